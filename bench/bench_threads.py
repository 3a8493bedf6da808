"""Torch thread settings for the demo's prune jobs, on an idle machine and with busy processes alongside.

Each run is one `wanda-core prune` child process, exactly as the workflow starts it (SmolLM2-135M,
float32, the demo's calibration: pydoc topics, 16 x 256 tokens), under one named setting:

    threads1          --threads 1
    threads2          --threads 2 (what the workflow passed before: every core to one job)
    threads2-passive  --threads 2 with OMP_WAIT_POLICY=PASSIVE (threads sleep at barriers, never spin)
    auto              no --threads: wanda-core's own choice (as many threads as cores are idle, see set_threads)

Conditions: `--busy 0,1` runs everything with no and with one extra process that keeps one core busy
(single-threaded matrix products, as another job or user would). Runs alternate over settings inside
each repetition, and repetitions alternate over conditions, so that a change in background load hits
every setting alike; the report gives each run's seconds, the median per (condition, setting, job),
and the load average (/proc/loadavg) before and after every run.

    python bench/bench_threads.py [--jobs wanda:2:4,sparsegpt:2:4] [--settings threads1,threads2,auto]
                                  [--busy 0,1] [--reps 3]
    python bench/bench_threads.py --demo [--busy 0,1] [--demo-settings config,all-cores]
        # the whole demo (`snakemake --cores N` in a fresh folder): wall time, and CPU time of all its jobs;
        # `config`: as config/config.yaml gives threads (SmolLM2: one per job, jobs side by side),
        # `all-cores`: every prune and perplexity job gets all cores (one at a time)

`--jobs demo` runs all seven prune jobs of config/config.yaml. Writes bench/results/threads_cpu.json
(`--demo`: threads_demo_cpu.json). On a quiet machine: `--reps 3` (about 20 min for the default jobs).
"""
import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

SETTINGS = {
    "threads1": (["--threads", "1"], {}),
    "threads2": (["--threads", "2"], {}),
    "threads2-passive": (["--threads", "2"], {"OMP_WAIT_POLICY": "PASSIVE"}),
    "auto": ([], {}),
}
# --demo: how the workflow gives threads to the jobs (CORES = --cores).
DEMO_SETTINGS = {
    "config": [],  # as config/config.yaml says: SmolLM2 jobs of one thread each, side by side
    "all-cores": ["--set-threads", "prune=CORES", "perplexity=CORES"],  # one job at a time with every core
}
DEMO_JOBS = ["magnitude:unstructured", "magnitude:2:4", "wanda:unstructured", "wanda:2:4", "sparsegpt:unstructured",
             "sparsegpt:2:4", "three_tier:unstructured"]
BUSY = "import torch\ntorch.set_num_threads(1)\na = torch.randn(1024, 1024)\nwhile True:\n    a @ a\n"


def children_cpu() -> float:
    """User + system CPU seconds of every finished child process so far (and their waited-for children)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def loadavg_line() -> str:
    return Path("/proc/loadavg").read_text().strip()


def start_busy(n: int) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, "-c", BUSY], env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(n)]
    time.sleep(2)  # past torch's import: the core is busy when the measured run starts
    return procs


def stop_busy(procs) -> None:
    for proc in procs:
        proc.kill()
        proc.wait()


def wanda_core(args, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wanda_core", *map(str, args)], env={**os.environ, **(env or {})},
                          capture_output=True, text=True, **kw)


def prepare(tmp: Path, model: str) -> Path:
    """The demo's calibration windows: pydoc topics (calibration part), 16 x 256 tokens, seed 0."""
    data, calib = tmp / "pydoc-calibration.jsonl", tmp / "calib.safetensors"
    for args in (["prepare-data", "--spec", json.dumps({"pydoc": "calibration"}), "--out", data],
                 ["calibrate", "--model", model, "--data", data, "--nsamples", 16, "--seqlen", 256, "--seed", 0, "--out", calib]):
        proc = wanda_core(args)
        if proc.returncode:
            raise SystemExit(proc.stderr)
    return calib


def prune_once(model, calib, job, setting, tmp: Path) -> dict:
    method, pattern = job.split(":", 1)
    flags, env = SETTINGS[setting]
    report = tmp / "report.json"
    load, cpu = loadavg_line(), children_cpu()
    t0 = time.perf_counter()
    proc = wanda_core([*flags, "prune", "--model", model, "--method", method, "--pattern", pattern,
                       "--calibration", calib, "--dtype", "float32", "--device", "cpu", "--batch-size", 8,
                       "--out", tmp / "pruned.safetensors", "--report", report, "--quiet"], env=env)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{job} under {setting} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(report.read_text())
    return {"wall_s": round(wall, 2), "prune_s": round(out["seconds"], 2), "cpu_s": round(children_cpu() - cpu, 1),
            "device": out["device"],
            "loadavg_before": load, "loadavg_after": loadavg_line()}


