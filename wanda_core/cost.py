"""What each cell cost: Snakemake's benchmark files joined onto the result rows, the prune-time split,
a cost table (method x model) and a quality-vs-cost plot.

Every compute job of the workflow writes a benchmark file (Snakemake's `benchmark:`) beside the
results, under results/benchmarks/<rule>/ with the path of the result it made:
  results/pruned/M/METHOD/PATTERN/SEED.json     -> results/benchmarks/prune/M/METHOD/PATTERN/SEED.tsv
  results/ppl/M/METHOD/PATTERN/SEED/D.parquet   -> results/benchmarks/perplexity/M/METHOD/PATTERN/SEED/D.tsv
  results/zeroshot/.../T.parquet                -> results/benchmarks/zeroshot/.../T.tsv
  results/calibration/M/C.safetensors           -> results/benchmarks/calibrate/M/C.tsv
  results/finetuned/M/METHOD/PATTERN/SEED/R     -> results/benchmarks/finetune/M/METHOD/PATTERN/SEED/R.tsv
  results/progressive/M/CHAIN/{prune,finetune}  -> results/benchmarks/progressive/M/CHAIN/{prune,finetune}.tsv
Snakemake measures the wall time exactly; CPU time and peak memory it samples (twice a second for
the first 15 s of a job, then every 30 s), so a long job's last seconds of CPU and a short peak of
memory between samples are missed. Results made before the benchmark files existed have no cost
columns (NA), and nothing is rerun for them.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from . import grid

# Snakemake's benchmark columns -> ours (seconds, seconds, MiB)
BENCHMARK_COLUMNS = {"s": "wall_s", "cpu_time": "cpu_s", "max_rss": "max_rss_mib"}
SPLIT = ("forward", "statistics", "method", "saving", "other")  # timing.PhaseTimer's phases, and the rest
RESULT_RULES = {"ppl": "perplexity", "zeroshot": "zeroshot", "pruned": "prune", "calibration": "calibrate",
                "finetuned": "finetune"}


def benchmark_of(result) -> Path:
    """The benchmark file of the job that made `result` (a path under results/<kind>/...)."""
    p = Path(result)
    parts = p.parts
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in RESULT_RULES and i > 0 and parts[i - 1] == "results":
            rest = Path(*parts[i + 1 :])
            name = rest.name if parts[i] == "finetuned" else rest.name.split(".", 1)[0]
            return Path(*parts[:i]) / "benchmarks" / RESULT_RULES[parts[i]] / rest.with_name(name + ".tsv")
    raise ValueError(f"{result}: not a result of the workflow (results/<kind>/...)")


def progressive_benchmarks(root, model: str, chain: str) -> list[Path]:
    """The benchmark files of one step of a progressive schedule (its prune and its fine-tuning)."""
    folder = Path(root) / "benchmarks" / "progressive" / model / chain
    return [folder / "prune.tsv", folder / "finetune.tsv"]


def read_benchmark(path) -> dict:
    """wall_s, cpu_s, max_rss_mib of one benchmark file (the median over its repeats); {} when missing."""
    p = Path(path)
    if not p.is_file():
        return {}
    d = pd.read_csv(p, sep="\t", na_values=["NA", "-"])
    return {ours: float(d[col].median()) for col, ours in BENCHMARK_COLUMNS.items()
            if col in d and d[col].notna().any()}


def _prefixed(prefix: str, figures: dict) -> dict:
    return {f"{prefix}_{k}": v for k, v in figures.items()}


def _combined(figures: list[dict]) -> dict:
    """Several jobs as one: seconds add up, memory is the largest."""
    figures = [f for f in figures if f]
    if not figures:
        return {}
    out = {k: sum(f.get(k, 0.0) for f in figures) for k in ("wall_s", "cpu_s")}
    out["max_rss_mib"] = max(f.get("max_rss_mib", float("nan")) for f in figures)
    return out


def _mib(nbytes) -> float | None:
    return None if nbytes is None or (isinstance(nbytes, float) and math.isnan(nbytes)) else nbytes / 2**20


def cost_columns(ppl_files, zeroshot_files, report_files, config: dict) -> pd.DataFrame:
    """Per result file: the cost of the jobs behind it, keyed by (model, method, pattern, seed, name).

    name is the result's data set or task, with '+<recipe or schedule>' for fine-tuned results.
    Columns: eval_*, prune_* and, for fine-tuned or progressive results, finetune_* (wall_s, cpu_s,
    max_rss_mib); calibrate_* for calibrated runs; the prune's time split prune_<phase>_s; peak GPU
    memory (CUDA) of the prune and of the evaluation, in MiB.
    """
    import json

    reports = {}
    for path in report_files:
        p = Path(path)
        reports[(*p.parts[-4:-1], p.name.removesuffix(".json"))] = (p, json.loads(p.read_text()))
    rows = []
    for path in [*ppl_files, *zeroshot_files]:
        p = Path(path)
        model, method, pattern, seed = p.parts[-5:-1]
        name = p.name.split(".", 1)[0]
        finetune = name.partition("+")[2]
        root = Path(*p.parts[:-6])
        row = {"model": model, "method": method, "pattern": pattern, "seed_dir": seed,
               **_prefixed("eval", read_benchmark(benchmark_of(p)))}
        result = pd.read_parquet(p)
        if "peak_gpu_bytes" in result:
            row["eval_peak_gpu_mib"] = _mib(result["peak_gpu_bytes"].max())
        found = reports.get((model, method, pattern, seed))
        if found:
            report_path, report = found
            row.update(_prefixed("prune", read_benchmark(benchmark_of(report_path))))
            row["prune_peak_gpu_mib"] = _mib(report.get("peak_gpu_bytes"))
            for phase, seconds in (report.get("seconds_split") or {}).items():
                row[f"prune_{phase}_s"] = seconds
        number = grid.seed_number(seed)
        if number is not None:
            calibration = root / "calibration" / model / f"{grid.calibration_id(config, number)}.safetensors"
            row.update(_prefixed("calibrate", read_benchmark(benchmark_of(calibration))))
        if finetune:
            recipes = (config.get("finetune") or {}).get("recipes") or {}
            if finetune in recipes:
                jobs = [read_benchmark(benchmark_of(root / "finetuned" / model / method / pattern / seed / finetune))]
            else:  # a progressive schedule: every step's prune and fine-tuning
                jobs = [read_benchmark(b) for step in grid.progressive_steps(config, finetune)
                        for b in progressive_benchmarks(root, model, step["chain"])]
            row.update(_prefixed("finetune", _combined(jobs)))
        # A zero-shot file holds the rows of its task (or of a group's tasks): one key per task.
        tasks = dict.fromkeys(result["task"]) if "task" in result else [name.partition("+")[0]]
        rows += [{**row, "name": f"{task}+{finetune}" if finetune else task} for task in tasks]
    return pd.DataFrame(rows)


def add_cost(df: pd.DataFrame, ppl_files, zeroshot_files, report_files, config: dict) -> pd.DataFrame:
    """The long table with the cost columns of each row's jobs joined on (NA where a job has no figures)."""
    if not len(df):
        return df
    cost = cost_columns(ppl_files, zeroshot_files, report_files, config)
    if not len(cost):
        return df
    key = pd.DataFrame({
        "model": df["model"], "method": df["method"], "pattern": df["pattern"],
        "seed_dir": [grid.NO_SEED if pd.isna(s) else f"seed{int(s)}" for s in df["seed"]],
        "name": [d if not f else f"{d}+{f}" for d, f in zip(df["dataset"], df["finetune"])],
    })
    joined = key.merge(cost, on=["model", "method", "pattern", "seed_dir", "name"], how="left")
    extra = [c for c in cost.columns if c not in key.columns]
    return pd.concat([df.reset_index(drop=True), joined[extra].reset_index(drop=True)], axis=1)


