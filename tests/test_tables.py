"""Aggregation and the grid: table layout, matched baselines, seeds as mean ± std, published deltas, no empty tables."""
import json

import pandas as pd
import pytest
import yaml

from wanda_core import aggregate, grid, io, tables
from wanda_core.errors import WandaError

OUT_KEYS = {"benchmark": ".parquet", "table": ".md", "csv": ".csv", "html": ".html", "zeroshot_table": ".md",
            "zeroshot_csv": ".csv", "zeroshot_html": ".html", "published_table": ".md", "published_csv": ".csv",
            "published_html": ".html", "plot": ".png", "layer_plot": ".png"}


def make_config(**extra):
    config = {
        "models": {"m": {"group": "G", "label": "Model"}},
        "methods": {"dense": {"method": "dense", "label": "Dense"},
                    "magnitude": {"method": "magnitude", "label": "Magnitude"},
                    "wanda": {"method": "wanda", "label": "Wanda"},
                    "three_tier": {"method": "three_tier", "label": "Three-tier", "matched": ["wanda", "magnitude"]}},
        "patterns": ["unstructured-0.5", "2-4"],
        "calibration": {"dataset": "c", "nsamples": 2, "seqlen": 8, "seeds": [0]},
        "evals": {"perplexity": {"datasets": ["wikitext2"]}},
        "published": None,
    }
    config.update(extra)
    return config


class Results:
    """Result files laid out as the workflow writes them, under tmp_path/results."""

    def __init__(self, root):
        self.root, self.ppl, self.reports, self.zeroshot, self.layers = root / "results", [], [], [], []

    def ppl_run(self, method, pattern, seed, value, sparsity=None, status="ok", dataset="wikitext2", target=None, seqlen=64,
                interval=None, **extra):
        path = self.root / "ppl" / "m" / method / pattern / seed / f"{dataset}.parquet"
        # What eval-ppl records of its protocol: every whole window of a 650-token text.
        row = {"perplexity": value, "status": status, "seconds": 1.0, "seqlen": seqlen, "seqlen_rule": "fixed",
               "windows": 650 // seqlen, "tokens": 650 // seqlen * seqlen, "text_tokens": 650, **extra}
        if interval:
            row.update(perplexity_low=interval[0], perplexity_high=interval[1])
        io.write_table([row], path)
        self.ppl.append(str(path))
        if method != "dense":
            self.report(method, pattern, seed, sparsity, target)

    def report(self, method, pattern, seed, sparsity, target=None):
        path = self.root / "pruned" / "m" / method / pattern / f"{seed}.json"
        if str(path) not in self.reports:
            calibration = None if seed == "noseed" else {"nsamples": "2", "seqlen": "8", "sampler": "stream", "seed": seed[4:]}
            io.write_json({"sparsity": sparsity, "target_sparsity": target, "seconds": 2.0, "params": {},
                           "calibration": calibration}, path)
            self.reports.append(str(path))
            layers = path.with_name(f"{seed}.layers.parquet")
            io.write_table([{"layer": f"model.layers.{b}.mlp.{k}", "block": b, "rows": 4, "cols": 8,
                             "sparsity": sparsity + 0.02 * (k == "up_proj") - 0.02 * (k == "gate_proj")}
                            for b in range(3) for k in ("gate_proj", "up_proj")], layers)
            self.layers.append(str(layers))

    def zeroshot_run(self, method, pattern, seed, accs: dict, sparsity=0.0, stderr=None):
        path = self.root / "zeroshot" / "m" / method / pattern / seed / "tasks.parquet"
        rows = [{"task": t, "metric": metric, "value": v, "stderr": stderr, "n": 100, "status": "ok", "lm_eval": "0.4.13",
                 "task_version": "2.0" if t == "boolq" else "1.0"} for t, v in accs.items() for metric in ("acc", "acc_norm")]
        io.write_table(rows, path)
        self.zeroshot.append(str(path))
        if method != "dense":
            self.report(method, pattern, seed, sparsity)

    def aggregate(self, config, keys=OUT_KEYS):
        out = {k: str(self.root / f"out-{k}{ext}") for k, ext in keys.items()}
        text = aggregate.aggregate(self.ppl, self.reports, self.zeroshot, config, out, self.layers)
        return text, out


def md_table(text: str, title: str) -> pd.DataFrame:
    """The Markdown table under `## title` as a frame of strings."""
    block = text.split(f"## {title}\n")[1].strip().split("\n\n")[0].splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in block if not line.startswith("|---")]
    return pd.DataFrame(cells[1:], columns=cells[0]).set_index("method", drop=False)


