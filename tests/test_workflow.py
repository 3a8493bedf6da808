"""The Snakemake workflow: grid sizes, lint, a real end-to-end run, incremental reruns, seeds, report, GPU slots, bad configs."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tiny_models import save_tiny

ROOT = Path(__file__).resolve().parents[1]
TASKS = Path(__file__).parent / "data" / "tasks"


def smk(workdir, config, *args, timeout=900, env=None, snakefile=ROOT / "Snakefile"):
    """Run Snakemake on the repository's Snakefile (or `snakefile`) in `workdir` with `config` (bounded in time)."""
    cfg = Path(workdir) / "config.yaml"
    if not isinstance(config, (str, Path)):
        cfg.write_text(yaml.safe_dump(config, sort_keys=False))
        config = cfg
    lock = Path(workdir) / ".snakemake" / "locks"
    if lock.exists():
        for f in lock.iterdir():
            f.unlink()
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(snakefile), "--directory", str(workdir),
           "--configfile", str(config), "--cores", "2", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def job_counts(proc) -> dict:
    """Job counts per rule from a dry run's 'Job stats' table ({} when there is nothing to do)."""
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout + proc.stderr
    if "Nothing to be done" in text:
        return {}
    table = text.split("Job stats:")[1].split("\n\n")[0]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", table, flags=re.M))
    return {k: int(v) for k, v in counts.items() if k != "total"}


def job_models(proc) -> set:
    return set(re.findall(r"wildcards: model=([\w.-]+)", proc.stdout + proc.stderr))


def job_seeds(proc) -> set:
    return set(re.findall(r"wildcards: .*seed=(\w+)", proc.stdout + proc.stderr))


def md_rows(text: str, title: str) -> list[list[str]]:
    """The cells of the Markdown table under `## title`, header first."""
    block = text.split(f"## {title}\n")[1].strip().split("\n\n")[0].splitlines()
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in block if not line.startswith("|---")]


@pytest.fixture(scope="module")
def tiny_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return {arch: save_tiny(arch, root / f"tiny-{arch}") for arch in ("llama", "gpt2", "opt")}


def test_dry_run_grid_sizes(tmp_path):
    demo = job_counts(smk(tmp_path / "demo", ROOT / "config" / "config.yaml", "-n"))
    # SmolLM2: magnitude (2 patterns + three_tier's sparsity), wanda (3 patterns + three_tier's), sparsegpt (3),
    # alps (2), ria (2), owl, dsnot, three_tier: 17 prunes; Gemma runs its subset: wanda at 3 patterns.
    # Dense needs no pruning; perplexity and the offline pydoc_cloze task for each of the 18 + 4 models.
    assert demo == {"materialize_model": 2, "prepare_dataset": 2, "calibrate": 2, "prune": 20, "perplexity": 22,
                    "zeroshot": 22, "aggregate": 1, "all": 1}
    proc = smk(tmp_path / "paper", ROOT / "config" / "paper.yaml", "-n", "-p")  # offline: no Hub needed to plan
    paper = job_counts(proc)
    # 15 models (LLaMA-1, LLaMA-2, OPT) x 38 prunes: magnitude 3 patterns + three_tier's sparsity, wanda 5 + 1,
    # sparsegpt 5 + 1, ria 3, owl 3, dsnot 3, alps 4, admm 4, sparseswaps 4, three_tier; + dense for evaluation;
    # the 7 zero-shot tasks for each of the 585 (pruned) models.
    assert paper == {"materialize_model": 15, "prepare_dataset": 2, "calibrate": 15, "prune": 570,
                     "perplexity": 585, "zeroshot": 585 * 7, "aggregate": 1, "all": 1}
    # Each model at its own length (the Wanda code's rule): LLaMA-2 at 4096, LLaMA-1 and OPT at 2048.
    lengths = planned_lengths(proc)
    assert set(lengths["calibrate"]) == set(lengths["perplexity"]) == set(yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())["models"])
    for stage in ("calibrate", "perplexity"):
        assert {m: n for m, n in lengths[stage].items() if n == 4096} == {m: 4096 for m in ("llama2-7b", "llama2-13b", "llama2-70b")}
        assert all(n == 2048 for m, n in lengths[stage].items() if not m.startswith("llama2"))


