"""DSnoT: ours against the authors' code (zyxxmu/DSnoT, `prune_DSnoT`) on SmolLM2-135M; prints JSON.

Both sides prune the same float32 model on the CPU with the same calibration windows (those of
bench/bench_methods_smollm2.py: 32 x 512 from WikiText-2 valid.txt drawn as get_wikitext2 does),
and both pruned models are evaluated by our perplexity on the first 64 x 512 windows of test.txt.
The authors' code is imported from a checkout given on the command line (it is not part of this
repository); only its data loader is replaced, to hand it our windows, and each decoder block is
given the rotary position embeddings that transformers 5 no longer computes inside the block.
Their options are their main.py defaults (skip_layer mlp, max_cycle_time 50, update_threshold 0.1,
pow_of_var_regrowing 1, without_same_sign True).

Two mask comparisons, each as the weights whose keep/prune decision differs, per decoder block (and
per matrix for the first block that differs):
  masks_same_statistics  our prune_matrix on the statistics their layer wrapper gathered, matrix by
                         matrix from the dense weights: differences of the algorithm alone;
  masks                  end to end, each side with its own statistics (ours summed in batches of
                         --batch-size, theirs running means one sequence at a time): float rounding
                         flips a few near-ties, and a flipped swap changes the next blocks' inputs.

    python bench/bench_dsnot_reference.py --ref /path/to/DSnoT [--sparsity 0.6 --pattern unstructured]
        [--blocks 2 --nsamples 8 --no-eval]      # quick: the first blocks only, no perplexity
        [--params '{"strict_swaps": true}']       # options of ours
"""
import argparse
import contextlib
import json
import sys
import time
from argparse import Namespace
from pathlib import Path

import torch

from bench_methods_smollm2 import wanda_windows
from common import WIKITEXT, loadavg, machine_note, smollm2_dir, write_result


def authors_module(ref: Path, windows: torch.Tensor):
    """Their lib.prune, with get_loaders handing out our windows (as their loader's (input, target) pairs)."""
    if not (ref / "lib" / "prune.py").is_file():
        sys.exit(f"error: {ref} is not a DSnoT checkout (no lib/prune.py)")
    sys.path.insert(0, str(ref))
    import lib.prune as ref_prune

    ref_prune.get_loaders = lambda *a, **k: ([(w.unsqueeze(0), None) for w in windows], None)
    return ref_prune


def add_rotary(model) -> list:
    """Their code calls each block with position_ids only; transformers 5 blocks need the (cos, sin) pair."""
    rotary = model.model.rotary_emb

    def hook(mod, args, kwargs):
        if kwargs.get("position_embeddings") is None:
            hidden = args[0] if args else kwargs["hidden_states"]
            pos = kwargs.get("position_ids")
            if pos is None:
                pos = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
            kwargs["position_embeddings"] = rotary(hidden, position_ids=pos)
        return args, kwargs

    return [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in model.model.layers]


def run_authors(ref_prune, model, nsamples, sparsity, n, m) -> dict:
    """Their prune_DSnoT on `model` in place; returns the statistics their layer wrapper gathered, by matrix name."""
    args = Namespace(nsamples=nsamples, seed=0, sparsity_ratio=sparsity, initial_method="wanda", max_cycle_time=50,
                     without_DSnoT=False, update_threshold=0.1, pow_of_var_regrowing=1.0, pow_of_var_pruning=1.0,
                     skip_layer="mlp", skip_sub_layer="no_skip", without_same_sign=True, get_time_overhead=False)
    model.hf_device_map = {}  # their code reads it (accelerate sets it when a device map is used)
    names = {id(mod): name for name, mod in model.named_modules()}
    wrappers = {}

    class Recorded(ref_prune.WrappedGPT):  # their wrapper, unchanged, remembered by matrix name
        def __init__(self, layer, *a, **k):
            super().__init__(layer, *a, **k)
            wrappers[names[id(layer)]] = self

    ref_prune.WrappedGPT = Recorded
    handles = add_rotary(model)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # their progress lines; our stdout is the JSON
            ref_prune.prune_DSnoT(args, model, None, device=torch.device("cpu"), prune_n=n, prune_m=m)
    finally:
        ref_prune.WrappedGPT = Recorded.__base__
        for h in handles:
            h.remove()
    return {name: as_stats(w) for name, w in wrappers.items()}


def as_stats(w):
    """Their running averages as our sums (sequences and tokens here are powers of two: exact)."""
    from wanda_core.methods import Stats

    return Stats(count=w.ntokens, sqnorm=w.scaler_row * w.nsamples, xsum=w.sum_metric_row * w.nsamples,
                 within=w.var.reshape(-1) * w.ntokens, samples=w.nsamples)


def replay(their_stats: dict, dense: dict, pattern, params: dict) -> dict:
    """Our prune_matrix on their statistics and the dense weights, matrix by matrix: pruned = True."""
    from wanda_core.methods import dsnot

    masks = {}
    for name, stats in their_stats.items():
        w = dense[name + ".weight"].float()
        masks[name] = ~dsnot.prune_matrix(w.clone(), stats, pattern, name=name, **params).keep | (w == 0)
    return masks


def zero_masks(model, n_blocks):
    """Pruned = exactly zero, per matrix of the first n_blocks blocks."""
    import wanda_core as wc

    return {t.name: (t.weight() == 0) for t in wc.all_targets(model) if int(t.name.split(".")[2]) < n_blocks}


