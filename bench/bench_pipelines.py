"""Pipelines (sequential, one_pass, independent) and compute dtypes on SmolLM2-135M: time, peak memory, perplexity.

Calibration: 32 x 512 WikiText-2 valid windows drawn as the Wanda code draws them; evaluation: the first
64 windows x 512 of WikiText-2 test. Every (method, pattern, pipeline, dtype) prunes in a fresh child
process, in alternating order over the repeats; seconds are the median of the repeats, perplexity comes
from the first (it is deterministic). Each row also has the prune's time split (forward, statistics,
method; medians) and a hash of its masks (the same in every repeat, or the row says so), so that two
versions of the engine can be compared at unchanged masks. Prints JSON and writes
bench/results/pipelines_cpu.json (--name).

    python bench/bench_pipelines.py [--methods wanda,sparsegpt,magnitude] [--patterns 0.5,2:4]
        [--pipelines sequential,one_pass,independent] [--dtypes float32,bfloat16] [--repeats 2] [--threads 1]
        [--no-eval]
"""
import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import PeakRSS, loadavg, machine_note, smollm2_dir, wikitext_test_ids, wikitext_windows, write_result  # noqa: E402


def child(cell: dict) -> dict:
    import torch

    import wanda_core as wc

    torch.set_num_threads(cell["threads"])
    model, tok = wc.load_model(cell["model"], device="cpu")
    calib = wikitext_windows(tok, cell["nsamples"], cell["seqlen"])
    pattern, sparsity = ("unstructured", float(cell["pattern"])) if ":" not in cell["pattern"] else (cell["pattern"], None)
    with PeakRSS() as rss:
        t0, cpu0 = time.perf_counter(), time.process_time()
        report = wc.prune(model, cell["method"], pattern, sparsity, calib, progress=False, pipeline=cell["pipeline"],
                          compute_dtype=None if cell["dtype"] == "float32" else cell["dtype"], keep_masks=True)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    masks = hashlib.sha256()
    for name in sorted(report["masks"]):
        masks.update(name.encode() + report["masks"][name].numpy().tobytes())
    out = {"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mib": rss.peak // 2**20, "sparsity": report["sparsity"],
           "pipeline_used": report["pipeline"], "split": report.get("seconds_split"), "masks_sha256": masks.hexdigest()[:16]}
    if cell["eval"]:
        out["perplexity"] = wc.perplexity(model, wikitext_test_ids(tok), cell["seqlen"], cell["eval_windows"],
                                          batch_size=4, progress=False)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="wanda,sparsegpt,magnitude")
    p.add_argument("--patterns", default="0.5,2:4")
    p.add_argument("--pipelines", default="sequential,one_pass,independent")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--no-eval", action="store_true", help="time the prunes only (no perplexity)")
    p.add_argument("--name", default="pipelines_cpu")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    model = smollm2_dir()
    cells = [dict(method=m, pattern=pat, pipeline=pl, dtype=dt)
             for m in args.methods.split(",") for pat in args.patterns.split(",")
             for pl in args.pipelines.split(",") for dt in args.dtypes.split(",")
             if not (m == "magnitude" and dt != "float32")]  # magnitude runs no forward
    start = loadavg()
    runs = {i: [] for i in range(len(cells))}
    for r in range(args.repeats):
        order = list(range(len(cells)))
        if r % 2:
            order.reverse()  # alternate, so that a slow phase of the machine hits every cell alike
        for i in order:
            cell = {**cells[i], "model": model, "threads": args.threads, "nsamples": args.nsamples, "seqlen": args.seqlen,
                    "eval": r == 0 and not args.no_eval, "eval_windows": args.eval_windows}
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(cell)], capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{cells[i]} failed:\n{proc.stderr[-3000:]}")
            runs[i].append({**json.loads(proc.stdout.strip().splitlines()[-1]), "loadavg": loadavg()[0]})
            print(cells[i], runs[i][-1], file=sys.stderr, flush=True)
    rows = []
    for i, cell in enumerate(cells):
        first = runs[i][0]
        hashes = {x["masks_sha256"] for x in runs[i]}
        split = {k: round(statistics.median(x["split"][k] for x in runs[i]), 2) for k in first["split"] or {}}
        rows.append({**cell, "seconds": round(statistics.median(x["seconds"] for x in runs[i]), 2),
                     "runs": [round(x["seconds"], 2) for x in runs[i]],
                     "cpu_seconds": round(statistics.median(x["cpu_seconds"] for x in runs[i]), 2), "split_median": split,
                     "peak_rss_mib": max(x["peak_rss_mib"] for x in runs[i]),
                     "perplexity": round(first["perplexity"], 3) if "perplexity" in first else None,
                     "sparsity": round(first["sparsity"], 4), "masks_sha256": first["masks_sha256"] if len(hashes) == 1 else
                     f"differ between repeats: {sorted(hashes)}", "pipeline_used": first["pipeline_used"],
                     "loadavg": [x["loadavg"] for x in runs[i]]})
    for row in rows:  # relative to the paper's pipeline in float32, same method and pattern
        base = next((b for b in rows if (b["method"], b["pattern"], b["pipeline"], b["dtype"]) ==
                     (row["method"], row["pattern"], "sequential", "float32")), None)
        if base is None:
            continue
        row["time_vs_sequential_fp32"] = round(row["seconds"] / base["seconds"], 3)
        row["cpu_vs_sequential_fp32"] = round(row["cpu_seconds"] / base["cpu_seconds"], 3)
        if row["perplexity"] is not None:
            row["ppl_change_vs_sequential_fp32"] = round(row["perplexity"] / base["perplexity"] - 1, 4)
    write_result(args.name, {"model": "SmolLM2-135M-Instruct", "calibration": f"WikiText-2 valid {args.nsamples}x{args.seqlen}, python random seed 0",
                             "evaluation": None if args.no_eval else f"WikiText-2 test, first {args.eval_windows} x {args.seqlen}",
                             "threads": args.threads, "machine": machine_note(start),
                             "repeats": args.repeats, "cpus": os.cpu_count(), "loadavg_start": start, "loadavg_end": loadavg(),
                             "rows": rows})


if __name__ == "__main__":
    main()