def demo_results(tmp_path, seeds=("seed0",)) -> Results:
    r = Results(tmp_path)
    r.ppl_run("dense", "none", "noseed", 20.0)
    r.ppl_run("magnitude", "unstructured-0.5", "noseed", 90.0, 0.5)
    r.ppl_run("magnitude", "2-4", "noseed", 300.0, 0.5)
    r.ppl_run("magnitude", "match-three_tier", "noseed", 60.0, 0.4137, target=0.4137)
    for i, seed in enumerate(seeds):
        r.ppl_run("wanda", "unstructured-0.5", seed, 33.0 + i, 0.5)
        r.ppl_run("wanda", "2-4", seed, 60.0 + 2 * i, 0.5)
        r.ppl_run("wanda", "match-three_tier", seed, 28.0 + i, 0.4136, target=0.4137)
        r.ppl_run("three_tier", "none", seed, 386.0 + 10 * i, 0.4137)
    return r


def test_failed_perplexity_is_a_failure_in_every_output(tmp_path):
    config = make_config()
    r = Results(tmp_path)
    r.ppl_run("dense", "none", "noseed", 7.5)
    r.ppl_run("wanda", "unstructured-0.5", "seed0", 9.25, 0.5)
    r.ppl_run("magnitude", "unstructured-0.5", "noseed", float("nan"), 0.5, status="failed: the model's logits are NaN in windows 0-0")
    text, out = r.aggregate(config)

    df = pd.read_parquet(out["benchmark"]).set_index("method")
    assert df.loc["magnitude", "status"] == "failed: the model's logits are NaN in windows 0-0"
    assert (df.loc[["dense", "wanda"], "status"] == "ok").all()
    t = md_table(text, "WikiText-2 perplexity, Model (G)")
    assert t.loc["Dense", "dense"] == "7.50" and t.loc["Wanda", "unstructured 50%"] == "9.25"
    assert t.loc["Magnitude", "unstructured 50%"] == "failed"
    csv = pd.read_csv(out["csv"]).set_index("method")
    assert csv.loc["magnitude", "text"] == "failed" and pd.isna(csv.loc["magnitude", "value"])
    assert csv.loc["magnitude", "failed"] == 1 and csv.loc["magnitude", "n"] == 0


def test_layout_rows_are_methods_columns_are_patterns_and_matched_sparsity(tmp_path):
    config = make_config()
    text, out = demo_results(tmp_path).aggregate(config)
    t = md_table(text, "WikiText-2 perplexity, Model (G)")
    # A row per method (dense is one), a column per pattern; three-tier's column carries its measured sparsity.
    assert list(t.columns) == ["method", "dense", "unstructured 50%", "2:4", "Three-tier (41.4%)"]
    assert list(t.index) == ["Dense", "Magnitude", "Wanda", "Three-tier"]
    assert t.loc["Dense"].tolist() == ["Dense", "20.00", "", "", ""]
    assert t.loc["Wanda"].tolist() == ["Wanda", "", "33.00", "60.00", "28.00"]
    # The matched baselines share three-tier's column: its value beside theirs at the same sparsity.
    assert t.loc["Three-tier", "Three-tier (41.4%)"] == "386.00"
    assert t.loc["Magnitude", "Three-tier (41.4%)"] == "60.00"
    assert "[x%]" not in text  # no cell is off its column's sparsity: no note
    csv = pd.read_csv(out["csv"])
    assert {"dataset", "model", "method", "column", "title", "value", "std", "n", "sparsity", "text"} <= set(csv.columns)
    wanda = csv[(csv["method"] == "wanda") & (csv["column"] == "match-three_tier")].iloc[0]
    assert wanda["title"] == "Three-tier sparsity" and wanda["sparsity"] == pytest.approx(0.4136)
    bench = pd.read_parquet(out["benchmark"]).set_index(["method", "pattern"])
    assert bench.loc[("wanda", "match-three_tier"), "target_sparsity"] == pytest.approx(0.4137)
    assert bench.loc[("wanda", "match-three_tier"), "column"] == "match-three_tier"
    assert pd.isna(bench.loc[("three_tier", "none"), "target_sparsity"])


