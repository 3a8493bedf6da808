"""What the hardware computes natively: the CPU's instruction-set class (or the GPU's name), and what `auto` dtypes mean.

Two things about a CPU change a benchmark's figures. Its instruction set picks torch's kernels
(AVX512, AVX2, ...), whose float32 rounding differs in the last bits, enough to flip near-tied mask
choices; so every result records it. And bfloat16 is fast only where the hardware computes it
(avx512_bf16, AMX, recent GPUs); elsewhere torch emulates it, several times slower than float32
(Gemma-3-270M's evaluation: 129 s in bfloat16 against 25.5 s in float32 on an AVX2-only CPU). So
`auto` dtypes take bfloat16 only where it is native.
"""
from __future__ import annotations

import platform
from pathlib import Path

# The x86 classes, best first: the flag that marks each in /proc/cpuinfo.
ISA_FLAGS = {"amx": "amx_bf16", "avx512_bf16": "avx512_bf16", "avx512": "avx512f", "avx2": "avx2"}
BF16_NATIVE = ("amx", "avx512_bf16")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags: the `flags` line of /proc/cpuinfo (`Features` on ARM); empty where unreadable."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_isa(flags: set[str] | None = None) -> str:
    """'amx', 'avx512_bf16', 'avx512' or 'avx2' (the best the flags show); else the machine type (e.g. aarch64)."""
    flags = cpu_flags() if flags is None else flags
    for isa, flag in ISA_FLAGS.items():
        if flag in flags:
            return isa
    return platform.machine() or "unknown"


def bf16_native(device="cpu", flags: set[str] | None = None) -> bool:
    """Whether `device` computes bfloat16 in hardware: a CPU with avx512_bf16 or AMX, a GPU that is not emulating it.

    Other CPUs (AVX2, AVX512 without bf16, ARM) are treated as emulating it.
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch before 2.3 has no such argument
            return torch.cuda.is_bf16_supported()
    return cpu_isa(flags) in BF16_NATIVE


def auto_dtype(device="cpu", flags: set[str] | None = None) -> str:
    """What `auto` runs in on `device`: bfloat16 where it is native, else float32 (CPU) or float16 (GPU)."""
    import torch

    if bf16_native(device, flags):
        return "bfloat16"
    return "float16" if torch.device(device).type == "cuda" else "float32"


def describe(device=None) -> dict:
    """For every result: `isa`, the CPU's class (or the GPU's name when `device` is CUDA), and `kernels`,
    the CPU kernel set torch dispatches to (AVX512, AVX2, DEFAULT; ATEN_CPU_CAPABILITY lowers it)."""
    import torch

    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    isa = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_isa()
    return {"isa": isa, "kernels": torch.backends.cpu.get_cpu_capability()}
