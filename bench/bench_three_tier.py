"""Time the block masks on one LLaMA-7B MLP-sized score matrix; prints JSON.

    python bench/bench_three_tier.py [--rows 4096 --cols 11008 --repeats 5]

Writes bench/results/three_tier_<cpu|cuda>.json.
"""
import argparse
import statistics
import time

import torch

from common import loadavg, machine_note, write_result
from wanda_core.block_masks import block_mask, block_topk_mask, hybrid_nm_mask, three_tier_mask

CASES = {
    "three_tier": lambda s: three_tier_mask(s),
    "block_topk": lambda s: block_topk_mask(s, 0.5),
    "hybrid_nm": lambda s: hybrid_nm_mask(s),
    "block": lambda s: block_mask(s, 0.5),
}


def median_seconds(fn, score, repeats, sync):
    fn(score)  # warm-up: allocator, kernels
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn(score)
        sync()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times), 4)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=11008)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    start = loadavg()
    torch.manual_seed(0)
    score = torch.rand(args.rows, args.cols)  # float32
    result = {
        "shape": [args.rows, args.cols],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "cpu_seconds": {name: median_seconds(fn, score, args.repeats, lambda: None) for name, fn in CASES.items()},
    }
    # on a busy machine, two OpenMP threads can be slower than one: show both
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    result["cpu_seconds_1_thread"] = {name: median_seconds(fn, score, args.repeats, lambda: None) for name, fn in CASES.items()}
    torch.set_num_threads(threads)
    if torch.cuda.is_available():
        cuda = score.cuda()
        result["cuda_device"] = torch.cuda.get_device_name()
        result["cuda_seconds"] = {name: median_seconds(fn, cuda, args.repeats, torch.cuda.synchronize) for name, fn in CASES.items()}
    result["machine"] = machine_note(start)  # the CPU may be shared: the load is context for the numbers
    write_result(f"three_tier_{'cuda' if torch.cuda.is_available() else 'cpu'}", result)


if __name__ == "__main__":
    main()
