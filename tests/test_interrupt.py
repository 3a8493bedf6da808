"""Interrupted runs and determinism: kill jobs with SIGKILL halfway, rerun, and get the same tables and masks.

Run A goes through uninterrupted. Run B is killed twice: the whole Snakemake process group while a
pruning job is halfway through its blocks (as when a node dies), then only an evaluation job
while it runs. B is then rerun to completion; its tables and every mask must equal A's bit for bit.
"""
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from test_workflow import ROOT, smk
from tiny_models import save_tiny

PRUNE_LOG = Path("results/logs/prune/tiny/sparsegpt/unstructured-0.5/seed0.log")
PRUNED = Path("results/pruned/tiny/sparsegpt/unstructured-0.5/seed0.safetensors")


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    # Wide and deep enough that SparseGPT takes a few seconds: time to kill it halfway.
    source = save_tiny("llama", tmp_path_factory.mktemp("model") / "tiny", hidden_size=256, num_attention_heads=8,
                       head_dim=32, num_key_value_heads=4, intermediate_size=512, num_hidden_layers=12)
    return {
        "models": {"tiny": {"source": str(source), "group": "Tiny", "label": "Tiny-LLaMA"}},
        "methods": {"dense": {"method": "dense"}, "magnitude": {"method": "magnitude"}, "sparsegpt": {"method": "sparsegpt"}},
        "patterns": ["unstructured-0.5"],
        "datasets": {"calib": {"pydoc": "calibration"}, "eval": {"pydoc": "evaluation"}},
        "calibration": {"dataset": "calib", "nsamples": 16, "seqlen": 128},
        "evals": {"perplexity": {"datasets": ["eval"], "seqlen": 128, "max_windows": 4}},
        "published": None,
    }


def start(workdir: Path, config: dict) -> subprocess.Popen:
    """Snakemake in its own session, so that it and every job it starts can be killed at once."""
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(workdir / "config.yaml"), "--cores", "2"]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def wait_for(condition, what: str, proc: subprocess.Popen, timeout: float = 300):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = condition()
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {what}")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"timed out waiting for {what}")


def job_pid(session: int, command: str) -> int | None:
    """A running job of this Snakemake session whose command line contains `command`."""
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[3]) == session and command in cmdline and "snakemake" not in cmdline:
            return int(proc.name)
    return None


def tensors_hash(path: Path) -> str:
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for name, t in sorted(load_file(path).items()):
        h.update(name.encode())
        h.update(t.contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def outputs(workdir: Path) -> dict:
    """Everything that must be identical between two runs: tables, values, masks and pruned weights."""
    results = workdir / "results"
    bench = pd.read_parquet(results / "benchmark.parquet")
    return {
        "perplexity.md": (results / "tables" / "perplexity.md").read_text(),
        "perplexity.csv": (results / "tables" / "perplexity.csv").read_text(),
        "values": bench[["model", "method", "pattern", "dataset", "value", "status", "sparsity"]].to_dict("records"),
        **{str(p.relative_to(results)): tensors_hash(p) for p in sorted(results.rglob("*.safetensors"))},
    }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, config):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    proc = smk(workdir, config)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return workdir


def test_killed_jobs_rerun_to_identical_tables_and_masks(tmp_path, config, uninterrupted):
    # 1. A crash of everything (Snakemake and its jobs) while SparseGPT is halfway through its 12 blocks.
    run = start(tmp_path, config)
    wait_for(lambda: (tmp_path / PRUNE_LOG).is_file() and "pruned block 4/12" in (tmp_path / PRUNE_LOG).read_text(),
             "the prune job reached block 4", run)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    assert "pruned block 12/12" not in (tmp_path / PRUNE_LOG).read_text(), "the job finished before it was killed"
    assert not (tmp_path / PRUNED).exists()  # written under a temporary name: nothing half-written is visible

    # 2. Only an evaluation job killed while it runs; Snakemake itself carries on and reports the failure.
    assert smk(tmp_path, config, "--unlock").returncode == 0  # what a user does after a crash
    run = start(tmp_path, config)
    pid = wait_for(lambda: job_pid(run.pid, "eval-ppl"), "an evaluation job", run)
    os.kill(pid, signal.SIGKILL)
    assert run.wait(timeout=600) != 0

    # 3. The rerun completes what is missing.
    proc = smk(tmp_path, config)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert not list(tmp_path.rglob(".*.tmp")), "temporaries of killed jobs were left behind"

    # Identical to the run that was never interrupted: the same config gives bit-identical results.
    expected, got = outputs(uninterrupted), outputs(tmp_path)
    assert sorted(got) == sorted(expected) and len([k for k in got if k.endswith(".safetensors")]) == 3
    for key in expected:
        assert got[key] == expected[key], key
