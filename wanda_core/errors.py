class WandaError(ValueError):
    """Bad input (config, model, data, arguments): the message is the one line the user sees."""
