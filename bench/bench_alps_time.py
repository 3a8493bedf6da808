"""ALPS against SparseGPT prune time on SmolLM2-135M, alternating runs (A B A B); prints JSON.

Calibration as bench_methods_smollm2.py (32 x 512 WikiText-2 valid windows, get_wikitext2 sampling),
prune only (no evaluation), one torch thread. Per run: wall and CPU seconds of the prune call (CPU
seconds of this process: less sensitive than wall time to other work on a shared machine) and the
load average; per method the medians, and the ratios ALPS / SparseGPT of each adjacent pair.

    python bench/bench_alps_time.py [--pattern 0.7|2:4] [--repeats 2] [--threads 1]
"""
import argparse
import statistics
import sys
import time

import torch

from common import loadavg, machine_note, smollm2_dir, wikitext_windows, write_result


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--pattern", default="0.7", help="an unstructured sparsity or N:M")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--methods", default="sparsegpt,alps")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = loadavg()

    import wanda_core as wc

    model, tok = wc.load_model(smollm2_dir(), device="cpu")
    calib = wikitext_windows(tok, 32, 512)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    nm = ":" in args.pattern
    runs = []
    for i in range(args.repeats):
        for method in args.methods.split(","):
            model.load_state_dict(dense)
            before = loadavg()
            t0, c0 = time.perf_counter(), time.process_time()
            report = wc.prune(model, method, args.pattern if nm else "unstructured", None if nm else float(args.pattern),
                              calib, progress=False)
            runs.append({"method": method, "repeat": i, "seconds": round(time.perf_counter() - t0, 1),
                         "cpu_seconds": round(time.process_time() - c0, 1),
                         "matrix_seconds": round(sum(r["seconds"] for r in report["layers"]), 1),
                         "loadavg_before": before, "loadavg_after": loadavg()})
            print(runs[-1], file=sys.stderr, flush=True)
    a, b = args.methods.split(",")[:2]
    summary = {}
    for key in ("seconds", "cpu_seconds", "matrix_seconds"):
        med = {m: statistics.median(r[key] for r in runs if r["method"] == m) for m in (a, b)}
        pairs = [runs[j + 1][key] / runs[j][key] for j in range(0, len(runs) - 1, 2)]
        summary[key] = {"median": med, f"ratio_{b}_over_{a}_of_medians": round(med[b] / med[a], 3),
                        f"ratio_{b}_over_{a}_per_pair": [round(x, 3) for x in pairs]}
    write_result(f"alps_time_{args.pattern.replace(':', '-')}_cpu", {
        "bench": "alps_time", "model": "SmolLM2-135M-Instruct (float32, CPU)", "pattern": args.pattern,
        "calibration": "wikitext-2 valid.txt, 32 x 512, Wanda get_wikitext2 sampling, seed 0",
        "threads": args.threads, "runs": runs, "summary": summary, "machine": machine_note(start)})


if __name__ == "__main__":
    main()