def planned_lengths(proc) -> dict:
    """{'calibrate' | 'perplexity': {model: tokens per window}} from a dry run with -p: the calibration file's name and
    the length each evaluation command checks (--expect-seqlen, or a plain --seqlen)."""
    text = proc.stdout + proc.stderr
    out = {"calibrate": {}, "perplexity": {}}
    for model, n in re.findall(r"results/calibration/([\w.-]+)/\w+_n\d+_len(\d+)_seed\d+\.safetensors", text):
        out["calibrate"][model] = int(n)
    for line in text.splitlines():
        m = re.search(r"eval-ppl --model resources/models/([\w.-]+) .*--seqlen (?:model .*--expect-seqlen )?(\d+)", line)
        if m:
            assert out["perplexity"].setdefault(m.group(1), int(m.group(2))) == int(m.group(2)), line
    return out


def test_dry_run_plans_each_models_own_length(tmp_path):
    """seqlen: model: a LLaMA-2-shaped tiny model (max_position_embeddings 4096) plans 4096-token calibration and
    evaluation, a LLaMA-1-shaped one 2048, read from their config.json; a per-model seqlen overrides both."""
    sources = tmp_path / "sources"
    config = {
        "models": {"tiny-llama2": {"source": str(save_tiny("llama", sources / "llama2", max_position_embeddings=4096)), "group": "Tiny"},
                   "tiny-llama1": {"source": str(save_tiny("llama", sources / "llama1", max_position_embeddings=2048)), "group": "Tiny"},
                   "tiny-fixed": {"source": str(sources / "llama2"), "group": "Tiny", "seqlen": 512}},
        "methods": {"dense": {"method": "dense"}, "wanda": {"method": "wanda"}},
        "datasets": {"calib": {"pydoc": "calibration"}, "eval": {"pydoc": "evaluation"}},
        "calibration": {"dataset": "calib", "nsamples": 2, "seqlen": "model"},
        "evals": {"perplexity": {"datasets": ["eval"], "seqlen": "model"}},
        "published": None,
    }
    proc = smk(tmp_path, config, "-n", "-p")
    lengths = planned_lengths(proc)
    assert lengths == {stage: {"tiny-llama2": 4096, "tiny-llama1": 2048, "tiny-fixed": 512} for stage in ("calibrate", "perplexity")}
    assert "--seqlen model --expect-seqlen 4096" in proc.stdout + proc.stderr  # the job checks the length it was planned at

def test_dry_run_seed_axis(tmp_path):
    """Each calibration seed is one more calibration and one more prune and evaluation of each calibrated method."""
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config["models"] = dict(list(config["models"].items())[:1])
    config["evals"]["zeroshot"]["tasks"] = []
    config["calibration"]["seeds"] = [0, 1, 2]
    proc = smk(tmp_path, config, "-n")
    # Per seed: wanda (3 patterns + three_tier's sparsity), sparsegpt (3), alps and ria (2 each), owl, dsnot and
    # three_tier; magnitude (3) and dense once.
    assert job_counts(proc) == {"materialize_model": 1, "prepare_dataset": 2, "calibrate": 3, "prune": 3 + 3 * 14,
                                "perplexity": 4 + 3 * 14, "aggregate": 1, "all": 1}
    assert job_seeds(proc) == {"noseed", "seed0", "seed1", "seed2"}
    # The older single seed still reads as one seed.
    del config["calibration"]["seeds"]
    config["calibration"]["seed"] = 5
    proc = smk(tmp_path, config, "-n")
    assert job_counts(proc)["calibrate"] == 1 and job_seeds(proc) == {"noseed", "seed5"}


def test_lint_is_clean(tmp_path):
    proc = smk(tmp_path, ROOT / "config" / "config.yaml", "--lint")
    assert proc.returncode == 0 and "Congratulations" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def base_config(tiny_sources, **extra):
    config = {
        "models": {"tiny-llama": {"source": str(tiny_sources["llama"]), "group": "Tiny", "label": "Tiny-LLaMA"}},
        "methods": {"dense": {"method": "dense", "label": "Dense"}, "magnitude": {"method": "magnitude", "label": "Magnitude"}},
        "patterns": ["unstructured-0.5"],
        "datasets": {"calib": {"pydoc": "calibration"}, "eval": {"pydoc": "evaluation"}},
        "calibration": {"dataset": "calib", "nsamples": 4, "seqlen": 64},
        "evals": {"perplexity": {"datasets": ["eval"], "seqlen": 64, "max_windows": 2}},
    }
    config.update(extra)
    return config