def bench_jobs(args) -> dict:
    model = common.smollm2_dir(args.smollm2)
    jobs = DEMO_JOBS if args.jobs == "demo" else args.jobs.split(",")
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_threads_") as tmp:
        tmp = Path(tmp)
        calib = prepare(tmp, model)
        for rep in range(args.reps):
            for busy in args.busy:
                procs = start_busy(busy)
                try:
                    for job in jobs:
                        for setting in args.settings:
                            row = {"rep": rep, "busy": busy, "setting": setting, "job": job,
                                   **prune_once(model, calib, job, setting, tmp)}
                            runs.append(row)
                            print(json.dumps(row), file=sys.stderr, flush=True)
                finally:
                    stop_busy(procs)
    summary = []
    for busy in args.busy:
        for job in jobs:
            for setting in args.settings:
                mine = [r for r in runs if (r["busy"], r["job"], r["setting"]) == (busy, job, setting)]
                summary.append({"busy": busy, "job": job, "setting": setting, "device": mine[0]["device"],
                                "median_prune_s": round(statistics.median(r["prune_s"] for r in mine), 2),
                                "median_wall_s": round(statistics.median(r["wall_s"] for r in mine), 2)})
    return {"jobs": jobs, "summary": summary, "runs": runs}


def bench_demo(args) -> dict:
    """The whole demo workflow (config/config.yaml) in a fresh directory, per busy condition and workflow
    setting: wall seconds, and CPU seconds of Snakemake and its jobs."""
    runs = []
    for rep in range(args.reps):
        for busy in args.busy:
            for setting in args.demo_settings:
                with tempfile.TemporaryDirectory(prefix="bench_threads_demo_") as tmp:
                    procs = start_busy(busy)
                    load, cpu = loadavg_line(), children_cpu()
                    t0 = time.perf_counter()
                    try:
                        proc = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(common.ROOT / "Snakefile"),
                                               "--directory", tmp, "--configfile", str(common.ROOT / "config" / "config.yaml"),
                                               "--cores", str(args.cores),
                                               *[a.replace("CORES", str(args.cores)) for a in DEMO_SETTINGS[setting]]],
                                              cwd=common.ROOT, capture_output=True, text=True)
                        wall, cpu = time.perf_counter() - t0, children_cpu() - cpu  # before the busy ones are reaped
                    finally:
                        stop_busy(procs)
                    if proc.returncode:
                        raise SystemExit(f"the demo failed:\n{proc.stderr[-4000:]}")
                    if args.keep_tables:  # the tables of the last run, to read its results
                        shutil.rmtree(args.keep_tables, ignore_errors=True)
                        shutil.copytree(Path(tmp) / "results" / "tables", args.keep_tables)
                    row = {"rep": rep, "busy": busy, "setting": setting, "cores": args.cores, "wall_s": round(wall, 1),
                           "cpu_s": round(cpu, 1), "loadavg_before": load, "loadavg_after": loadavg_line()}
                    runs.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    summary = [{"busy": b, "setting": st,
                "median_wall_s": round(statistics.median(r["wall_s"] for r in runs if (r["busy"], r["setting"]) == (b, st)), 1),
                "median_cpu_s": round(statistics.median(r["cpu_s"] for r in runs if (r["busy"], r["setting"]) == (b, st)), 1)}
               for b in args.busy for st in args.demo_settings]
    return {"summary": summary, "runs": runs}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", default="wanda:2:4,sparsegpt:2:4", help="comma-separated method:pattern, or 'demo' (all seven)")
    p.add_argument("--settings", default="threads1,threads2,threads2-passive,auto",
                   type=lambda s: s.split(","), help=f"comma-separated, of {', '.join(SETTINGS)}")
    p.add_argument("--busy", default="0,1", type=lambda s: [int(x) for x in s.split(",")],
                   help="comma-separated numbers of busy processes alongside")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--demo", action="store_true", help="time the whole demo workflow instead of single prune jobs")
    p.add_argument("--keep-tables", metavar="DIR", help="--demo: copy the last run's results/tables/ to DIR")
    p.add_argument("--cores", type=int, default=os.cpu_count(), help="--demo: snakemake --cores")
    p.add_argument("--demo-settings", default="config,all-cores", type=lambda s: s.split(","),
                   help=f"--demo: comma-separated, of {', '.join(DEMO_SETTINGS)}")
    p.add_argument("--smollm2", default=common.SMOLLM2)
    p.add_argument("--name", help="result file name (default threads_cpu or threads_demo_cpu)")
    args = p.parse_args()
    unknown = set(args.settings) - set(SETTINGS)
    if unknown:
        p.error(f"unknown setting(s) {', '.join(sorted(unknown))}: choose from {', '.join(SETTINGS)}")

    start = loadavg_line()
    body = bench_demo(args) if args.demo else bench_jobs(args)
    result = {"bench": "threads_demo" if args.demo else "threads", "model": "SmolLM2-135M float32",
              "calibration": "pydoc topics 16x256 (the demo's)", "reps": args.reps, "busy_processes": args.busy,
              "settings": {k: {"flags": f, "env": e} for k, (f, e) in SETTINGS.items() if k in args.settings},
              "note": "runs alternate over settings and conditions; one busy process = one core kept busy by a "
                      "single-threaded matmul loop; see each run's load average",
              "loadavg_start": start, "loadavg_end": loadavg_line(), "machine": common.machine_note(), **body}
    common.write_result(args.name or ("threads_demo_cpu" if args.demo else "threads_cpu"), result)


if __name__ == "__main__":
    main()