# --- the cost table ---

def _plain_wanda(config: dict) -> str | None:
    """The grid's reference for relative times: the method named 'wanda', else the first Wanda without options."""
    methods = config["methods"]
    if methods.get("wanda", {}).get("method") == "wanda":
        return "wanda"
    return next((m for m, spec in methods.items() if spec["method"] == "wanda" and not spec.get("params")), None)


def cost_cells(df: pd.DataFrame, config: dict) -> pd.DataFrame:
    """One row per (model, method, column) of pruned-not-fine-tuned runs: means over calibration seeds of
    the prune call's seconds and split, its job's wall, CPU and peak memory, the evaluation jobs' seconds
    (summed over data sets and tasks), the time relative to Wanda's on the same model and column, and the
    first data set's perplexity (for the plot)."""
    from .tables import column_order, model_order, ordered

    columns = ["model", "label", "method", "method_label", "column", "sparsity", "seeds", "prune_s", *[f"{p}_s" for p in SPLIT],
               "vs_wanda", "job_wall_s", "job_cpu_s", "job_max_rss_mib", "peak_gpu_mib", "eval_s", "dataset", "perplexity"]
    if not len(df):
        return pd.DataFrame(columns=columns)
    d = df[df["finetune"].isna()].copy() if "finetune" in df else df.copy()
    d["seed_key"] = d["seed"].astype("string").fillna(grid.NO_SEED)

    def col(frame, name):
        return frame[name] if name in frame else pd.Series(float("nan"), index=frame.index)

    # One row per prune job (model, method, pattern, seed), one per evaluation job.
    runs = d.drop_duplicates(["model", "method", "pattern", "seed_key"])
    evals = d.drop_duplicates(["model", "method", "pattern", "seed_key", "dataset"])
    ppl = d[(d["metric"] == "perplexity") & (d["status"] == "ok")]
    first_dataset = ppl["dataset"].iloc[0] if len(ppl) else None
    wanda = _plain_wanda(config)
    rows = []
    for (model, method, column), g in runs.groupby(["model", "method", "column"], sort=False):
        e = evals[(evals["model"] == model) & (evals["method"] == method) & (evals["column"] == column)]
        p = ppl[(ppl["model"] == model) & (ppl["method"] == method) & (ppl["column"] == column) & (ppl["dataset"] == first_dataset)]
        row = {"model": model, "label": g["label"].iloc[0], "method": method, "method_label": g["method_label"].iloc[0],
               "column": column, "sparsity": g["sparsity"].mean(), "seeds": len(g), "prune_s": col(g, "prune_seconds").mean()}
        for phase in SPLIT:
            row[f"{phase}_s"] = col(g, f"prune_{phase}_s").mean()
        row.update(job_wall_s=col(g, "prune_wall_s").mean(), job_cpu_s=col(g, "prune_cpu_s").mean(),
                   job_max_rss_mib=col(g, "prune_max_rss_mib").max(), peak_gpu_mib=col(g, "prune_peak_gpu_mib").max(),
                   eval_s=col(e, "eval_wall_s").sum(min_count=1) / max(len(g), 1),
                   dataset=first_dataset, perplexity=p["value"].mean() if len(p) else float("nan"))
        rows.append(row)
    cells = pd.DataFrame(rows, columns=columns)
    for i, r in cells.iterrows():
        ref = cells[(cells["model"] == r["model"]) & (cells["column"] == r["column"]) & (cells["method"] == wanda)]
        if len(ref) and r["column"] != "dense" and ref["prune_s"].iloc[0] > 0:
            cells.loc[i, "vs_wanda"] = r["prune_s"] / ref["prune_s"].iloc[0]
    # Models and columns in the perplexity tables' order, methods in the config's.
    cells["_m"] = cells["model"].map({m: i for i, m in enumerate(model_order(config))})
    cols = ordered(cells["column"], column_order(config))
    cells["_c"] = cells["column"].map({c: i for i, c in enumerate(cols)})
    cells["_k"] = cells["method"].map({m: i for i, m in enumerate(config["methods"])})
    return cells.sort_values(["_m", "_c", "_k"], kind="stable").drop(columns=["_m", "_c", "_k"]).reset_index(drop=True)


