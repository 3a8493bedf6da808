"""The benchmark grid of the workflow: pattern labels, method x pattern x seed expansion, result paths.

Kept in the library (not in the Snakefile) so that it is tested like the rest of the code.
"""
from __future__ import annotations

import re
from typing import NamedTuple

from .errors import WandaError
from .methods import METHODS, get_method
from .request import own_pattern, pattern_of, resolve

# Methods whose structure is fixed by their own options (OWN_PATTERN = True) run once, under the label "none".
# 'match-<method>': unstructured at the sparsity that <method> (one with its own structure) measured, read
# from its prune report when the job runs: the plain methods' baseline beside a hybrid pattern.
MATCH = "match-"
NO_SEED = "noseed"  # the seed label of runs that use no calibration (dense, magnitude)


def pattern_args(label: str) -> tuple[str, float | None]:
    """A file-name-safe pattern label -> (pattern, sparsity) for wanda_core.prune.

    'unstructured-0.5' -> ('unstructured', 0.5); '2-4' -> ('2:4', 0.5); 'none' -> ('unstructured', 0.0);
    'match-three_tier' -> ('unstructured', None): the sparsity comes from three_tier's prune report.
    """
    if label == "none":
        return "unstructured", 0.0
    if label.startswith(MATCH):
        return "unstructured", None
    m = re.fullmatch(r"unstructured-([0-9.]+)", label)
    if m:
        return "unstructured", float(m.group(1))
    m = re.fullmatch(r"(\d+)-(\d+)", label)
    if m:
        n, mm = int(m.group(1)), int(m.group(2))
        return f"{n}:{mm}", 1 - n / mm
    raise WandaError(f"unknown pattern label {label!r}: use 'unstructured-<sparsity>' (e.g. unstructured-0.5) or '<N>-<M>' (e.g. 2-4)")


def pattern_title(label: str, config: dict | None = None) -> str:
    if label == "none":
        return "own structure"
    if label.startswith(MATCH):
        source = label.removeprefix(MATCH)
        return f"{((config or {}).get('methods', {}).get(source) or {}).get('label', source)} sparsity"
    pattern, sparsity = pattern_args(label)
    return f"unstructured {sparsity:.0%}" if pattern == "unstructured" else pattern


def matched_sources(config: dict, name: str) -> list[str]:
    """The own-structure methods whose measured sparsity method `name` is also run at (their `matched` lists)."""
    return [source for source, spec in config["methods"].items() if name in (spec.get("matched") or [])]


def has_own_structure(config: dict, name: str) -> bool:
    """Whether method `name` of the config fixes its own structure (dense, three_tier, hybrid_nm, ...)."""
    return own_pattern(get_method(config["methods"][name]["method"]))


def has_sparsity_to_match(config: dict, name: str) -> bool:
    """An own structure that prunes: other methods can run at the sparsity it measured (not dense)."""
    return has_own_structure(config, name) and config["methods"][name]["method"] != "dense"


def method_patterns(config: dict, name: str) -> list[str]:
    if has_own_structure(config, name):
        return ["none"]
    spec = config["methods"][name]
    return list(spec.get("patterns") or config["patterns"]) + [MATCH + s for s in matched_sources(config, name)]


def seeds(config: dict) -> list[int]:
    """The calibration seeds: `calibration.seeds`, or the older single `calibration.seed`, or [0]."""
    calib = config["calibration"]
    if "seeds" in calib and "seed" in calib:
        raise WandaError("config calibration: give seeds (a list), not also seed")
    return list(calib["seeds"]) if "seeds" in calib else [calib.get("seed", 0)]


def needs_calibration(config: dict, name: str) -> bool:
    from .methods import needs_calibration

    spec = config["methods"][name]
    return needs_calibration(get_method(spec["method"]), spec.get("params"))


def method_seeds(config: dict, name: str) -> list[str]:
    """Seed labels of a method's runs: one per calibration seed ('seed0', ...), or 'noseed' without calibration."""
    return [f"seed{s}" for s in seeds(config)] if needs_calibration(config, name) else [NO_SEED]