@pytest.mark.parametrize("change,message", [
    (lambda c: c["calibration"].update(nsamples="many"), "config calibration.nsamples: 'many' is not an integer"),
    (lambda c: c["methods"].update(x={"method": "lottery"}), "config methods.x: unknown method 'lottery'"),
    (lambda c: c.update(patterns=["3-3"]), "config patterns: N:M pattern needs 0 < N < M, got '3:3'"),
    (lambda c: c.update(patterns=["2:4"]), "config patterns[0]: '2:4' is not accepted: use unstructured-<sparsity"),
    (lambda c: c.update(patterns=["unstructured-0.5", "unstructured-1.5"]), "config patterns[1]: 'unstructured-1.5' is not accepted"),
    (lambda c: c["methods"]["magnitude"].update(patterns=["2:4"]), "config methods.magnitude.patterns: unknown pattern label '2:4'"),
    (lambda c: c["methods"].update(t={"method": "three_tier", "params": {"dense": 0.5}}), "must sum to 1"),
    (lambda c: c["evals"]["perplexity"].update(datasets=["c4"]), "evals.perplexity.datasets: 'c4' is not in datasets"),
    (lambda c: c["models"]["tiny-llama"].update(gpus=-1), "config models.tiny-llama.gpus: -1 is below the minimum 0"),
    (lambda c: c["models"]["tiny-llama"].update(gpu=1), "config models.tiny-llama: unknown key 'gpu' (accepted: source, trust_remote_code, blocks, dtype,"),
    (lambda c: c["datasets"].update(eval={"path": "no/such/test.txt"}), "config datasets.eval.path: data file not found: no/such/test.txt"),
    (lambda c: c["evals"].update(zeroshot={"tasks": ["no_such_task"]}), "unknown zero-shot task 'no_such_task'"),
])
def test_bad_config_stops_before_any_job(tmp_path, tiny_sources, change, message):
    config = base_config(tiny_sources)
    change(config)
    proc = smk(tmp_path, config)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert message in out, out
    assert "Failed validating" not in out and "Traceback" not in out, out  # one line, not jsonschema's dump
    assert not (tmp_path / "results").exists() and not (tmp_path / "resources").exists()


def test_missing_data_file_stops_before_old_outputs_are_touched(tmp_path, tiny_sources):
    """A data file renamed in the config: Snakemake would rerun prepare_dataset (its params changed) and delete
    the output it has; the check at parse time stops first."""
    config = base_config(tiny_sources)
    text = tmp_path / "eval.txt"
    text.write_text("some text\n" * 200)
    config["datasets"]["eval"] = {"path": str(text)}
    assert smk(tmp_path, config, "--until", "prepare_dataset").returncode == 0
    prepared = tmp_path / "resources" / "data" / "eval.jsonl"
    before = prepared.read_bytes()
    config["datasets"]["eval"] = {"path": str(tmp_path / "renamed.txt")}
    proc = smk(tmp_path, config)
    assert proc.returncode != 0 and f"config datasets.eval.path: data file not found: {tmp_path / 'renamed.txt'}" in proc.stderr
    # Nothing but the first run's log (results/logs/prepare_dataset) is under results/.
    assert prepared.read_bytes() == before and not [p for p in (tmp_path / "results").rglob("*") if p.is_file() and "logs" not in p.parts]


