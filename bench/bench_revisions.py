"""Pruning time of two git revisions of wanda_core, same model, same calibration, same run; prints JSON.

Each revision's `wanda_core/` is extracted with `git archive` and imported in a child process of
its own; the runs alternate (before, after, before, after, ...) so that load on a shared machine
hits both alike. Reports the median seconds per method, the before/after ratio, and whether both
revisions kept exactly the same weights.

    python bench/bench_revisions.py --before 050448b [--after HEAD] [--runs wanda:unstructured,sparsegpt:2:4] [--reps 2]

Writes bench/results/revisions_<before>_<after>_cpu.json. `--busy N` keeps N other processes
multiplying matrices meanwhile (each on one thread), as when several workflow jobs share a
machine (the file name then ends in _busy<N>_cpu.json).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import common

CHILD = r"""
import hashlib, json, sys, time
import torch
import wanda_core as wc
src, model_dir, calib_path, method, pattern, threads = sys.argv[1:7]
assert wc.__file__.startswith(src), f"imported {wc.__file__}, not the revision under {src}"
torch.set_num_threads(int(threads))
model, _ = wc.load_model(model_dir, dtype="float32", device="cpu")
calib = torch.load(calib_path)
sparsity = None if ":" in pattern else 0.5
t0 = time.perf_counter()
wc.prune(model, method, pattern, sparsity, calib, device="cpu", batch_size=8, progress=False)
seconds = time.perf_counter() - t0
digest = hashlib.sha256()
for t in wc.all_targets(model):
    digest.update((t.weight() != 0).numpy().tobytes())
print(json.dumps({"seconds": round(seconds, 2), "mask_sha256": digest.hexdigest()[:16]}))
"""

BUSY = "import torch\ntorch.set_num_threads(1)\na = torch.randn(1024, 1024)\nwhile True:\n    a @ a\n"


def extract(rev: str, into: Path) -> Path:
    """The revision's wanda_core package, as a folder to put on PYTHONPATH."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev, "wanda_core"], cwd=common.ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def run_child(src: Path, model_dir, calib_path, method, pattern, threads) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(src), str(model_dir), str(calib_path), method, pattern, str(threads)],
                          env=env, cwd=src, capture_output=True, text=True)  # cwd: `-c` puts it first on sys.path
    if proc.returncode:
        raise SystemExit(f"error: {method} {pattern} under {src} failed: {proc.stderr.strip().splitlines()[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--before", required=True, help="git revision to compare against")
    p.add_argument("--after", default="HEAD")
    p.add_argument("--runs", default="wanda:unstructured,wanda:2:4,sparsegpt:unstructured,sparsegpt:2:4",
                   help="comma-separated method:pattern")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--threads", type=int, default=2, help="torch threads in each child")
    p.add_argument("--busy", type=int, default=0, help="other processes competing for the cores meanwhile")
    p.add_argument("--smollm2", default=common.SMOLLM2)
    args = p.parse_args()

    args.smollm2 = common.smollm2_dir(args.smollm2)
    revs = {label: subprocess.run(["git", "rev-parse", "--short", rev], cwd=common.ROOT, check=True, capture_output=True,
                                  text=True).stdout.strip()
            for label, rev in (("before", args.before), ("after", args.after))}
    start_load = common.loadavg()
    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(args.busy)]
    try:
        rows = compare(args, revs)
    finally:
        for proc in busy:
            proc.kill()
    result = {"bench": "revisions", "model": "SmolLM2-135M float32", "revisions": revs,
              "calibration": f"wikitext-2 valid {args.nsamples}x{args.seqlen}", "threads": args.threads, "reps": args.reps,
              "busy_processes": args.busy,
              "note": "2 shared cores: runs alternate between revisions so load hits both alike; see loadavg",
              "machine": common.machine_note(start_load), "rows": rows}
    suffix = f"_busy{args.busy}" if args.busy else ""
    common.write_result(f"revisions_{revs['before']}_{revs['after']}{suffix}_cpu", result)


def compare(args, revs) -> list[dict]:
    """One row per method:pattern: both revisions' seconds, their ratio, and whether the masks agree."""
    import torch
    import wanda_core as wc

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        srcs = {label: extract(sha, tmp / label) for label, sha in revs.items()}
        ids = wc.tokenize(wc.load_tokenizer(args.smollm2), wc.read_corpus(common.WIKITEXT / "valid.txt"))
        calib_path = tmp / "calib.pt"
        torch.save(wc.calibration_windows(ids, args.nsamples, args.seqlen, 0), calib_path)
        rows = []
        for spec in args.runs.split(","):
            method, pattern = spec.split(":", 1)
            seconds, hashes = {"before": [], "after": []}, {}
            for _ in range(args.reps):
                for label in ("before", "after"):
                    out = run_child(srcs[label], args.smollm2, calib_path, method, pattern, args.threads)
                    seconds[label].append(out["seconds"])
                    hashes[label] = out["mask_sha256"]
            row = {"method": method, "pattern": pattern, "before_s": seconds["before"], "after_s": seconds["after"],
                   "before_over_after": round(statistics.median(seconds["before"]) / statistics.median(seconds["after"]), 2),
                   "same_masks": hashes["before"] == hashes["after"]}
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
    return rows


if __name__ == "__main__":
    main()