def seed_number(label: str) -> int | None:
    return None if label == NO_SEED else int(label.removeprefix("seed"))


def match_report(config: dict, run: "Run") -> str:
    """The prune report whose measured sparsity the 'match-<method>' run `run` prunes at.

    Same seed as the run where both calibrate; a run without calibration follows the first seed.
    """
    source = run.pattern.removeprefix(MATCH)
    source_seeds = method_seeds(config, source)
    seed = run.seed if run.seed in source_seeds else source_seeds[0]
    return f"results/pruned/{run.model}/{source}/none/{seed}.json"


def check_config(config: dict, files: bool = True) -> None:
    """What the JSON schema cannot say: valid patterns, known methods and options, known data sets,
    and (files=True: on the machine that runs the workflow) that the data files named by `path:` exist."""
    datasets = config.get("datasets", {})
    # Patterns first, under the key that holds them: a bad global pattern is no one method's fault.
    for where, labels in [("patterns", config.get("patterns") or [])] + [
            (f"methods.{name}.patterns", spec["patterns"]) for name, spec in config["methods"].items() if spec.get("patterns")]:
        for label in labels:
            try:
                pattern_of(*pattern_args(label))
            except WandaError as e:
                raise WandaError(f"config {where}: {e}") from None
    for name, spec in config["methods"].items():
        try:
            for label in method_patterns(config, name):
                pattern, sparsity = pattern_args(label)
                if sparsity is None:  # a matched baseline: unstructured at a sparsity known later; 0.5 stands in
                    sparsity = 0.5
                resolve(spec["method"], pattern, sparsity, spec.get("params"))
            check_matched(config, name)
        except WandaError as e:
            raise WandaError(f"config methods.{name}: {e}") from None
    check_unique_labels(config)
    for model, spec in config["models"].items():
        for name in spec.get("methods") or []:
            if name not in config["methods"]:
                raise WandaError(f"config models.{model}.methods: {name!r} is not in methods ({', '.join(config['methods'])})")
    seeds(config)
    calib = config["calibration"]["dataset"]
    if calib not in datasets:
        raise WandaError(f"config calibration.dataset: {calib!r} is not in datasets ({', '.join(datasets) or 'none'})")
    for ds in config["evals"]["perplexity"]["datasets"]:
        if ds not in datasets:
            raise WandaError(f"config evals.perplexity.datasets: {ds!r} is not in datasets ({', '.join(datasets) or 'none'})")
    check_finetune(config)
    for model in config["models"]:  # every length known now: it names files and is checked by the jobs
        if any(needs_calibration(config, m) for m in model_methods(config, model)):
            seqlen(config, model, "calibration")
        if config["evals"]["perplexity"]["datasets"]:
            seqlen(config, model, "perplexity")
    if files:
        from pathlib import Path

        training = [r["dataset"] for r in _finetune(config)["recipes"].values()]
        for ds in dict.fromkeys([calib, *config["evals"]["perplexity"]["datasets"], *training]):
            path = datasets[ds].get("path")
            if path and not Path(path).is_file():
                raise WandaError(f"config datasets.{ds}.path: data file not found: {path}")


def model_dtype(config: dict, model: str, flags: set[str] | None = None) -> str:
    """The dtype a model's jobs load it in: its `dtype`, where `auto` is bfloat16 only on hardware that computes
    it natively (avx512_bf16 or AMX CPUs), else float32: never emulated bf16, several times slower than float32.

    Resolved here, where the workflow starts, for a model that runs on the CPU (flags: the CPU's, for tests);
    a job that may run on a GPU (the model's `gpus`, or `device` cuda, or auto on a machine with CUDA) gets
    `auto` and resolves it itself: bfloat16 where the GPU supports it, else float16.
    """
    spec = config["models"][model]
    dtype = spec.get("dtype") or "auto"
    if dtype != "auto" or spec.get("gpus") or config.get("device", "auto") == "cuda":
        return dtype
    import torch

    if config.get("device", "auto") == "auto" and torch.cuda.is_available():
        return dtype
    from .hardware import auto_dtype

    return auto_dtype("cpu", flags)


