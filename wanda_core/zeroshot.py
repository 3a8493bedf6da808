"""Zero-shot accuracy with lm-eval 0.4, on the model in memory (pruned weights applied, no checkpoint)."""
from __future__ import annotations

import logging
import math
from pathlib import Path

from .errors import WandaError, first_line

log = logging.getLogger("wanda_core")

# The seven tasks of the Wanda paper's zero-shot table.
PAPER_TASKS = ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise WandaError("zero-shot evaluation needs lm-eval: pip install 'lm-eval==0.4.*'") from None
    return lm_eval, TaskManager


def check_task_names(tasks: list[str], include_path=None):
    """The lm-eval TaskManager, after checking that every task name is known to it."""
    _, TaskManager = _lm_eval()
    if include_path and not Path(include_path).is_dir():
        raise WandaError(f"zero-shot task folder not found: {include_path}")
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known:
            raise WandaError(f"unknown zero-shot task {task!r}" + (f" (searched lm-eval's tasks and {include_path})" if include_path else ""))
    return manager


def load_tasks(tasks: list[str], include_path=None) -> dict:
    """Resolve task names and load their data: fails with a clear message before any model is loaded."""
    manager = check_task_names(tasks, include_path)
    try:
        return {"manager": manager, "tasks": manager.load(list(tasks))["tasks"]}
    except Exception as e:
        raise WandaError(f"cannot load the data of task(s) {', '.join(tasks)}: {first_line(e)}") from None


def evaluate(model, tokenizer, loaded: dict, limit=None, batch_size: int = 1, seed: int = 0, cache=None) -> list[dict]:
    """Rows of (task, metric, value, stderr, n) for every task of `loaded` (from load_tasks), 0-shot.

    cache: path of lm-eval's request cache (sqlite); it is keyed by request only, so it must be
    one file per pruned model.
    """
    lm_eval, _ = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=list(loaded["tasks"].values()), num_fewshot=0, limit=limit, task_manager=loaded["manager"],
        use_cache=str(cache) if cache else None, log_samples=False, bootstrap_iters=1000,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
    )
    rows = []
    for task, metrics in results["results"].items():
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        for key, value in metrics.items():
            metric, _, _filter = key.partition(",")
            if metric in ("acc", "acc_norm") and isinstance(value, (int, float)):
                stderr = metrics.get(f"{metric}_stderr,{_filter}")
                rows.append({"task": task, "metric": metric, "value": float(value),
                             "stderr": float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None,
                             "n": n, "limit": limit, "num_fewshot": 0, "lm_eval": lm_eval.__version__})
    if not rows:
        raise WandaError(f"lm-eval reported no acc metric for {', '.join(loaded['tasks'])}")
    return rows
