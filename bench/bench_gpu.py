"""GPU figures on one H100/H200: pruning a LLaMA-2-7B-shaped model, and 2:4 inference speed; prints JSON.

  prune     random LLaMA-2-7B shape (hidden 4096, MLP 11008, 32 layers, 32 heads, vocab 32000), bf16,
            128 x 2048 random calibration tokens: wanda, sparsegpt, three_tier, each pipeline (sequential,
            one_pass, independent); time and peak GPU memory with the weights resident on the GPU and
            streamed block by block from the CPU; against
            the floor of two forward passes over the calibration set (measured, and 4 x params x tokens
            FLOPs at the measured bf16 matmul rate)
  sparse24  every 7B linear shape pruned 2:4 and converted with to_sparse_semi_structured, against
            dense bf16, for batch-1 decode (1 token) and a 2048-token prefill; and the whole model's
            block linears swapped, for a 2048 prefill and a decode step

The JSON is rewritten after every stage, so a run cut short by the time limit keeps what it measured.

    python bench/bench_gpu.py                # the GPU machine (bench/gpu.sh runs this)
    python bench/bench_gpu.py --smoke        # on the CPU, tiny shapes, no semi-structured: tests the script
"""
import argparse
import os
import re
import sys
import time
import traceback

import torch
import torch.nn.functional as F

import common

import wanda_core as wc
from wanda_core.masks import nm_mask

LLAMA2_7B = dict(hidden=4096, layers=32, heads=32, intermediate=11008, vocab=32000)
SMOKE = dict(hidden=256, layers=2, heads=4, intermediate=704, vocab=1024)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn, device, warmup=3, iters=10):
    """Mean seconds per call: CUDA events on the GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def matmul_tflops(shape, device, dtype):
    """The dense bf16 matmul rate on a 7B MLP-sized product [tokens, hidden] @ [hidden, intermediate]."""
    m, k, n = shape
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    seconds = bench(lambda: a @ b, device, warmup=3, iters=20)
    return {"shape": [m, k, n], "seconds": seconds, "tflops": float(f"{2 * m * k * n / seconds / 1e12:.4g}")}


def copy_rate(device, dtype, mib=512):
    """Host-to-device GB/s from pageable memory (what block streaming uses) and from pinned memory."""
    x = torch.randn(mib << 19, dtype=dtype)  # mib MiB of bf16
    out = {}
    for kind, src in (("pageable", x), ("pinned", x.pin_memory())):
        seconds = bench(lambda: src.to(device), device, warmup=1, iters=5)
        out[f"{kind}_gbps"] = round(x.numel() * x.element_size() / seconds / 1e9, 1)
    return out


def two_four(w):
    """w with the lowest-magnitude 2 of every 4 consecutive inputs zeroed (a 2:4 pattern)."""
    return w * nm_mask(w.abs().float(), 2, 4).to(w.dtype)


def to_semi_structured(w, backend):
    """Compressed 2:4 tensor via cuSPARSELt (the default when available) or CUTLASS (_FORCE_CUTLASS)."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    try:
        return to_sparse_semi_structured(w)
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = False


def sparse24_shapes(shapes, device, dtype, prefill, backends):
    """Per linear shape: dense vs semi-structured F.linear time for decode (1 token) and prefill; >1 means sparse is faster."""
    rows = []
    for name, (out_f, in_f) in shapes.items():
        w = two_four(torch.randn(out_f, in_f, device=device, dtype=dtype) * 0.02)
        for tokens in (1, prefill):
            x = torch.randn(tokens, in_f, device=device, dtype=dtype)
            dense = bench(lambda: F.linear(x, w), device, warmup=10, iters=50)
            row = {"linear": name, "shape": [out_f, in_f], "tokens": tokens, "dense_ms": round(dense * 1e3, 4)}
            for backend in backends:
                try:
                    ws = to_semi_structured(w, backend)
                    err = (F.linear(x, ws).float() - F.linear(x, w).float()).abs().max().item()
                    sparse = bench(lambda: F.linear(x, ws), device, warmup=10, iters=50)
                    row[backend] = {"class": type(ws).__name__, "sparse_ms": round(sparse * 1e3, 4),
                                    "speedup": round(dense / sparse, 3), "max_abs_err": err}
                except Exception as e:  # a backend missing from this torch build, or a shape it refuses
                    row[backend] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
    return rows


def block_linears(model):
    return [m for layer in model.model.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]


def cache_kwarg(model):
    import inspect

    return "cache" if "cache" in inspect.signature(model.model.forward).parameters else "past_key_values"


