"""The workflow's last step: read the result files, write the long Parquet table, the tables, the plots and the cost.

This module only wires files together; what a table, a plot or a cost cell is lives in tables.py, plots.py and
cost.py, which do not import it (tables is the leaf they all read from).
"""
from __future__ import annotations

import re

import pandas as pd

from . import cost, plots
from .io import atomic_path
from .tables import (html_page, long_table, markdown, perplexity_captions, perplexity_cells, perplexity_tables,
                     published_delta, published_delta_table, published_for_grid, tidy, zeroshot_caption, zeroshot_cells,
                     zeroshot_tables)


SEEDS_NOTE = "Cells over several calibration seeds read mean ± std (number of seeds)."
SPARSITY_NOTE = "[x%]: the measured sparsity, where it differs from the column's."
INTERVAL_NOTE = ("±: half the width of the 95% interval (perplexity: over the evaluation windows; accuracy: lm-eval's "
                 "standard error).")
TIE_NOTE = "~a: cells of a column that share a letter have overlapping 95% intervals: their order is not a result."


def _notes(tables, *notes: str) -> str:
    """The notes that apply to these tables: the interval's when a cell shows one, the letters' when a cell has one."""
    cells = [str(v) for _, t in tables for v in t.to_numpy().ravel()]
    extra = [INTERVAL_NOTE if any(re.search(r" ±\d", v) for v in cells) else "",
             TIE_NOTE if any(re.search(r" ~[a-z]+$", v) for v in cells) else ""]
    return " ".join(n for n in (*notes, *extra) if n)


def aggregate(ppl_files, report_files, zeroshot_files, config, out: dict, layer_files=()) -> str:
    """Write the outputs named in `out` and return the tables' Markdown (only tables with something to show).

    out keys: benchmark (long Parquet); table, csv, html (perplexity); zeroshot_table, zeroshot_csv, zeroshot_html;
    published_table, published_csv, published_html (ours against published figures); plot (perplexity bars),
    layer_plot (per-layer sparsity); cost_table, cost_csv, cost_html, cost_plot (wanda_core.cost). A key left out is not written; a table with no rows is written empty
    (Markdown and HTML without tables, CSV with its header only), never as a placeholder line.
    """
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
    ppl_note = _notes(ppl_tables, seeds_note, SPARSITY_NOTE if noted else "")
    zs_tables = zeroshot_tables(zs, published, config)
    delta = published_delta(ppl, zs, published, config, df)
    compared_note = ("Our value is set beside a published one only where the protocols agree (evaluation length and "
                     "windows, calibration; zero-shot: lm-eval and task versions); elsewhere the comparison says what differs.")
    sections = [
        ("perplexity", "table", "csv", "html", ppl_tables, tidy(ppl, config, ["dataset", "model", "column"]), ppl_note,
         perplexity_captions(df, published, config)),
        ("zero-shot accuracy", "zeroshot_table", "zeroshot_csv", "zeroshot_html", zs_tables,
         tidy(zs, config), _notes(zs_tables, seeds_note), zeroshot_caption(df)),
        ("ours against published figures", "published_table", "published_csv", "published_html",
         [("Ours against published figures", published_delta_table(delta))] if len(delta) else [], delta,
         " ".join(n for n in (compared_note, seeds_note) if n), None),
    ]
    texts = []
    for name, md, csv, page, tables, cells, note, captions in sections:
        text = markdown(tables, note, captions)
        if md in out:
            _write_text(text, out[md])
        if csv in out:
            _write_csv(cells, out[csv])
        if page in out:
            _write_text(html_page(name, tables, note if tables else "", captions), out[page])
        if text:
            texts.append(text)
    if "plot" in out:
        plots.perplexity_plot(ppl, config, out["plot"])
    if "layer_plot" in out:
        plots.layer_sparsity_plot(layer_files, config, out["layer_plot"])
    if any(key in out for key in cost.OUTPUTS):
        texts.append(cost.write_cost(df, config, out))
    return "\n".join(t for t in texts if t)


def _write_text(text: str, path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _write_csv(df: pd.DataFrame, path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