def test_measured_sparsity_shown_where_it_is_not_the_columns(tmp_path):
    r = Results(tmp_path)
    r.ppl_run("dense", "none", "noseed", 20.0)
    r.ppl_run("wanda", "unstructured-0.5", "seed0", 33.0, 0.47)  # e.g. per-row rounding on a narrow matrix
    text, _ = r.aggregate(make_config())
    assert md_table(text, "WikiText-2 perplexity, Model (G)").loc["Wanda", "unstructured 50%"] == "33.00 [47.0%]"
    assert "[x%]: the measured sparsity" in text


def test_several_seeds_are_mean_std_and_count(tmp_path):
    config = make_config(calibration={"dataset": "c", "nsamples": 2, "seqlen": 8, "seeds": [0, 1, 2]})
    text, out = demo_results(tmp_path, seeds=("seed0", "seed1", "seed2")).aggregate(config)
    bench = pd.read_parquet(out["benchmark"])
    wanda = bench[(bench["method"] == "wanda") & (bench["pattern"] == "unstructured-0.5")]
    assert sorted(wanda["seed"].tolist()) == [0, 1, 2]  # one row per seed
    assert bench.loc[bench["method"] == "magnitude", "seed"].isna().all()  # no calibration: no seed
    t = md_table(text, "WikiText-2 perplexity, Model (G)")
    assert t.loc["Wanda", "unstructured 50%"] == "34.00 ± 1.00 (3)"
    assert t.loc["Wanda", "2:4"] == "62.00 ± 2.00 (3)"
    assert t.loc["Magnitude", "unstructured 50%"] == "90.00"  # one run: a plain value
    assert t.loc["Dense", "dense"] == "20.00"
    assert "mean ± std (number of seeds)" in text
    csv = pd.read_csv(out["csv"]).set_index(["method", "column"])
    assert csv.loc[("wanda", "2-4"), "std"] == pytest.approx(2.0) and csv.loc[("wanda", "2-4"), "n"] == 3


def test_zeroshot_over_seeds(tmp_path):
    config = make_config(calibration={"dataset": "c", "nsamples": 2, "seqlen": 8, "seeds": [0, 1]})
    config["evals"]["zeroshot"] = {"tasks": ["boolq", "rte"]}
    r = Results(tmp_path)
    r.zeroshot_run("dense", "none", "noseed", {"boolq": 0.70, "rte": 0.60})
    r.zeroshot_run("wanda", "2-4", "seed0", {"boolq": 0.60, "rte": 0.50}, sparsity=0.5)
    r.zeroshot_run("wanda", "2-4", "seed1", {"boolq": 0.62, "rte": 0.56}, sparsity=0.5)
    text, _ = r.aggregate(config)
    # The mean over tasks is taken per seed (55, 59), then over seeds.
    assert "| G | Model | Wanda | 50.0% | 61.00 ± 1.41 (2) | 53.00 ± 4.24 (2) | 57.00 ± 2.83 (2) |" in text
    assert "| G | Model | Dense | 0.0% | 70.00 | 60.00 | 65.00 |" in text
    assert text.strip().endswith("mean ± std (number of seeds).")


