"""The benchmark grid of the workflow: pattern labels, method x pattern expansion, result paths.

Kept in the library (not in the Snakefile) so that it is tested like the rest of the code.
"""
from __future__ import annotations

import re

from .errors import WandaError
from .masks import parse_pattern
from .methods import check_params, get_method

# Methods whose structure is fixed by their own options: they run once, under the label "none".
OWN_PATTERN = ("dense", "three_tier", "hybrid_nm")


def pattern_args(label: str) -> tuple[str, float]:
    """A file-name-safe pattern label -> (pattern, sparsity) for wanda_core.prune.

    'unstructured-0.5' -> ('unstructured', 0.5); '2-4' -> ('2:4', 0.5); 'none' -> ('unstructured', 0.0).
    """
    if label == "none":
        return "unstructured", 0.0
    m = re.fullmatch(r"unstructured-([0-9.]+)", label)
    if m:
        return "unstructured", float(m.group(1))
    m = re.fullmatch(r"(\d+)-(\d+)", label)
    if m:
        n, mm = int(m.group(1)), int(m.group(2))
        return f"{n}:{mm}", 1 - n / mm
    raise WandaError(f"unknown pattern label {label!r}: use 'unstructured-<sparsity>' (e.g. unstructured-0.5) or '<N>-<M>' (e.g. 2-4)")


def pattern_title(label: str) -> str:
    if label == "none":
        return "own structure"
    pattern, sparsity = pattern_args(label)
    return f"unstructured {sparsity:.0%}" if pattern == "unstructured" else pattern


def method_patterns(config: dict, name: str) -> list[str]:
    spec = config["methods"][name]
    if spec["method"] in OWN_PATTERN:
        return ["none"]
    return list(spec.get("patterns") or config["patterns"])


def check_config(config: dict) -> None:
    """What the JSON schema cannot say: known methods and options, valid patterns, known data sets."""
    datasets = config.get("datasets", {})
    for name, spec in config["methods"].items():
        try:
            method = get_method(spec["method"])
            for label in method_patterns(config, name):
                pattern, sparsity = pattern_args(label)
                check_params(method, parse_pattern(pattern, None if ":" in pattern else sparsity), dict(spec.get("params", {})))
        except WandaError as e:
            raise WandaError(f"config methods.{name}: {e}") from None
    check_unique_labels(config)
    calib = config["calibration"]["dataset"]
    if calib not in datasets:
        raise WandaError(f"config calibration.dataset: {calib!r} is not in datasets ({', '.join(datasets) or 'none'})")
    for ds in config["evals"]["perplexity"]["datasets"]:
        if ds not in datasets:
            raise WandaError(f"config evals.perplexity.datasets: {ds!r} is not in datasets ({', '.join(datasets) or 'none'})")
    check_finetune(config)


def check_unique_labels(config: dict) -> None:
    """Tables have one row per model label and one column per method label: two alike would merge."""
    for section in ("models", "methods"):
        seen = {}
        for name, spec in config[section].items():
            label = spec.get("label", name)
            if label in seen:
                raise WandaError(f"config {section}: {seen[label]!r} and {name!r} have the same label {label!r}")
            seen[label] = name


def check_duplicate_keys(path) -> None:
    """YAML keeps the last of two equal keys without a word: two models of one name would lose one."""
    from pathlib import Path

    import yaml

    class Strict(yaml.SafeLoader):
        pass

    def mapping(loader, node):
        seen = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise WandaError(f"config file {path}, line {line}: duplicate key {key!r} (first on line {seen[key]})")
            seen[key] = line
        return loader.construct_mapping(node)

    Strict.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    try:
        yaml.load(Path(path).read_text(), Loader=Strict)
    except yaml.YAMLError as e:
        raise WandaError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None


def check_tasks(config: dict, basedir: str = ".") -> None:
    zs = config["evals"].get("zeroshot") or {}
    if zs.get("tasks"):
        from pathlib import Path

        from .zeroshot import check_task_names

        include = zs.get("include_path") and Path(basedir) / zs["include_path"]
        try:
            check_task_names(zs["tasks"], include)
        except WandaError as e:
            raise WandaError(f"config evals.zeroshot: {e}") from None


def runs(config: dict) -> list[tuple[str, str, str]]:
    """Every (model, method, pattern label) of the grid."""
    return [(model, method, label) for model in config["models"] for method in config["methods"]
            for label in method_patterns(config, method)]


def calibration_id(config: dict) -> str:
    c = config["calibration"]
    return f"{c['dataset']}_n{c['nsamples']}_len{c['seqlen']}_seed{c['seed']}"


# ---------------------------------------------------------------------------------------------
# recovery fine-tuning and progressive pruning (config section `finetune`, wanda_core.finetune)


def _finetune(config: dict) -> dict:
    ft = config.get("finetune") or {}
    return {"recipes": ft.get("recipes") or {}, "runs": ft.get("runs") or [], "progressive": ft.get("progressive") or {}}


def recipe(config: dict, name: str, steps: int | None = None) -> dict:
    """A recipe of the config as wanda_core.finetune takes it (defaults filled, workflow keys dropped)."""
    from .finetune import check_recipe

    spec = dict(_finetune(config)["recipes"][name])
    if steps is not None:
        spec["steps"] = steps
    return check_recipe(spec)


def finetune_runs(config: dict) -> list[tuple[str, str, str, str]]:
    """Every (model, method, pattern label, recipe) that gets fine-tuned after pruning."""
    out = []
    for run in _finetune(config)["runs"]:
        for model, method, label in runs(config):
            if all(not run.get(key) or value in run[key] for key, value in
                   (("models", model), ("methods", method), ("patterns", label))):
                out.append((model, method, label, run["recipe"]))
    return list(dict.fromkeys(out))


