"""Cost as a result: the prune's time split, Snakemake's benchmark files joined onto the result rows, the cost
table and the quality-vs-cost plot."""
import json
from pathlib import Path

import pandas as pd
import pytest
from snakemake.benchmark import BenchmarkRecord, write_benchmark_records

import wanda_core as wc
from wanda_core.cli import main
from test_tables import demo_results, make_config
from tiny_models import tiny_input_ids, tiny_model
from wanda_core import cost, io
from wanda_core.timing import PhaseTimer

COST_KEYS = {"benchmark": ".parquet", "cost_table": ".md", "cost_csv": ".csv", "cost_html": ".html", "cost_plot": ".png"}


# --- the time split ---

def test_nested_phases_count_each_second_once(monkeypatch):
    clock = iter([0.0, 1.0, 3.0, 4.0, 7.0, 7.5]).__next__
    monkeypatch.setattr("wanda_core.timing.time.perf_counter", clock)
    timer = PhaseTimer()  # 0.0
    with timer("forward"):  # 1.0
        with timer("statistics"):  # 3.0: forward has 2 s
            pass  # 4.0: statistics 1 s
    # 7.0: forward 3 more s
    assert timer.seconds["forward"] == 5.0 and timer.seconds["statistics"] == 1.0
    assert timer.split(7.5) == {"forward": 5.0, "statistics": 1.0, "method": 0.0, "saving": 0.0, "other": 1.5}


@pytest.mark.parametrize("method,pipeline", [("wanda", "sequential"), ("wanda", "one_pass"), ("sparsegpt", "one_pass"),
                                             ("sparsegpt", "independent"), ("magnitude", "sequential")])
def test_prune_report_splits_its_seconds(method, pipeline):
    report = wc.prune(tiny_model("llama", num_hidden_layers=2), method, "unstructured", 0.5,
                      tiny_input_ids(batch=4, seq=32), batch_size=2, progress=False, pipeline=pipeline)
    split = report["seconds_split"]
    assert list(split) == ["forward", "statistics", "method", "saving", "other"]
    assert sum(split.values()) == pytest.approx(report["seconds"], abs=0.01)
    assert split["method"] > 0 and split["saving"] == 0  # the CLI saves, and adds its seconds
    calibrated = method != "magnitude"
    assert (split["forward"] > 0) == calibrated and (split["statistics"] > 0) == calibrated


def test_cli_prune_report_has_the_saving_seconds(tmp_path, tiny_dir):
    out = tmp_path / "p.safetensors"
    assert main(["--threads", "1", "prune", "--model", str(tiny_dir), "--method", "magnitude", "--sparsity", "0.5",
                 "--out", str(out), "--report", str(tmp_path / "p.json"), "--quiet"]) == 0
    split = json.loads((tmp_path / "p.json").read_text())["seconds_split"]
    assert split["saving"] > 0 and split["method"] > 0


# --- benchmark files joined onto the rows ---

def write_benchmark(path: Path, wall: float, cpu: float, rss: float) -> None:
    """A benchmark file as Snakemake writes it (its own writer)."""
    record = BenchmarkRecord(running_time=wall, max_rss=rss, max_vms=2 * rss, max_uss=rss, max_pss=rss, io_in=0.0,
                             io_out=0.0, cpu_time=cpu)
    record.data_collected = True
    path.parent.mkdir(parents=True, exist_ok=True)
    write_benchmark_records([record], str(path), False)


def test_benchmark_files_sit_where_the_rules_write_them():
    r = "results"
    assert cost.benchmark_of(f"{r}/pruned/m/wanda/2-4/seed0.json") == Path(f"{r}/benchmarks/prune/m/wanda/2-4/seed0.tsv")
    assert cost.benchmark_of(f"/x/{r}/ppl/m/wanda/2-4/seed0/wikitext2+lora.parquet") == \
        Path(f"/x/{r}/benchmarks/perplexity/m/wanda/2-4/seed0/wikitext2+lora.tsv")
    assert cost.benchmark_of(f"{r}/zeroshot/m/dense/none/noseed/boolq.parquet") == \
        Path(f"{r}/benchmarks/zeroshot/m/dense/none/noseed/boolq.tsv")
    assert cost.benchmark_of(f"{r}/calibration/m/c_stream_n2_len8_seed0.safetensors") == \
        Path(f"{r}/benchmarks/calibrate/m/c_stream_n2_len8_seed0.tsv")
    assert cost.benchmark_of(f"{r}/finetuned/m/wanda/2-4/seed0/lora") == Path(f"{r}/benchmarks/finetune/m/wanda/2-4/seed0/lora.tsv")
    with pytest.raises(ValueError):
        cost.benchmark_of("elsewhere/file.parquet")