def test_zeroshot_cells_show_lm_evals_standard_error(tmp_path):
    config = make_config(calibration={"dataset": "c", "nsamples": 2, "seqlen": 8, "seeds": [0, 1]})
    config["evals"]["zeroshot"] = {"tasks": ["boolq", "rte"]}
    r = Results(tmp_path)
    r.zeroshot_run("dense", "none", "noseed", {"boolq": 0.70, "rte": 0.60}, stderr=0.01)
    r.zeroshot_run("wanda", "2-4", "seed0", {"boolq": 0.60, "rte": 0.50}, sparsity=0.5, stderr=0.01)
    r.zeroshot_run("wanda", "2-4", "seed1", {"boolq": 0.62, "rte": 0.56}, sparsity=0.5, stderr=0.01)
    text, out = r.aggregate(config)
    # One run: lm-eval's standard error of 1 point is +-2.0 at 95%; the mean of two tasks +-2.0 / sqrt(2). Two seeds
    # make wide intervals (Student's t with one degree of freedom): each overlaps dense's, so all carry the letter a.
    assert "| G | Model | Dense | 0.0% | 70.00 ±2.0 ~a | 60.00 ±2.0 ~a | 65.00 ±1.4 ~a |" in text
    assert "| G | Model | Wanda | 50.0% | 61.00 ± 1.41 (2) ~a | 53.00 ± 4.24 (2) ~a | 57.00 ± 2.83 (2) ~a |" in text
    assert "mean ± std (number of seeds)." in text and "lm-eval's standard error" in text
    assert text.strip().endswith("their order is not a result.")
    bench = pd.read_parquet(out["benchmark"])
    dense = bench[(bench["method"] == "dense") & (bench["metric"] == "acc")].set_index("dataset")
    assert dense.loc["boolq", "ci_low"] == pytest.approx(0.70 - 1.96 * 0.01, abs=1e-4)
    assert dense.loc["boolq", "ci_high"] == pytest.approx(0.70 + 1.96 * 0.01, abs=1e-4)


def test_a_failed_seed_is_counted_apart(tmp_path):
    r = Results(tmp_path)
    r.ppl_run("dense", "none", "noseed", 20.0)
    r.ppl_run("wanda", "unstructured-0.5", "seed0", 33.0, 0.5)
    r.ppl_run("wanda", "unstructured-0.5", "seed1", 35.0, 0.5)
    r.ppl_run("wanda", "unstructured-0.5", "seed2", float("nan"), 0.5, status="failed: NaN")
    text, _ = r.aggregate(make_config(calibration={"dataset": "c", "nsamples": 2, "seqlen": 8, "seeds": [0, 1, 2]}))
    assert md_table(text, "WikiText-2 perplexity, Model (G)").loc["Wanda", "unstructured 50%"] == "34.00 ± 1.41 (2), 1 failed"


def test_tie_letters_mark_overlapping_intervals():
    # a and b overlap; b and d; d and c; a is apart from d and c: three groups, lettered from the lowest up.
    letters = tables.tie_letters({"a": (1, 3), "b": (2, 4), "c": (5, 6), "d": (3.5, 5.5), "e": (9, 10), "f": (None, None)})
    assert letters == {"a": "a", "b": "ab", "d": "bc", "c": "c", "e": "", "f": ""}
    assert tables.tie_letters({"x": (1, 2), "y": (3, 4)}) == {"x": "", "y": ""}  # apart: no letters
    assert tables.tie_letters({"x": (1, 5), "y": (2, 3), "z": (2.5, 4)}) == {"x": "a", "y": "a", "z": "a"}


def test_perplexity_cells_show_their_interval_and_which_overlap(tmp_path):
    r = Results(tmp_path)
    run = {"dtype": "bfloat16", "isa": "avx2", "kernels": "AVX2", "window_nll": [3.4, 3.6, 3.5]}
    r.ppl_run("dense", "none", "noseed", 20.0, interval=(19.0, 21.2), **run)
    r.ppl_run("wanda", "unstructured-0.5", "seed0", 33.0, 0.5, interval=(31.0, 35.0), **run)
    r.ppl_run("magnitude", "unstructured-0.5", "noseed", 34.0, 0.5, interval=(32.0, 36.4), **run)
    r.ppl_run("wanda", "2-4", "seed0", 60.0, 0.5, interval=(55.0, 66.0), **run)
    r.ppl_run("magnitude", "2-4", "noseed", 300.0, 0.5, interval=(251.0, 351.0), **run)
    text, out = r.aggregate(make_config())
    t = md_table(text, "WikiText-2 perplexity, Model (G)")
    # Half the interval's width, to two digits; Wanda and magnitude at 50% overlap (a), at 2:4 they are apart.
    assert t.loc["Dense", "dense"] == "20.00 ±1.1"
    assert t.loc["Wanda", "unstructured 50%"] == "33.00 ±2.0 ~a" and t.loc["Magnitude", "unstructured 50%"] == "34.00 ±2.2 ~a"
    assert t.loc["Wanda", "2:4"] == "60.00 ±5.5" and t.loc["Magnitude", "2:4"] == "300.00 ±50"
    assert "±: half the width of the 95% interval" in text and "~a: cells of a column that share a letter" in text
    csv = pd.read_csv(out["csv"]).set_index(["method", "column"])
    assert csv.loc[("wanda", "2-4"), "low"] == 55.0 and csv.loc[("wanda", "2-4"), "high"] == 66.0
    assert csv.loc[("wanda", "unstructured-0.5"), "tie"] == "a" and pd.isna(csv.loc[("wanda", "2-4"), "tie"])
    bench = pd.read_parquet(out["benchmark"]).set_index(["method", "pattern"])
    assert bench.loc[("magnitude", "2-4"), "ci_low"] == 251.0 and bench.loc[("magnitude", "2-4"), "ci_high"] == 351.0
    assert list(bench.loc[("dense", "none"), "window_nll"]) == [3.4, 3.6, 3.5]  # for paired comparisons
    assert (bench["dtype"] == "bfloat16").all() and (bench["isa"] == "avx2").all() and (bench["kernels"] == "AVX2").all()
    assert open(out["plot"], "rb").read(4) == b"\x89PNG"


