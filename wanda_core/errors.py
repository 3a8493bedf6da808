class WandaError(ValueError):
    """Bad input (config, model, data, arguments): the message is the one line the user sees."""


def first_line(e: BaseException) -> str:
    """The first line of an exception from another library, for a one-line error message."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
