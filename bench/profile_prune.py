"""Where pruning time goes: cProfile of wanda_core.prune() on SmolLM2-135M (CPU); prints JSON.

For each method: our functions by cumulative time, and the torch / transformers calls by own time,
each as a share of the prune call.

    python bench/profile_prune.py [--methods wanda,sparsegpt] [--nsamples 8 --seqlen 256] [--model random100m]
"""
import argparse
import cProfile
import pstats
import sys
from pathlib import Path

import torch

import common

import wanda_core as wc


def label(key):
    file, line, name = key
    if file == "~":  # a C function or method: '{built-in method torch.kthvalue}'
        return name
    path = Path(file)
    for root in (common.ROOT, Path(torch.__file__).parents[1]):
        if path.is_relative_to(root):
            return f"{path.relative_to(root)}:{line}({name})"
    return f"{path.name}:{line}({name})"


def profile(model, method, calib, top):
    prof = cProfile.Profile()
    prof.enable()
    wc.prune(model, method, "unstructured", 0.5, calib, batch_size=8, device="cpu", progress=False)
    prof.disable()
    stats = pstats.Stats(prof).stats  # {(file, line, name): (cc, ncalls, tottime, cumtime, callers)}
    total = sum(v[2] for v in stats.values())
    pkg = str(common.ROOT / "wanda_core")
    ours = sorted(((k, v) for k, v in stats.items() if k[0].startswith(pkg)), key=lambda kv: -kv[1][3])
    own = sorted(stats.items(), key=lambda kv: -kv[1][2])
    return {
        "profiled_seconds": round(total, 2),
        "ours_by_cumulative": [{"function": label(k), "calls": v[1], "cumulative_s": round(v[3], 2), "share": round(v[3] / total, 3)}
                               for k, v in ours[:top]],
        "all_by_own_time": [{"function": label(k), "calls": v[1], "own_s": round(v[2], 2), "share": round(v[2] / total, 3)}
                            for k, v in own[:top]],
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--methods", default="wanda,sparsegpt")
    p.add_argument("--model", default="smollm2", help="smollm2 or random100m")
    p.add_argument("--smollm2", default=common.SMOLLM2)
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's own)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start_load = common.loadavg()
    args.smollm2 = common.smollm2_dir(args.smollm2)
    tok = wc.load_tokenizer(args.smollm2)
    calib = wc.calibration_windows(wc.tokenize(tok, wc.read_corpus(common.WIKITEXT / "valid.txt")), args.nsamples, args.seqlen, 0)
    if args.model == "smollm2":
        model, _ = wc.load_model(args.smollm2, dtype="float32", device="cpu")
    else:
        model = common.random_llama(common.llama_config(768, 8, 12, 2048))
        calib = calib % model.config.vocab_size
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    methods = {}
    for method in args.methods.split(","):
        model.load_state_dict(dense)
        methods[method] = profile(model, method, calib, args.top)
        print(method, methods[method]["profiled_seconds"], file=sys.stderr, flush=True)
    result = {"bench": "profile_prune", "model": args.model, "calibration": f"wikitext-2 valid {args.nsamples}x{args.seqlen}",
              "threads": torch.get_num_threads(), "profiler": "cProfile (adds per-call overhead to Python-heavy loops)",
              "note": "2 shared cores (tests ran beside): seconds are noisy; see loadavg",
              "machine": common.machine_note(start_load), "methods": methods}
    common.write_result(f"profile_{args.model}_cpu", result)


if __name__ == "__main__":
    main()