def check_sources(config: dict, models_dir: str = "resources/models") -> None:
    """Every model source that a materialize job would read (its directory is missing, or was made from another
    source) must be there, checked before any job: Snakemake deletes a job's old output before the job runs, so
    a typo in a source would otherwise cost the materialized model and everything made from it.

    Installed pypi: packages and existing paths are checked always; a hub id offline (HF_HUB_OFFLINE) must be in
    the local cache; a hub id that would replace a directory made from another source is asked for on the Hub.
    """
    from pathlib import Path

    from .model import made_from, source_problem

    for name, spec in config["models"].items():
        directory = Path(models_dir) / name
        made = made_from(directory)
        if made == spec["source"]:
            continue  # made from this very source: nothing to fetch
        problem = source_problem(spec["source"], ask_hub=made is not None)
        if problem:
            kept = f" ({directory}, made from {made}, is kept)" if made is not None else ""
            raise WandaError(f"config models.{name}.source: {problem}{kept}")


def check_matched(config: dict, name: str) -> None:
    matched = config["methods"][name].get("matched") or []
    if matched and not has_sparsity_to_match(config, name):
        hybrids = [m for m, module in METHODS.items() if own_pattern(module) and m != "dense"]
        raise WandaError(f"matched: only methods with their own structure ({', '.join(hybrids)}) have a sparsity to match")
    for other in matched:
        if other not in config["methods"]:
            raise WandaError(f"matched: {other!r} is not in methods ({', '.join(config['methods'])})")
        if has_own_structure(config, other):
            raise WandaError(f"matched: {other!r} has its own structure; it cannot prune at another method's sparsity")


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


class Run(NamedTuple):
    """One pruned (or dense) model of the grid; its files live under `{model}/{method}/{pattern}/{seed}`."""

    model: str
    method: str
    pattern: str
    seed: str  # 'seed0', 'seed1', ... or 'noseed'

    @property
    def path(self) -> str:
        return f"{self.model}/{self.method}/{self.pattern}/{self.seed}"


def model_methods(config: dict, model: str) -> list[str]:
    """The methods a model runs: its `methods:` list (a cheaper subset for a costly model), else all."""
    return [m for m in config["methods"] if m in (config["models"][model].get("methods") or config["methods"])]


def runs(config: dict) -> list[Run]:
    """Every (model, method, pattern label, seed label) of the grid; a matched baseline only where its
    own-structure method runs too."""
    out = []
    for model in config["models"]:
        methods = model_methods(config, model)
        for method in methods:
            for label in method_patterns(config, method):
                if label.startswith(MATCH) and label.removeprefix(MATCH) not in methods:
                    continue
                out += [Run(model, method, label, seed) for seed in method_seeds(config, method)]
    return out


def calibration_id(config: dict, seed: int, model: str | None = None) -> str:
    """The calibration file's name: every setting that changes the windows, so changing one re-calibrates.

    With a model, the length is that model's (seqlen()); without, the config's setting as written
    ('lenmodel' for the model's own length), which names the calibration of a progressive schedule.
    """
    c = config["calibration"]
    length = seqlen(config, model, "calibration") if model else c["seqlen"]
    return f"{c['dataset']}_{c.get('sampler', 'stream')}_n{c['nsamples']}_len{length}_seed{seed}"


# --- sequence length per model (wanda_core.protocol: the Wanda code's rule) ---

STAGES = {"calibration": "calibration", "perplexity": "evals.perplexity"}  # stage -> its config section


def _section(config: dict, stage: str) -> dict:
    return config["calibration"] if stage == "calibration" else config["evals"]["perplexity"]