def model_speed(model, device, prefill, decode_context, vocab):
    """Seconds of a batch-1 prefill (decoder stack) and of one decode step after `decode_context` tokens."""
    ids = torch.randint(0, vocab, (1, prefill), device=device)
    with torch.no_grad():
        t_prefill = bench(lambda: model.model(ids, use_cache=False), device, warmup=2, iters=5)
        out = model.model(ids[:, :decode_context], use_cache=True)
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        one = ids[:, :1]
        kw = {cache_kwarg(model): cache, "use_cache": True}
        t_decode = bench(lambda: model.model(one, **kw), device, warmup=3, iters=20)
    return {"prefill_tokens": prefill, "prefill_s": round(t_prefill, 5), "decode_context": decode_context,
            "decode_step_s": round(t_decode, 6)}


def sparse24_model(model, device, prefill, backend, vocab):
    """The whole model's block linears made 2:4 (magnitude) and swapped for semi-structured tensors; restored after."""
    linears = block_linears(model)
    dense = [m.weight for m in linears]
    with torch.no_grad():
        for m in linears:
            m.weight.copy_(two_four(m.weight))
    context = min(512, prefill)
    result = {"dense": model_speed(model, device, prefill, context, vocab)}
    if device.type == "cuda":
        try:
            for m in linears:
                m.weight = torch.nn.Parameter(to_semi_structured(m.weight.detach(), backend), requires_grad=False)
            result["sparse"] = {"backend": backend, **model_speed(model, device, prefill, context, vocab)}
            result["prefill_speedup"] = round(result["dense"]["prefill_s"] / result["sparse"]["prefill_s"], 3)
            result["decode_speedup"] = round(result["dense"]["decode_step_s"] / result["sparse"]["decode_step_s"], 3)
        finally:
            for m, w in zip(linears, dense):
                m.weight = w
    else:
        result["sparse"] = "skipped: semi-structured tensors need CUDA"
    return result


