import json
import os
import sys

from snakemake.utils import validate

from wanda_core import grid
from wanda_core.errors import WandaError

try:
    for path in workflow.configfiles:
        grid.check_duplicate_keys(path)
except WandaError as e:
    raise ValueError(str(e)) from None
validate(config, "../schemas/config.schema.yaml")
try:
    grid.check_config(config)
    if workflow.is_main_process:  # a job (SLURM, containers) re-reads the workflow; its command checks its task
        grid.check_tasks(config, workflow.basedir)
except WandaError as e:
    raise ValueError(str(e)) from None

# Jobs find `wanda-core` beside the Python that runs Snakemake, so a venv need not be activated
# (with --use-conda the rule's environment comes first on PATH).
envvars:
    "PATH",


search_path = os.environ["PATH"]
os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), search_path])
RUNS = grid.runs(config)
# Relative to the repository, so that a run in another --directory finds it too.
PUBLISHED = [os.path.join(workflow.basedir, config["published"])] if config["published"] else []
CALIBRATION_ID = grid.calibration_id(config)


ZEROSHOT = config["evals"]["zeroshot"]
TASK_DIR = ZEROSHOT["include_path"] and os.path.join(workflow.basedir, ZEROSHOT["include_path"])


wildcard_constraints:
    model="|".join(config["models"]),
    method="|".join(config["methods"]),
    pattern=r"none|unstructured-[0-9.]+|[0-9]+-[0-9]+",
    dataset="|".join(config["datasets"]) or "NONE",
    task="|".join(ZEROSHOT["tasks"]) or "NONE",


def model_spec(wildcards):
    return config["models"][wildcards.model]


def model_flags(wildcards, blocks=True):
    spec = model_spec(wildcards)
    flags = "--trust-remote-code" if spec["trust_remote_code"] else ""
    return f"{flags} --blocks {spec['blocks']}" if blocks and spec["blocks"] else flags


def method_spec(wildcards):
    return config["methods"][wildcards.method]


def needs_calibration(method):
    from wanda_core.methods import get_method, needs_calibration

    spec = config["methods"][method]
    return needs_calibration(get_method(spec["method"]), spec.get("params"))


def is_dense(method):
    return config["methods"][method]["method"] == "dense"


def gpus(wildcards):
    return model_spec(wildcards)["gpus"]


def threads_for(wildcards):
    # CPU-only models use every core; GPU jobs need a few for data handling.
    return 4 if gpus(wildcards) else workflow.cores


def prune_inputs(wildcards):
    inputs = {"model": f"resources/models/{wildcards.model}"}
    if needs_calibration(wildcards.method):
        inputs["calibration"] = f"results/calibration/{wildcards.model}/{CALIBRATION_ID}.safetensors"
    return inputs


def eval_inputs(wildcards):
    inputs = {"model": f"resources/models/{wildcards.model}"}
    if "dataset" in wildcards.keys():
        inputs["data"] = f"resources/data/{wildcards.dataset}.jsonl"
    if not is_dense(wildcards.method):
        inputs["pruned"] = f"results/pruned/{wildcards.model}/{wildcards.method}/{wildcards.pattern}.safetensors"
    return inputs


def prune_args(wildcards):
    pattern, sparsity = grid.pattern_args(wildcards.pattern)
    spec = method_spec(wildcards)
    params = " ".join(f"--param {k}={json.dumps(v)}" for k, v in spec.get("params", {}).items())
    pipeline = spec.get("pipeline") or config["pruning"]["pipeline"]
    dtype = config["pruning"]["compute_dtype"]
    return (f"--method {spec['method']} --pattern {pattern} --sparsity {sparsity} {params} --pipeline {pipeline}"
            + (f" --compute-dtype {dtype}" if dtype else ""))


def pruned_weights(path):
    # pruning.keep_pruned: false deletes each pruned file once its evaluations are done (rerun: prune again).
    return path if config["pruning"]["keep_pruned"] else temp(path)


def ppl_results():
    return [
        f"results/ppl/{model}/{method}/{pattern}/{dataset}.parquet"
        for model, method, pattern in RUNS
        for dataset in config["evals"]["perplexity"]["datasets"]
    ]


def prune_reports():
    return [f"results/pruned/{m}/{meth}/{p}.json" for m, meth, p in RUNS if not is_dense(meth)]


def zeroshot_results():
    return [
        f"results/zeroshot/{model}/{method}/{pattern}/{task}.parquet"
        for model, method, pattern in RUNS
        for task in ZEROSHOT["tasks"]
    ]
