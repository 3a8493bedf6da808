"""The workflow's plots: perplexity per model and pattern, and per-layer sparsity of the pruned models."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from . import grid
from .grid import MATCH
from .io import atomic_path
from .tables import DATASET_TITLES, column_order, column_sparsity, column_title, model_order, ordered


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def perplexity_plot(cells: pd.DataFrame, config: dict, path) -> None:
    """One panel per (model, data set): bars per pattern (groups) and method (colours), values on the bars.

    Dense is a dashed line across the panel (its 95% interval shaded); a method with its own structure is hatched,
    in the group of the plain methods pruned at its measured sparsity. Error bars: 95% intervals (tables.cell_interval;
    the std over calibration seeds for results without one). Bars of a group whose intervals overlap share a
    letter after their value ('~a'), as in the tables: their order is not a result.
    """
    from .tables import column_ties

    plt = _pyplot()
    panels = [(m, d) for d in cells["dataset"].unique() for m in model_order(config)
              if ((cells["model"] == m) & (cells["dataset"] == d)).any()]
    labels = ordered(cells["method_label"], [config["methods"][m].get("label", m) for m in config["methods"]])
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    widths = [max(2, cells[(cells["model"] == m) & (cells["dataset"] == d)]["column"].nunique()) for m, d in panels]
    fig, axes = plt.subplots(len(panels) or 1, 1, figsize=(max(7, 1.6 * max(widths, default=2) + 3), 4.2 * max(len(panels), 1)),
                             squeeze=False)
    tied = False
    for ax, (model, dataset) in zip(axes[:, 0], panels):
        c = cells[(cells["model"] == model) & (cells["dataset"] == dataset)]
        columns = [col for col in ordered(c["column"], column_order(config)) if col != "dense"]
        values = c["value"].dropna()
        log = len(values) > 1 and values.max() / max(values.min(), 1e-9) > 30
        dense = c[c["column"] == "dense"]
        for d in dense.itertuples():
            if d.n:
                ax.axhline(d.value, color="0.3", linestyle="--", linewidth=1, label=f"{d.method_label}: {d.value:.2f}")
                if _has_interval(d):
                    ax.axhspan(d.low, d.high, color="0.3", alpha=0.12, linewidth=0)
        ties = column_ties(c)
        for x, column in enumerate(columns):
            g = c[c["column"] == column]
            width = 0.8 / max(len(g), 1)
            for i, r in enumerate(g.itertuples()):
                xi = x - 0.4 + width * (i + 0.5)
                own = column == MATCH + r.method
                if not r.n:  # every seed failed: a marker, not a bar
                    ax.annotate("failed", (xi, 0.02), xycoords=("data", "axes fraction"), rotation=90, ha="center",
                                va="bottom", fontsize=7, color="red")
                    continue
                if _has_interval(r):  # the 95% interval, not symmetric for a perplexity
                    err, top = [[r.value - r.low], [r.high - r.value]], r.high
                else:
                    err, top = (r.std, r.value + r.std) if r.n > 1 else (None, r.value)
                ax.bar(xi, r.value, width * 0.9, color=colours[r.method_label], hatch="//" if own else None,
                       edgecolor="black" if own else None, yerr=err, capsize=2)
                tie = f" ~{ties[r.Index]}" if ties[r.Index] else ""
                tied = tied or bool(tie)
                ax.annotate((f"{r.value:.1f}" if r.value < 1000 else f"{r.value:.3g}") + tie, (xi, top), xytext=(0, 2),
                            textcoords="offset points", rotation=90, ha="center", va="bottom", fontsize=7)
        if columns:
            for x, column in enumerate(columns):
                if column.startswith(MATCH):
                    ax.axvspan(x - 0.45, x + 0.45, color="0.93", zorder=0)
            ax.set_xticks(range(len(columns)), [column_title(col, config, column_sparsity(c, col)) for col in columns])
        ax.set_xlim(-0.6, max(len(columns), 1) - 0.4)
        if log:
            ax.set_yscale("log")
        ax.margins(y=0.25)
        ax.set_ylabel("perplexity (lower is better)" + (", log scale" if log else ""))
        spec = config["models"][model]
        ax.set_title(f"{spec.get('label', model)}: {DATASET_TITLES.get(dataset, dataset)}")
        _panel_legend(ax, c, labels, colours, columns)
    if not panels:
        axes[0, 0].set_axis_off()
    intervals = bool(len(cells)) and cells.apply(_has_interval, axis=1).any()
    ties = "~a: bars of a group that share a letter have overlapping 95% intervals: their order is not a result."
    note = " ".join(n for n in ("Error bars and shading: 95% intervals." if intervals else "", ties if tied else "") if n)
    if note:
        fig.text(0.01, 0.005, note, fontsize=7, ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.03 if note else 0, 1, 1))
    _save(fig, path)
    plt.close(fig)


def _panel_legend(ax, c: pd.DataFrame, labels: list, colours: dict, columns: list) -> None:
    """Right of the panel: a colour per method shown, the dense lines, and the hatch of own-structure methods."""
    from matplotlib.patches import Rectangle

    names = ordered(c.loc[c["column"] != "dense", "method_label"], labels)
    handles = [Rectangle((0, 0), 1, 1, color=colours[name]) for name in names]
    dense_handles, dense_names = ax.get_legend_handles_labels()
    hybrid = [Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="black", hatch="//")]
    has_own = any(col.startswith(MATCH) for col in columns)
    ax.legend(handles + dense_handles + hybrid * has_own,
              names + dense_names + ["own structure (shaded: plain methods at its sparsity)"] * has_own,
              fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)


def _has_interval(r) -> bool:
    low, high = getattr(r, "low", None), getattr(r, "high", None)
    return bool(r.n) and low is not None and high is not None and not (pd.isna(low) or pd.isna(high))


def layer_table(layer_files) -> pd.DataFrame:
    """Per-matrix rows of every prune job's .layers.parquet, with the run (model, method, pattern, seed) of its path."""
    frames = []
    for path in layer_files:
        p = Path(path)
        d = pd.read_parquet(p)
        model, method, pattern = p.parts[-4:-1]
        frames.append(d.assign(model=model, run_method=method, run_pattern=pattern, seed=p.name.removesuffix(".layers.parquet")))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def layer_sparsity_plot(layer_files, config: dict, path) -> None:
    """Per model, two heat maps of sparsity: runs x blocks, and runs x matrix kinds (q_proj, ..., down_proj).

    Weighted by matrix size, averaged over seeds; the row labels carry each run's overall sparsity.
    """
    plt = _pyplot()
    d = layer_table(layer_files)
    # The colour scale spans the data in 5% steps: a few points between matrices stay visible.
    low = math.floor(d["sparsity"].min() * 20) / 20 if len(d) else 0.0
    high = max(math.ceil(d["sparsity"].max() * 20) / 20, low + 0.05) if len(d) else 1.0
    models = [m for m in config["models"] if len(d) and (d["model"] == m).any()]
    fig, axes = plt.subplots(max(len(models), 1), 2, squeeze=False, width_ratios=[3, 1], layout="constrained",
                             figsize=(13, 1.2 + 0.35 * max([_runs(d, m) for m in models], default=3) * max(len(models), 1)))
    image = None
    for row, model in zip(axes, models):
        m = d[d["model"] == model].copy()
        m["params"] = m["rows"] * m["cols"]
        m["zeros"] = m["sparsity"] * m["params"]
        m["kind"] = m["layer"].str.rsplit(".", n=1).str[-1]
        m["run"] = [_run_label(r.run_method, r.run_pattern, config) for r in m.itertuples()]
        runs = list(dict.fromkeys(m["run"]))
        overall = m.groupby("run", sort=False).apply(lambda g: g["zeros"].sum() / g["params"].sum(), include_groups=False)
        for ax, by in zip(row, ("block", "kind")):
            # Per seed first, then the mean over seeds: each seed's run weighs the same.
            per_seed = m.groupby(["run", "seed", by], sort=False)[["zeros", "params"]].sum()
            grid_ = (per_seed["zeros"] / per_seed["params"]).groupby(["run", by], sort=False).mean().unstack(by)
            grid_ = grid_.reindex(index=runs, columns=list(dict.fromkeys(m[by])))
            image = ax.imshow(grid_.to_numpy(), aspect="auto", vmin=low, vmax=high, cmap="viridis", interpolation="nearest")
            if by == "kind":  # few columns: the values themselves
                for (i, j), v in np.ndenumerate(grid_.to_numpy()):
                    ax.text(j, i, f"{v:.0%}" if v == v else "", ha="center", va="center", fontsize=6,
                            color="white" if v < (low + high) / 2 else "black")
            ax.set_xticks(range(grid_.shape[1]), [str(v) for v in grid_.columns], rotation=90 if by == "kind" else 0,
                          fontsize=7)
            ax.set_yticks(range(len(runs)), [f"{r} ({overall[r]:.1%})" for r in runs] if by == "block" else [""] * len(runs),
                          fontsize=7)
            ax.set_xlabel("transformer block" if by == "block" else "matrix")
        spec = config["models"][model]
        row[0].set_title(f"{spec.get('label', model)}: sparsity per block (overall in brackets)", fontsize=9)
        row[1].set_title("per matrix kind", fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), label="sparsity", shrink=0.8)
    else:
        for ax in axes.ravel():
            ax.set_axis_off()
    _save(fig, path)
    plt.close(fig)


def _runs(d: pd.DataFrame, model: str) -> int:
    m = d[d["model"] == model]
    return len(m[["run_method", "run_pattern"]].drop_duplicates())


def _run_label(method: str, pattern: str, config: dict) -> str:
    label = config["methods"].get(method, {}).get("label", method)
    if pattern == "none":
        return label
    return f"{label} · {grid.pattern_title(pattern, config)}"
