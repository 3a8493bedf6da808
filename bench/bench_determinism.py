"""Do torch's CPU thread count and the statistics' precision change the masks? SmolLM2-135M, the demo's data.

1. Block 0 alone, same inputs: its forward output and each matrix's Wanda statistic (sum of x^2 over
   tokens) computed with 1 and with N threads, compared bit for bit (where a difference starts).
2. The demo's prune jobs (Wanda and SparseGPT at 2:4, by default) in child processes with 1 and N threads:
   the fraction of weights whose keep/prune decision differs, per block, and the demo's perplexity
   (pydoc evaluation topics, 8 x 512 tokens) of each.

    python bench/bench_determinism.py [--threads 2] [--jobs wanda:2:4,sparsegpt:2:4] [--revision 8e2e96f]

`--revision REV` also prunes with that git revision's wanda_core (1 thread), `--capability avx2` with
torch's AVX2 kernels instead of the best this CPU has (ATEN_CPU_CAPABILITY): where an old run's numbers
came from. `--threads 1` skips the thread comparison.

Writes bench/results/determinism_cpu.json. Deterministic figures: the load average does not matter here,
only the time of each run does (reported for the record).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import common

CHILD = r"""
import json, sys, time
import torch
import wanda_core as wc
from wanda_core.masks import unpack_mask
model_dir, calib_path, eval_path, method, pattern, threads, out = sys.argv[1:8]
torch.set_num_threads(int(threads))
model, tok = wc.load_model(model_dir, dtype="float32", device="cpu")
calib = wc.load_windows(calib_path)
t0 = time.perf_counter()
report = wc.prune(model, method, pattern, None if ":" in pattern else 0.5, calib, device="cpu", batch_size=8,
                  keep_masks=True, progress=False)
seconds = time.perf_counter() - t0
shapes = {t.name: tuple(t.shape) for t in wc.all_targets(model)}
masks = {name: unpack_mask(packed, shapes[name]) for name, packed in report["masks"].items()}
torch.save(masks, out)
ids = wc.tokenize(tok, wc.read_corpus(eval_path))
ppl = wc.perplexity(model, ids, seqlen=512, max_windows=8, batch_size=2, progress=False)
print(json.dumps({"seconds": round(seconds, 1), "perplexity": ppl, "cpu_capability": torch.backends.cpu.get_cpu_capability()}))
"""


def block0(model_dir, calib_path, threads: int) -> dict:
    """Block 0's output and statistics with 1 and `threads` threads, on the same captured inputs."""
    import torch
    import wanda_core as wc
    from wanda_core import capture
    from wanda_core.methods import Stats
    from wanda_core.model import find_blocks, find_targets

    model, _ = wc.load_model(model_dir, dtype="float32", device="cpu")
    path, blocks = find_blocks(model)
    windows = wc.load_windows(calib_path)
    inputs = capture.capture_inputs(model, blocks, windows, torch.device("cpu"), torch.device("cpu"), 8)
    targets = find_targets(blocks[0], f"{path}.0")
    runs = {}
    torch.set_grad_enabled(False)
    for n in (1, threads):
        torch.set_num_threads(n)
        for kind in ("sqnorm", "hessian"):  # Wanda's statistic, SparseGPT's
            stats = {t.name: Stats() for t in targets}
            handles = capture.stat_hooks(targets, stats, kind)
            try:
                outputs = [capture.block_output(blocks[0](h, *inputs.extras[h.shape[0]][0], **inputs.extras[h.shape[0]][1]))
                           for h in inputs.hidden]
            finally:
                for h in handles:
                    h.remove()
            runs[n, kind] = {k: getattr(st, kind).clone() for k, st in stats.items()}
        runs[n, "output"] = {"block 0 output": torch.cat(outputs)}
    found = {}
    for what in ("output", "sqnorm", "hessian"):
        one, many = runs[1, what], runs[threads, what]
        found[what] = {k: {"identical": bool(torch.equal(one[k], many[k])),
                           "max_rel_diff": float(((one[k] - many[k]).abs() / one[k].abs().max()).max())} for k in one}
    return found


