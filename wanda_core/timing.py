"""Where a prune's seconds go: PhaseTimer splits them by phase (the report's `seconds_split`)."""
from __future__ import annotations

import contextlib
import time

import torch


class PhaseTimer:
    """Seconds of a prune per phase: forward (capture and propagation), statistics, method (score,
    mask, weight update) and saving (the CLI's). Each second counts once: a phase entered inside
    another (statistics hooks and one_pass's pruning run inside a block forward) pauses the outer
    one. On CUDA every switch synchronizes, so that queued kernels count in the phase that queued them."""

    PHASES = ("forward", "statistics", "method", "saving")

    def __init__(self, device: torch.device | None = None):
        self.seconds = dict.fromkeys(self.PHASES, 0.0)
        self._stack: list[str] = []
        self._since = time.perf_counter()
        self._cuda = device is not None and device.type == "cuda"

    def _switch(self) -> None:
        if self._cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self._stack:
            self.seconds[self._stack[-1]] += now - self._since
        self._since = now

    @contextlib.contextmanager
    def __call__(self, phase: str):
        self._switch()
        self._stack.append(phase)
        try:
            yield
        finally:
            self._switch()
            self._stack.pop()

    def split(self, total: float) -> dict:
        """The phases' seconds, and what none of them covers (model moves, bookkeeping) as 'other'."""
        out = {k: round(v, 6) for k, v in self.seconds.items()}  # microseconds: a tiny phase is still > 0
        out["other"] = round(max(total - sum(self.seconds.values()), 0.0), 6)
        return out


def untimed(phase: str):
    """A stand-in for a PhaseTimer where nothing is timed."""
    return contextlib.nullcontext()
