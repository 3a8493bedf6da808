"""The workflow's results as tables: one long table, the paper's tables, their Markdown, CSV and HTML.

The long table has one row per (model, method, pattern, seed, data set or task, metric). The tables
reduce seeds to cells (mean, std and count of the successful runs) and lay cells out for reading:
perplexity as a row per method and a column per pattern, per model and data set; zero-shot accuracy
as a row per model and method and a column per task, per pattern. A column is 'dense', a pattern label,
or 'match-<method>' for a method with its own structure (three_tier, hybrid_nm) together with the
plain methods pruned at the sparsity it measured.

tables imports no other reporting module (plots, cost and aggregate read it); wanda_core.aggregate writes the files.
"""
from __future__ import annotations

import html
import json
import math
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import yaml

from . import grid, protocol
from .grid import MATCH, pattern_args, pattern_title

DATASET_TITLES = {"wikitext2": "WikiText-2"}
# A published.yaml block (or row) whose dataset or metric is this holds zero-shot mean accuracies.
ZEROSHOT_MEAN = "zeroshot-mean"
# A cell's measured sparsity is shown beside its value when it differs from its column's by more than this
# (half a percentage point: per-row rounding of 41.37% on a 576-wide matrix is not worth a note).
SPARSITY_TOLERANCE = 0.005


def git_commit(cwd=".") -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True)
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _target_sparsity(method_kind: str, pattern: str, report: dict) -> float | None:
    if method_kind == "dense":
        return 0.0
    if pattern == "none":
        return None  # fixed by the method's own options (three_tier, hybrid_nm)
    if pattern.startswith(MATCH):
        return report.get("target_sparsity")  # what the matched method measured
    return pattern_args(pattern)[1]


def _status(result: dict, metric: str, value: float) -> str:
    """'ok', or 'failed: <reason>': a non-finite value never counts as a result."""
    status = result.get("status")
    if isinstance(status, str) and status != "ok":
        return status
    return "ok" if math.isfinite(value) else f"failed: non-finite {metric}"


def column_of(method: str, method_kind: str, pattern: str) -> str:
    """The table column of a result: 'dense', its pattern label, or 'match-<method>' for an own-structure method."""
    if method_kind == "dense":
        return "dense"
    return MATCH + method if pattern == "none" else pattern


def long_table(ppl_files: list[str], report_files: list[str], config: dict, zeroshot_files=()) -> pd.DataFrame:
    """One row per (model, method, pattern, seed, data set or task, metric) with its provenance.

    Files are the workflow's: results/{ppl,zeroshot}/<model>/<method>/<pattern>/<seed>/<name>.parquet and
    results/pruned/<model>/<method>/<pattern>/<seed>.json.
    """
    reports = {}
    for path in report_files:
        p = Path(path)
        reports[(*p.parts[-4:-1], p.name.removesuffix(".json"))] = json.loads(p.read_text())
    calib = config["calibration"]
    commit = git_commit()
    rows = []

    def row(p: Path, result: dict, dataset: str, metric: str, value: float, **extra) -> dict:
        model, method, pattern, seed = p.parts[-5:-1]
        mspec, meth = config["models"][model], config["methods"][method]
        report = reports.get((model, method, pattern, seed), {})
        seed = grid.seed_number(seed)
        finetune = p.stem.partition("+")[2] or None  # <data set or task>+<recipe or schedule>: fine-tuned
        sparsity = result.get("sparsity")  # measured on the evaluated weights (fine-tuned results)
        if sparsity is None or sparsity != sparsity:
            sparsity = report.get("sparsity", 0.0)
        return {
            "model": model, "label": mspec.get("label", model), "group": mspec["group"],
            "method": method, "method_label": meth.get("label", method) + _finetune_suffix(config, finetune),
            "method_kind": meth["method"], "finetune": finetune,
            "params": json.dumps({**report.get("params", {}), **meth.get("params", {})}, sort_keys=True),
            "pattern": pattern, "column": column_of(method, meth["method"], pattern),
            "target_sparsity": _target_sparsity(meth["method"], pattern, report),
            "sparsity": sparsity, "dataset": dataset, "metric": metric, "value": value,
            "status": _status(result, metric, value), **extra,
            # What the figures were computed in, and on: dtypes and the CPU class (or GPU) of the evaluation and of the prune.
            "dtype": result.get("dtype"), "prune_dtype": report.get("dtype"), "compute_dtype": report.get("compute_dtype"),
            "isa": result.get("isa"), "kernels": result.get("kernels"), "prune_isa": report.get("isa"),
            "prune_seconds": report.get("seconds"), "eval_seconds": result.get("seconds"),
            **calibration_protocol(report, calib, seed), "seed": seed,
            "wanda_core": result.get("wanda_core"), "torch": result.get("torch"),
            "transformers": result.get("transformers"), "lm_eval": result.get("lm_eval"),
            "device": result.get("device"), "git_commit": commit,
            "time": datetime.fromtimestamp(p.stat().st_mtime, timezone.utc).isoformat(timespec="seconds"),
        }

    for path in ppl_files:
        p = Path(path)
        result = pd.read_parquet(p).iloc[0].to_dict()
        dataset = p.stem.partition("+")[0]
        nll = result.get("window_nll")
        rows.append(row(p, result, dataset, "perplexity", float(result["perplexity"]), eval_dataset=dataset,
                        ci_low=result.get("perplexity_low"), ci_high=result.get("perplexity_high"),
                        window_nll=None if nll is None else [float(x) for x in nll],
                        **{f"eval_{k}": _known(result.get(k)) for k in ("seqlen", "seqlen_rule", "windows", "tokens", "text_tokens")}))
    for path in zeroshot_files:
        p = Path(path)
        for result in pd.read_parquet(p).to_dict("records"):
            low, high = _stderr_interval(float(result["value"]), result.get("stderr"))
            rows.append(row(p, result, result["task"], result["metric"], float(result["value"]),
                            stderr=result.get("stderr"), n=result.get("n"), ci_low=low, ci_high=high, eval_dataset=result["task"],
                            task_version=_known(result.get("task_version")), num_fewshot=_known(result.get("num_fewshot"))))
    df = pd.DataFrame(rows)
    if len(df):
        # Counts stay integers; NA where there is none (no calibration: dense, magnitude; zero-shot: no windows).
        for column in ("seed", "calibration_nsamples", "calibration_seqlen", "eval_seqlen", "eval_windows", "eval_tokens",
                       "eval_text_tokens"):
            if column in df:
                df[column] = df[column].astype("Int64")
    return df


