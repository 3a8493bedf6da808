"""profiles/slurm against a real (single-node) Slurm: compute jobs go through sbatch, local rules do not.

The cluster (tests/slurm_cluster.py) is Debian's Slurm 22.05 on this machine, started as root, with two
fake GPUs: it installs munge and Slurm with apt-get when missing, writes /etc/slurm/{slurm,gres}.conf
(removed after), state under /var/lib/slurm/wanda-test and logs under /var/log/slurm, and starts munged,
slurmctld and slurmd (stopped after, by PID). So it runs only when asked: `pytest --slurm` or
WANDA_TEST_SLURM=1, and always in CI (CI=true). A machine that cannot host it (not root, no apt, a
foreign /etc/slurm) then skips these tests outside CI; in CI that fails them.
"""
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from slurm_cluster import ClusterUnavailable, SlurmCluster
from tiny_models import save_tiny

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() == "true"
PARTITION = "wandatest"  # not the cluster's default partition: only the profile's SBATCH_PARTITION leads there
COMPUTE_RULES = {"calibrate", "prune", "perplexity"}
LOCAL_RULES = {"materialize_model", "prepare_dataset", "aggregate"}
# Test-only overrides on top of the profile: no slurmdbd here, so job status comes from squeue (the cluster
# keeps finished jobs for MinJobAge=600 s >= 3 x 2 s); a 2-core node, so one thread per job and a small
# calibration job; keep Slurm's job logs as evidence.
OVERRIDES = [
    "--workflow-profile", "none",
    "--slurm-status-command", "squeue",
    "--slurm-init-seconds-before-status-checks", "2",
    "--slurm-keep-successful-logs",
    "--max-threads", "1",
    "--set-resources", "calibrate:mem_mb=1000",
]
TIMEOUT = 420
pytestmark = pytest.mark.slurm  # opt-in outside CI (tests/conftest.py)


