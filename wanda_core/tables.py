"""Aggregation of the workflow's results: one long Parquet table, the paper's tables, a plot."""
from __future__ import annotations

import json
import math
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import yaml

from .grid import pattern_args, pattern_title
from .io import atomic_path, write_table

DATASET_TITLES = {"wikitext2": "WikiText-2"}


def git_commit(cwd=".") -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True)
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _target_sparsity(method_kind: str, pattern: str) -> float | None:
    if method_kind == "dense":
        return 0.0
    if pattern == "none":
        return None  # fixed by the method's own options (three_tier, hybrid_nm)
    return pattern_args(pattern)[1]


def _status(result: dict, metric: str, value: float) -> str:
    """'ok', or 'failed: <reason>': a non-finite value never counts as a result."""
    status = result.get("status")
    if isinstance(status, str) and status != "ok":
        return status
    return "ok" if math.isfinite(value) else f"failed: non-finite {metric}"


def _cell(hit: pd.DataFrame):
    """A table cell: the value, 'failed' for a recorded failure, None for no result."""
    if not len(hit):
        return None
    return float(hit["value"].iloc[0]) if hit["status"].iloc[0] == "ok" else "failed"


def long_table(ppl_files: list[str], report_files: list[str], config: dict, zeroshot_files=()) -> pd.DataFrame:
    """One row per (model, method, pattern, data set or task, metric) with its provenance."""
    reports = {}
    for path in report_files:
        p = Path(path)
        reports[(p.parts[-3], p.parts[-2], p.name.removesuffix(".json"))] = json.loads(p.read_text())
    calib = config["calibration"]
    commit = git_commit()
    rows = []

    def row(p: Path, result: dict, dataset: str, metric: str, value: float, **extra) -> dict:
        model, method, pattern = p.parts[-4], p.parts[-3], p.parts[-2]
        mspec, meth = config["models"][model], config["methods"][method]
        report = reports.get((model, method, pattern), {})
        finetune = p.stem.partition("+")[2] or None  # <data set or task>+<recipe or schedule>: fine-tuned
        sparsity = result.get("sparsity")  # measured on the evaluated weights (fine-tuned results)
        if sparsity is None or sparsity != sparsity:
            sparsity = report.get("sparsity", 0.0)
        return {
            "model": model, "label": mspec.get("label", model), "group": mspec["group"],
            "method": method, "method_label": meth.get("label", method) + _finetune_suffix(config, finetune),
            "method_kind": meth["method"], "finetune": finetune,
            "params": json.dumps({**report.get("params", {}), **meth.get("params", {})}, sort_keys=True),
            "pattern": pattern, "target_sparsity": _target_sparsity(meth["method"], pattern),
            "sparsity": sparsity, "dataset": dataset, "metric": metric, "value": value,
            "status": _status(result, metric, value), **extra,
            "prune_seconds": report.get("seconds"), "eval_seconds": result.get("seconds"),
            "calibration": f"{calib['dataset']} {calib['nsamples']}x{calib['seqlen']}", "seed": calib["seed"],
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
    return pd.DataFrame(rows)


def _finetune_suffix(config: dict, name: str | None) -> str:
    """' + <label>' of a fine-tuning recipe or progressive schedule, for the method's name in the tables."""
    if not name:
        return ""
    ft = config.get("finetune") or {}
    spec = (ft.get("recipes") or {}).get(name) or (ft.get("progressive") or {}).get(name) or {}
    return f" + {spec.get('label', name)}"


def published_rows(path, config: dict) -> pd.DataFrame:
    """Published figures for models of this config, each with its source."""
    if not path or not Path(path).is_file():
        return pd.DataFrame()
    rows = []
    for entry in yaml.safe_load(Path(path).read_text()) or []:
        for r in entry["rows"]:
            rows.append({**r, "source": entry["source"], "dataset": entry.get("dataset", "wikitext2")})
    df = pd.DataFrame(rows)
    return df[df["model"].isin(list(config["models"]))] if len(df) else df


def _fmt(v) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def zeroshot_tables(df: pd.DataFrame, config: dict) -> list[tuple[str, pd.DataFrame]]:
    """Per pattern, a row per (model, method) with each task's accuracy and their mean, as the paper's table."""
    acc = df[df["metric"] == "acc"]
    if not len(acc):
        return []
    if "finetune" not in acc.columns:
        acc = acc.assign(finetune=None)
    tasks = list(dict.fromkeys(acc["dataset"]))
    dense = acc[acc["method_kind"] == "dense"]
    tables = []
    for pattern in [p for p in acc["pattern"].unique() if p != "none"] + (["none"] if (acc["pattern"] == "none").any() else []):
        d = pd.concat([dense, acc[(acc["pattern"] == pattern) & (acc["method_kind"] != "dense")]])
        rows = []
        for _, g in d.groupby(["model", "method", "finetune"], sort=False, dropna=False):
            values = g.set_index("dataset")["value"]
            cells = {t: float(values[t]) * 100 if t in values else None for t in tasks}
            present = [v for v in cells.values() if v is not None]
            rows.append({"group": g["group"].iloc[0], "model": g["label"].iloc[0], "method": g["method_label"].iloc[0],
                         **cells, "Mean": sum(present) / len(present) if len(present) == len(tasks) else None})
        table = pd.DataFrame(rows).sort_values(["group"], kind="stable").reset_index(drop=True)
        tables.append((f"Zero-shot accuracy (%), {pattern_title(pattern)}", table.assign(pattern=pattern)))
    return tables


def wide_tables(df: pd.DataFrame, published: pd.DataFrame, config: dict) -> list[tuple[str, pd.DataFrame]]:
    """One table per (data set, pattern): a row per model (grouped by family), a column per method.

    The dense result is a column of every table; published figures get a row of their own, named by source.
    """
    tables = []
    methods = list(config["methods"])
    dense = [m for m in methods if config["methods"][m]["method"] == "dense"]
    df = df[df["metric"] == "perplexity"]
    if "finetune" not in df.columns:
        df = df.assign(finetune=None)
    # A column per (method, fine-tuning): a fine-tuned model's column follows its pruned model's.
    finetunes = [None] + list(dict.fromkeys(f for f in df["finetune"] if f))
    same_ft = lambda d, f: d["finetune"].isna() if f is None else d["finetune"] == f  # noqa: E731
    for dataset in df["dataset"].unique():
        d = df[df["dataset"] == dataset]
        for pattern in [p for p in d["pattern"].unique() if p != "none"] + (["none"] if (d["pattern"] == "none").any() else []):
            cols = [(m, None) for m in dense] + [
                (m, f) for m in methods for f in finetunes
                if (m not in dense or f) and ((d["method"] == m) & same_ft(d, f) & ((d["pattern"] == pattern) | (m in dense))).any()]
            if not [c for c in cols if c[0] not in dense]:
                continue
            rows = []
            for model in config["models"]:
                spec = config["models"][model]
                cell = {}
                for m, f in cols:
                    hit = d[(d["model"] == model) & (d["method"] == m) & same_ft(d, f) & ((d["pattern"] == pattern) | (m in dense))]
                    cell[config["methods"][m].get("label", m) + _finetune_suffix(config, f)] = _cell(hit)
                rows.append({"group": spec["group"], "model": spec.get("label", model), "source": "measured", **cell})
                if len(published):
                    pub = published[(published["model"] == model) & (published["dataset"] == dataset)]
                    for source in pub["source"].unique():
                        cell = {}
                        for m, f in cols:
                            if f:
                                continue
                            kind = config["methods"][m]["method"]
                            want = "none" if m in dense else pattern
                            hit = pub[(pub["source"] == source) & (pub["method"] == kind) & (pub["pattern"] == want)]
                            cell[config["methods"][m].get("label", m)] = float(hit["value"].iloc[0]) if len(hit) else None
                        if any(v is not None for v in cell.values()):
                            rows.append({"group": spec["group"], "model": spec.get("label", model), "source": source, **cell})
            table = pd.DataFrame(rows)
            table = table.sort_values(["group"], kind="stable").reset_index(drop=True)
            tables.append((f"{DATASET_TITLES.get(dataset, dataset)} perplexity, {pattern_title(pattern)}", table.assign(dataset=dataset, pattern=pattern)))
    return tables


def markdown(tables) -> str:
    out = []
    for title, t in tables:
        shown = t.drop(columns=[c for c in ("dataset", "pattern") if c in t.columns])
        out.append(f"## {title}\n")
        out.append("| " + " | ".join(shown.columns) + " |")
        out.append("|" + "---|" * len(shown.columns))
        for _, r in shown.iterrows():
            out.append("| " + " | ".join(_fmt(v) if isinstance(v, float) or v is None else str(v) for v in r.values) + " |")
        out.append("")
    return "\n".join(out)


def plot(df: pd.DataFrame, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(df["label"]))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        d = df[(df["label"] == model) & df["value"].notna()]
        labels = [f"{r.method_label}\n{r.pattern}" if r.pattern != "none" else r.method_label for r in d.itertuples()]
        ax.bar(range(len(d)), d["value"], color=[f"C{hash(p) % 10}" for p in d["pattern"]])
        ax.set_xticks(range(len(d)), labels, rotation=60, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{model} ({', '.join(d['dataset'].unique())})")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def aggregate(ppl_files, report_files, zeroshot_files, config, out: dict) -> str:
    """Write out["benchmark"] (long Parquet), the perplexity and zero-shot tables (.md, .csv) and the plot."""
    df = long_table(ppl_files, report_files, config, zeroshot_files)
    write_table(df.to_dict("records"), out["benchmark"])
    texts = []
    for tables, md, csv in [
        (wide_tables(df, published_rows(config.get("published"), config), config), out["table"], out["csv"]),
        (zeroshot_tables(df, config), out["zeroshot_table"], out["zeroshot_csv"]),
    ]:
        text = markdown(tables) or "No results.\n"
        with atomic_path(md) as tmp:
            tmp.write_text(text)
        write_table([r for _, t in tables for r in t.to_dict("records")], csv)
        texts.append(text)
    plot(df[df["metric"] == "perplexity"], out["plot"])
    return "\n".join(texts)
