"""The machine: what its hardware computes natively, how much memory and how many idle cores it has,
and the process's policies for them (torch's thread count, glibc's heap during a prune).

Two things about a CPU change a benchmark's figures. Its instruction set picks torch's kernels
(AVX512, AVX2, ...), whose float32 rounding differs in the last bits, enough to flip near-tied mask
choices; so every result records it. And bfloat16 is fast only where the hardware computes it
(avx512_bf16, AMX, recent GPUs); elsewhere torch emulates it, several times slower than float32
(Gemma-3-270M's evaluation: 129 s in bfloat16 against 25.5 s in float32 on an AVX2-only CPU). So
`auto` dtypes take bfloat16 only where it is native.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import platform
import time
from pathlib import Path

log = logging.getLogger("wanda_core")

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



def autocast_dtype(compute_dtype, device, model_dtype):
    """The dtype block forwards run in on `device` for a requested compute dtype (a name, a torch dtype, "auto":
    bfloat16 where it is native, else as loaded), or None to run them in the model's own dtype."""
    import torch

    from .errors import WandaError
    from .model import DTYPES

    if compute_dtype in (None, "", "none"):
        return None
    if compute_dtype == "auto":
        native = torch.cuda.is_bf16_supported() if device.type == "cuda" else bf16_native("cpu")
        dtype = torch.bfloat16 if native else model_dtype
    else:
        try:
            dtype = compute_dtype if isinstance(compute_dtype, torch.dtype) else DTYPES[str(compute_dtype).replace("torch.", "")]
        except KeyError:
            raise WandaError(f"unknown compute dtype {compute_dtype!r}: choose one of {', '.join(DTYPES)}, auto or none") from None
    return None if dtype == model_dtype else dtype

def describe(device=None) -> dict:
    """For every result: `isa`, the CPU's class (or the GPU's name when `device` is CUDA), and `kernels`,
    the CPU kernel set torch dispatches to (AVX512, AVX2, DEFAULT; ATEN_CPU_CAPABILITY lowers it)."""
    import torch

    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    isa = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_isa()
    return {"isa": isa, "kernels": torch.backends.cpu.get_cpu_capability()}


# --- memory ---


def available_memory() -> int:
    """Bytes the system can give this process now (MemAvailable), or all its memory where that is unknown."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        line = next(line for line in open("/proc/meminfo") if line.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def peak_memory(device) -> int:
    """Peak accelerator memory so far, or on the CPU the process's peak resident memory."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


class KeptHeap:
    """The heap while freed_memory_kept() is on: after_block() hands freed memory back once more is
    kept than twice what the first block left free (its forward's temporaries), so that long-lived
    tensors scattered between freed ones (pruned weights, masks) cannot grow the process without bound."""

    def __init__(self, libc):
        self.libc, self.limit = libc, None

    def after_block(self) -> None:
        free = self.libc.mallinfo2().fordblks
        if self.limit is None:
            self.limit = max(2 * free, 256 * 2**20)
        elif free > self.limit:
            self.libc.malloc_trim(0)


class NoHeap:
    """Where glibc's heap cannot be tuned: nothing to bound."""

    def after_block(self) -> None:
        pass


@contextlib.contextmanager
def freed_memory_kept():
    """Large CPU tensors from the heap, and freed memory kept there for the next block, while inside.

    glibc serves every allocation over 32 MB with its own mmap and unmaps it when freed, so the next
    tensor of that size faults all its pages in again, zeroed by the kernel. A block forward of the
    whole calibration set (one_pass: 32 x 512 tokens of SmolLM2 make 100 MB MLP activations) spent a
    sixth of its CPU time there; batches of 8 hardly any. Values are unchanged: only where memory
    comes from. Yields an object whose after_block() bounds what is kept (call it after each block);
    after, glibc's limits are set back and the kept memory is returned (malloc_trim).
    """
    libc = None
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        with contextlib.suppress(OSError):
            libc = ctypes.CDLL("libc.so.6")
    if libc is None or not hasattr(libc, "mallinfo2"):  # mallinfo2: glibc 2.33 and later
        yield NoHeap()
        return
    libc.mallinfo2.restype = _MallInfo2
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield KeptHeap(libc)
    finally:
        libc.mallopt(_M_MMAP_MAX, 65536)  # glibc's defaults
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
        libc.malloc_trim(0)


# --- threads ---


def free_cores(interval: float = 0.3) -> tuple[int, int]:
    """(idle cores, cores this process may use): /proc/stat sampled over `interval` seconds.

    A core counts as idle when at least 75% of it was. Without /proc/stat every usable core counts.
    """
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))

    def sample() -> dict:
        times = {}
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("cpu") and line[3].isdigit():
                    name, *fields = line.split()
                    ticks = [int(x) for x in fields[:8]]
                    times[int(name[3:])] = (ticks[3] + ticks[4], sum(ticks))  # (idle + iowait, total)
        return times

    try:
        before = sample()
        time.sleep(interval)
        after = sample()
    except (OSError, ValueError, IndexError):
        return len(cpus), len(cpus)
    idle = 0.0
    for c in cpus:
        if c in before and c in after:
            total = after[c][1] - before[c][1]
            idle += (after[c][0] - before[c][0]) / total if total > 0 else 1.0
    return max(1, min(len(cpus), int(idle + 0.25))), len(cpus)


def set_threads(exact: int = 0, at_most: int = 0, announce: bool = True) -> int:
    """torch's CPU threads: `exact` when given (with torch's defaults), else as many as cores are idle now
    (at most `at_most` when given), and threads that sleep rather than spin while they wait. Returns the number.
    announce: log the choice at INFO (else DEBUG: a command's bad input then ends with its error line alone).

    A pool larger than the idle cores stalls: each parallel op waits at a barrier for the thread whose core
    another process holds, and the waiting threads spin, burning the time the others need. On 2 cores under
    load, Wanda 2:4 of SmolLM2 took 2.4-2.6x longer on 2 threads than on 1, and 0.8-0.95x with
    OMP_WAIT_POLICY=PASSIVE (bench/bench_threads.py). The policy is read when torch loads OpenMP: set it first.
    """
    if exact:
        import torch

        torch.set_num_threads(exact)
        return exact
    idle, usable = free_cores()
    threads = min(idle, at_most) if at_most else idle
    if threads > 1:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # a core taken later then costs a share, not a stall
    import torch

    torch.set_num_threads(threads)
    log.log(logging.INFO if announce else logging.DEBUG, "torch threads: %d (%d of %d cores idle%s; OMP_WAIT_POLICY=%s)",
            threads, idle, usable, f", at most {at_most}" if at_most else "", os.environ.get("OMP_WAIT_POLICY", "torch's default"))
    return threads
