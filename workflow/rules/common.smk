import hashlib
import json
import os
import re
import shlex
import sys

import jsonschema
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from wanda_core import commands, grid
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
        grid.check_sources(config)  # before Snakemake removes a model directory to make it again
except WandaError as e:
    raise ValueError(str(e)) from None

# Jobs find `wanda-core` beside the Python that runs Snakemake, so a venv need not be activated
# (with --use-conda the rule's environment comes first on PATH).
envvars:
    "PATH",


search_path = os.environ["PATH"]
os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), search_path])
# A model's `dtype: auto` becomes what this machine computes natively (bfloat16 on avx512_bf16/AMX CPUs, else
# float32), so that no job runs in emulated bfloat16; GPU jobs resolve it themselves (grid.model_dtype).
for _model in config["models"]:
    config["models"][_model]["dtype"] = grid.model_dtype(config, _model)
RUNS = grid.runs(config)
# Found relative to the repository (a run in another --directory finds it too), but named relative to the
# working directory: an absolute path in a job's inputs or params reruns it when the checkout moves.
PUBLISHED = [os.path.relpath(os.path.join(workflow.basedir, config["published"]))] if config["published"] else []
# (model, calibration file name) -> its seed: one calibration (and one pruned model) per seed. The name holds the
# model's own sequence length (grid.seqlen: a number, or its max_position_embeddings with seqlen: model).
CALIBRATION_SEEDS = {(m, grid.calibration_id(config, seed, m)): seed for m in config["models"] for seed in grid.seeds(config)}
# What the tables are made with (labels, groups, published figures), short enough for `snakemake -n`'s reasons.
CONFIG_HASH = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


ZEROSHOT = config["evals"]["zeroshot"]
TASK_DIR = ZEROSHOT["include_path"] and os.path.relpath(os.path.join(workflow.basedir, ZEROSHOT["include_path"]))


wildcard_constraints:
    model="|".join(config["models"]),
    method="|".join(map(re.escape, config["methods"])),  # a name may hold dots (mypkg.my_method)
    pattern=r"none|unstructured-[0-9.]+|[0-9]+-[0-9]+|" + "|".join(re.escape(grid.MATCH + m) for m in config["methods"]),
    seed=rf"seed[0-9]+|{grid.NO_SEED}",
    dataset="|".join(config["datasets"]) or "NONE",
    task="|".join(ZEROSHOT["tasks"]) or "NONE",


def model_spec(wildcards):
    return config["models"][wildcards.model]


def model_flags(wildcards, blocks=True):
    return shlex.join(commands.model_args(config, wildcards.model, blocks))


def method_spec(wildcards):
    return config["methods"][wildcards.method]


def is_dense(method):
    return config["methods"][method]["method"] == "dense"


def gpus(wildcards):
    return model_spec(wildcards)["gpus"]


def threads_for(wildcards):
    # The model's `threads`, else every core for a CPU model (one job at a time: memory) and a few for a GPU
    # job's data handling. The rules pass it as --max-threads: a job started while cores are busy takes
    # fewer, as a torch pool larger than the idle cores stalls at every op (bench/bench_threads.py).
    return model_spec(wildcards)["threads"] or (4 if gpus(wildcards) else workflow.cores)


def run_of(wildcards):
    return grid.Run(wildcards.model, wildcards.method, wildcards.pattern, wildcards.seed)


def prune_inputs(wildcards):
    inputs = {"model": f"resources/models/{wildcards.model}"}
    seed = grid.seed_number(wildcards.seed)
    if seed is not None:
        inputs["calibration"] = f"results/calibration/{wildcards.model}/{grid.calibration_id(config, seed, wildcards.model)}.safetensors"
    if wildcards.pattern.startswith(grid.MATCH):
        inputs["match"] = grid.match_report(config, run_of(wildcards))
    return inputs


def eval_inputs(wildcards):
    inputs = {"model": f"resources/models/{wildcards.model}"}
    if "dataset" in wildcards.keys():
        inputs["data"] = f"resources/data/{wildcards.dataset}.jsonl"
    if not is_dense(wildcards.method):
        inputs["pruned"] = f"results/pruned/{run_of(wildcards).path}.safetensors"
    return inputs


# A job's options come from wanda_core.commands (one builder per stage, quoted with shlex.join); the
# rules' shell lines name only the files every job of the rule has.
def prune_args(wildcards, input):
    return commands.prune_args(config, wildcards.model, wildcards.method, wildcards.pattern, dict(input.items()))


def pruned_weights(path):
    # pruning.keep_pruned: false deletes each pruned file once its evaluations are done (rerun: prune again).
    return path if config["pruning"]["keep_pruned"] else temp(path)


def ppl_results():
    return [
        f"results/ppl/{run.path}/{dataset}{suffix}.parquet"
        for run, suffix in RUNS_AND_FINETUNED
        for dataset in config["evals"]["perplexity"]["datasets"]
    ]


def prune_reports():
    return [f"results/pruned/{run.path}.json" for run in RUNS if not is_dense(run.method)]


def prune_layers():
    return [f"results/pruned/{run.path}.layers.parquet" for run in RUNS if not is_dense(run.method)]


def zeroshot_results():
    return [f"results/zeroshot/{run.path}/{task}{suffix}.parquet" for run, suffix in RUNS_AND_FINETUNED for task in ZEROSHOT["tasks"]]


