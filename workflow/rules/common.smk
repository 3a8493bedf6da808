import json
import os
import sys

import jsonschema
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from wanda_core import grid
from wanda_core.errors import WandaError

try:
    for path in workflow.configfiles:
        grid.check_duplicate_keys(path)
except WandaError as e:
    raise ValueError(str(e)) from None
try:
    validate(config, "../schemas/config.schema.yaml")
except WorkflowError as e:
    # Snakemake's message dumps the whole schema; say which key, what was given and what is accepted.
    cause = e.__cause__ or e.__context__  # validate() raises it while handling jsonschema's error
    if not isinstance(cause, jsonschema.ValidationError):
        raise
    raise ValueError(grid.schema_error(cause)) from None
try:
    # Data files are checked where the workflow starts, not in jobs that re-read it (SLURM).
    grid.check_config(config, files=workflow.is_main_process)
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


def method_spec(wildcards):
    return config["methods"][wildcards.method]


def needs_calibration(method):
    from wanda_core.methods import get_method

    return get_method(config["methods"][method]["method"]).STATS is not None


def is_dense(method):
    return config["methods"][method]["method"] == "dense"


def gpus(wildcards):
    return model_spec(wildcards)["gpus"]


def threads_for(wildcards):
    # The model's `threads`, else every core for a CPU model (one job at a time: memory) and a few for a GPU
    # job's data handling. The rules pass it as --max-threads: a job started while cores are busy takes
    # fewer, as a torch pool larger than the idle cores stalls at every op (bench/bench_threads.py).
    return model_spec(wildcards)["threads"] or (4 if gpus(wildcards) else workflow.cores)


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
    return f"--method {spec['method']} --pattern {pattern} --sparsity {sparsity} {params}"


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