def progressive_steps(config: dict, name: str) -> list[dict]:
    """The steps of a progressive schedule, resolved: pattern label, the method's options with the
    step's on top, the recipe after the step; `chain` names the step's cached folder: one segment
    per step so far, each a hash of what that step does, so schedules that begin alike share them."""
    import hashlib
    import json

    from .methods import get_method

    spec = _finetune(config)["progressive"][name]
    method = config["methods"][spec["method"]]
    kind = get_method(method["method"])
    chain, out = [], []
    for i, step in enumerate(spec["steps"], 1):
        params = {**method.get("params", {}), **step.get("params", {})}
        if "progressive" in kind.PARAMS:
            params["progressive"] = True  # blocks never move to a denser tier (three_tier)
        own = method_patterns(config, spec["method"])
        pattern = step.get("pattern") or (own[0] if len(own) == 1 else None)
        if pattern is None:
            raise WandaError(f"config finetune.progressive.{name}.steps[{i - 1}]: give a pattern ({spec['method']} runs {', '.join(own)})")
        recipe_name = step.get("recipe") or spec["recipe"]
        resolved = recipe(config, recipe_name, step.get("steps"))
        what = {"method": method["method"], "pattern": pattern, "params": params, "recipe": resolved,
                "dataset": config["datasets"][_finetune(config)["recipes"][recipe_name]["dataset"]],
                "calibration": calibration_id(config) if kind.STATS else None}
        chain.append(f"{i}-{hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:8]}")
        out.append({"method": spec["method"], "pattern": pattern, "params": params, "recipe_name": recipe_name,
                    "recipe": resolved, "chain": "/".join(chain)})
    return out


def progressive_runs(config: dict) -> list[tuple[str, str, str, str]]:
    """Every (model, method, final pattern label, schedule) of the progressive schedules."""
    out = []
    for name, spec in _finetune(config)["progressive"].items():
        final = progressive_steps(config, name)[-1]
        for model in spec.get("models") or config["models"]:
            out.append((model, spec["method"], final["pattern"], name))
    return out


def chain_step(config: dict, chain: str) -> dict:
    """The step whose cached folder is `chain`."""
    for name in _finetune(config)["progressive"]:
        for step in progressive_steps(config, name):
            if step["chain"] == chain:
                return step
    raise WandaError(f"no progressive step is cached under {chain!r}")


def check_finetune(config: dict) -> None:
    """The finetune section: known recipes, data sets, methods and patterns; schedules that end at
    their method's own structure; recipe and schedule names apart (they name result files)."""
    ft = _finetune(config)
    datasets = config.get("datasets", {})
    for name, spec in ft["recipes"].items():
        try:
            recipe(config, name)
        except WandaError as e:
            raise WandaError(f"config finetune.recipes.{name}: {e}") from None
        if spec["dataset"] not in datasets:
            raise WandaError(f"config finetune.recipes.{name}.dataset: {spec['dataset']!r} is not in datasets ({', '.join(datasets) or 'none'})")
    for i, run in enumerate(ft["runs"]):
        where = f"config finetune.runs[{i}]"
        if run["recipe"] not in ft["recipes"]:
            raise WandaError(f"{where}.recipe: {run['recipe']!r} is not in finetune.recipes ({', '.join(ft['recipes']) or 'none'})")
        for key, known in (("models", config["models"]), ("methods", config["methods"])):
            for value in run.get(key) or []:
                if value not in known:
                    raise WandaError(f"{where}.{key}: {value!r} is not in {key} ({', '.join(known)})")
        if not [r for r in finetune_runs({**config, "finetune": {**ft, "runs": [run]}})]:
            raise WandaError(f"{where}: selects no pruned model (check its models, methods and patterns)")
    for name, spec in ft["progressive"].items():
        where = f"config finetune.progressive.{name}"
        if name in ft["recipes"]:
            raise WandaError(f"{where}: the name is also a recipe's; result files are named by both")
        if spec["method"] not in config["methods"]:
            raise WandaError(f"{where}.method: {spec['method']!r} is not in methods ({', '.join(config['methods'])})")
        for j, step in enumerate(spec["steps"]):
            r = step.get("recipe") or spec.get("recipe")
            if r not in ft["recipes"]:
                raise WandaError(f"{where}.steps[{j}]: recipe {r!r} is not in finetune.recipes ({', '.join(ft['recipes']) or 'none'})")
        for model in spec.get("models") or []:
            if model not in config["models"]:
                raise WandaError(f"{where}.models: {model!r} is not in models ({', '.join(config['models'])})")
        if not spec["steps"]:
            raise WandaError(f"{where}.steps: a schedule needs at least one step")
        method = config["methods"][spec["method"]]
        kind = get_method(method["method"])
        steps = progressive_steps(config, name)
        for j, step in enumerate(steps):
            try:
                p, sparsity = pattern_args(step["pattern"])
                check_params(kind, parse_pattern(p, None if ":" in p else sparsity), dict(step["params"]))
            except WandaError as e:
                raise WandaError(f"{where}.steps[{j}]: {e}") from None
        target = {**kind.PARAMS, **method.get("params", {})}
        final = {k: v for k, v in {**kind.PARAMS, **steps[-1]["params"]}.items() if k != "progressive"}
        if {k: v for k, v in target.items() if k != "progressive"} != final or steps[-1]["pattern"] not in method_patterns(config, spec["method"]):
            raise WandaError(f"{where}: the last step must reach the method's own structure "
                             f"({spec['method']}: {pattern_title(method_patterns(config, spec['method'])[-1])}, options {method.get('params', {})})")
