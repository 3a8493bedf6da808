"""Memory at 4096 tokens: what the engine needs on the compute device to prune LLaMA-2 (7B, 13B, 70B) with
128 calibration windows of 2048 and 4096 tokens, by part (wanda_core.memory.prune_account), and the check of
that account against every byte the real engine allocates on the CPU for models with LLaMA-2-70B's
proportions at a CPU's scale (torch's profiler). Prints JSON and writes bench/results/memory_4096.json.

    python bench/memory_4096.py [--quick]

No 70B-sized arithmetic runs here: the 70B figures are the account at its shapes (the weights counted on the
meta device), the account itself is what the CPU runs check.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from common import loadavg, machine_note, write_result  # noqa: E402

import wanda_core as wc  # noqa: E402
from wanda_core import memory  # noqa: E402

LLAMA2 = {  # the published config.json of each (hidden, intermediate, heads, KV heads), vocabulary 32000
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, head_dim=128),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40, head_dim=128),
    "llama2-70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8, head_dim=128),
}
# Scaled shapes with 70B's proportions (intermediate 3.5 x hidden; GQA), and calibration sets (N, S, batch).
CHECKS = [
    (dict(hidden_size=1024, intermediate_size=3584, num_attention_heads=8, num_key_value_heads=1, head_dim=128), 16, 512, 8),
    (dict(hidden_size=512, intermediate_size=1792, num_attention_heads=8, num_key_value_heads=1, head_dim=64), 8, 1024, 4),
    (dict(hidden_size=768, intermediate_size=2688, num_attention_heads=6, num_key_value_heads=2, head_dim=128), 12, 256, 6),
]
GB = 1e9
BUDGET = 80 * GB  # an 80 GB GPU (A100/H100 80GB)


def check(shape, nsamples, seqlen, batch, method, dtype):
    from tiny_models import tiny_model

    model = tiny_model("llama", num_hidden_layers=2, max_position_embeddings=4096, **shape).to(dtype)
    calibration = torch.randint(0, 256, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    peak = memory.allocated_peak(lambda: wc.prune(model, method, "unstructured", 0.5, calibration, batch_size=batch, progress=False))
    account = memory.prune_account(model.config, nsamples, seqlen, method, batch, dtype.itemsize)
    allocated = account["peak"] - account["outside_weights"] - account["block_weights"]  # the weights were loaded before
    return {"shape": shape, "nsamples": nsamples, "seqlen": seqlen, "batch_size": batch, "method": method,
            "dtype": str(dtype).replace("torch.", ""), "measured_mb": round(peak / 2**20, 3),
            "account_mb": round(allocated / 2**20, 3), "account_over_measured": round(allocated / peak, 4), "phase": account["phase"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the CPU check on the smallest shape only")
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = loadavg()
    checks = []
    for shape, n, s, b in CHECKS[1:2] if args.quick else CHECKS:
        for method in ("wanda", "sparsegpt"):
            for dtype in (torch.bfloat16, torch.float32):
                checks.append(check(shape, n, s, b, method, dtype))
                print(checks[-1], flush=True)
    accounts = []
    for name, shape in LLAMA2.items():
        for seqlen in (2048, 4096):
            for method in ("wanda", "sparsegpt"):
                for offload in (False, True):
                    a = memory.prune_account({**shape, "vocab_size": 32000}, 128, seqlen, method, batch_size=8, dtype_bytes=2,
                                             offload_activations=offload)
                    accounts.append({"model": name, "seqlen": seqlen, "method": method, "offload_activations": offload,
                                     **{k: (v if k == "phase" else round(v / GB, 2)) for k, v in a.items()},
                                     # the engine's rule (capture.calibration_inputs): offload above 40% of free memory
                                     "engine_offloads_on_80gb": (128 * seqlen * shape["hidden_size"] * 2) > 0.4 * BUDGET})
    write_result("memory_4096", {"unit": "GB (1e9 bytes) for the accounts, MiB for the CPU checks", "batch_size": 8,
                                 "dtype": "float16", "nsamples": 128, "budget_gb": BUDGET / GB, "accounts": accounts,
                                 "cpu_checks": checks, "machine": machine_note(start)})


if __name__ == "__main__":
    main()