def _known(value):
    """A recorded value, or None where there is none (older results: NaN in its column; NA in an Int64 one)."""
    try:
        missing = value is None or bool(pd.isna(value))
    except (TypeError, ValueError):  # a list or mapping: recorded
        missing = False
    return None if missing else value


def _int(value) -> int | None:
    value = _known(value)
    return None if value is None else int(value)


def calibration_protocol(report: dict, calib: dict, seed) -> dict:
    """How a run's calibration windows were drawn: from what its prune report recorded (the calibration
    file's metadata), else from the config; nothing for runs without calibration."""
    keys = ("calibration", "calibration_dataset", "calibration_sampler", "calibration_nsamples", "calibration_seqlen")
    if seed is None:
        return dict.fromkeys(keys)
    made = report.get("calibration") or {}
    written = calib.get("seqlen")
    nsamples = _int(made.get("nsamples")) or calib["nsamples"]
    length = _int(made.get("seqlen")) or (written if isinstance(written, int) else None)  # 'model': in the report
    sampler = made.get("sampler") or calib.get("sampler", "stream")
    return dict(zip(keys, (f"{calib['dataset']} {nsamples}x{length or '?'}", calib["dataset"], sampler, nsamples, length)))


# z of a two-sided 95% interval: a zero-shot accuracy's interval is its value +- Z95 lm-eval standard errors.
Z95 = 1.959964


def _stderr_interval(value: float, stderr) -> tuple[float | None, float | None]:
    """The 95% interval of an accuracy from lm-eval's standard error, within [0, 1]; (None, None) without one."""
    if stderr is None or not math.isfinite(float(stderr)) or not math.isfinite(value):
        return None, None
    return max(0.0, value - Z95 * float(stderr)), min(1.0, value + Z95 * float(stderr))


def _finetune_suffix(config: dict, name: str | None) -> str:
    """' + <label>' of a fine-tuning recipe or progressive schedule, for the method's name in the tables."""
    if not name:
        return ""
    ft = config.get("finetune") or {}
    spec = (ft.get("recipes") or {}).get(name) or (ft.get("progressive") or {}).get(name) or {}
    return f" + {spec.get('label', name)}"

# --- published figures ---

