"""The options of the workflow's `wanda-core` jobs, built from the config (one place per stage).

A rule's shell line names the files every job of it has (--model, --data, --out, the log) and takes the
rest from here: what the config says (method, pattern, options, pipeline, dtypes, device, batch size) and
the inputs only some jobs have (calibration windows, a matched baseline's report, a progressive step's
start). Each builder returns one string quoted with shlex.join, so a value with spaces or quotes (a JSON
list in --param) reaches the command whole.
"""
from __future__ import annotations

import json
import shlex

from . import grid

# A job's optional input files (by the name the rule gives them) -> the prune flag that takes them.
PRUNE_FILES = {"calibration": "--calibration", "match": "--sparsity-from",
               "start_pruned": "--start-pruned", "start_finetuned": "--start-finetuned"}


def model_args(config: dict, model: str, blocks: bool = True) -> list[str]:
    """How to load the model (every stage that loads it; calibrate loads only its tokenizer: blocks=False)."""
    spec = config["models"][model]
    args = ["--trust-remote-code"] if spec["trust_remote_code"] else []
    return args + (["--blocks", spec["blocks"]] if blocks and spec["blocks"] else [])


def param_args(params: dict) -> list[str]:
    """--param KEY=VALUE per option, the value as JSON (the CLI parses it back; a bare word stays a string)."""
    return [arg for key, value in params.items() for arg in ("--param", f"{key}={json.dumps(value)}")]


def prune_args(config: dict, model: str, method: str, pattern: str, files: dict, params: dict | None = None) -> str:
    """`wanda-core prune` options of one job: `method` names a config method, `pattern` is a pattern label
    (grid.pattern_args); `files` holds the job's optional inputs (PRUNE_FILES); `params` replaces the
    method's options (a progressive step's, its own on top of the method's)."""
    spec, model_spec = config["methods"][method], config["models"][model]
    pattern, sparsity = grid.pattern_args(pattern)
    args = model_args(config, model) + ["--method", spec["method"], "--pattern", pattern]
    if sparsity is not None:  # else a match- pattern: the sparsity comes from the report in files["match"]
        args += ["--sparsity", str(sparsity)]
    args += param_args(spec.get("params", {}) if params is None else params)
    args += ["--pipeline", spec.get("pipeline") or config["pruning"]["pipeline"]]
    if config["pruning"]["compute_dtype"]:
        args += ["--compute-dtype", config["pruning"]["compute_dtype"]]
    args += [arg for key, flag in PRUNE_FILES.items() if files.get(key) for arg in (flag, str(files[key]))]
    args += ["--dtype", model_spec["dtype"], "--device", config["device"], "--batch-size", str(model_spec["batch_size"])]
    return shlex.join(args)


def progressive_prune_args(config: dict, model: str, chain: str, files: dict) -> str:
    """`wanda-core prune` options of a progressive step (grid.chain_step): its method, pattern and options,
    with the pipeline and compute dtype every other prune of the method runs with."""
    step = grid.chain_step(config, chain)
    return prune_args(config, model, step["method"], step["pattern"], files, step["params"])


def finetune_args(config: dict, model: str, recipe: dict, pruned: str | None = None) -> str:
    """`wanda-core finetune` options of one job: `recipe` as grid.recipe resolves it, `pruned` the weights
    it starts from (None: the dense model)."""
    # Masked fine-tuning trains the weights: float32. A LoRA adapter trains in float32 beside a frozen
    # base, which may stay in the model's own dtype.
    dtype = "float32" if recipe["kind"] == "masked" else config["models"][model]["dtype"]
    args = model_args(config, model) + (["--pruned", str(pruned)] if pruned else [])
    args += ["--kind", recipe["kind"], *param_args({k: v for k, v in recipe.items() if k != "kind"})]
    return shlex.join(args + ["--dtype", dtype, "--device", config["device"]])
