"""What the c4_documents sampler costs on a C4-sized shard: reading the JSONL records and drawing the
paper's 128 x 2048 windows with SmolLM2's tokenizer (only drawn documents are tokenized); prints JSON.

The shard is synthetic (no network): 356,317 documents, as many as en/c4-train.00000-of-01024, with
lengths drawn from a heavy-tailed (log-normal) law of mean ~2,200 characters so that a few percent
exceed 2,048 tokens, as C4's do. Its words are the pydoc topics' words. Written once to --shard.

    python bench/bench_c4_sampler.py [--docs 356317] [--shard /tmp/c4_synthetic.jsonl]
"""
import argparse
import json
import os
import platform
import random
import time
from pathlib import Path

import common


def write_shard(path: Path, ndocs: int, seed: int = 0) -> None:
    from wanda_core.data import pydoc_topics

    words = " ".join(pydoc_topics("calibration")).split()
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(ndocs):
            nwords = max(5, int(rng.lognormvariate(5.2, 1.0)))  # mean ~300 words, ~2,000 characters
            start = rng.randrange(len(words) - nwords) if nwords < len(words) else 0
            f.write(json.dumps({"text": " ".join(words[start : start + nwords])}) + "\n")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--docs", type=int, default=356_317)
    p.add_argument("--shard", default="/tmp/c4_synthetic.jsonl")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--keep", action="store_true", help="keep the synthetic shard")
    args = p.parse_args()

    import torch

    import wanda_core as wc

    torch.set_num_threads(1)
    shard = Path(args.shard)
    if not shard.is_file():
        write_shard(shard, args.docs)
    tokenizer = wc.load_tokenizer(common.smollm2_dir())
    calls = chars = 0
    real_call = type(tokenizer).__call__

    def counting(self, text, *a, **k):
        nonlocal calls, chars
        calls, chars = calls + 1, chars + len(text)
        return real_call(self, text, *a, **k)

    type(tokenizer).__call__ = counting
    t0, c0 = time.perf_counter(), time.process_time()
    docs = wc.read_records(shard)
    t1, c1 = time.perf_counter(), time.process_time()
    windows = wc.calibration_windows(docs, args.nsamples, args.seqlen, 0, sampler="c4_documents", tokenizer=tokenizer)
    t2, c2 = time.perf_counter(), time.process_time()
    type(tokenizer).__call__ = real_call
    result = {"documents": len(docs), "shard_mib": round(shard.stat().st_size / 2**20), "windows": list(windows.shape),
              "read_seconds": round(t1 - t0, 2), "draw_seconds": round(t2 - t1, 2),
              "read_cpu_seconds": round(c1 - c0, 2), "draw_cpu_seconds": round(c2 - c1, 2),
              "documents_tokenized": calls, "characters_tokenized": chars,
              "loadavg": os.getloadavg(), "machine": platform.machine()}
    if not args.keep:
        shard.unlink()
    print(json.dumps(result))
    common.RESULTS.mkdir(exist_ok=True)
    (common.RESULTS / "c4_sampler_cpu.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
