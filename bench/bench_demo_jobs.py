"""Wall and CPU seconds of each demo job of one model (config/config.yaml's settings); prints JSON.

Runs the commands the workflow's rules run, one after the other, in a temporary folder:
materialize (unless --materialized names a converted directory), calibrate, prune per method and
pattern, perplexity of the dense model and of each pruned one. CPU seconds (user + system of the
job's process) are less sensitive than wall seconds to other work on a shared machine; the load
average is recorded beside them.

    python bench/bench_demo_jobs.py --model gemma3-270m [--materialized /work/cache/gemma3-270m] [--threads 2]
        [--methods wanda magnitude] [--patterns unstructured-0.5] [--no-eval]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

import common

sys.path.insert(0, str(common.ROOT))
from wanda_core import grid  # noqa: E402


def job(name, args, results, threads):
    """Run one wanda-core command; record its wall and CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "wanda_core", "--threads", str(threads), *map(str, args)],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    results.append({"job": name, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "loadavg": common.loadavg()})
    print(json.dumps(results[-1]), flush=True)
    return proc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(common.ROOT / "config" / "config.yaml"))
    ap.add_argument("--model", default="gemma3-270m", help="a model name of the config")
    ap.add_argument("--materialized", help="an already converted HF directory of the model (skips materialize)")
    ap.add_argument("--threads", type=int, default=2, help="as `snakemake --cores 2` gives each CPU job")
    ap.add_argument("--methods", nargs="*", help="default: every method of the config")
    ap.add_argument("--patterns", nargs="*", help="default: each method's patterns in the config")
    ap.add_argument("--no-eval", action="store_true", help="time the pruning jobs only")
    args = ap.parse_args()

    config = yaml.safe_load(Path(args.config).read_text())
    spec, calib, ppl = config["models"][args.model], config["calibration"], config["evals"]["perplexity"]
    start = common.loadavg()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
        tmp = Path(tmp)
        model = args.materialized
        if not model:
            model = tmp / "model"
            job("materialize", ["materialize", "--model", spec["source"], "--out", model], results, args.threads)
        data = {}
        for name in {calib["dataset"], *ppl["datasets"]}:
            data[name] = tmp / f"{name}.jsonl"
            job(f"prepare_dataset {name}", ["prepare-data", "--spec", json.dumps(config["datasets"][name]), "--out", data[name]],
                results, args.threads)
        calibration = tmp / "calib.safetensors"
        job("calibrate", ["calibrate", "--model", model, "--data", data[calib["dataset"]], "--nsamples", calib["nsamples"],
                          "--seqlen", calib["seqlen"], "--seed", calib.get("seed", 0), "--out", calibration], results, args.threads)
        evaluate = ["--seqlen", ppl["seqlen"], "--batch-size", ppl.get("batch_size", 1), "--dtype", spec.get("dtype", "auto"), "--quiet"]
        if ppl.get("max_windows"):
            evaluate += ["--max-windows", ppl["max_windows"]]
        if not args.no_eval:
            job("perplexity dense", ["eval-ppl", "--model", model, "--data", data[ppl["datasets"][0]], *evaluate], results, args.threads)
        for name, method in config["methods"].items():
            if method["method"] == "dense" or (args.methods and name not in args.methods):
                continue
            for label in args.patterns or method.get("patterns") or config.get("patterns", ["unstructured-0.5"]):
                pattern, sparsity = grid.pattern_args(label)
                out = tmp / f"{name}-{label}.safetensors"
                params = [x for k, v in method.get("params", {}).items() for x in ("--param", f"{k}={json.dumps(v)}")]
                job(f"prune {name} {label}", ["prune", "--model", model, "--method", method["method"], "--pattern", pattern,
                                               "--sparsity", sparsity, *params, "--calibration", calibration,
                                               "--dtype", spec.get("dtype", "auto"), "--batch-size", spec.get("batch_size", 8),
                                               "--out", out, "--quiet"], results, args.threads)
                if not args.no_eval:
                    job(f"perplexity {name} {label}", ["eval-ppl", "--model", model, "--pruned", out,
                                                       "--data", data[ppl["datasets"][0]], *evaluate], results, args.threads)
    total = {k: round(sum(r[k] for r in results), 1) for k in ("wall_s", "cpu_s")}
    result = {"model": args.model, "threads": args.threads, "jobs": results, "total": total, **common.machine_note(start)}
    chosen = "-".join(args.methods or []) + ("_" + "-".join(args.patterns) if args.patterns else "")
    common.write_result(f"demo_jobs_{args.model}{'_' + chosen if chosen else ''}{'_noeval' if args.no_eval else ''}_cpu", result)


if __name__ == "__main__":
    main()
