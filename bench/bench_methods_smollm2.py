"""WikiText-2 perplexity of SmolLM2-135M pruned by Wanda, OWL, RIA and DSnoT (issue #14); prints JSON.

Calibration as the Wanda code's get_wikitext2 draws it, here from valid.txt: the lines joined with
" " into one token stream, random.seed(0), each window starting at random.randint(0, n - seqlen - 1).
Evaluation: the first 64 windows of 512 tokens of test.txt, lines joined with "\\n\\n" (read_corpus).

    python bench/bench_methods_smollm2.py [--nsamples 32 --seqlen 512 --windows 64 --threads 1 --quick]
"""
import argparse
import random
import sys
import time

import torch

from common import WIKITEXT, loadavg, machine_note, smollm2_dir, write_result

RUNS = [  # (label, method, pattern, sparsity, options)
    ("dense", "dense", "unstructured", 0.0, {}),
    ("wanda 50%", "wanda", "unstructured", 0.5, {}),
    ("wanda 60%", "wanda", "unstructured", 0.6, {}),
    ("wanda 70%", "wanda", "unstructured", 0.7, {}),
    ("owl+wanda 70%", "owl", "unstructured", 0.7, {"base": "wanda", "M": 5, "lambda": 0.08}),
    ("ria 50%", "ria", "unstructured", 0.5, {}),
    ("ria 2:4", "ria", "2:4", None, {}),
    ("dsnot+wanda 60%", "dsnot", "unstructured", 0.6, {"init": "wanda"}),
    # The authors' code applies the sign rule to N:M masks only (see README); here to unstructured too.
    ("dsnot+wanda 60% same_sign", "dsnot", "unstructured", 0.6, {"init": "wanda", "same_sign": True}),
]


def wanda_windows(token_ids: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """The Wanda code's get_wikitext2 sampling (Python's random, inclusive randint) on one token stream."""
    random.seed(seed)
    starts = [random.randint(0, token_ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([token_ids[s : s + seqlen] for s in starts])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", default=None, help="comma-separated labels to run (default: all)")
    p.add_argument("--quick", action="store_true", help="check the script: 4 x 128 calibration, 4 evaluation windows")
    p.add_argument("--name", default=None, help="result file name (default methods_smollm2_cpu, or _quick)")
    args = p.parse_args()
    if args.quick:
        args.nsamples, args.seqlen, args.windows = 4, 128, 4
    torch.set_num_threads(args.threads)
    start_load = loadavg()

    import wanda_core as wc

    model, tok = wc.load_model(args.model or smollm2_dir(), device="cpu")
    calib_ids = wc.tokenize(tok, wc.read_corpus(WIKITEXT / "valid.txt", join=" "))
    calib = wanda_windows(calib_ids, args.nsamples, args.seqlen)
    test = wc.tokenize(tok, wc.read_corpus(WIKITEXT / "test.txt"))
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    for label, method, pattern, sparsity, params in RUNS:
        if args.runs and label not in args.runs.split(","):
            continue
        model.load_state_dict(dense)
        t0 = time.perf_counter()
        report = wc.prune(model, method, pattern, sparsity, calib, params=params, progress=False)
        seconds = time.perf_counter() - t0
        ppl = wc.perplexity(model, test, args.seqlen, args.windows, batch_size=4, progress=False)
        row = {"run": label, "method": method, "pattern": pattern, "params": params,
               "sparsity": round(report["sparsity"], 4), "ppl": round(ppl, 3), "prune_seconds": round(seconds, 1),
               "loadavg": loadavg()}
        if "block_sparsity" in report:
            row["block_sparsity"] = [round(s, 4) for s in report["block_sparsity"]]
        if method == "dsnot":
            swaps = [r.get("dsnot_swaps", 0) for r in report["layers"]]
            row["dsnot_swaps"] = sum(swaps)
            row["dsnot_refined_matrices"] = sum(1 for r in report["layers"] if r.get("dsnot_cycles", 0) > 0)
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    write_result(args.name or ("methods_smollm2_quick" if args.quick else "methods_smollm2_cpu"), {
        "bench": "methods_smollm2", "model": "SmolLM2-135M-Instruct (float32, CPU)",
        "calibration": f"wikitext-2 valid.txt, lines joined with ' ', {args.nsamples} x {args.seqlen}, Wanda get_wikitext2 sampling, seed 0",
        "eval": f"wikitext-2 test.txt, lines joined with '\\n\\n', first {args.windows} windows x {args.seqlen}",
        "threads": args.threads, "rows": rows, "machine": machine_note(start_load),
    })


if __name__ == "__main__":
    main()
