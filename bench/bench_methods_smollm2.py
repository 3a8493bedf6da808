"""WikiText-2 perplexity and prune seconds of SmolLM2-135M pruned by Wanda, OWL, RIA, DSnoT (issue #14),
SparseGPT, ALPS, the ADMM weight update and SparseSwaps (issue #24), magnitude and the block patterns; prints JSON.

Calibration as the Wanda code's get_wikitext2 draws it, here from valid.txt: the lines joined with
" " into one token stream, random.seed(0), each window starting at random.randint(0, n - seqlen - 1).
Evaluation: the first 64 windows of 512 tokens of test.txt, lines joined with "\\n\\n" (read_corpus).

    python bench/bench_methods_smollm2.py [--nsamples 32 --seqlen 512 --windows 64 --threads 1 --quick]
        [--runs LABEL,LABEL] [--update]

--update rewrites only the rows it ran in the result file (matched by label), keeps the others, and
appends a note of the update (date, rows, machine) under "updates".
"""
import argparse
import datetime
import json
import sys
import time

import torch

from common import RESULTS, loadavg, machine_note, smollm2_dir, wikitext_test_ids, wikitext_windows, write_result

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
    ("wanda 2:4", "wanda", "2:4", None, {}),
    # Issue #24: the one-shot frontier beside SparseGPT, at 50/60/70% and 2:4.
    *[(f"{m} {label}", m, pattern, sparsity, {}) for m in ("sparsegpt", "alps", "admm")
      for label, pattern, sparsity in (("50%", "unstructured", 0.5), ("60%", "unstructured", 0.6),
                                       ("70%", "unstructured", 0.7), ("2:4", "2:4", None))],
    # The block patterns and magnitude (formerly bench/ppl_smollm2.py): three_tier and hybrid_nm fix their own
    # sparsity (the 0.5 given is only what the unstructured pattern requires; the row records the measured one).
    ("magnitude 50%", "magnitude", "unstructured", 0.5, {}),
    ("three_tier", "three_tier", "unstructured", 0.5, {"inner_score": "wanda"}),
    ("three_tier magnitude", "three_tier", "unstructured", 0.5, {"inner_score": "magnitude"}),
    ("block_topk 20%", "block_topk", "unstructured", 0.2, {}),
    ("hybrid_nm", "hybrid_nm", "unstructured", 0.5, {}),
    # Exhaustive 1-swap search (the paper's) costs rows x in^2 per swap: hours on a CPU. Here each swap is the
    # best among the 16 kept weights cheapest to prune and the 16 pruned weights best to regrow (N:M: exhaustive).
    *[(f"sparseswaps+wanda {label}", "sparseswaps", pattern, sparsity, {"base": "wanda", "candidates": 16})
      for label, pattern, sparsity in (("50%", "unstructured", 0.5), ("60%", "unstructured", 0.6),
                                       ("70%", "unstructured", 0.7), ("2:4", "2:4", None))],
]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", default=None, help="comma-separated labels to run, in this order (default: all)")
    p.add_argument("--quick", action="store_true", help="check the script: 4 x 128 calibration, 4 evaluation windows")
    p.add_argument("--name", default=None, help="result file name (default methods_smollm2_cpu, or _quick)")
    p.add_argument("--update", action="store_true", help="replace only the rows run here in the existing result file")
    args = p.parse_args()
    wanted = args.runs.split(",") if args.runs else None
    unknown = set(wanted or ()) - {r[0] for r in RUNS}
    if unknown:
        p.error(f"unknown run labels: {sorted(unknown)}")
    if args.quick:
        args.nsamples, args.seqlen, args.windows = 4, 128, 4
    torch.set_num_threads(args.threads)
    start_load = loadavg()

    import wanda_core as wc

    model, tok = wc.load_model(args.model or smollm2_dir(), device="cpu")
    calib = wikitext_windows(tok, args.nsamples, args.seqlen)
    test = wikitext_test_ids(tok)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    by_label = {r[0]: r for r in RUNS}
    for label, method, pattern, sparsity, params in [by_label[w] for w in wanted] if wanted else RUNS:  # in the order asked
        model.load_state_dict(dense)
        t0, c0 = time.perf_counter(), time.process_time()
        report = wc.prune(model, method, pattern, sparsity, calib, params=params, progress=False)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0  # CPU seconds: less load-sensitive
        ppl = wc.perplexity(model, test, args.seqlen, args.windows, batch_size=4, progress=False)
        row = {"run": label, "method": method, "pattern": pattern, "params": params,
               "sparsity": round(report["sparsity"], 4), "ppl": round(ppl, 3), "prune_seconds": round(seconds, 1), "prune_cpu_seconds": round(cpu, 1),
               "loadavg": loadavg()}
        if "block_sparsity" in report:
            row["block_sparsity"] = [round(s, 4) for s in report["block_sparsity"]]
        if method == "dsnot":
            swaps = [r.get("dsnot_swaps", 0) for r in report["layers"]]
            row["dsnot_swaps"] = sum(swaps)
            row["dsnot_refined_matrices"] = sum(1 for r in report["layers"] if r.get("dsnot_cycles", 0) > 0)
        if method == "sparseswaps":
            row["swaps"] = sum(r["swaps"] for r in report["layers"])
            row["swap_error_ratio_mean"] = round(sum(r["swap_error_ratio"] for r in report["layers"]) / len(report["layers"]), 4)
        if method == "alps":
            row["alps_iters_mean"] = round(sum(r["alps_iters"] for r in report["layers"]) / len(report["layers"]), 1)
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    name = args.name or ("methods_smollm2_quick" if args.quick else "methods_smollm2_cpu")
    result = {
        "bench": "methods_smollm2", "model": "SmolLM2-135M-Instruct (float32, CPU)",
        "calibration": f"wikitext-2 valid.txt, lines joined with ' ', {args.nsamples} x {args.seqlen}, Wanda get_wikitext2 sampling, seed 0",
        "eval": f"wikitext-2 test.txt, lines joined with '\\n\\n', first {args.windows} windows x {args.seqlen}",
        "threads": args.threads, "rows": rows, "machine": machine_note(start_load),
    }
    if args.update and (RESULTS / f"{name}.json").is_file():
        result = merge(json.loads((RESULTS / f"{name}.json").read_text()), result)
    write_result(name, result)


def merge(old: dict, new: dict) -> dict:
    """The old result with the new rows in place of those of the same label (new labels appended in RUNS
    order); the settings must match. The old machine note stays; each update adds its own."""
    for key in ("calibration", "eval", "threads", "model"):
        if old.get(key) != new[key]:
            sys.exit(f"--update: {key} differs from the existing file ({old.get(key)!r} vs {new[key]!r}); use --name")
    fresh = {r["run"]: r for r in new["rows"]}
    rows = [fresh.pop(r["run"], r) for r in old["rows"]]
    order = [label for label, *_ in RUNS]
    rows += sorted(fresh.values(), key=lambda r: order.index(r["run"]))
    note = {"date": datetime.date.today().isoformat(), "runs": [r["run"] for r in new["rows"]], "machine": new["machine"]}
    return {**old, "rows": rows, "updates": old.get("updates", []) + [note]}


if __name__ == "__main__":
    main()
