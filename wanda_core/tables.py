"""Aggregation of the workflow's results: one long Parquet table, the paper's tables, the plots.

The long table has one row per (model, method, pattern, seed, data set or task, metric). The tables
reduce seeds to cells (mean, std and count of the successful runs) and lay cells out for reading:
perplexity as a row per method and a column per pattern, per model and data set; zero-shot accuracy
as a row per model and method and a column per task, per pattern. A column is 'dense', a pattern label,
or 'match-<method>' for a method with its own structure (three_tier, hybrid_nm) together with the
plain methods pruned at the sparsity it measured.
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

from . import grid
from .grid import MATCH, pattern_args, pattern_title
from .io import atomic_path, write_table

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
            "prune_seconds": report.get("seconds"), "eval_seconds": result.get("seconds"),
            "calibration": None if seed is None else f"{calib['dataset']} {calib['nsamples']}x{calib['seqlen']}",
            "seed": seed,
            "wanda_core": result.get("wanda_core"), "torch": result.get("torch"),
            "transformers": result.get("transformers"), "lm_eval": result.get("lm_eval"),
            "device": result.get("device"), "git_commit": commit,
            "time": datetime.fromtimestamp(p.stat().st_mtime, timezone.utc).isoformat(timespec="seconds"),
        }

    for path in ppl_files:
        p = Path(path)
        result = pd.read_parquet(p).iloc[0].to_dict()
        rows.append(row(p, result, p.stem.partition("+")[0], "perplexity", float(result["perplexity"])))
    for path in zeroshot_files:
        p = Path(path)
        for result in pd.read_parquet(p).to_dict("records"):
            rows.append(row(p, result, result["task"], result["metric"], float(result["value"]),
                            stderr=result.get("stderr"), n=result.get("n")))
    df = pd.DataFrame(rows)
    if len(df):
        df["seed"] = df["seed"].astype("Int64")  # NA for runs without calibration (dense, magnitude)
    return df


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
        for r in entry["rows"]:
            r = {"dataset": entry.get("dataset", "wikitext2"), "metric": entry.get("metric", "perplexity"), **r,
                 "source": entry["source"]}
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
    """Per cell (keys), over seeds: mean, std and count of the successful values, failures, mean measured sparsity."""
    rows = []
    for key, g in df.groupby(keys, sort=False, dropna=False):
        ok = g.loc[g["status"] == "ok", "value"]
        rows.append({**dict(zip(keys, key)), "value": float(ok.mean()) if len(ok) else None,
                     "std": float(ok.std()) if len(ok) > 1 else None, "n": len(ok), "failed": len(g) - len(ok),
                     "sparsity": float(g["sparsity"].mean())})
    return pd.DataFrame(rows, columns=[*keys, "value", "std", "n", "failed", "sparsity"])


def cell_text(value, std, n, failed, note: str = "") -> str:
    """'7.52', '7.52 ± 0.11 (3)' over several seeds, 'failed' when no run succeeded."""
    n, failed = int(n), int(failed)
    if not n:
        return "failed" if failed else ""
    text = f"{value:.2f}" if n == 1 else f"{value:.2f} ± {std:.2f} ({n})"
    return text + (f", {failed} failed" if failed else "") + note


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
    own = [MATCH + m for m, spec in config["methods"].items() if spec["method"] in grid.OWN_PATTERN and spec["method"] != "dense"]
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
            rows = []
            for method in ordered(c["method"], list(config["methods"])):
                m = c[c["method"] == method]
                for label in m["method_label"].unique():
                    row = {"method": label, "source": "measured"}
                    for cell in m[m["method_label"] == label].itertuples():
                        target = sparsity[cell.column]
                        off = target is not None and abs(cell.sparsity - target) > SPARSITY_TOLERANCE
                        row[titles[cell.column]] = cell_text(cell.value, cell.std, cell.n, cell.failed,
                                                             f" [{cell.sparsity:.1%}]" if off else "")
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
            spec = config["models"][model]
            title = f"{DATASET_TITLES.get(dataset, dataset)} perplexity, {spec.get('label', model)} ({spec['group']})"
            tables.append((title, table))
    return tables


# --- zero-shot accuracy ---

def zeroshot_cells(df: pd.DataFrame) -> pd.DataFrame:
    """Accuracy (%) per task and the mean over tasks (per seed, then over seeds), as cells."""
    keys = ["group", "model", "label", "method", "method_label", "method_kind", "column"]
    acc = df[df["metric"] == "acc"].copy() if len(df) else df
    if not len(acc):
        return cell_stats(pd.DataFrame(columns=[*keys, "dataset", "value", "status", "sparsity"]), [*keys, "dataset"])
    acc["value"] = acc["value"] * 100
    tasks = list(dict.fromkeys(acc["dataset"]))
    means = []
    for key, g in acc.groupby([*keys, "pattern", "seed"], sort=False, dropna=False):
        complete = len(g) == len(tasks) and (g["status"] == "ok").all()
        means.append({**g.iloc[0].to_dict(), "dataset": "Mean", "value": g["value"].mean() if complete else float("nan"),
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
        rows = []
        for model in model_order(config):
            spec = config["models"][model]
            for method in ordered(d.loc[d["model"] == model, "method"], list(config["methods"])):
                m = d[(d["model"] == model) & (d["method"] == method)]
                for label in m["method_label"].unique():
                    g = m[m["method_label"] == label].set_index("dataset")
                    row = {"group": spec["group"], "model": spec.get("label", model), "method": label, "source": "measured",
                           "sparsity": f"{g['sparsity'].iloc[0]:.1%}"}
                    for task in [*tasks, "Mean"]:
                        row[task] = cell_text(*g.loc[task, ["value", "std", "n", "failed"]]) if task in g.index else ""
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

def published_delta(ppl: pd.DataFrame, zeroshot: pd.DataFrame, published: pd.DataFrame, config: dict) -> pd.DataFrame:
    """Our value beside each published one of the same model, method, pattern and data set, and the difference."""
    rows = []
    for r in published.itertuples():
        if r.dataset == ZEROSHOT_MEAN:
            ours, what = zeroshot[zeroshot["dataset"] == "Mean"], "zero-shot mean accuracy (%)"
        else:
            ours, what = ppl[ppl["dataset"] == r.dataset], f"{DATASET_TITLES.get(r.dataset, r.dataset)} perplexity"
        for method, spec in config["methods"].items():
            if spec["method"] != r.method or r.pattern not in grid.method_patterns(config, method):
                continue
            hit = ours[(ours["model"] == r.model) & (ours["method"] == method)
                       & (ours["column"] == column_of(method, spec["method"], r.pattern))
                       & (ours["method_label"] == spec.get("label", method))]
            cell = hit.iloc[0] if len(hit) else {"value": None, "std": None, "n": 0, "failed": 0}
            value = None if cell["value"] is None or pd.isna(cell["value"]) else float(cell["value"])
            mspec = config["models"][r.model]
            rows.append({
                "metric": what, "group": mspec["group"], "model": mspec.get("label", r.model),
                "method": spec.get("label", method),
                "pattern": "dense" if spec["method"] == "dense" else pattern_title(r.pattern, config),
                "ours": value, "std": cell["std"], "n": cell["n"], "failed": cell["failed"],
                "published": float(r.value), "source": r.source,
                "difference": value - r.value if value is not None else None,
                "relative": (value - r.value) / r.value if value is not None and r.value else None,
            })
    return pd.DataFrame(rows, columns=["metric", "group", "model", "method", "pattern", "ours", "std", "n", "failed",
                                       "published", "source", "difference", "relative"])


def published_delta_table(delta: pd.DataFrame) -> pd.DataFrame:
    """The comparison as shown: our cell's text, the published figure, the difference (absolute and relative)."""
    show = delta[["metric", "group", "model", "method", "pattern"]].copy()
    show["ours"] = [cell_text(r.ours, r.std, r.n, r.failed) for r in delta.itertuples()]
    show["published"] = [f"{v:.2f}" for v in delta["published"]]
    show["source"] = delta["source"]
    show["difference"] = ["" if pd.isna(v) else f"{v:+.2f}" for v in delta["difference"]]
    show["relative"] = ["" if pd.isna(v) else f"{v:+.1%}" for v in delta["relative"]]
    return show


