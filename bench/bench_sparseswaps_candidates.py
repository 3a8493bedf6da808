"""SparseSwaps: the exhaustive 1-swap search against K x K candidates, on SmolLM2-135M's block 0; prints JSON.

The statistics of block 0's matrices come from the dense block (calibration as bench_methods_smollm2.py:
32 x 512 WikiText-2 valid windows, get_wikitext2 sampling). The exhaustive search costs rows x in^2
per step, so it runs on the first --rows rows of each matrix; every K runs on the same rows. Per
matrix and K: the row error after over before (the Wanda warm start), swaps, steps and seconds.

    python bench/bench_sparseswaps_candidates.py [--rows 24] [--sparsity 0.6] [--k 16,64] [--matrices q_proj,up_proj,down_proj]
"""
import argparse
import sys
import time

import torch

from bench_frontier_reference import block0_stats
from common import loadavg, machine_note, smollm2_dir, wikitext_windows, write_result


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=24)
    p.add_argument("--sparsity", type=float, default=0.6)
    p.add_argument("--k", default="16,64")
    p.add_argument("--matrices", default="self_attn.q_proj,mlp.up_proj,mlp.down_proj")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = loadavg()

    import wanda_core as wc
    from wanda_core.masks import parse_pattern
    from wanda_core.methods import sparseswaps

    model, tok = wc.load_model(smollm2_dir(), device="cpu")
    stats = block0_stats(model, wikitext_windows(tok, 32, 512))
    pattern = parse_pattern("unstructured", args.sparsity)
    rows = []
    for name, (w, st) in stats.items():
        if not any(name.endswith(m) for m in args.matrices.split(",")):
            continue
        for k in [None] + [int(v) for v in args.k.split(",")]:
            t0 = time.perf_counter()
            r = sparseswaps.prune_matrix(w[: args.rows].clone(), st, pattern, candidates=k)
            row = {"matrix": name.split(".", 3)[-1], "rows": args.rows, "candidates": k or "all",
                   "seconds": round(time.perf_counter() - t0, 2), **r.info, "loadavg": loadavg()}
            row["swap_error_ratio"] = round(row["swap_error_ratio"], 5)
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
    for row in rows:  # the share of the exhaustive search's error reduction each K reaches
        full = next(r for r in rows if r["matrix"] == row["matrix"] and r["candidates"] == "all")
        row["reduction_share"] = round((1 - row["swap_error_ratio"]) / (1 - full["swap_error_ratio"]), 4)
        row["time_share"] = round(row["seconds"] / full["seconds"], 4)
    write_result("sparseswaps_candidates_cpu", {
        "bench": "sparseswaps_candidates", "model": "SmolLM2-135M-Instruct block 0 (float32, CPU)",
        "calibration": "wikitext-2 valid.txt, 32 x 512, Wanda get_wikitext2 sampling, seed 0",
        "pattern": f"unstructured {args.sparsity}, Wanda warm start", "threads": args.threads, "rows": rows,
        "machine": machine_note(start)})


if __name__ == "__main__":
    main()