def test_cell_interval_over_seeds_adds_the_seeds_spread():
    ok = pd.DataFrame({"value": [33.0, 35.0], "ci_low": [32.0, 34.0], "ci_high": [34.0, 36.0]})
    low, high = tables.cell_interval(ok)
    from scipy import stats

    seeds = stats.t.ppf(0.975, 1) * ok["value"].std() / 2 ** 0.5  # Student's t of the mean of two seeds
    assert (low, high) == pytest.approx((34.0 - (seeds ** 2 + 1) ** 0.5, 34.0 + (seeds ** 2 + 1) ** 0.5))
    assert tables.cell_interval(ok.iloc[:1]) == (32.0, 34.0)
    assert tables.cell_interval(ok.assign(ci_low=[32.0, None])) == (None, None)  # a run without one: none


def write_published(tmp_path, blocks) -> str:
    path = tmp_path / "published.yaml"
    path.write_text(yaml.safe_dump(blocks, sort_keys=False))
    return str(path)


def test_published_rows_and_delta(tmp_path):
    calibration = {"dataset": "c", "sampler": "stream", "nsamples": 2, "seqlen": 8}
    published = write_published(tmp_path, [
        {"source": "Paper A", "dataset": "wikitext2",
         "protocol": {"eval": {"seqlen": 64, "windows": "all"}, "calibration": calibration, "seeds": 1},
         "rows": [{"model": "m", "method": "dense", "pattern": "none", "value": 19.5},
                  {"model": "m", "method": "wanda", "pattern": "unstructured-0.5", "value": 32.0},
                  {"model": "m", "method": "wanda", "pattern": "4-8", "value": 50.0},  # not in our grid
                  {"model": "other", "method": "wanda", "pattern": "2-4", "value": 9.0}]},  # not our model
        {"source": "Paper B", "dataset": "zeroshot-mean",
         "protocol": {"zeroshot": {"lm_eval": "0.4.13", "task_versions": {"boolq": "2.0", "rte": "1.0"}}, "calibration": calibration},
         "rows": [{"model": "m", "method": "wanda", "pattern": "unstructured-0.5", "value": 55.5}]},
    ])
    config = make_config(published=published)
    config["evals"]["zeroshot"] = {"tasks": ["boolq", "rte"]}
    r = demo_results(tmp_path)
    r.zeroshot_run("dense", "none", "noseed", {"boolq": 0.70, "rte": 0.60})
    r.zeroshot_run("wanda", "unstructured-0.5", "seed0", {"boolq": 0.65, "rte": 0.55}, sparsity=0.5)
    assert len(tables.published_for_grid(published, config)) == 3  # what the workflow declares outputs for
    text, out = r.aggregate(config)

    t = md_table(text, "WikiText-2 perplexity, Model (G)")
    rows = t[t["method"] == "Wanda"].set_index("source")
    assert rows.loc["measured", "unstructured 50%"] == "33.00" and rows.loc["Paper A", "unstructured 50%"] == "32.00"
    assert rows.loc["Paper A", "2:4"] == ""
    assert t.loc[t["source"] == "Paper A", "method"].tolist() == ["Dense", "Wanda"]  # after their method's row

    zs = text.split("## Zero-shot accuracy (%), unstructured 50%\n")[1]
    assert "| G | Model | Wanda | measured | 50.0% | 65.00 | 55.00 | 60.00 |" in zs
    assert "| G | Model | Wanda | Paper B |  |  |  | 55.50 |" in zs  # the published mean follows its row
    assert "| G | Model | Dense | measured | 0.0% | 70.00 | 60.00 | 65.00 |" in zs

    delta = pd.read_csv(out["published_csv"]).set_index(["metric", "method"])
    assert delta.loc[("WikiText-2 perplexity", "Wanda"), "published"] == 32.0
    assert delta.loc[("WikiText-2 perplexity", "Wanda"), "difference"] == pytest.approx(1.0)
    assert delta.loc[("WikiText-2 perplexity", "Wanda"), "relative"] == pytest.approx(1 / 32)
    assert delta.loc[("WikiText-2 perplexity", "Dense"), "difference"] == pytest.approx(0.5)
    assert delta.loc[("zero-shot mean accuracy (%)", "Wanda"), "ours"] == pytest.approx(60.0)
    assert delta.loc[("zero-shot mean accuracy (%)", "Wanda"), "difference"] == pytest.approx(4.5)
    assert len(delta) == 3
    shown = md_table((tmp_path / "results" / "out-published_table.md").read_text(), "Ours against published figures")
    assert shown.loc["Wanda"].values.tolist()[0] == [
        "WikiText-2 perplexity", "G", "Model", "Wanda", "unstructured 50%", "33.00", "32.00", "Paper A", "+1.00", "+3.1%",
        "eval 64 tokens, the whole test set; calibration c 2 x 8 (stream); 1 seed", "same protocol"]
    assert "<h2>Ours against published figures</h2>" in (tmp_path / "results" / "out-published_html.html").read_text()


