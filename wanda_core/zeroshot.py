"""Zero-shot accuracy with lm-eval 0.4, on the model in memory (pruned weights applied, no checkpoint)."""
from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path

from .errors import WandaError, first_line
from .io import write_json

log = logging.getLogger("wanda_core")


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise WandaError("zero-shot evaluation needs lm-eval: pip install 'lm-eval==0.4.*'") from None
    return lm_eval, TaskManager


def _task_index_cache(include_path) -> Path:
    """Where the task names of this lm-eval version (+ include folder) are cached; found without importing lm-eval.

    Keyed by what defines the names, not by where they are: lm-eval's version, and the include folder's task
    files (*.yaml, *.yml, *.py: names and contents), so a copied or moved checkout finds the same entry.
    """
    import hashlib
    import importlib.metadata
    import importlib.util

    from .model import cache_dir

    if importlib.util.find_spec("lm_eval") is None:
        _lm_eval()  # raises the install hint
    key = hashlib.sha256(importlib.metadata.version("lm_eval").encode())
    if include_path:
        root = Path(include_path)
        for f in sorted(p for p in root.rglob("*") if p.suffix in (".yaml", ".yml", ".py") and p.is_file()):
            key.update(f"\0{f.relative_to(root).as_posix()}\0".encode())
            key.update(f.read_bytes())
    return cache_dir() / f"lm_eval_tasks-{key.hexdigest()[:16]}.json"


def _check_folder(include_path) -> None:
    if include_path and not Path(include_path).is_dir():
        raise WandaError(f"zero-shot task folder not found: {include_path}")


def _task_manager(include_path, include_defaults: bool = True):
    _, TaskManager = _lm_eval()
    _check_folder(include_path)
    return TaskManager(include_path=str(include_path) if include_path else None, include_defaults=include_defaults)


def _check_known(tasks: list[str], known, include_path) -> None:
    for task in tasks:
        if task not in known:
            raise WandaError(f"unknown zero-shot task {task!r}" + (f" (searched lm-eval's tasks and {include_path})" if include_path else ""))


def check_task_names(tasks: list[str], include_path=None) -> None:
    """Stops with a clear message if lm-eval (plus include_path) does not know every task name.

    lm-eval indexes its ~15,000 task files in about 8 s, which every `snakemake` start would pay, so
    the known names are cached per lm-eval install and include folder. The cache only ever says
    "known": a name it lacks makes a fresh index before the answer is no.
    """
    _check_folder(include_path)
    cache = _task_index_cache(include_path)
    with contextlib.suppress(OSError, ValueError, TypeError):
        if set(tasks) <= set(json.loads(cache.read_text())):
            return
    known = set(_task_manager(include_path).all_tasks)
    with contextlib.suppress(OSError):
        write_json(sorted(known), cache)
    _check_known(tasks, known, include_path)


def load_tasks(tasks: list[str], include_path=None) -> dict:
    """Resolve task names and load their data: fails with a clear message before any model is loaded.

    Tasks that the include folder alone defines are loaded without indexing lm-eval's own (8 s a job).
    """
    if include_path:
        local = _task_manager(include_path, include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            with contextlib.suppress(Exception):  # e.g. a group naming lm-eval's tasks: the full index below
                return {"manager": local, "tasks": local.load(list(tasks))["tasks"]}
    manager = _task_manager(include_path)
    _check_known(tasks, set(manager.all_tasks), include_path)
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
    versions = results.get("versions") or {}  # each task's version, as lm-eval reports it (the paper's were 0, BoolQ 1)
    for task, metrics in results["results"].items():
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        version = versions.get(task)
        for key, value in metrics.items():
            metric, _, _filter = key.partition(",")
            if metric in ("acc", "acc_norm") and isinstance(value, (int, float)):
                stderr = metrics.get(f"{metric}_stderr,{_filter}")
                rows.append({"task": task, "metric": metric, "value": float(value),
                             "stderr": float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None,
                             "n": n, "limit": limit, "num_fewshot": 0, "lm_eval": lm_eval.__version__,
                             "task_version": None if version is None else str(version)})
    if not rows:
        raise WandaError(f"lm-eval reported no acc metric for {', '.join(loaded['tasks'])}")
    return rows