def test_duplicate_model_names_and_labels_stop_before_any_job(tmp_path, tiny_sources):
    config = base_config(tiny_sources)
    text = yaml.safe_dump(config, sort_keys=False)
    # A second entry under the same name: YAML alone would keep the last one without a word.
    twice = text.replace("models:\n", f"models:\n  tiny-llama:\n    source: {tiny_sources['gpt2']}\n    group: Tiny\n", 1)
    (tmp_path / "dup.yaml").write_text(twice)
    proc = smk(tmp_path, tmp_path / "dup.yaml")
    assert proc.returncode != 0
    assert "duplicate key 'tiny-llama' (first on line 2)" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    config["models"]["other"] = {"source": str(tiny_sources["gpt2"]), "group": "Tiny", "label": "Tiny-LLaMA"}
    proc = smk(tmp_path, config)
    assert proc.returncode != 0
    assert "'tiny-llama' and 'other' have the same label 'Tiny-LLaMA'" in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "resources").exists()


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, tiny_sources, smollm2_dir, wikitext):
    """One real run: a tiny random model and SmolLM2-135M, on WikiText-2."""
    workdir = tmp_path_factory.mktemp("e2e")
    config = {
        "models": {
            "tiny-llama": {"source": str(tiny_sources["llama"]), "group": "Tiny", "label": "Tiny-LLaMA"},
            "smollm2-135m": {"source": str(smollm2_dir), "group": "SmolLM2", "label": "SmolLM2-135M", "dtype": "float32"},
        },
        "methods": {
            "dense": {"method": "dense", "label": "Dense"},
            "magnitude": {"method": "magnitude", "label": "Magnitude"},
            "wanda": {"method": "wanda", "label": "Wanda", "patterns": ["unstructured-0.5", "2-4"]},
            "sparsegpt": {"method": "sparsegpt", "label": "SparseGPT"},
        },
        "patterns": ["unstructured-0.5"],
        "datasets": {"wikitext2-valid": {"path": str(wikitext / "valid.txt")},
                     "wikitext2": {"path": str(wikitext / "test.txt")}},
        "calibration": {"dataset": "wikitext2-valid", "nsamples": 4, "seqlen": 128, "seeds": [0]},
        "evals": {"perplexity": {"datasets": ["wikitext2"], "seqlen": 256, "max_windows": 3, "batch_size": 3},
                  "zeroshot": {"tasks": ["tiny_mc"], "include_path": str(TASKS), "limit": 8, "batch_size": 4}},
        "published": None,
    }
    proc = smk(workdir, config, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return workdir, config, proc


@pytest.mark.slow  # the e2e fixture runs the workflow on SmolLM2 (about 4 min)
def test_end_to_end_results(e2e):
    workdir, config, proc = e2e
    results = workdir / "results"
    df = pd.read_parquet(results / "benchmark.parquet")
    expected = {"model", "group", "method", "pattern", "target_sparsity", "sparsity", "dataset", "metric", "value",
                "wanda_core", "torch", "transformers", "lm_eval", "git_commit", "device", "calibration", "seed", "time"}
    assert expected <= set(df.columns)
    zs, df = df[df["metric"] != "perplexity"], df[df["metric"] == "perplexity"]
    assert len(df) == 2 * 5  # 2 models x (dense, magnitude, wanda x2, sparsegpt)
    assert df["value"].notna().all() and (df["value"] > 1).all() and (df["status"] == "ok").all()
    assert set(df["dataset"]) == {"wikitext2"}
    assert df.loc[df["method"].isin(["dense", "magnitude"]), "seed"].isna().all() and set(df["seed"].dropna()) == {0}
    assert len(zs) == 2 * 5 * 2 and set(zs["metric"]) == {"acc", "acc_norm"} and set(zs["dataset"]) == {"tiny_mc"}
    assert zs["value"].between(0, 1).all() and (zs["n"] == 8).all() and zs["lm_eval"].str.startswith("0.4").all()
    zs_table = (results / "tables" / "zeroshot.md").read_text()
    assert "Zero-shot accuracy (%), unstructured 50%" in zs_table and "| tiny_mc | Mean |" in zs_table
    pruned = df[df["method"] != "dense"]
    assert (pruned["sparsity"].round(4) == 0.5).all() and (pruned["target_sparsity"] == 0.5).all()
    smol = df[df["model"] == "smollm2-135m"].set_index(["method", "pattern"])["value"]
    assert smol[("dense", "none")] < smol[("wanda", "unstructured-0.5")] < smol[("magnitude", "unstructured-0.5")]
    assert smol[("sparsegpt", "unstructured-0.5")] < smol[("magnitude", "unstructured-0.5")]

    table = (results / "tables" / "perplexity.md").read_text()
    assert "## WikiText-2 perplexity, SmolLM2-135M (SmolLM2)" in table and "## WikiText-2 perplexity, Tiny-LLaMA (Tiny)" in table
    rows = md_rows(table, "WikiText-2 perplexity, SmolLM2-135M (SmolLM2)")
    assert rows[0] == ["method", "dense", "unstructured 50%", "2:4"]
    assert [r[0] for r in rows[1:]] == ["Dense", "Magnitude", "Wanda", "SparseGPT"]
    # Each value with half its 95% interval over the 3 evaluation windows (and a letter where it overlaps another).
    assert rows[3][:2] == ["Wanda", ""] and rows[3][2].startswith(f"{smol[('wanda', 'unstructured-0.5')]:.2f} ±")
    assert rows[3][3].startswith(f"{smol[('wanda', '2-4')]:.2f} ±")
    assert (df["ci_low"] < df["value"]).all() and (df["value"] < df["ci_high"]).all()
    from wanda_core.hardware import auto_dtype, cpu_isa

    # SmolLM2 is fixed at float32; the tiny model's dtype is `auto`: bfloat16 only where this CPU computes it natively.
    assert df["window_nll"].map(len).eq(3).all()
    assert (df.loc[df["model"] == "smollm2-135m", "dtype"] == "float32").all()
    assert (df.loc[df["model"] == "tiny-llama", "dtype"] == auto_dtype()).all()

    assert (df["isa"] == cpu_isa()).all() and df["kernels"].notna().all() and (df.loc[df["method"] != "dense", "prune_isa"] == cpu_isa()).all()
    assert zs["ci_low"].notna().all()  # lm-eval's standard error, as an interval
    csv = pd.read_csv(results / "tables" / "perplexity.csv")
    assert {"dataset", "model", "method", "column", "value", "std", "n", "sparsity", "text"} <= set(csv.columns)
    assert len(csv) == 2 * 5 and (csv["n"] == 1).all()
    assert "<h2>WikiText-2 perplexity, SmolLM2-135M (SmolLM2)</h2>" in (results / "tables" / "perplexity.html").read_text()
    for plot in ("perplexity.png", "layer_sparsity.png"):
        assert (results / "plots" / plot).read_bytes()[:4] == b"\x89PNG"
    assert not (results / "tables" / "published.md").exists()  # no published figures for this grid: not an output
    layers = pd.read_parquet(results / "pruned" / "smollm2-135m" / "wanda" / "2-4" / "seed0.layers.parquet")
    assert {"layer", "block", "rows", "cols", "sparsity", "seconds", "tokens", "peak_memory_bytes"} <= set(layers.columns)
    assert len(layers) == 30 * 7 and (layers["sparsity"] == 0.5).all()
    assert (results / "logs" / "prune" / "smollm2-135m" / "wanda" / "2-4" / "seed0.log").is_file()
    assert not (workdir / "logs").exists()  # every log is under results/logs
    assert "Tiny-LLaMA" in proc.stdout  # the tables are printed at the end
    # The terminal follows the long jobs block by block; each job's whole log is in results/logs/.
    assert "resources/models/smollm2-135m wanda 2:4: pruned block 30/30 (" in proc.stderr, proc.stderr[-3000:]
    assert re.search(r"smollm2-135m: perplexity \d+\.\d+ on resources/data/wikitext2.jsonl", proc.stderr)
    log = (workdir / "results" / "logs" / "prune" / "smollm2-135m" / "wanda" / "2-4" / "seed0.log").read_text()
    assert "loading model" in log and "pruned block 30/30" in log and "torch threads" in log


@pytest.mark.slow  # the e2e fixture runs the workflow on SmolLM2 (about 4 min)
def test_report_after_a_run(e2e):
    workdir, config, _ = e2e
    report = workdir / "results" / "report.html"
    proc = smk(workdir, config, "--report", report)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    text = report.read_text()
    for item in ("perplexity.html", "zeroshot.html", "perplexity.png", "layer_sparsity.png",
                 "matched baselines", "per-layer statistics"):  # the items and (words of) their captions
        assert item in text, item


@pytest.mark.slow  # the e2e fixture runs the workflow on SmolLM2 (about 4 min)
def test_noop_rerun_does_nothing(e2e):
    workdir, config, _ = e2e
    assert job_counts(smk(workdir, config, "-n")) == {}
    (ROOT / "README.md").touch()  # an unrelated file
    (workdir / "notes.txt").write_text("unrelated")
    assert job_counts(smk(workdir, config, "-n")) == {}


@pytest.mark.slow  # the e2e fixture runs the workflow on SmolLM2 (about 4 min)
def test_adding_a_model_runs_only_its_jobs(e2e, tiny_sources):
    workdir, config, _ = e2e
    config = json.loads(json.dumps(config))
    config["models"]["tiny-gpt2"] = {"source": str(tiny_sources["gpt2"]), "group": "Tiny"}
    proc = smk(workdir, config, "-n")
    assert job_counts(proc) == {"materialize_model": 1, "calibrate": 1, "prune": 4, "perplexity": 5, "zeroshot": 5,
                                "aggregate": 1, "all": 1}
    assert job_models(proc) == {"tiny-gpt2"}


@pytest.mark.slow  # the e2e fixture runs the workflow on SmolLM2 (about 4 min)
def test_adding_a_seed_runs_only_its_jobs(e2e):
    workdir, config, _ = e2e
    config = json.loads(json.dumps(config))
    config["calibration"]["seeds"] = [0, 1]
    proc = smk(workdir, config, "-n")
    # Per model: its calibration, then wanda x2 and sparsegpt; dense and magnitude use no calibration and do not
    # run again.
    assert job_counts(proc) == {"calibrate": 2, "prune": 2 * 3, "perplexity": 2 * 3, "zeroshot": 2 * 3,
                                "aggregate": 1, "all": 1}
    assert job_seeds(proc) == {"seed1"}


@pytest.mark.slow  # the e2e fixture runs the workflow on SmolLM2 (about 4 min)
def test_a_label_change_reruns_only_the_tables(e2e):
    workdir, config, _ = e2e
    config = json.loads(json.dumps(config))
    config["methods"]["wanda"]["label"] = "Wanda (ours)"
    proc = smk(workdir, config, "-n")
    assert job_counts(proc) == {"aggregate": 1, "all": 1}
    # Its reason names a short hash of the config, not the config itself.
    reason = next(line for line in (proc.stdout + proc.stderr).splitlines() if "reason: Params have changed" in line)
    assert len(reason) < 200, reason  # short hashes of the config, not the config itself


@pytest.mark.slow  # the e2e fixture runs the workflow on SmolLM2 (about 4 min)
def test_adding_a_task_runs_only_the_new_evaluations(e2e):
    workdir, config, _ = e2e
    config = json.loads(json.dumps(config))
    config["evals"]["zeroshot"]["tasks"].append("tiny_mc_b")
    assert job_counts(smk(workdir, config, "-n")) == {"zeroshot": 10, "aggregate": 1, "all": 1}


@pytest.mark.slow  # the e2e fixture runs the workflow on SmolLM2 (about 4 min)
def test_adding_an_evaluation_reruns_no_pruning(e2e, wikitext):
    workdir, config, _ = e2e
    config = json.loads(json.dumps(config))
    config["datasets"]["wikitext2-valid-ppl"] = {"path": str(wikitext / "valid.txt")}
    config["evals"]["perplexity"]["datasets"].append("wikitext2-valid-ppl")
    counts = job_counts(smk(workdir, config, "-n"))
    assert counts == {"prepare_dataset": 1, "perplexity": 10, "aggregate": 1, "all": 1}


def test_seeds_and_matched_baselines_end_to_end(tmp_path, tiny_sources):
    """Two calibration seeds and Wanda/magnitude at three-tier's measured sparsity, on the tiny model."""
    config = base_config(tiny_sources, published=None)
    config["methods"]["wanda"] = {"method": "wanda", "label": "Wanda"}
    config["methods"]["three_tier"] = {"method": "three_tier", "label": "Three-tier", "matched": ["wanda", "magnitude"]}
    config["calibration"]["seeds"] = [0, 1]
    proc = smk(tmp_path, config, timeout=1800)  # 23 small jobs
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    df = pd.read_parquet(tmp_path / "results" / "benchmark.parquet")
    # dense, magnitude x2 once; wanda x2 and three_tier per seed.
    assert len(df) == 3 + 2 * 3 and (df["status"] == "ok").all()
    runs = df.set_index(["method", "pattern", "seed"])
    for seed in (0, 1):
        hybrid = runs.loc[("three_tier", "none", seed), "sparsity"]
        # Wanda at exactly what three-tier measured with the same seed (read from its report when the job ran),
        # up to Wanda's per-row rounding: one weight in a row of 64 inputs.
        assert runs.loc[("wanda", "match-three_tier", seed), "target_sparsity"] == pytest.approx(hybrid)
        assert runs.loc[("wanda", "match-three_tier", seed), "sparsity"] == pytest.approx(hybrid, abs=1 / 64)
    magnitude = df[(df["method"] == "magnitude") & (df["pattern"] == "match-three_tier")].iloc[0]
    assert magnitude["target_sparsity"] == pytest.approx(runs.loc[("three_tier", "none", 0), "sparsity"])  # the first seed's
    rows = md_rows((tmp_path / "results" / "tables" / "perplexity.md").read_text(), "eval perplexity, Tiny-LLaMA (Tiny)")
    hybrid = df.loc[df["method"] == "three_tier", "sparsity"].mean()
    assert rows[0] == ["method", "dense", "unstructured 50%", f"Three-tier ({hybrid:.1%})"]
    table = {r[0]: r[1:] for r in rows[1:]}
    wanda = df[(df["method"] == "wanda") & (df["pattern"] == "unstructured-0.5")]["value"]
    # mean ± std over the 2 seeds, and a letter (~a) where its interval overlaps another cell's of the column
    assert re.sub(r" ~[a-z]+$", "", table["Wanda"][1]) == f"{wanda.mean():.2f} ± {wanda.std():.2f} (2)"
    assert table["Magnitude"][2].startswith(f"{magnitude['value']:.2f}") and re.sub(r" ~[a-z]+$", "", table["Three-tier"][2]).endswith("(2)")
    assert "Cells over several calibration seeds" in proc.stdout


def test_gpu_slots_are_distinct(tmp_path, tiny_sources):
    """Pretend there are 4 GPUs: jobs needing 2 each must never share a device, and at most 4 are busy."""
    config = base_config(tiny_sources)
    config["models"] = {f"tiny-{arch}": {"source": str(src), "group": "Tiny", "gpus": 2} for arch, src in tiny_sources.items()}
    config["datasets"]["eval2"] = {"pydoc": "calibration"}
    config["evals"]["perplexity"]["datasets"] = ["eval", "eval2"]
    env = {"WANDA_GPUS": "0,1,2,3", "WANDA_GPU_LOCK_DIR": str(tmp_path / "locks")}
    proc = smk(tmp_path, config, "--cores", "12", "--resources", "gpu=4", timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    jobs = [pd.read_parquet(p).iloc[0].to_dict() for p in (tmp_path / "results" / "ppl").rglob("*.parquet")]
    jobs += [json.loads(p.read_text()) for p in (tmp_path / "results" / "pruned").rglob("*.json")]
    assert len(jobs) == 3 * (2 * 2 + 1)
    spans = [(j["started"], j["finished"], set(j["visible_devices"].split(","))) for j in jobs]
    assert all(len(d) == 2 and d <= {"0", "1", "2", "3"} for _, _, d in spans)
    overlapping = 0
    for i, (s1, e1, d1) in enumerate(spans):
        for s2, e2, d2 in spans[i + 1:]:
            if s1 < e2 and s2 < e1:
                overlapping += 1
                assert not d1 & d2, (d1, d2)
    for s, _, _ in spans:  # never more than 4 devices busy at once
        assert sum(len(d) for s2, e2, d in spans if s2 <= s < e2) <= 4
    assert overlapping > 0, "no two jobs ran at the same time: the test proved nothing"


@pytest.mark.slow  # 8 jobs on a tiny model (about 100 s on 2 busy cores)
def test_seqlen_model_end_to_end_rows_captions_and_published(tmp_path):
    """A tiny model at its own length (max_position_embeddings 128): the jobs check and record it, every row of
    benchmark.parquet carries the protocol, the table's caption names it, and a published figure is set beside
    ours only where its protocol is ours."""
    model = save_tiny("llama", tmp_path / "sources" / "tiny", max_position_embeddings=128)
    calibration = {"dataset": "calib", "sampler": "stream", "nsamples": 2, "seqlen": 128}
    row = {"model": "tiny", "method": "wanda", "pattern": "unstructured-0.5", "value": 300.0}
    published = tmp_path / "published.yaml"
    published.write_text(yaml.safe_dump([
        {"source": "Alike", "dataset": "eval", "protocol": {"eval": {"seqlen": 128, "windows": 2}, "calibration": calibration, "from": "test"}, "rows": [row]},
        {"source": "At 2048", "dataset": "eval", "protocol": {"eval": {"seqlen": 2048, "windows": 2}, "calibration": calibration, "from": "test"}, "rows": [row]},
    ]))
    config = {
        "models": {"tiny": {"source": str(model), "group": "Tiny", "label": "Tiny"}},
        "methods": {"dense": {"method": "dense", "label": "Dense"}, "wanda": {"method": "wanda", "label": "Wanda"}},
        "datasets": {"calib": {"pydoc": "calibration"}, "eval": {"pydoc": "evaluation"}},
        "calibration": {"dataset": "calib", "nsamples": 2, "seqlen": "model"},
        "evals": {"perplexity": {"datasets": ["eval"], "seqlen": "model", "max_windows": 2}},
        "published": str(published),
    }
    proc = smk(tmp_path, config, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert (tmp_path / "results" / "calibration" / "tiny" / "calib_stream_n2_len128_seed0.safetensors").is_file()
    df = pd.read_parquet(tmp_path / "results" / "benchmark.parquet").set_index("method")
    assert (df["eval_seqlen"] == 128).all() and (df["eval_seqlen_rule"] == "model").all() and (df["eval_windows"] == 2).all()
    assert (df["eval_tokens"] == 256).all() and (df["eval_dataset"] == "eval").all()
    assert df.loc["wanda", ["calibration_dataset", "calibration_sampler", "calibration_nsamples", "calibration_seqlen", "seed"]].tolist() \
        == ["calib", "stream", 2, 128, 0]
    tables = (tmp_path / "results" / "tables" / "perplexity.md").read_text()
    assert ("Protocol: eval in windows of 128 tokens (the model's max_position_embeddings), the first 2; "
            "calibration calib, 2 windows of 128 tokens (stream sampler), seed 0.") in tables
    delta = pd.read_csv(tmp_path / "results" / "tables" / "published.csv").set_index("source")
    assert delta.loc["Alike", "compared"] and delta.loc["Alike", "ours"] == pytest.approx(df.loc["wanda", "value"])
    assert not delta.loc["At 2048", "compared"] and pd.isna(delta.loc["At 2048", "ours"])
    assert delta.loc["At 2048", "comparison"] == "not compared: published at 2048, ours at 128"


@pytest.fixture(scope="module")
def checkout(tmp_path_factory, tiny_sources):
    """A finished tiny run inside a checkout of its own (Snakefile, workflow/, config/), run where it lives as the
    demo is, with a model, zero-shot tasks and published figures inside it, all named by relative paths."""
    root = tmp_path_factory.mktemp("checkout") / "wanda-bench"
    root.mkdir()
    for name in ("Snakefile", "environment.yml"):
        shutil.copy2(ROOT / name, root / name)
    for name in ("workflow", "config"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(tiny_sources["llama"], root / "models" / "tiny-llama")
    shutil.copytree(TASKS, root / "tasks")
    config = base_config(tiny_sources, published="config/published.yaml")
    config["models"]["tiny-llama"]["source"] = "models/tiny-llama"
    config["evals"]["zeroshot"] = {"tasks": ["tiny_mc"], "include_path": "tasks", "limit": 4, "batch_size": 4}
    path = root / "config" / "tiny.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    proc = smk(root, path, snakefile=root / "Snakefile", timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return root, config


def files_of(root: Path) -> dict:
    """Every file of a run (Snakemake's own bookkeeping left out) with its size and modification time."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file() and ".snakemake" not in p.parts}


def test_a_moved_checkout_has_nothing_to_do(checkout, tmp_path):
    """Job inputs and params name files relative to the checkout (the zero-shot tasks' folder, published figures,
    a model source inside it): copied elsewhere, with the original gone, its dry run finds nothing to do."""
    root, _ = checkout
    moved = shutil.copytree(root, tmp_path / "moved", symlinks=True)  # as cp -a: contents and modification times
    away = root.rename(root.with_name("away"))  # nothing may still point at the old place
    try:
        proc = smk(moved, moved / "config" / "tiny.yaml", "-n", snakefile=moved / "Snakefile")
    finally:
        away.rename(root)
    assert "Nothing to be done" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
    assert job_counts(proc) == {}


@pytest.mark.parametrize("typo,env,message", [
    ("pypi:llm-smollm3", {}, "model source pypi:llm-smollm3: Python package 'llm_smollm3' is not installed"),
    ("./models/tiny-lama", {}, "model source not found: ./models/tiny-lama"),
    # 'org/name' is a hub id, or a relative path with a typo: offline, neither can be found.
    ("models/tiny-lama", {"HF_HUB_OFFLINE": "1"}, "model source models/tiny-lama: no such local path, and as a Hugging "
     "Face Hub id it is not in the local cache while the Hub is offline (HF_HUB_OFFLINE)"),
])
def test_a_typo_in_a_model_source_destroys_nothing(checkout, tmp_path, typo, env, message):
    """A changed source would rerun the model's materialize job, and Snakemake removes a job's output before it
    runs: the source is checked first, and the run stops with one line naming it, every output in place."""
    root, config = checkout
    assert json.loads((root / "resources" / "models" / "tiny-llama" / "wanda_source.json").read_text()) == \
        {"source": "models/tiny-llama"}  # what materialize read, recorded beside the model
    before = files_of(root)
    bad = json.loads(json.dumps(config))
    bad["models"]["tiny-llama"]["source"] = typo
    path = tmp_path / "typo.yaml"  # outside the checkout: nothing in it may change
    path.write_text(yaml.safe_dump(bad, sort_keys=False))
    proc = smk(root, path, snakefile=root / "Snakefile", env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out, out[-3000:]
    kept = "(resources/models/tiny-llama, made from models/tiny-llama, is kept)"
    assert [line for line in out.splitlines() if "source" in line] == [f"config models.tiny-llama.source: {message} {kept}"], \
        out[-3000:]
    assert files_of(root) == before