def unavailable(reason: str):
    if IN_CI:
        pytest.fail(f"SLURM test cannot run in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        unavailable("the SLURM test starts slurmctld/slurmd and needs root")
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        unavailable("snakemake-executor-plugin-slurm is not installed")
    slurm = SlurmCluster(partition=PARTITION, gpus=2)
    try:
        slurm.start()
    except ClusterUnavailable as e:
        slurm.stop()
        unavailable(f"no test cluster on this machine: {e}")
    except BaseException:
        slurm.stop()
        raise
    try:
        yield slurm
    finally:
        slurm.stop()


def run_snakemake(cmd, env, timeout):
    """Run in a session of its own, so that a timeout stops Snakemake and whatever it started."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # Snakemake cancels its Slurm jobs on SIGTERM
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        pytest.fail(f"snakemake on SLURM took more than {timeout} s:\n{out[-6000:]}")
    return proc.returncode, out


@pytest.fixture(scope="module")
def slurm_run(cluster, tmp_path_factory):
    sources = tmp_path_factory.mktemp("slurm-sources")
    workdir = tmp_path_factory.mktemp("slurm-run")
    config = {
        "models": {
            # CPU only: gpu=0, so no --gpus for its jobs.
            "tiny-llama": {"source": str(save_tiny("llama", sources / "tiny-llama")), "group": "Tiny",
                           "label": "Tiny-LLaMA", "mem_mb": 1000, "runtime": 10},
            # One GPU per job, which Slurm picks and announces in CUDA_VISIBLE_DEVICES.
            "tiny-gpt2": {"source": str(save_tiny("gpt2", sources / "tiny-gpt2")), "group": "Tiny",
                          "label": "Tiny-GPT2", "gpus": 1, "mem_mb": 1000, "runtime": 10},
        },
        "methods": {"dense": {"method": "dense", "label": "Dense"},
                    "magnitude": {"method": "magnitude", "label": "Magnitude"},
                    "wanda": {"method": "wanda", "label": "Wanda"}},
        "patterns": ["unstructured-0.5"],
        "datasets": {"calib": {"pydoc": "calibration"}, "eval": {"pydoc": "evaluation"}},
        "calibration": {"dataset": "calib", "nsamples": 4, "seqlen": 64},
        "evals": {"perplexity": {"datasets": ["eval"], "seqlen": 64, "max_windows": 2}},
        "published": None,
    }
    cfg = workdir / "config.yaml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    locks = workdir / ".snakemake" / "locks"
    if locks.exists():  # a killed earlier run in the same folder
        for f in locks.iterdir():
            f.unlink()
    # Nothing of the caller's scheduler or devices may leak in: GPUs must come from this Slurm.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "SNAKEMAKE_PROFILE"))
           and k not in ("CUDA_VISIBLE_DEVICES", "WANDA_GPUS", "WANDA_GPU_LOCK_DIR")}
    env["SBATCH_PARTITION"] = PARTITION  # read by the profile (default-resources: slurm_partition)
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(cfg), "--profile", str(ROOT / "profiles" / "slurm"), *OVERRIDES]
    rc, out = run_snakemake(cmd, env, TIMEOUT)
    assert rc == 0, out[-8000:] + "\n" + cluster.logs()
    return workdir, out, cluster.jobs()


def submissions(out: str) -> dict:
    """Slurm job id -> rule, from Snakemake's 'Job N has been submitted with SLURM jobid J (log: ...)' lines."""
    found = re.findall(r"submitted with SLURM jobid (\d+) \(log: \S*/slurm_logs/rule_(\w+)/", out)
    return {jobid: rule for jobid, rule in found}


def test_compute_jobs_went_through_sbatch(slurm_run):
    workdir, out, jobs = slurm_run
    submitted = submissions(out)
    # 2 models: calibrate each, prune magnitude + wanda each, perplexity of dense + the 2 pruned each.
    counts = {rule: list(submitted.values()).count(rule) for rule in set(submitted.values())}
    assert counts == {"calibrate": 2, "prune": 4, "perplexity": 6}, out[-4000:]
    for jobid, rule in submitted.items():
        job = jobs.get(jobid)
        assert job is not None, f"Slurm does not know job {jobid} ({rule}): {sorted(jobs)}"
        assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", job
        assert job["Comment"].startswith(f"rule_{rule}_wildcards_"), job
        assert job["Partition"] == PARTITION, job  # SBATCH_PARTITION reached sbatch through the profile
        assert any((workdir / ".snakemake" / "slurm_logs").rglob(f"{jobid}.log")), jobid  # Slurm wrote its log
    # Slurm ran nothing else, and the local rules ran here, not through sbatch.
    assert set(jobs) == set(submitted), (sorted(jobs), sorted(submitted))
    ran_by_slurm = {job["Comment"].split("_wildcards_")[0].removeprefix("rule_") for job in jobs.values()}
    assert ran_by_slurm == COMPUTE_RULES
    for rule in LOCAL_RULES:
        assert f"localrule {rule}:" in out


def test_gpu_requests_follow_the_model(slurm_run):
    _, out, jobs = slurm_run
    for jobid, rule in submissions(out).items():
        comment, tres = jobs[jobid]["Comment"], jobs[jobid].get("TresPerJob", "")
        if rule != "calibrate" and "tiny-gpt2" in comment:
            assert tres == "gres:gpu:1", jobs[jobid]  # gpu=1 -> sbatch --gpus=1
        else:
            assert "gpu" not in tres, jobs[jobid]  # gpu=0 (and calibrate, which has none) -> no GPU asked


def test_gpu_jobs_got_their_device_from_slurm(slurm_run):
    workdir, _, _ = slurm_run
    records = [(p, pd.read_parquet(p).iloc[0].to_dict()) for p in (workdir / "results" / "ppl").rglob("*.parquet")]
    records += [(p, json.loads(p.read_text())) for p in (workdir / "results" / "pruned").rglob("*.json")]
    assert len(records) == 6 + 4
    for path, record in records:
        devices = record.get("visible_devices")
        if "tiny-gpt2" in str(path):
            # No WANDA_GPUS and no nvidia-smi here: only Slurm's CUDA_VISIBLE_DEVICES can name a device.
            assert devices in ("0", "1"), (path, devices)
        else:
            assert not devices, (path, devices)


def test_tables_are_produced(slurm_run):
    workdir, out, _ = slurm_run
    df = pd.read_parquet(workdir / "results" / "benchmark.parquet")
    assert len(df) == 2 * 3 and df["value"].notna().all() and (df["status"] == "ok").all()
    assert set(df["model"]) == {"tiny-llama", "tiny-gpt2"} and set(df["method"]) == {"dense", "magnitude", "wanda"}
    table = (workdir / "results" / "tables" / "perplexity.md").read_text()
    assert "Tiny-LLaMA" in table and "Tiny-GPT2" in table and "Wanda" in table
    assert "Tiny-GPT2" in out  # printed at the end, by the local aggregate job