def prune_run(model, method, calib, placement, device, floor, pipeline="sequential"):
    """One wanda_core.prune() call: weights resident on `device`, or on the CPU and streamed block by block."""
    common.reset_weights(model, seed=1)  # a fresh dense model for every run
    model.to(device if placement == "resident" else "cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    sync(device)
    t0 = time.perf_counter()
    report = wc.prune(model, method, "unstructured", 0.5, calib, device=str(device), batch_size=8, progress=False,
                      pipeline=pipeline)
    sync(device)
    seconds = time.perf_counter() - t0
    row = {"method": method, "placement": placement, "pipeline": report["pipeline"], "seconds": round(seconds, 2),
           "matrix_seconds": round(sum(r["seconds"] for r in report["layers"]), 2),
           "sparsity": round(report["sparsity"], 4), "over_measured_floor": round(seconds / floor["measured_two_passes_s"], 2),
           "over_flops_floor": round(seconds / floor["flops_two_passes_s"], 2)}
    if device.type == "cuda":
        row.update(peak_gpu_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
                   gpu_gib_before=round(before / 2**30, 2))
    model.to(device)
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, no semi-structured: tests this script")
    p.add_argument("--nsamples", type=int, default=None, help="calibration windows (default 128; smoke 4)")
    p.add_argument("--seqlen", type=int, default=None, help="calibration and prefill length (default 2048; smoke 64)")
    p.add_argument("--runs", default="wanda:resident,wanda:resident:one_pass,wanda:resident:independent,wanda:streaming,"
                   "wanda:streaming:one_pass,sparsegpt:resident,sparsegpt:resident:one_pass,sparsegpt:resident:independent,"
                   "three_tier:resident",
                   help="method:placement[:pipeline] prune runs, in order (sparsegpt on 7B takes minutes)")
    p.add_argument("--skip", default="", help="stages to skip: sparse24,prune")
    p.add_argument("--budget-s", type=float, default=420, help="start no prune run after this many seconds")
    p.add_argument("--out", default=os.environ.get("OUT"), help="also write the JSON here (default $OUT)")
    args = p.parse_args()
    smoke = args.smoke or not torch.cuda.is_available()
    shape = SMOKE if smoke else LLAMA2_7B
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.bfloat16
    nsamples = args.nsamples or (4 if smoke else 128)
    seqlen = args.seqlen or (64 if smoke else 2048)
    t_start = time.perf_counter()
    torch.manual_seed(0)

    name = "gpu_smoke_cpu" if smoke else "gpu_" + re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name().lower()).strip("_")
    result = {"bench": "gpu", "smoke": smoke, "device": torch.cuda.get_device_name() if not smoke else "cpu (smoke)",
              "torch": torch.__version__, "dtype": "bfloat16", "shape": shape,
              "calibration": f"random token ids {nsamples}x{seqlen}", "stages": {}}
    if not smoke:
        import transformers

        result.update(transformers=transformers.__version__, capability=list(torch.cuda.get_device_capability()),
                      gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))

    def save(echo=False):
        result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        common.write_result(name, result, args.out, echo)

    def stage(key, fn):
        result["stages"][key] = "running"  # left in the JSON if the time limit cuts this stage
        save()
        try:
            result[key] = fn()
            result["stages"][key] = "done"
        except KeyboardInterrupt:  # gpu.sh's timeout sends SIGINT: keep what was measured
            result["stages"][key] = f"cut by the time limit after {time.perf_counter() - t_start:.0f} s"
            save(echo=True)
            raise SystemExit(124)
        except Exception as e:
            result["stages"][key] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            traceback.print_exc()
        save()

    h, inter = shape["hidden"], shape["intermediate"]
    stage("matmul", lambda: matmul_tflops((8 * seqlen if not smoke else 256, h, inter), device, dtype))
    if not smoke:
        stage("copy_to_gpu", lambda: copy_rate(device, dtype))
    shapes = {"q/k/v/o_proj": (h, h), "gate/up_proj": (inter, h), "down_proj": (h, inter)}
    if "sparse24" not in args.skip and not smoke:
        stage("sparse24_linears", lambda: sparse24_shapes(shapes, device, dtype, seqlen, ["cusparselt", "cutlass"]))

    config = common.llama_config(h, shape["layers"], shape["heads"], inter, shape["vocab"], positions=max(seqlen, 2048))
    t0 = time.perf_counter()
    model = build_model(config, device, dtype)
    result["build_s"] = round(time.perf_counter() - t0, 1)
    result["params"] = common.count_params(model)
    result["block_linear_params"] = sum(m.weight.numel() for m in block_linears(model))

    if "sparse24" not in args.skip:
        backend = "cusparselt"
        if isinstance(result.get("sparse24_linears"), list):  # the backend that worked (and was faster) on the shapes
            ok = [r for r in result["sparse24_linears"] if r["tokens"] > 1]
            speed = {b: sum(r[b].get("speedup", 0) for r in ok) for b in ("cusparselt", "cutlass")}
            backend = max(speed, key=speed.get)
        stage("sparse24_model", lambda: sparse24_model(model, device, seqlen, backend, shape["vocab"]))

    calib = torch.randint(0, shape["vocab"], (nsamples, seqlen), generator=torch.Generator().manual_seed(0))

    def floor():
        """Two forward passes over the calibration set: measured (batches of 8), and from FLOPs at the matmul rate."""
        common.reset_weights(model, seed=1)
        with torch.no_grad():
            def one_pass():
                for s in range(0, nsamples, 8):
                    model.model(calib[s : s + 8].to(device), use_cache=False)
            one = bench(one_pass, device, warmup=0 if not smoke else 1, iters=1)
        flops = 2 * 2 * result["block_linear_params"] * nsamples * seqlen
        tflops = result["matmul"]["tflops"] if isinstance(result.get("matmul"), dict) else float("nan")
        return {"measured_two_passes_s": round(2 * one, 2), "flops_two_passes": flops,
                "flops_two_passes_s": round(flops / (tflops * 1e12), 2), "matmul_tflops": tflops,
                "note": "4 x params x tokens counts the block linears only; attention scores add about seqlen/(6 x hidden) more (8% at 2048/4096)"}

    if "prune" not in args.skip:
        stage("floor", floor)
        if not isinstance(result.get("floor"), dict):
            args.runs = ""  # without the floor a failure below would only repeat
        result["prune"] = []
        for run in filter(None, args.runs.split(",")):
            method, placement, pipeline = (run.split(":") + ["sequential"])[:3]
            key = f"prune_{method}_{placement}_{pipeline}"
            if time.perf_counter() - t_start > args.budget_s:
                result["stages"][key] = f"skipped: past the {args.budget_s:.0f} s budget"
                continue
            stage(key, lambda: prune_run(model, method, calib, placement, device, result["floor"], pipeline))
            if isinstance(result.get(key), dict):
                result["prune"].append(result.pop(key))
    save(echo=True)


def build_model(config, device, dtype):
    """Random weights straight on the device in bf16: transformers' own init on the GPU is fast; no meta tensors."""
    from transformers import LlamaForCausalLM

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    common.reset_weights(model, seed=0)
    return model.eval()


if __name__ == "__main__":
    main()
