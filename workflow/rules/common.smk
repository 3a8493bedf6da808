import json
import os
import shlex
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
    return f"--method {spec['method']} --pattern {pattern} --sparsity {sparsity} {params}"


def ppl_results():
    return [
        f"results/ppl/{model}/{method}/{pattern}/{dataset}{suffix}.parquet"
        for model, method, pattern, suffix in RUNS_AND_FINETUNED
        for dataset in config["evals"]["perplexity"]["datasets"]
    ]


def prune_reports():
    return [f"results/pruned/{m}/{meth}/{p}.json" for m, meth, p in RUNS if not is_dense(meth)]


def zeroshot_results():
    return [
        f"results/zeroshot/{model}/{method}/{pattern}/{task}{suffix}.parquet"
        for model, method, pattern, suffix in RUNS_AND_FINETUNED
        for task in ZEROSHOT["tasks"]
    ]


# Recovery fine-tuning and progressive pruning (finetune.smk). Their evaluations are named like the
# pruned model's, with "+<recipe>" or "+<schedule>" after the data set or task.
FINETUNE = config["finetune"]
RUNS_AND_FINETUNED = (
    [(*run, "") for run in RUNS]
    + [(model, method, pattern, f"+{recipe}") for model, method, pattern, recipe in grid.finetune_runs(config)]
    + [(model, method, pattern, f"+{name}") for model, method, pattern, name in grid.progressive_runs(config)]
)


wildcard_constraints:
    recipe="|".join(FINETUNE["recipes"]) or "NONE",
    schedule="|".join(FINETUNE["progressive"]) or "NONE",
    chain=r"[0-9]+-[0-9a-f]{8}(/[0-9]+-[0-9a-f]{8})*",


def recipe_args(recipe):
    options = " ".join(f"--param {shlex.quote(f'{k}={json.dumps(v)}')}" for k, v in recipe.items() if k != "kind")
    return f"--kind {recipe['kind']} {options}"


def finetune_dtype(wildcards, recipe):
    # Masked fine-tuning trains the weights: float32. A LoRA adapter trains in float32 beside a frozen
    # base, which may stay in the model's own dtype.
    return "float32" if recipe["kind"] == "masked" else model_spec(wildcards)["dtype"]


def finetune_inputs(wildcards):
    dataset = FINETUNE["recipes"][wildcards.recipe]["dataset"]
    inputs = {"model": f"resources/models/{wildcards.model}", "data": f"resources/data/{dataset}.jsonl"}
    if not is_dense(wildcards.method):
        inputs["pruned"] = f"results/pruned/{wildcards.model}/{wildcards.method}/{wildcards.pattern}.safetensors"
    return inputs


def finetuned_eval_inputs(wildcards):
    f = f"results/finetuned/{wildcards.model}/{wildcards.method}/{wildcards.pattern}/{wildcards.recipe}"
    return {**eval_inputs(wildcards), "finetuned": f}


def finetuned_eval_args(wildcards, input):
    pruned = f"--pruned {input.pruned} " if "pruned" in input.keys() else ""
    return f"{pruned}--finetuned {input.finetuned}"


def progressive_prune_inputs(wildcards):
    step = grid.chain_step(config, wildcards.chain)
    inputs = {"model": f"resources/models/{wildcards.model}"}
    if needs_calibration(step["method"]):
        inputs["calibration"] = f"results/calibration/{wildcards.model}/{CALIBRATION_ID}.safetensors"
    if "/" in wildcards.chain:  # every step after the first starts from the one before, fine-tuned
        previous = f"results/progressive/{wildcards.model}/{wildcards.chain.rsplit('/', 1)[0]}"
        inputs["start_pruned"] = f"{previous}/pruned.safetensors"
        inputs["start_finetuned"] = f"{previous}/finetuned"
    return inputs


def progressive_prune_args(wildcards, input):
    step = grid.chain_step(config, wildcards.chain)
    pattern, sparsity = grid.pattern_args(step["pattern"])
    params = " ".join(f"--param {shlex.quote(f'{k}={json.dumps(v)}')}" for k, v in step["params"].items())
    args = f"--method {config['methods'][step['method']]['method']} --pattern {pattern} --sparsity {sparsity} {params}"
    for key in ("calibration", "start_pruned", "start_finetuned"):
        if key in input.keys():
            args += f" --{key.replace('_', '-')} {input[key]}"
    return args


def progressive_finetune_data(wildcards):
    recipe = grid.chain_step(config, wildcards.chain)["recipe_name"]
    return f"resources/data/{FINETUNE['recipes'][recipe]['dataset']}.jsonl"


def progressive_eval_inputs(wildcards):
    final = f"results/progressive/{wildcards.model}/{grid.progressive_steps(config, wildcards.schedule)[-1]['chain']}"
    return {**eval_inputs(wildcards), "pruned": f"{final}/pruned.safetensors", "finetuned": f"{final}/finetuned"}