def _num(v, digits=1, suffix="") -> str:
    return "" if v is None or pd.isna(v) else f"{v:.{digits}f}{suffix}"


def cost_tables(cells: pd.DataFrame, config: dict) -> list[tuple[str, pd.DataFrame]]:
    """Per model: a row per (pattern, method) with the prune's seconds and split, the time relative to
    Wanda, the prune job's wall, CPU and peak memory, and the evaluations' seconds."""
    from .tables import column_sparsity, column_title

    tables = []
    gpu = cells["peak_gpu_mib"].notna().any() if len(cells) else False
    for model in dict.fromkeys(cells["model"]):
        c = cells[cells["model"] == model]
        rows = []
        for r in c.itertuples():
            pattern = "dense" if r.column == "dense" else column_title(r.column, config, column_sparsity(c, r.column))
            row = {"pattern": pattern, "method": r.method_label, "prune s": _num(r.prune_s),
                   "forward": _num(r.forward_s), "statistics": _num(r.statistics_s), "method s": _num(r.method_s),
                   "saving": _num(r.saving_s), "x Wanda": _num(r.vs_wanda, 2, "x"), "job wall s": _num(r.job_wall_s),
                   "job CPU s": _num(r.job_cpu_s), "peak RSS MiB": _num(r.job_max_rss_mib, 0)}
            if gpu:
                row["peak GPU MiB"] = _num(r.peak_gpu_mib, 0)
            row["evaluation s"] = _num(r.eval_s)
            rows.append(row)
        spec = config["models"][model]
        tables.append((f"Cost, {spec.get('label', model)} ({spec['group']})", pd.DataFrame(rows)))
    return tables


