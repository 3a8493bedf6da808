"""Claiming distinct GPUs for concurrent jobs.

Snakemake's `--resources gpu=4` only counts: it never says *which* devices a job may use. Each
job therefore claims free devices itself, through one lock file per device, and sets
CUDA_VISIBLE_DEVICES before CUDA starts. The locks are held by the process (flock) and vanish
with it, even when it is killed, so a crashed job never leaves a device claimed.
"""
from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import time
from pathlib import Path

from .errors import WandaError

log = logging.getLogger("wanda_core")
_held: list = []  # open lock files: keep them for the life of the process


def available_devices() -> list[str]:
    """Device ids this machine offers: WANDA_GPUS (a comma list, also for tests) or what NVML sees."""
    listed = os.environ.get("WANDA_GPUS")
    if listed is not None:
        return [d for d in listed.split(",") if d.strip()]
    # Ask nvidia-smi, not torch: initialising CUDA here would freeze the visible devices.
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def lock_dir() -> Path:
    return Path(os.environ.get("WANDA_GPU_LOCK_DIR", f"/tmp/wanda-gpu-locks-{os.getuid()}"))


def claim(count: int, timeout: float = 3600.0) -> list[str]:
    """Claim `count` free devices and make them the only visible ones; returns their ids.

    Under a scheduler that already assigned devices (SLURM sets CUDA_VISIBLE_DEVICES), those are used.
    """
    if count <= 0:
        return []
    if os.environ.get("SLURM_JOB_ID") and os.environ.get("CUDA_VISIBLE_DEVICES"):
        return os.environ["CUDA_VISIBLE_DEVICES"].split(",")
    devices = available_devices()
    if len(devices) < count:
        raise WandaError(f"this job needs {count} GPUs but the machine has {len(devices)}")
    folder = lock_dir()
    folder.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    while True:
        got = []
        for dev in devices:
            f = open(folder / f"gpu{dev}.lock", "w")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            got.append((dev, f))
            if len(got) == count:
                break
        if len(got) == count:
            _held.extend(f for _, f in got)
            ids = [d for d, _ in got]
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
            log.info("claimed GPUs %s", ",".join(ids))
            return ids
        for _, f in got:  # release a partial claim so two jobs cannot deadlock
            f.close()
        if time.monotonic() > deadline:
            raise WandaError(f"no {count} free GPUs within {timeout:.0f} s (locks in {folder})")
        time.sleep(0.5)