def with_costs(tmp_path):
    """The demo results of test_tables, each job with a benchmark file and each prune report with a split."""
    r = demo_results(tmp_path)
    seconds = {"magnitude": 0.5, "wanda": 4.0, "three_tier": 12.0}
    for path in r.reports:
        report = json.loads(Path(path).read_text())
        method = Path(path).parts[-3]
        report["seconds"] = seconds[method]
        report["seconds_split"] = {"forward": 0.6 * seconds[method], "statistics": 0.1, "method": 0.3 * seconds[method] - 0.1,
                                   "saving": 0.2, "other": 0.1 * seconds[method]}
        io.write_json(report, path)
        write_benchmark(cost.benchmark_of(path), wall=seconds[method] + 5, cpu=seconds[method] + 4, rss=900.0)
    for path in r.ppl:
        write_benchmark(cost.benchmark_of(path), wall=3.0, cpu=2.5, rss=700.0)
    write_benchmark(tmp_path / "results/benchmarks/calibrate/m/c_stream_n2_len8_seed0.tsv", wall=1.5, cpu=1.0, rss=300.0)
    return r


def test_benchmark_figures_join_the_rows_they_cost(tmp_path):
    r = with_costs(tmp_path)
    _, out = r.aggregate(make_config(), COST_KEYS)
    df = pd.read_parquet(out["benchmark"]).set_index(["method", "pattern"])
    wanda = df.loc[("wanda", "2-4")]
    assert (wanda["prune_wall_s"], wanda["prune_cpu_s"], wanda["prune_max_rss_mib"]) == (9.0, 8.0, 900.0)
    assert (wanda["eval_wall_s"], wanda["eval_cpu_s"], wanda["eval_max_rss_mib"]) == (3.0, 2.5, 700.0)
    assert wanda["prune_forward_s"] == pytest.approx(2.4) and wanda["prune_saving_s"] == 0.2
    assert wanda["calibrate_wall_s"] == 1.5
    dense = df.loc[("dense", "none")]
    assert dense["eval_wall_s"] == 3.0 and pd.isna(dense["prune_wall_s"]) and pd.isna(dense["calibrate_wall_s"])
    assert pd.isna(df.loc[("magnitude", "2-4"), "calibrate_wall_s"])  # magnitude calibrates nothing


def test_missing_benchmark_files_leave_the_columns_empty(tmp_path):
    r = demo_results(tmp_path)  # results made before the benchmark files existed
    _, out = r.aggregate(make_config(), COST_KEYS)
    df = pd.read_parquet(out["benchmark"])
    assert "prune_wall_s" not in df or df["prune_wall_s"].isna().all()
    assert len(df) == len(r.ppl)


def test_cost_table_relative_to_wanda_and_plot(tmp_path):
    r = with_costs(tmp_path)
    text, out = r.aggregate(make_config(), COST_KEYS)
    cells = pd.read_csv(out["cost_csv"]).set_index(["method", "column"])
    assert cells.loc[("magnitude", "2-4"), "vs_wanda"] == pytest.approx(0.5 / 4.0)
    assert cells.loc[("three_tier", "match-three_tier"), "vs_wanda"] == pytest.approx(12.0 / 4.0)
    assert cells.loc[("wanda", "unstructured-0.5"), "job_wall_s"] == 9.0
    assert cells.loc[("wanda", "unstructured-0.5"), "perplexity"] == 33.0
    assert pd.isna(cells.loc[("dense", "dense"), "prune_s"]) and cells.loc[("dense", "dense"), "eval_s"] == 3.0
    md = Path(out["cost_table"]).read_text()
    assert md in text and "## Cost, Model (G)" in md
    row = next(line for line in md.splitlines() if "| Magnitude |" in line and "2:4" in line)
    assert "| 0.5 |" in row and "| 0.12x |" in row and "| 900 |" in row
    assert "<table" in Path(out["cost_html"]).read_text()
    assert open(out["cost_plot"], "rb").read(4) == b"\x89PNG"


def test_pareto_front():
    points = [(1.0, 90.0), (4.0, 33.0), (12.0, 386.0), (5.0, 30.0), (4.0, 40.0)]
    assert cost.pareto_front(points) == [0, 1, 3]