def compare(theirs: dict, ours: dict) -> dict:
    per_block, first = {}, None
    for name, a in theirs.items():
        diff = int((a != ours[name]).sum())
        block = int(name.split(".")[2])
        per_block[block] = per_block.get(block, 0) + diff
        if diff and first is None:
            first = block
    matrices = {}
    if first is not None:
        for name, a in theirs.items():
            if int(name.split(".")[2]) == first:
                b = ours[name]
                matrices[name.split(".", 3)[3]] = {"differ": int((a != b).sum()), "rows_differ": int((a != b).any(1).sum()),
                                                   "numel": a.numel()}
    return {"differ_per_block": [per_block[b] for b in sorted(per_block)], "total_weights": sum(a.numel() for a in theirs.values()),
            "first_block_differing": first, "matrices_of_that_block": matrices}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ref", required=True, type=Path, help="a checkout of zyxxmu/DSnoT")
    p.add_argument("--model", default=None)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--sparsity", type=float, default=0.6)
    p.add_argument("--pattern", default="unstructured", help="unstructured, or N:M (their code: sparsity 0.5)")
    p.add_argument("--params", default="{}", help="options of ours, as JSON")
    p.add_argument("--order", type=int, default=0,
                   help="0: the windows as drawn; k: shuffled by permutation seed k (the same sums, other rounding)")
    p.add_argument("--batch-size", type=int, default=8, help="our engine's calibration batch (theirs: 1)")
    p.add_argument("--blocks", type=int, default=None, help="keep only the first N decoder blocks (mask check only)")
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="dsnot_reference_cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start_load = loadavg()

    import wanda_core as wc
    from wanda_core.methods import dsnot
    from wanda_core.model import set_blocks

    model, tok = wc.load_model(args.model or smollm2_dir(), device="cpu")
    if args.blocks:
        model.model.layers = model.model.layers[: args.blocks]
        model.config.num_hidden_layers = args.blocks
        set_blocks(model, "model.layers")  # too few blocks to hold most weights: name them
    n_blocks = len(model.model.layers)
    dtype = next(model.parameters()).dtype
    model.seqlen = args.seqlen
    calib = wanda_windows(wc.tokenize(tok, wc.read_corpus(WIKITEXT / "valid.txt", join=" ")), args.nsamples, args.seqlen)
    if args.order:
        calib = calib[torch.randperm(len(calib), generator=torch.Generator().manual_seed(args.order))]
    test = wc.tokenize(tok, wc.read_corpus(WIKITEXT / "test.txt"))
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    nm = (0, 0) if args.pattern == "unstructured" else tuple(map(int, args.pattern.split(":")))
    sparsity = args.sparsity if args.pattern == "unstructured" else 0.5
    params = json.loads(args.params)

    def evaluate():
        return None if args.no_eval else round(wc.perplexity(model, test, args.seqlen, args.windows, batch_size=4, progress=False), 3)

    ref_prune = authors_module(args.ref, calib)
    t0 = time.perf_counter()
    their_stats = run_authors(ref_prune, model, args.nsamples, sparsity, *nm)
    theirs_seconds = time.perf_counter() - t0
    theirs = zero_masks(model, n_blocks)
    full = {**dsnot.PARAMS, **params}
    pat = wc.parse_pattern(args.pattern, sparsity if args.pattern == "unstructured" else None)
    same = replay(their_stats, dense, pat, full)
    same_stats = compare(theirs, same)
    # The other setting of strict_swaps, on the same statistics: where the corner cases were reached.
    other = compare(same, replay(their_stats, dense, pat, {**full, "strict_swaps": not full["strict_swaps"]}))
    del same
    theirs_ppl = evaluate()
    theirs_load = loadavg()

    model.load_state_dict(dense)
    t0 = time.perf_counter()
    report = wc.prune(model, "dsnot", args.pattern, sparsity if args.pattern == "unstructured" else None, calib,
                      params=params, progress=False, batch_size=args.batch_size)
    ours_seconds = time.perf_counter() - t0
    ours = zero_masks(model, n_blocks)
    ours_ppl = evaluate()

    result = {
        "bench": "dsnot_reference", "model": f"SmolLM2-135M-Instruct ({str(dtype).replace('torch.', '')}, CPU)", "blocks": n_blocks,
        "reference": "zyxxmu/DSnoT lib/prune.py prune_DSnoT, main.py defaults (initial_method wanda)",
        "pattern": args.pattern, "sparsity": sparsity, "ours_params": report["params"],
        "calibration": f"wikitext-2 valid.txt, lines joined with ' ', {args.nsamples} x {args.seqlen}, Wanda get_wikitext2 sampling, seed 0"
                       + (f", shuffled (permutation seed {args.order})" if args.order else ""),
        "eval": None if args.no_eval else f"wikitext-2 test.txt, lines joined with '\\n\\n', first {args.windows} windows x {args.seqlen}",
        "theirs": {"ppl": theirs_ppl, "prune_seconds": round(theirs_seconds, 1), "loadavg": theirs_load},
        "ours": {"ppl": ours_ppl, "prune_seconds": round(ours_seconds, 1), "loadavg": loadavg(),
                 "dsnot_swaps": sum(r.get("dsnot_swaps", 0) for r in report["layers"])},
        "ppl_ours_over_theirs": round(ours_ppl / theirs_ppl, 4) if theirs_ppl else None,
        "batch_size_ours": args.batch_size,
        # Ours on their statistics (each matrix from the dense weights): differences of the algorithm alone.
        "masks_same_statistics": same_stats,
        "strict_swaps_toggled_same_statistics": other,
        # End to end: each side's statistics, from its own pruned blocks before (differences grow with depth).
        "masks": compare(theirs, ours), "threads": args.threads, "machine": machine_note(start_load),
    }
    write_result(args.name, result)


if __name__ == "__main__":
    main()