def test_published_zeroshot_fractions_read_as_percent(tmp_path):
    published = write_published(tmp_path, [{"source": "S", "metric": "zeroshot-mean",
                                           "rows": [{"model": "m", "method": "dense", "pattern": "none", "value": 0.612}]}])
    pub = tables.published_rows(published, make_config())
    assert pub.iloc[0]["value"] == pytest.approx(61.2) and pub.iloc[0]["dataset"] == "zeroshot-mean"


def test_nothing_to_show_is_neither_printed_nor_a_placeholder(tmp_path):
    config = make_config()
    text, out = demo_results(tmp_path).aggregate(config)
    assert "No results" not in text and "Zero-shot" not in text and "published" not in text
    # Outputs that a config cannot fill are written empty but valid (the workflow does not even declare them).
    assert (tmp_path / "results" / "out-zeroshot_table.md").read_text() == ""
    assert pd.read_csv(out["zeroshot_csv"]).empty and "dataset" in pd.read_csv(out["zeroshot_csv"]).columns
    assert pd.read_csv(out["published_csv"]).empty
    assert "<table" not in (tmp_path / "results" / "out-zeroshot_html.html").read_text()
    assert tables.zeroshot_tables(tables.zeroshot_cells(pd.DataFrame()), pd.DataFrame(), config) == []
    # Only the outputs asked for are written.
    r = demo_results(tmp_path / "b")
    _, out = r.aggregate(config, keys={"benchmark": ".parquet", "table": ".md"})
    assert sorted(p.name for p in (tmp_path / "b" / "results").glob("out-*")) == ["out-benchmark.parquet", "out-table.md"]


def test_plots_are_pngs(tmp_path):
    config = make_config(calibration={"dataset": "c", "nsamples": 2, "seqlen": 8, "seeds": [0, 1]})
    r = demo_results(tmp_path, seeds=("seed0", "seed1"))
    _, out = r.aggregate(config)
    for key in ("plot", "layer_plot"):
        assert open(out[key], "rb").read(4) == b"\x89PNG"
    from wanda_core.plots import layer_table

    layers = layer_table(r.layers)
    assert set(layers["run_pattern"]) == {"unstructured-0.5", "2-4", "match-three_tier", "none"}
    assert set(layers["seed"]) == {"noseed", "seed0", "seed1"}


