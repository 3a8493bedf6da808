"""Our Wanda (batched engine) against a straightforward one-sample-at-a-time Wanda, same run, same model; prints JSON.

The naive version is written the way the original reference code works: forward hooks on every
nn.Linear keep a running mean of the squared input norm per column, one calibration sample per
forward, and a full per-row torch.sort picks the lowest 50% of |W| * sqrt(norm). Both should give
the same masks (up to ties flipped by float rounding: the sums are accumulated in other orders).

    python bench/bench_naive_wanda.py [--nsamples 16 --seqlen 512] [--models smollm2,random100m] [--threads 1]
"""
import argparse
import copy
import sys
import time

import torch
from torch import nn

import common

import wanda_core as wc


class _Stop(Exception):
    pass


def naive_wanda(model, calib, sparsity=0.5):
    """Wanda, one sample per forward: the reference's loop structure (LLaMA-style model.model.layers)."""
    layers = model.model.layers
    # 1. The hidden states entering layer 0, one sample at a time, and the layer's other arguments.
    inps, extra = [], {}

    def catch(mod, args, kwargs):
        inps.append(args[0] if args else kwargs.pop("hidden_states"))
        extra.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Stop

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    for j in range(calib.shape[0]):
        try:
            model(calib[j : j + 1], use_cache=False)
        except _Stop:
            pass
    handle.remove()

    def run(layer, x):
        out = layer(x, **extra)
        return out[0] if isinstance(out, (tuple, list)) else out

    # 2. Layer by layer: statistics from the dense layer, prune its linears, then the pruned layer's outputs feed the next.
    for layer in layers:
        linears = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
        scaler = {name: torch.zeros(m.in_features) for name, m in linears.items()}
        seen = {name: 0 for name in linears}

        def add(name):
            def hook(mod, args, out):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # [tokens, in]
                # running mean over samples of the column's squared L2 norm (over this sample's tokens)
                scaler[name] *= seen[name] / (seen[name] + 1)
                seen[name] += 1
                scaler[name] += torch.norm(x, p=2, dim=0) ** 2 / seen[name]
            return hook

        handles = [m.register_forward_hook(add(name)) for name, m in linears.items()]
        for x in inps:
            run(layer, x)
        for h in handles:
            h.remove()
        for name, m in linears.items():
            W = m.weight.data
            metric = W.abs() * torch.sqrt(scaler[name].reshape(1, -1))
            # full sort of every row; the first half of the indices (lowest scores) is pruned
            idx = torch.sort(metric, dim=-1, stable=True)[1][:, : int(W.shape[1] * sparsity)]
            prune = torch.zeros_like(W, dtype=torch.bool).scatter_(1, idx, True)
            W[prune] = 0
        inps = [run(layer, x) for x in inps]


def zero_masks(model):
    return {t.name: t.weight() == 0 for t in wc.all_targets(model)}


def compare(model, calib, batch_size):
    """Time both on copies of the same dense model; fraction of weights whose keep/prune decision agrees."""
    ours, naive = model, copy.deepcopy(model)
    with torch.no_grad():
        t0 = time.perf_counter()
        wc.prune(ours, "wanda", "unstructured", 0.5, calib, batch_size=batch_size, device="cpu", progress=False)
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        naive_wanda(naive, calib, 0.5)
        t_naive = time.perf_counter() - t0
    a, b = zero_masks(ours), zero_masks(naive)
    same = sum(int((a[k] == b[k]).sum()) for k in a)
    total = sum(a[k].numel() for k in a)
    worst = min(a, key=lambda k: float((a[k] == b[k]).float().mean()))
    # Block 0 sees identical inputs in both; later blocks see inputs that already differ by rounding.
    by_block = {}
    for k in a:
        block = int(k.split(".layers.")[1].split(".")[0])
        s, n = by_block.get(block, (0, 0))
        by_block[block] = (s + int((a[k] == b[k]).sum()), n + a[k].numel())
    return {"ours_seconds": round(t_ours, 2), "naive_seconds": round(t_naive, 2),
            "naive_over_ours": round(t_naive / t_ours, 2), "mask_agreement": round(same / total, 6),
            "weights_compared": total, "least_agreeing_layer": worst,
            "least_agreeing_layer_agreement": round(float((a[worst] == b[worst]).float().mean()), 6),
            "agreement_by_block": [round(s / n, 6) for _, (s, n) in sorted(by_block.items())]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--models", default="smollm2,random100m")
    p.add_argument("--smollm2", default=common.SMOLLM2)
    p.add_argument("--batch-size", type=int, default=8)
    # One thread by default: on a shared machine two OpenMP threads stall each other (see bench_scaling.py).
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's own)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start_load = common.loadavg()
    args.smollm2 = common.smollm2_dir(args.smollm2)  # its tokenizer makes the calibration ids of both models
    tok = wc.load_tokenizer(args.smollm2)
    ids = wc.tokenize(tok, wc.read_corpus(common.WIKITEXT / "valid.txt"))
    calib = wc.calibration_windows(ids, args.nsamples, args.seqlen, 0)
    rows = []
    for name in args.models.split(","):
        if name == "smollm2":
            model, _ = wc.load_model(args.smollm2, dtype="float32", device="cpu")
            windows = calib
        else:  # ~106M parameters (57M in the blocks), LLaMA-shaped; WikiText ids folded into its 32000-token vocab
            model = common.random_llama(common.llama_config(768, 8, 12, 2048))
            windows = calib % model.config.vocab_size
        row = {"model": name, "params": common.count_params(model), **compare(model, windows, args.batch_size)}
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
        del model
    result = {"bench": "naive_wanda", "calibration": f"wikitext-2 valid {args.nsamples}x{args.seqlen}",
              "ours": f"wanda_core.prune(batch_size={args.batch_size})", "naive": "one sample per forward, running-mean hooks, per-row torch.sort",
              "threads": torch.get_num_threads(), "note": "2 shared cores (tests ran beside): seconds are noisy; see loadavg",
              "machine": common.machine_note(start_load), "rows": rows}
    common.write_result("naive_wanda_cpu", result)


if __name__ == "__main__":
    main()