def published_rows(path, config: dict) -> pd.DataFrame:
    """Published figures for models of this config, each with its source, data set and metric.

    A block (or row) may name its `dataset` (default wikitext2) and `metric` (default perplexity);
    zero-shot mean accuracies have dataset or metric 'zeroshot-mean' (in %, or as fractions <= 1).
    """
    if not path or not Path(path).is_file():
        return pd.DataFrame()
    rows = []
    for entry in yaml.safe_load(Path(path).read_text()) or []:
        how = protocol.published_protocol(entry)  # what the block states of its protocol, 'unknown' elsewhere
        for r in entry["rows"]:
            r = {"dataset": entry.get("dataset", "wikitext2"), "metric": entry.get("metric", "perplexity"), **r,
                 "source": entry["source"], **how}
            if ZEROSHOT_MEAN in (r["dataset"], r["metric"]):
                r.update(dataset=ZEROSHOT_MEAN, metric=ZEROSHOT_MEAN, value=_percent(r["value"]))
            rows.append(r)
    df = pd.DataFrame(rows)
    return df[df["model"].isin(list(config["models"]))].reset_index(drop=True) if len(df) else df


def _percent(v: float) -> float:
    return float(v) * 100 if float(v) <= 1 else float(v)


def published_for_grid(path, config: dict) -> pd.DataFrame:
    """The published rows this config's grid measures too (same model, method, pattern and data set)."""
    pub = published_rows(path, config)
    if not len(pub):
        return pub
    planned = {(run.model, config["methods"][run.method]["method"], run.pattern) for run in grid.runs(config)}
    datasets = set((config.get("evals", {}).get("perplexity") or {}).get("datasets") or [])
    if ((config.get("evals", {}).get("zeroshot") or {}).get("tasks")):
        datasets.add(ZEROSHOT_MEAN)
    keep = [(r.model, r.method, r.pattern) in planned and r.dataset in datasets for r in pub.itertuples()]
    return pub[keep].reset_index(drop=True)


# --- cells: seeds reduced to mean, std, count ---