# --- the grid: seeds, matched baselines ---

def grid_config(**calibration):
    config = make_config()
    config["calibration"] = {"dataset": "c", "nsamples": 2, "seqlen": 8, **calibration}
    config["datasets"] = {"c": {"pydoc": "calibration"}, "wikitext2": {"pydoc": "evaluation"}}
    return config


def test_runs_have_a_seed_axis_only_where_calibration_is_used():
    runs = grid.runs(grid_config(seeds=[0, 1]))
    by_method = {}
    for run in runs:
        by_method.setdefault(run.method, []).append((run.pattern, run.seed))
    assert by_method["dense"] == [("none", "noseed")]
    assert by_method["magnitude"] == [("unstructured-0.5", "noseed"), ("2-4", "noseed"), ("match-three_tier", "noseed")]
    assert by_method["wanda"] == [(p, s) for p in ("unstructured-0.5", "2-4", "match-three_tier") for s in ("seed0", "seed1")]
    assert by_method["three_tier"] == [("none", "seed0"), ("none", "seed1")]
    assert runs[0].path == "m/dense/none/noseed"
    # Matched runs take the report of the same seed, or the first one when they calibrate nothing.
    assert grid.match_report(grid_config(seeds=[3, 4]), grid.Run("m", "wanda", "match-three_tier", "seed4")) == \
        "results/pruned/m/three_tier/none/seed4.json"
    assert grid.match_report(grid_config(seeds=[3, 4]), grid.Run("m", "magnitude", "match-three_tier", "noseed")) == \
        "results/pruned/m/three_tier/none/seed3.json"


def test_a_model_may_run_a_subset_of_the_methods():
    config = grid_config()
    config["models"]["m"]["methods"] = ["dense", "wanda"]  # no three_tier: no wanda at its sparsity either
    assert [(r.method, r.pattern) for r in grid.runs(config)] == [("dense", "none"), ("wanda", "unstructured-0.5"), ("wanda", "2-4")]
    config["models"]["m"]["methods"] = ["wanda", "three_tier"]
    assert ("wanda", "match-three_tier") in [(r.method, r.pattern) for r in grid.runs(config)]
    config["models"]["m"]["methods"] = ["lottery"]
    with pytest.raises(WandaError, match="models.m.methods: 'lottery' is not in methods"):
        grid.check_config(config, files=False)


def test_seeds_default_and_older_single_seed():
    assert grid.seeds(grid_config()) == [0]
    assert grid.seeds(grid_config(seed=7)) == [7]
    assert grid.seeds(grid_config(seeds=[1, 2])) == [1, 2]
    assert grid.calibration_id(grid_config(seeds=[1, 2]), 2) == "c_stream_n2_len8_seed2"  # the sampler names the file too
    with pytest.raises(WandaError, match="give seeds"):
        grid.check_config(grid_config(seed=1, seeds=[1]))


def test_pattern_labels_of_matched_baselines():
    config = grid_config()
    assert grid.pattern_args("match-three_tier") == ("unstructured", None)
    assert grid.pattern_title("match-three_tier", config) == "Three-tier sparsity"
    grid.check_config(config)


@pytest.mark.parametrize("matched,message", [
    ({"wanda": ["magnitude"]}, "only methods with their own structure"),
    ({"three_tier": ["nope"]}, "'nope' is not in methods"),
    ({"three_tier": ["dense"]}, "'dense' has its own structure"),
])
def test_bad_matched_config(matched, message):
    config = grid_config()
    for name, value in matched.items():
        config["methods"][name]["matched"] = value
    with pytest.raises(WandaError, match=message):
        grid.check_config(config)


def test_sparsity_from_a_prune_report(tmp_path):
    from wanda_core.cli import sparsity_from

    report = tmp_path / "r.json"
    report.write_text(json.dumps({"sparsity": 0.4137}))
    assert sparsity_from(report, "unstructured") == 0.4137
    with pytest.raises(WandaError, match="needs --pattern unstructured"):
        sparsity_from(report, "2:4")
    with pytest.raises(WandaError, match="not a prune report"):
        sparsity_from(tmp_path / "missing.json", "unstructured")