# --- output ---

def markdown(tables, note: str = "") -> str:
    """The tables as Markdown, each under its title, the note below them; '' when there is none."""
    out = []
    for title, t in tables:
        out.append(f"## {title}\n")
        out.append("| " + " | ".join(map(str, t.columns)) + " |")
        out.append("|" + "---|" * len(t.columns))
        for _, r in t.iterrows():
            out.append("| " + " | ".join("" if v is None else str(v) for v in r.values) + " |")
        out.append("")
    if note and tables:
        out += [note, ""]
    return "\n".join(out)


def html_page(title: str, tables, note: str = "") -> str:
    """The tables as one small HTML page (the Snakemake report shows it as is)."""
    body = []
    for caption, t in tables:
        body.append(f"<h2>{html.escape(caption)}</h2>")
        body.append(t.to_html(index=False, border=0, na_rep="", classes="results"))
    if note:
        body.append(f"<p>{html.escape(note)}</p>")
    style = ("body{font-family:sans-serif;margin:1em} table.results{border-collapse:collapse;margin-bottom:1.5em}"
             " table.results td,table.results th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}"
             " table.results td:first-child,table.results th:first-child{text-align:left}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def _write_text(text: str, path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _write_csv(df: pd.DataFrame, path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def tidy(cells: pd.DataFrame, config: dict) -> pd.DataFrame:
    """Cells for a CSV: one row per cell with its numbers, its column's title and the text the tables show."""
    t = cells.copy()
    t.insert(t.columns.get_loc("column") + 1, "title", [pattern_title(c, config) if c != "dense" else "dense" for c in t["column"]])
    t["text"] = [cell_text(r.value, r.std, r.n, r.failed) for r in t.itertuples()]
    return t


SEEDS_NOTE = "Cells over several calibration seeds read mean ± std (number of seeds)."
SPARSITY_NOTE = "[x%]: the measured sparsity, where it differs from the column's."


def aggregate(ppl_files, report_files, zeroshot_files, config, out: dict, layer_files=()) -> str:
    """Write the outputs named in `out` and return the tables' Markdown (only tables with something to show).

    out keys: benchmark (long Parquet); table, csv, html (perplexity); zeroshot_table, zeroshot_csv, zeroshot_html;
    published_table, published_csv, published_html (ours against published figures); plot (perplexity bars),
    layer_plot (per-layer sparsity); cost_table, cost_csv, cost_html, cost_plot (wanda_core.cost). A key left out is not written; a table with no rows is written empty
    (Markdown and HTML without tables, CSV with its header only), never as a placeholder line.
    """
    from . import cost, plots

    df = long_table(ppl_files, report_files, config, zeroshot_files)
    df = cost.add_cost(df, ppl_files, zeroshot_files, report_files, config)  # each row's jobs: seconds, memory
    with atomic_path(out["benchmark"]) as tmp:
        df.to_parquet(tmp, index=False)
    published = published_for_grid(config.get("published"), config)
    ppl, zs = perplexity_cells(df), zeroshot_cells(df)
    several = bool(len(df)) and bool(df.groupby(["model", "method", "pattern", "dataset", "metric"])["seed"].nunique().max() > 1)
    seeds_note = SEEDS_NOTE if several else ""
    ppl_tables = perplexity_tables(ppl, published, config)
    noted = any(str(v).endswith("%]") for _, t in ppl_tables for v in t.to_numpy().ravel())  # a sparsity in brackets
    ppl_note = " ".join(n for n in (seeds_note, SPARSITY_NOTE if noted else "") if n)
    delta = published_delta(ppl, zs, published, config)
    sections = [
        ("perplexity", "table", "csv", "html", ppl_tables, tidy(ppl, config), ppl_note),
        ("zero-shot accuracy", "zeroshot_table", "zeroshot_csv", "zeroshot_html", zeroshot_tables(zs, published, config),
         tidy(zs, config), seeds_note),
        ("ours against published figures", "published_table", "published_csv", "published_html",
         [("Ours against published figures", published_delta_table(delta))] if len(delta) else [], delta, seeds_note),
    ]
    texts = []
    for name, md, csv, page, tables, cells, note in sections:
        text = markdown(tables, note)
        if md in out:
            _write_text(text, out[md])
        if csv in out:
            _write_csv(cells, out[csv])
        if page in out:
            _write_text(html_page(name, tables, note if tables else ""), out[page])
        if text:
            texts.append(text)
    if "plot" in out:
        plots.perplexity_plot(ppl, config, out["plot"])
    if "layer_plot" in out:
        plots.layer_sparsity_plot(layer_files, config, out["layer_plot"])
    if any(key in out for key in cost.OUTPUTS):
        texts.append(cost.write_cost(df, config, out))
    return "\n".join(t for t in texts if t)