def extract(rev: str, into: Path) -> Path:
    """The revision's wanda_core package, as a folder to put on PYTHONPATH."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev, "wanda_core"], cwd=common.ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def compare(a: dict, b: dict) -> dict:
    """How many keep/prune decisions differ between two runs' masks, in all and per block."""
    per_block, differ, total, first = {}, 0, 0, None
    for name in a:
        d = int((a[name] != b[name]).sum())
        block = int(name.split(".layers.")[1].split(".")[0]) if ".layers." in name else name
        per_block[block] = per_block.get(block, 0) + d
        differ, total = differ + d, total + a[name].numel()
        if d and first is None:
            first = name
    return {"identical": differ == 0, "weights_decided_differently": differ, "fraction": differ / total,
            "first_differing_matrix": first, "differing_per_block": per_block}


def main():
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="compared against 1 thread (1: no comparison)")
    p.add_argument("--jobs", default="wanda:2:4,sparsegpt:2:4", help="comma-separated method:pattern ('' for none)")
    p.add_argument("--capability", help="also prune (1 thread) with torch's kernels for this instruction set: "
                   "ATEN_CPU_CAPABILITY=avx2, default, ... (another machine's CPU)")
    p.add_argument("--revision", help="also prune with this git revision's wanda_core (1 thread), e.g. an old run's")
    p.add_argument("--smollm2", default=common.SMOLLM2)
    p.add_argument("--name", default="determinism_cpu", help="result file name")
    args = p.parse_args()
    model = common.smollm2_dir(args.smollm2)
    start = common.loadavg()
    result = {"bench": "determinism", "model": "SmolLM2-135M float32", "threads": [1, args.threads],
              "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "calibration": "pydoc topics 16x256 seed 0 (the demo's)", "evaluation": "pydoc evaluation topics, 8 x 512"}
    with tempfile.TemporaryDirectory(prefix="bench_determinism_") as tmp:
        tmp = Path(tmp)
        for part in ("calibration", "evaluation"):
            subprocess.run([sys.executable, "-m", "wanda_core", "--threads", "1", "prepare-data", "--spec",
                            json.dumps({"pydoc": part}), "--out", str(tmp / f"{part}.jsonl")], check=True, capture_output=True)
        subprocess.run([sys.executable, "-m", "wanda_core", "--threads", "1", "calibrate", "--model", model, "--data",
                        str(tmp / "calibration.jsonl"), "--nsamples", "16", "--seqlen", "256", "--seed", "0",
                        "--out", str(tmp / "calib.safetensors")], check=True, capture_output=True)
        result["block0"] = block0(model, tmp / "calib.safetensors", args.threads)
        print(json.dumps(result["block0"]), file=sys.stderr, flush=True)
        srcs = {"this": None}
        if args.revision:
            srcs[args.revision] = extract(args.revision, tmp / "rev")
        runs_of = [("this", 1, None)] + ([("this", args.threads, None)] if args.threads > 1 else [])
        runs_of += [(args.revision, 1, None)] if args.revision else []
        runs_of += [("this", 1, args.capability)] if args.capability else []
        result["jobs"] = []
        for job in filter(None, args.jobs.split(",")):
            method, pattern = job.split(":", 1)
            runs, masks = {}, {}
            for src, n, capability in runs_of:
                key = f"{src}, {n} thread{'s' if n > 1 else ''}" + (f", ATEN_CPU_CAPABILITY={capability}" if capability else "")
                out = tmp / "masks.pt"
                env = {**os.environ, "OMP_NUM_THREADS": str(n)}
                if capability:
                    env["ATEN_CPU_CAPABILITY"] = capability
                if srcs[src]:
                    env["PYTHONPATH"] = str(srcs[src])
                proc = subprocess.run([sys.executable, "-c", CHILD, model, str(tmp / "calib.safetensors"),
                                       str(tmp / "evaluation.jsonl"), method, pattern, str(n), str(out)],
                                      capture_output=True, text=True, env=env, cwd=srcs[src] or common.ROOT)
                if proc.returncode:
                    raise SystemExit(proc.stderr[-3000:])
                runs[key] = json.loads(proc.stdout.strip().splitlines()[-1])
                masks[key] = torch.load(out)
            reference = next(iter(masks))
            row = {"job": job, "runs": runs, "against": reference,
                   "differences": {key: compare(masks[reference], m) for key, m in masks.items() if key != reference}}
            result["jobs"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    result["machine"] = common.machine_note(start)
    common.write_result(args.name, result)


if __name__ == "__main__":
    main()