COST_NOTE = ("prune s: the pruning call, split into forward (calibration passes through the blocks), statistics and "
             "method s (scores, masks, weight updates); saving: writing the pruned file after it; x Wanda: prune s over "
             "Wanda's on the same model and pattern; job: the prune job as Snakemake's benchmark file measured it (start-up, "
             "model load and saving included; CPU and memory sampled); evaluation s: the wall time of the model's "
             "evaluation jobs. Means over calibration seeds.")


# --- quality against cost ---

def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower is better on both), by rising x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def quality_vs_cost_plot(cells: pd.DataFrame, dense: pd.DataFrame, config: dict, path) -> None:
    """One panel per (model, pattern): perplexity against the prune call's seconds, both on log axes, a
    labelled point per method, the Pareto front as a step line, the dense model as a dashed line.

    dense: the dense rows of cost_cells (their perplexity); cells: the pruned ones.
    """
    from .plots import _pyplot, _save
    from .tables import DATASET_TITLES, column_sparsity, column_title

    plt = _pyplot()
    from matplotlib import ticker

    c = cells[cells["prune_s"].notna() & cells["perplexity"].notna() & (cells["prune_s"] > 0)]
    panels = list(dict.fromkeys(zip(c["model"], c["column"])))
    ncols = min(4, max(len(panels), 1))
    nrows = max(math.ceil(len(panels) / ncols), 1)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.8 * nrows), squeeze=False)
    labels = list(dict.fromkeys(c["method_label"]))
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    for ax, (model, column) in zip(axes.ravel(), panels):
        g = c[(c["model"] == model) & (c["column"] == column)].reset_index(drop=True)
        points = list(zip(g["prune_s"], g["perplexity"]))
        front = pareto_front(points)
        fx, fy = [points[i][0] for i in front], [points[i][1] for i in front]
        ax.step(fx, fy, where="post", color="0.4", linewidth=1, zorder=1, label="Pareto front")
        for r in g.itertuples():
            on = r.Index in front
            ax.scatter(r.prune_s, r.perplexity, s=36 if on else 22, color=colours[r.method_label], zorder=2,
                       edgecolors="black" if on else "none")
            ax.annotate(r.method_label, (r.prune_s, r.perplexity), xytext=(4, 3), textcoords="offset points", fontsize=7)
        d = dense[dense["model"] == model]["perplexity"].dropna()
        if len(d):
            ax.axhline(float(d.iloc[0]), color="0.3", linestyle="--", linewidth=1, label=f"dense: {float(d.iloc[0]):.2f}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):  # plain numbers at 1, 2 and 5 of each decade
            axis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(ticker.NullFormatter())
        ax.margins(x=0.3, y=0.15)
        spec = config["models"][model]
        title = column_title(column, config, column_sparsity(cells[cells["model"] == model], column))
        ax.set_title(f"{spec.get('label', model).split(' (')[0]}: {title}", fontsize=9)
        ax.set_xlabel("prune time, s (log)", fontsize=8)
        dataset = g["dataset"].iloc[0]
        ax.set_ylabel(f"{DATASET_TITLES.get(dataset, dataset)} perplexity (log)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="best")
    for ax in axes.ravel()[len(panels):]:
        ax.set_axis_off()
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


OUTPUTS = ("cost_table", "cost_csv", "cost_html", "cost_plot")


def write_cost(df: pd.DataFrame, config: dict, out: dict) -> str:
    """Write the cost outputs named in `out` (cost_table, cost_csv, cost_html, cost_plot); returns the Markdown."""
    from .io import atomic_path
    from .tables import html_page, markdown

    cells = cost_cells(df, config)
    pruned = cells[cells["column"] != "dense"]
    tables = cost_tables(cells, config) if len(pruned) else []
    text = markdown(tables, COST_NOTE)
    for key, content in (("cost_table", text), ("cost_html", html_page("cost", tables, COST_NOTE if tables else ""))):
        if key in out:
            with atomic_path(out[key]) as tmp:
                tmp.write_text(content)
    if "cost_csv" in out:
        with atomic_path(out["cost_csv"]) as tmp:
            cells.to_csv(tmp, index=False)
    if "cost_plot" in out:
        quality_vs_cost_plot(pruned, cells[cells["column"] == "dense"], config, out["cost_plot"])
    return text