def model_positions(config: dict, model: str) -> int | None:
    """A model's max_position_embeddings as known when the workflow is planned, without the Hub: its
    entry's `max_position_embeddings`, else the config.json of its local source directory or of its
    copy under resources/models/. A stated value that a config.json contradicts is an error."""
    import json
    from pathlib import Path

    from .model import config_positions

    spec = config["models"][model]
    stated = spec.get("max_position_embeddings")
    source = str(spec.get("source", ""))
    folders = [Path(source).expanduser()] if source and not source.startswith("pypi:") else []
    for folder in folders + [Path("resources/models") / model]:
        path = folder / "config.json"
        if not path.is_file():
            continue
        try:
            found = config_positions(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
        if stated and found and stated != found:
            raise WandaError(f"config models.{model}.max_position_embeddings: {stated}, but {path} says {found}")
        return stated or found
    return stated


def seqlen_spec(config: dict, model: str, stage: str) -> tuple[int | str, int | None, str]:
    """(spec, cap, config key) of a model's sequence length at `stage` ('calibration' or 'perplexity'):
    the model's own `seqlen` if it has one, else the stage's; spec is a number or 'model'."""
    from .protocol import parse_seqlen

    own = config["models"][model].get("seqlen")
    section = _section(config, stage)
    key = f"models.{model}.seqlen" if own is not None else f"{STAGES[stage]}.seqlen"
    try:
        spec = parse_seqlen(own if own is not None else section.get("seqlen", 2048))
    except WandaError as e:
        raise WandaError(f"config {key}: {e}") from None
    return spec, section.get("seqlen_cap"), key


def seqlen(config: dict, model: str, stage: str) -> int:
    """The number of tokens per window of a model's calibration ('calibration') or perplexity evaluation
    ('perplexity'); 'model' is its max_position_embeddings (model_positions), at most the stage's seqlen_cap."""
    from .protocol import FROM_MODEL, resolve_seqlen

    spec, cap, key = seqlen_spec(config, model, stage)
    if spec != FROM_MODEL:
        return spec
    positions = model_positions(config, model)
    if positions is None:
        raise WandaError(f"config {key}: 'model' needs the max_position_embeddings of {model!r} when the workflow is "
                         f"planned: add max_position_embeddings: N (the value in its config.json) to models.{model}, "
                         "or materialize it first (snakemake --until materialize_model)")
    return resolve_seqlen(spec, positions, cap)


def seqlen_option(config: dict, model: str, stage: str) -> int | str:
    """What a job's --seqlen gets: the number, or 'model' with the cap and the length the plan expects,
    which the job checks against the model it loads (a number stays a number: unchanged jobs do not rerun)."""
    from .protocol import FROM_MODEL

    spec, cap, _ = seqlen_spec(config, model, stage)
    if spec != FROM_MODEL:
        return spec
    return f"model{f' --seqlen-cap {cap}' if cap else ''} --expect-seqlen {seqlen(config, model, stage)}"


def schema_error(error) -> str:
    """A jsonschema ValidationError of the config as one line: which key, what was given, what is accepted."""
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
    where = f"config {path}" if path else "config"
    kind, value, given, schema = error.validator, error.validator_value, error.instance, error.schema
    if kind == "additionalProperties":
        accepted = list(schema.get("properties", {}))
        unknown = [k for k in given if k not in accepted]
        what = f"unknown key {unknown[0]!r}" + (f" (accepted: {', '.join(accepted)})" if accepted else "")
    elif kind == "required":
        what = f"missing key {next(k for k in value if k not in given)!r}"
    elif kind == "type":
        names = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false",
                 "array": "a list", "object": "a mapping", "null": "null"}
        what = f"{given!r} is not " + " or ".join(names.get(t, t) for t in ([value] if isinstance(value, str) else value))
    elif kind == "enum":
        what = f"{given!r} is not one of {', '.join(map(str, value))}"
    elif kind == "pattern":
        what = f"{given!r} is not accepted: use {schema.get('description') or 'the form ' + value}"
    elif kind in ("minimum", "maximum"):
        what = f"{given!r} is {'below the minimum' if kind == 'minimum' else 'above the maximum'} {value}"
    elif kind in ("minItems", "minProperties"):
        what = f"needs at least {value} entr{'y' if value == 1 else 'ies'}"
    elif kind == "oneOf" and all(len(s.get("required", [])) == 1 for s in value):
        what = f"give exactly one of {', '.join(s['required'][0] for s in value)}"
    else:
        what = error.message.splitlines()[0]
    return f"{where}: {what}"




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