def cell_stats(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per cell (keys), over seeds: mean, std and count of the successful values, failures, mean measured sparsity,
    and the cell's 95% interval (low, high; see cell_interval)."""
    rows = []
    for key, g in df.groupby(keys, sort=False, dropna=False):
        ok = g[g["status"] == "ok"]
        low, high = cell_interval(ok)
        rows.append({**dict(zip(keys, key)), "value": float(ok["value"].mean()) if len(ok) else None,
                     "std": float(ok["value"].std()) if len(ok) > 1 else None, "n": len(ok), "failed": len(g) - len(ok),
                     "sparsity": float(g["sparsity"].mean()), "low": low, "high": high})
    return pd.DataFrame(rows, columns=[*keys, "value", "std", "n", "failed", "sparsity", "low", "high"])


def cell_interval(ok: pd.DataFrame) -> tuple[float | None, float | None]:
    """The 95% interval of a cell from its successful runs' own intervals (ci_low, ci_high) and their spread.

    One run: its interval (over the evaluation windows, or from lm-eval's standard error). Several seeds,
    all evaluated on the same text: the mean, +- the two half-widths combined in quadrature, the seeds'
    (Student's t of their mean) and the average of the runs' own. (None, None) where a run has none.
    """
    if not len(ok) or "ci_low" not in ok or ok["ci_low"].isna().any() or ok["ci_high"].isna().any():
        return None, None
    if len(ok) == 1:
        return float(ok["ci_low"].iloc[0]), float(ok["ci_high"].iloc[0])
    from scipy import stats

    n, mean = len(ok), float(ok["value"].mean())
    seeds = float(stats.t.ppf(0.975, n - 1)) * float(ok["value"].std()) / math.sqrt(n)
    own = float(((ok["ci_high"] - ok["ci_low"]) / 2).mean())
    half = math.hypot(seeds, own)
    return mean - half, mean + half


def _two_digits(x: float) -> str:
    """x to two significant digits, without an exponent: 1.4, 0.14, 210."""
    if x <= 0 or not math.isfinite(x):
        return f"{x:.2f}"
    return f"{x:.{max(0, 1 - math.floor(math.log10(x)))}f}"


def cell_text(value, std, n, failed, note: str = "", low=None, high=None, tie: str = "") -> str:
    """'7.52', '7.52 ±0.31' with a 95% interval (half its width), '7.52 ± 0.11 (3)' over several seeds,
    'failed' when no run succeeded; ' ~a' when its interval overlaps those of the cells that share the letter."""
    n, failed = int(n), int(failed)
    if not n:
        return "failed" if failed else ""
    if n > 1:
        text = f"{value:.2f} ± {std:.2f} ({n})"
    elif low is not None and high is not None and not (pd.isna(low) or pd.isna(high)):
        text = f"{value:.2f} ±{_two_digits((high - low) / 2)}"
    else:
        text = f"{value:.2f}"
    return text + (f", {failed} failed" if failed else "") + note + (f" ~{tie}" if tie else "")


def tie_letters(intervals: dict) -> dict:
    """Letters for cells whose 95% intervals overlap: {key: (low, high)} -> {key: 'a', 'ab', ...; '' when apart}.

    Cells that share a letter overlap one another, so their order is not a result. A letter stands for a
    largest group of cells whose intervals share a point (intervals overlap pairwise exactly when they do),
    lettered from the lowest group up; a cell apart from all others gets none. Keys without an interval
    (None or NaN) get none.
    """
    spans = {k: (float(lo), float(hi)) for k, (lo, hi) in intervals.items()
             if lo is not None and hi is not None and not (pd.isna(lo) or pd.isna(hi))}
    groups = []
    for _, (start, _) in sorted(spans.items(), key=lambda kv: kv[1]):
        group = {k for k, (lo, hi) in spans.items() if lo <= start <= hi}
        if len(group) > 1 and not any(group <= g for g in groups):
            groups = [g for g in groups if not g < group] + [group]
    letters = {k: "" for k in intervals}
    for i, group in enumerate(groups):
        for k in group:
            letters[k] += "abcdefghijklmnopqrstuvwxyz"[i % 26]
    return letters


def column_sparsity(cells: pd.DataFrame, column: str) -> float | None:
    """What a column's sparsity is: the pattern's, or what its own-structure method measured."""
    if column == "dense":
        return 0.0
    if not column.startswith(MATCH):
        return pattern_args(column)[1]
    own = cells[(cells["column"] == column) & (cells["method"] == column.removeprefix(MATCH))]
    return float(own["sparsity"].mean()) if len(own) else None


def column_title(column: str, config: dict, sparsity: float | None) -> str:
    if column == "dense":
        return "dense"
    if column.startswith(MATCH):
        source = column.removeprefix(MATCH)
        label = config["methods"].get(source, {}).get("label", source)
        return f"{label} ({sparsity:.1%})" if sparsity is not None else label
    return pattern_title(column)


def ordered(values, order: list) -> list:
    """Distinct values, those in `order` first in its order, the rest as they come."""
    values = list(dict.fromkeys(values))
    return [v for v in order if v in values] + [v for v in values if v not in order]


def column_order(config: dict) -> list[str]:
    plain = [p for m in config["methods"] for p in grid.method_patterns(config, m) if p != "none" and not p.startswith(MATCH)]
    own = [MATCH + m for m in config["methods"] if grid.has_sparsity_to_match(config, m)]
    return ["dense", *dict.fromkeys([*config.get("patterns", []), *plain]), *own]


def model_order(config: dict) -> list[str]:
    """Models of the config, grouped by family (groups in order of first appearance)."""
    groups = list(dict.fromkeys(spec["group"] for spec in config["models"].values()))
    return sorted(config["models"], key=lambda m: groups.index(config["models"][m]["group"]))


def _published_pattern(method: str, kind: str, column: str) -> str | None:
    """The published pattern label that fills `column` of a method's row (None: no published figure there)."""
    if column == "dense":
        return "none" if kind == "dense" else None
    if column.startswith(MATCH):
        return "none" if column == MATCH + method else None  # the own-structure method itself
    return column


# --- perplexity ---

def perplexity_cells(df: pd.DataFrame) -> pd.DataFrame:
    d = df[df["metric"] == "perplexity"] if len(df) else df
    if not len(d):
        return cell_stats(pd.DataFrame(columns=["dataset", "group", "model", "label", "method", "method_label", "method_kind",
                                                "column", "value", "status", "sparsity"]),
                          ["dataset", "group", "model", "label", "method", "method_label", "method_kind", "column"])
    return cell_stats(d, ["dataset", "group", "model", "label", "method", "method_label", "method_kind", "column"])


def perplexity_tables(cells: pd.DataFrame, published: pd.DataFrame, config: dict) -> list[tuple[str, pd.DataFrame]]:
    """Per (data set, model): a row per method (dense included), a column per pattern and sparsity.

    A method with its own structure has a column titled with the sparsity it measured; the plain methods
    pruned at that sparsity ('match-<method>') share it. Published figures follow their method's row.
    """
    tables = []
    for dataset in cells["dataset"].unique():
        for model in model_order(config):
            c = cells[(cells["dataset"] == dataset) & (cells["model"] == model)]
            if not len(c):
                continue
            columns = ordered(c["column"], column_order(config))
            sparsity = {col: column_sparsity(c, col) for col in columns}
            titles = {col: column_title(col, config, sparsity[col]) for col in columns}
            pub = published[(published["model"] == model) & (published["dataset"] == dataset)] if len(published) else published
            ties = column_ties(c)
            rows = []
            for method in ordered(c["method"], list(config["methods"])):
                m = c[c["method"] == method]
                for label in m["method_label"].unique():
                    row = {"method": label, "source": "measured"}
                    for cell in m[m["method_label"] == label].itertuples():
                        target = sparsity[cell.column]
                        off = target is not None and abs(cell.sparsity - target) > SPARSITY_TOLERANCE
                        row[titles[cell.column]] = cell_text(cell.value, cell.std, cell.n, cell.failed,
                                                             f" [{cell.sparsity:.1%}]" if off else "", cell.low, cell.high,
                                                             ties[cell.Index])
                    rows.append(row)
                    if len(pub) and label == config["methods"][method].get("label", method):
                        kind = config["methods"][method]["method"]
                        mine = pub[pub["method"] == kind]
                        for source in mine["source"].unique():
                            values = {}
                            for col in columns:
                                hit = mine[(mine["source"] == source) & (mine["pattern"] == _published_pattern(method, kind, col))]
                                if len(hit):
                                    values[titles[col]] = f"{hit['value'].iloc[0]:.2f}"
                            if values:
                                rows.append({"method": label, "source": source, **values})
            table = pd.DataFrame(rows, columns=["method", "source", *titles.values()]).fillna("")
            if (table["source"] == "measured").all():
                table = table.drop(columns="source")
            tables.append((perplexity_title(dataset, model, config), table))
    return tables


def perplexity_title(dataset: str, model: str, config: dict) -> str:
    spec = config["models"][model]
    return f"{DATASET_TITLES.get(dataset, dataset)} perplexity, {spec.get('label', model)} ({spec['group']})"


# --- captions: the protocol of every table ---

def _windows_caption(p: dict) -> str:
    seqlen, windows = p["eval_seqlen"], p["eval_windows"]
    if protocol.is_unknown(seqlen):
        return "windows of unrecorded length"
    rule = p.get("eval_seqlen_rule")
    text = f"windows of {seqlen} tokens" + (" (the model's max_position_embeddings)" if rule == "model" else "")
    if windows == "all":
        return text + ", every whole window of the text"
    return text + ("" if protocol.is_unknown(windows) else f", the first {windows}")


def perplexity_captions(df: pd.DataFrame, published: pd.DataFrame, config: dict) -> dict[str, str]:
    """Per perplexity table (by title): the protocol of our runs, and that of every published block shown in it."""
    out = {}
    if not len(df) or not (df["metric"] == "perplexity").any():
        return out
    for (dataset, model), rows in df[df["metric"] == "perplexity"].groupby(["dataset", "model"], sort=False):
        parts = [f"Protocol: {DATASET_TITLES.get(dataset, dataset)} in {_windows_caption(cell_protocol(rows))}"]
        calibrated = rows[rows["seed"].notna()]
        if len(calibrated):
            c = cell_protocol(calibrated)
            seeds = sorted(int(v) for v in calibrated["seed"].dropna().unique())
            parts.append(f"calibration {c['calibration_dataset']}, {c['calibration_nsamples']} windows of "
                         f"{c['calibration_seqlen']} tokens ({c['calibration_sampler']} sampler), "
                         f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}")
        text = "; ".join(parts) + "."
        pub = published[(published["model"] == model) & (published["dataset"] == dataset)] if len(published) else published
        shown = [f"{source}: {protocol.describe(g.iloc[0].to_dict())}." for source, g in pub.groupby("source", sort=False)] if len(pub) else []
        if shown:
            text += " Published rows, " + " ".join(shown)
        out[perplexity_title(dataset, model, config)] = text
    return out


def zeroshot_caption(df: pd.DataFrame) -> str:
    """The zero-shot protocol: lm-eval's version, 0-shot, each task's version (as recorded in the rows)."""
    d = df[df["metric"] == "acc"] if len(df) and "metric" in df else pd.DataFrame()
    if not len(d):
        return ""
    p = cell_protocol(d)
    versions = p["task_versions"]
    text = f"Protocol: lm-eval {p['lm_eval']}, 0-shot"
    if isinstance(versions, dict):
        text += ", task versions " + ", ".join(f"{t} {v}" for t, v in versions.items())
    return text + "."


def column_ties(cells: pd.DataFrame, by: str = "column") -> pd.Series:
    """tie_letters within each value of `by` (a table's column), indexed like `cells`: the cells that share a
    letter in a column have overlapping 95% intervals."""
    ties = pd.Series("", index=cells.index, dtype=object)
    for _, g in cells.groupby(by, sort=False):
        letters = tie_letters({i: (r.low, r.high) for i, r in zip(g.index, g.itertuples())})
        ties.loc[list(letters)] = list(letters.values())
    return ties


# --- zero-shot accuracy ---

def zeroshot_cells(df: pd.DataFrame) -> pd.DataFrame:
    """Accuracy (%) per task and the mean over tasks (per seed, then over seeds), as cells."""
    keys = ["group", "model", "label", "method", "method_label", "method_kind", "column"]
    acc = df[df["metric"] == "acc"].copy() if len(df) else df
    if not len(acc):
        return cell_stats(pd.DataFrame(columns=[*keys, "dataset", "value", "status", "sparsity"]), [*keys, "dataset"])
    acc["value"] = acc["value"] * 100
    for bound in ("ci_low", "ci_high"):
        acc[bound] = acc[bound] * 100 if bound in acc else float("nan")
    tasks = list(dict.fromkeys(acc["dataset"]))
    means = []
    for key, g in acc.groupby([*keys, "pattern", "seed"], sort=False, dropna=False):
        complete = len(g) == len(tasks) and (g["status"] == "ok").all()
        mean = g["value"].mean() if complete else float("nan")
        # The tasks' errors are independent: the mean's half-width is the root of the summed squares over the count.
        half = math.sqrt((((g["ci_high"] - g["ci_low"]) / 2) ** 2).sum(skipna=False)) / len(g)
        means.append({**g.iloc[0].to_dict(), "dataset": "Mean", "value": mean, "ci_low": mean - half, "ci_high": mean + half,
                      "status": "ok" if complete else "failed: a task is missing or failed"})
    return cell_stats(pd.concat([acc, pd.DataFrame(means)], ignore_index=True), [*keys, "dataset"])


def zeroshot_tables(cells: pd.DataFrame, published: pd.DataFrame, config: dict) -> list[tuple[str, pd.DataFrame]]:
    """Per column (pattern): a row per (model, method) with each task's accuracy and their mean, as the paper's table.

    Dense rows are in every table; published mean accuracies follow their method's row.
    """
    if not len(cells):
        return []
    tasks = [t for t in dict.fromkeys(cells["dataset"]) if t != "Mean"]
    pub = published[published["dataset"] == ZEROSHOT_MEAN] if len(published) else published
    columns = [c for c in ordered(cells["column"], column_order(config)) if c != "dense"] or ["dense"]
    tables = []
    for column in columns:
        d = cells[(cells["column"] == column) | (cells["column"] == "dense")]
        ties = column_ties(d, by="dataset")  # rows of one task column whose intervals overlap
        rows = []
        for model in model_order(config):
            spec = config["models"][model]
            for method in ordered(d.loc[d["model"] == model, "method"], list(config["methods"])):
                m = d[(d["model"] == model) & (d["method"] == method)]
                for label in m["method_label"].unique():
                    g = m[m["method_label"] == label]
                    g = g.assign(tie=ties[g.index]).set_index("dataset")
                    row = {"group": spec["group"], "model": spec.get("label", model), "method": label, "source": "measured",
                           "sparsity": f"{g['sparsity'].iloc[0]:.1%}"}
                    for task in [*tasks, "Mean"]:
                        row[task] = (cell_text(*g.loc[task, ["value", "std", "n", "failed"]], "", *g.loc[task, ["low", "high", "tie"]])
                                     if task in g.index else "")
                    rows.append(row)
                    kind = config["methods"][method]["method"]
                    if len(pub) and label == config["methods"][method].get("label", method):
                        want = _published_pattern(method, kind, "dense" if kind == "dense" else column)
                        hits = pub[(pub["model"] == model) & (pub["method"] == kind) & (pub["pattern"] == want)]
                        for hit in hits.itertuples():
                            rows.append({"group": spec["group"], "model": spec.get("label", model), "method": label,
                                         "source": hit.source, "Mean": f"{hit.value:.2f}"})
        table = pd.DataFrame(rows, columns=["group", "model", "method", "source", "sparsity", *tasks, "Mean"]).fillna("")
        if (table["source"] == "measured").all():
            table = table.drop(columns="source")
        title = "dense" if column == "dense" else column_title(column, config, None)
        tables.append((f"Zero-shot accuracy (%), {title}", table))
    return tables


# --- ours against published ---

def cell_protocol(rows: pd.DataFrame) -> dict:
    """How our runs of one cell were measured (the long table's rows of its seeds), for protocol.differences():
    each field's value where the runs share one, 'unknown' where none was recorded, 'mixed: ...' otherwise.
    eval_windows is 'all' where a run evaluated every whole window of the text."""
    def column(name):
        return list(rows[name]) if name in rows else [None] * len(rows)

    def one(values):
        values = list(dict.fromkeys(v for v in map(_known, values) if v is not None))
        values = [int(v) if isinstance(v, float) and v.is_integer() else v for v in values]
        return protocol.UNKNOWN if not values else values[0] if len(values) == 1 else "mixed: " + ", ".join(map(str, values))

    windows = [w if _known(w) is None or not _known(t) or not _known(n) or w != t // n else "all"
               for w, t, n in zip(column("eval_windows"), column("eval_text_tokens"), column("eval_seqlen"))]
    out = {"eval_seqlen": one(column("eval_seqlen")), "eval_seqlen_rule": one(column("eval_seqlen_rule")),
           "eval_windows": one(windows), "lm_eval": one(column("lm_eval")),
           **{k: one(column(k)) for k in ("calibration_dataset", "calibration_sampler", "calibration_nsamples", "calibration_seqlen")}}
    versions = {t: v for t, v in zip(column("dataset"), column("task_version")) if _known(v) is not None}
    out["task_versions"] = versions if versions and "task_version" in rows else protocol.UNKNOWN
    seeds = rows["seed"].dropna().nunique() if "seed" in rows else 0
    out["seeds"] = int(seeds) or 1
    return out


def _our_rows(df: pd.DataFrame, model: str, method: str, column: str, label: str, dataset: str) -> pd.DataFrame:
    """The long table's rows of one of our cells: perplexity on `dataset`, or every task's accuracy (zero-shot mean)."""
    if df is None or not len(df):
        return pd.DataFrame()
    d = df[(df["model"] == model) & (df["method"] == method) & (df["column"] == column) & (df["method_label"] == label)]
    return d[d["metric"] == "acc"] if dataset == ZEROSHOT_MEAN else d[(d["metric"] == "perplexity") & (d["dataset"] == dataset)]


def published_delta(ppl: pd.DataFrame, zeroshot: pd.DataFrame, published: pd.DataFrame, config: dict,
                    df: pd.DataFrame | None = None) -> pd.DataFrame:
    """Each published figure of the grid with our cell of the same model, method, pattern and data set.

    Our value, and the difference, are set beside it only when the two protocols agree (protocol.differences,
    from our runs' rows in `df`, the long table); elsewhere `comparison` says which field differs.
    """
    rows = []
    for r in published.to_dict("records"):
        if r["dataset"] == ZEROSHOT_MEAN:
            ours, what = zeroshot[zeroshot["dataset"] == "Mean"], "zero-shot mean accuracy (%)"
        else:
            ours, what = ppl[ppl["dataset"] == r["dataset"]], f"{DATASET_TITLES.get(r['dataset'], r['dataset'])} perplexity"
        zs = r["dataset"] == ZEROSHOT_MEAN
        for method, spec in config["methods"].items():
            if spec["method"] != r["method"] or r["pattern"] not in grid.method_patterns(config, method):
                continue
            column, label = column_of(method, spec["method"], r["pattern"]), spec.get("label", method)
            hit = ours[(ours["model"] == r["model"]) & (ours["method"] == method) & (ours["column"] == column)
                       & (ours["method_label"] == label)]
            cell = hit.iloc[0] if len(hit) else {"value": None, "std": None, "n": 0, "failed": 0}
            mine = cell_protocol(_our_rows(df, r["model"], method, column, label, r["dataset"]))
            calibrated = grid.needs_calibration(config, method)
            why = protocol.differences(mine, r, calibrated, zeroshot=zs)
            shown = [p if calibrated else {**p, "calibration_nsamples": None} for p in (r, mine)]  # dense: none to show
            value = None if why or cell["value"] is None or pd.isna(cell["value"]) else float(cell["value"])
            mspec = config["models"][r["model"]]
            std = _known(r.get("std"))
            rows.append({
                "metric": what, "group": mspec["group"], "model": mspec.get("label", r["model"]),
                "method": label, "pattern": "dense" if spec["method"] == "dense" else pattern_title(r["pattern"], config),
                "ours": value, "std": None if why else cell["std"], "n": 0 if why else cell["n"], "failed": 0 if why else cell["failed"],
                "published": float(r["value"]), "published_std": std, "source": r["source"],
                "difference": value - r["value"] if value is not None else None,
                "relative": (value - r["value"]) / r["value"] if value is not None and r["value"] else None,
                "compared": not why, "comparison": "not compared: " + "; ".join(why) if why else "same protocol",
                "protocol": protocol.describe(shown[0], zs), "our_protocol": protocol.describe(shown[1], zs),
                "protocol_from": r.get("protocol_from") or "",
            })
    return pd.DataFrame(rows, columns=["metric", "group", "model", "method", "pattern", "ours", "std", "n", "failed",
                                       "published", "published_std", "source", "difference", "relative", "compared",
                                       "comparison", "protocol", "our_protocol", "protocol_from"])


def published_delta_table(delta: pd.DataFrame) -> pd.DataFrame:
    """The comparison as shown: our cell's text and the difference where the protocols agree, the published
    figure (± where its source gives one) and its protocol, and what was compared or why not."""
    show = delta[["metric", "group", "model", "method", "pattern"]].copy()
    show["ours"] = [cell_text(r.ours, r.std, r.n, r.failed) if r.compared else "" for r in delta.itertuples()]
    show["published"] = [f"{v:.2f}" + ("" if pd.isna(sd) else f" ± {sd:.2f}") for v, sd in zip(delta["published"], delta["published_std"])]
    show["source"] = delta["source"]
    show["difference"] = ["" if pd.isna(v) else f"{v:+.2f}" for v in delta["difference"]]
    show["relative"] = ["" if pd.isna(v) else f"{v:+.1%}" for v in delta["relative"]]
    show["published protocol"] = delta["protocol"]
    show["comparison"] = delta["comparison"]
    return show


# --- output ---

def _caption(captions, title: str) -> str:
    """A table's caption: captions is one text for every table, or a text per title."""
    return (captions.get(title, "") if isinstance(captions, dict) else captions) or ""


def markdown(tables, note: str = "", captions=None) -> str:
    """The tables as Markdown, each under its title with its caption below it, the note below them all; '' when
    there is none."""
    out = []
    for title, t in tables:
        out.append(f"## {title}\n")
        out.append("| " + " | ".join(map(str, t.columns)) + " |")
        out.append("|" + "---|" * len(t.columns))
        for _, r in t.iterrows():
            out.append("| " + " | ".join("" if v is None else str(v) for v in r.values) + " |")
        out.append("")
        if _caption(captions, title):
            out += [_caption(captions, title), ""]
    if note and tables:
        out += [note, ""]
    return "\n".join(out)


def html_page(title: str, tables, note: str = "", captions=None) -> str:
    """The tables as one small HTML page (the Snakemake report shows it as is)."""
    body = []
    for caption, t in tables:
        body.append(f"<h2>{html.escape(caption)}</h2>")
        body.append(t.to_html(index=False, border=0, na_rep="", classes="results"))
        if _caption(captions, caption):
            body.append(f"<p class=\"caption\">{html.escape(_caption(captions, caption))}</p>")
    if note:
        body.append(f"<p>{html.escape(note)}</p>")
    style = ("body{font-family:sans-serif;margin:1em} table.results{border-collapse:collapse;margin-bottom:1.5em}"
             " table.results td,table.results th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}"
             " table.results td:first-child,table.results th:first-child{text-align:left}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def tidy(cells: pd.DataFrame, config: dict, tie_keys: list[str] | None = None) -> pd.DataFrame:
    """Cells for a CSV: one row per cell with its numbers (95% interval: low, high), its column's title and the
    text the tables show; with tie_keys, `tie`: the letters of overlapping intervals among cells alike in those keys."""
    t = cells.copy()
    t.insert(t.columns.get_loc("column") + 1, "title", [pattern_title(c, config) if c != "dense" else "dense" for c in t["column"]])
    if tie_keys and len(t):
        t["tie"] = column_ties(t, by=tie_keys)
    t["text"] = [cell_text(r.value, r.std, r.n, r.failed, "", r.low, r.high, getattr(r, "tie", "")) for r in t.itertuples()]
    return t