def aggregate_outputs():
    """Only what the config can fill: zero-shot tables need tasks, the comparison with published figures
    needs some for this grid, the per-layer plot a pruned model."""
    from wanda_core.tables import published_for_grid

    out = {"benchmark": "results/benchmark.parquet"}
    if config["evals"]["perplexity"]["datasets"]:
        out.update(
            table="results/tables/perplexity.md",
            csv="results/tables/perplexity.csv",
            html=report("results/tables/perplexity.html", caption="../report/perplexity_table.rst", category="Tables"),
            plot=report("results/plots/perplexity.png", caption="../report/perplexity.rst", category="Plots"),
        )
    if ZEROSHOT["tasks"]:
        out.update(
            zeroshot_table="results/tables/zeroshot.md",
            zeroshot_csv="results/tables/zeroshot.csv",
            zeroshot_html=report("results/tables/zeroshot.html", caption="../report/zeroshot_table.rst", category="Tables"),
        )
    if PUBLISHED and len(published_for_grid(PUBLISHED[0], config)):
        out.update(
            published_table="results/tables/published.md",
            published_csv="results/tables/published.csv",
            published_html=report("results/tables/published.html", caption="../report/published.rst", category="Tables"),
        )
    if prune_layers():
        out["layer_plot"] = report("results/plots/layer_sparsity.png", caption="../report/layer_sparsity.rst", category="Plots")
        # What each pruned cell cost (wanda_core.cost), from the jobs' benchmark files and the prune reports.
        out.update(
            cost_table="results/tables/cost.md",
            cost_csv="results/tables/cost.csv",
            cost_html=report("results/tables/cost.html", caption="../report/cost_table.rst", category="Tables"),
        )
        if config["evals"]["perplexity"]["datasets"]:
            out["cost_plot"] = report("results/plots/quality_vs_cost.png", caption="../report/quality_vs_cost.rst", category="Plots")
    return out


# Recovery fine-tuning and progressive pruning (finetune.smk). Their evaluations are named like the
# pruned model's, with "+<recipe>" or "+<schedule>" after the data set or task.
FINETUNE = config["finetune"]
RUNS_AND_FINETUNED = (
    [(run, "") for run in RUNS]
    + [(run, f"+{recipe}") for run, recipe in grid.finetune_runs(config)]
    + [(run, f"+{name}") for run, name in grid.progressive_runs(config)]
)


wildcard_constraints:
    recipe="|".join(FINETUNE["recipes"]) or "NONE",
    schedule="|".join(FINETUNE["progressive"]) or "NONE",
    chain=r"[0-9]+-[0-9a-f]{8}(/[0-9]+-[0-9a-f]{8})*",


def finetune_args(wildcards, input):
    return commands.finetune_args(config, wildcards.model, grid.recipe(config, wildcards.recipe), input.get("pruned"))


def finetune_inputs(wildcards):
    dataset = FINETUNE["recipes"][wildcards.recipe]["dataset"]
    inputs = {"model": f"resources/models/{wildcards.model}", "data": f"resources/data/{dataset}.jsonl"}
    if not is_dense(wildcards.method):
        inputs["pruned"] = f"results/pruned/{run_of(wildcards).path}.safetensors"
    return inputs


def finetuned_eval_inputs(wildcards):
    f = f"results/finetuned/{run_of(wildcards).path}/{wildcards.recipe}"
    return {**eval_inputs(wildcards), "finetuned": f}


def finetuned_eval_args(wildcards, input):
    pruned = f"--pruned {input.pruned} " if "pruned" in input.keys() else ""
    return f"{pruned}--finetuned {input.finetuned}"


def progressive_prune_inputs(wildcards):
    step = grid.chain_step(config, wildcards.chain)
    inputs = {"model": f"resources/models/{wildcards.model}"}
    if grid.needs_calibration(config, step["method"]):
        seed = grid.seeds(config)[0]  # a schedule calibrates with the first seed
        inputs["calibration"] = f"results/calibration/{wildcards.model}/{grid.calibration_id(config, seed, wildcards.model)}.safetensors"
    if "/" in wildcards.chain:  # every step after the first starts from the one before, fine-tuned
        previous = f"results/progressive/{wildcards.model}/{wildcards.chain.rsplit('/', 1)[0]}"
        inputs["start_pruned"] = f"{previous}/pruned.safetensors"
        inputs["start_finetuned"] = f"{previous}/finetuned"
    return inputs


def progressive_prune_args(wildcards, input):
    return commands.progressive_prune_args(config, wildcards.model, wildcards.chain, dict(input.items()))


def progressive_finetune_args(wildcards, input):
    recipe = grid.chain_step(config, wildcards.chain)["recipe"]
    return commands.finetune_args(config, wildcards.model, recipe, input.pruned)


def progressive_finetune_data(wildcards):
    recipe = grid.chain_step(config, wildcards.chain)["recipe_name"]
    return f"resources/data/{FINETUNE['recipes'][recipe]['dataset']}.jsonl"


def progressive_eval_inputs(wildcards):
    final = f"results/progressive/{wildcards.model}/{grid.progressive_steps(config, wildcards.schedule)[-1]['chain']}"
    return {**eval_inputs(wildcards), "pruned": f"{final}/pruned.safetensors", "finetuned": f"{final}/finetuned"}