def finetune_runs(config: dict) -> list[tuple[Run, str]]:
    """Every (pruned model of the grid, recipe) that gets fine-tuned after pruning: every calibration seed's."""
    out = []
    for spec in _finetune(config)["runs"]:
        for run in runs(config):
            if all(not spec.get(key) or value in spec[key] for key, value in
                   (("models", run.model), ("methods", run.method), ("patterns", run.pattern))):
                out.append((run, spec["recipe"]))
    return list(dict.fromkeys(out))


def progressive_steps(config: dict, name: str) -> list[dict]:
    """The steps of a progressive schedule, resolved: pattern label, the method's options with the
    step's on top, the recipe after the step; `chain` names the step's cached folder: one segment
    per step so far, each a hash of what that step does, so schedules that begin alike share them."""
    import hashlib
    import json

    spec = _finetune(config)["progressive"][name]
    method = config["methods"][spec["method"]]
    kind = get_method(method["method"])
    chain, out = [], []
    for i, step in enumerate(spec["steps"], 1):
        # the method's own options for a progressive step (three_tier: blocks never move to a denser tier)
        params = {**method.get("params", {}), **step.get("params", {}), **getattr(kind, "PROGRESSIVE_PARAMS", {})}
        own = method_patterns(config, spec["method"])
        pattern = step.get("pattern") or (own[0] if len(own) == 1 else None)
        if pattern is None:
            raise WandaError(f"config finetune.progressive.{name}.steps[{i - 1}]: give a pattern ({spec['method']} runs {', '.join(own)})")
        recipe_name = step.get("recipe") or spec["recipe"]
        resolved = recipe(config, recipe_name, step.get("steps"))
        what = {"method": method["method"], "pattern": pattern, "params": params, "recipe": resolved,
                "dataset": config["datasets"][_finetune(config)["recipes"][recipe_name]["dataset"]],
                "calibration": calibration_id(config, seeds(config)[0]) if needs_calibration(config, spec["method"]) else None}
        chain.append(f"{i}-{hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:8]}")
        out.append({"method": spec["method"], "pattern": pattern, "params": params, "recipe_name": recipe_name,
                    "recipe": resolved, "chain": "/".join(chain)})
    return out


def progressive_runs(config: dict) -> list[tuple[Run, str]]:
    """Every (final model, schedule) of the progressive schedules; a schedule calibrates with the first seed."""
    out = []
    for name, spec in _finetune(config)["progressive"].items():
        final = progressive_steps(config, name)[-1]
        seed = method_seeds(config, spec["method"])[0]
        for model in spec.get("models") or config["models"]:
            out.append((Run(model, spec["method"], final["pattern"], seed), name))
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
                resolve(method["method"], *pattern_args(step["pattern"]), step["params"])
            except WandaError as e:
                raise WandaError(f"{where}.steps[{j}]: {e}") from None
        progressive = getattr(kind, "PROGRESSIVE_PARAMS", {})  # set by every step: not part of the target
        target = {k: v for k, v in {**kind.PARAMS, **method.get("params", {})}.items() if k not in progressive}
        final = {k: v for k, v in {**kind.PARAMS, **steps[-1]["params"]}.items() if k not in progressive}
        if target != final or steps[-1]["pattern"] not in method_patterns(config, spec["method"]):
            raise WandaError(f"{where}: the last step must reach the method's own structure "
                             f"({spec['method']}: {pattern_title(method_patterns(config, spec['method'])[-1])}, options {method.get('params', {})})")
