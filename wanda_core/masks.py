"""Mask construction: pure functions from a score tensor to a boolean keep-mask.

Scores are [out_features, in_features]; higher means more important. Ties are broken
deterministically: among equal scores the one with the lower index is pruned first.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import WandaError


@dataclass(frozen=True)
class Pattern:
    """A sparsity pattern: unstructured at `sparsity`, or N:M (keep N of every M inputs)."""

    kind: str  # "unstructured" or "nm"
    sparsity: float
    n: int = 0
    m: int = 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else "unstructured"


def parse_pattern(pattern: str, sparsity: float | None = None) -> Pattern:
    """'unstructured' (needs sparsity in [0, 1)) or 'N:M' with 0 < N < M (sparsity is 1 - N/M)."""
    pattern = str(pattern).strip()
    if pattern == "unstructured":
        if sparsity is None:
            raise WandaError("pattern 'unstructured' needs a sparsity in [0, 1)")
        sparsity = float(sparsity)
        if not 0.0 <= sparsity < 1.0:
            raise WandaError(f"sparsity must be in [0, 1), got {sparsity}")
        return Pattern("unstructured", sparsity)
    parts = pattern.split(":")
    if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
        n, m = int(parts[0]), int(parts[1])
        if not 0 < n < m:
            raise WandaError(f"N:M pattern needs 0 < N < M, got {pattern!r}")
        implied = 1.0 - n / m
        if sparsity is not None and abs(float(sparsity) - implied) > 1e-9:
            raise WandaError(f"pattern {pattern} implies sparsity {implied:g}, but sparsity {sparsity} was given")
        return Pattern("nm", implied, n, m)
    raise WandaError(f"unknown pattern {pattern!r}: use 'unstructured' or 'N:M' such as '2:4'")


def _prune_lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask over the last dim that drops the k lowest scores of each row.

    Selection by kthvalue (linear time, no full sort); among scores equal to the k-th,
    the lower indices are dropped first, so the result is exact and deterministic.
    """
    if k <= 0:
        return torch.ones_like(score, dtype=torch.bool)
    kth = torch.kthvalue(score, k, dim=-1, keepdim=True).values
    keep = score > kth
    # Only rows with more than k scores at or below their k-th have a tie to break (rare among
    # float scores, common in hand-made ones); the others are done. Per-row selection on the CPU
    # gets 1.4-1.8x faster than running the tie pass (a cumulative sum) on every row.
    tied_rows = score.shape[-1] - keep.sum(-1, dtype=torch.int32) > k
    n_tied = int(tied_rows.sum())  # one host sync
    if n_tied == tied_rows.numel():  # no copy when every row has ties (a whole-matrix selection is one row)
        return _drop_lowest_with_ties(score, kth, k)
    if n_tied:
        keep[tied_rows] = _drop_lowest_with_ties(score[tied_rows], kth[tied_rows], k)
    return keep


def _drop_lowest_with_ties(score: torch.Tensor, kth: torch.Tensor, k: int) -> torch.Tensor:
    below = score < kth
    tied = score == kth
    need = k - below.sum(-1, keepdim=True)
    return ~(below | (tied & (tied.cumsum(-1) <= need)))


def unstructured_row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Each output row drops exactly int(in_features * sparsity) of its lowest scores."""
    return _prune_lowest(score, int(score.shape[-1] * sparsity))


def unstructured_matrix_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The whole matrix drops exactly int(numel * sparsity) of its lowest scores."""
    flat = score.reshape(1, -1)
    return _prune_lowest(flat, int(flat.shape[-1] * sparsity)).reshape(score.shape)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In each row, every group of m consecutive inputs keeps its n highest scores."""
    rows, cols = score.shape
    if cols % m:
        raise WandaError(f"input width {cols} is not divisible by M={m} for an N:M pattern")
    groups = score.reshape(rows, cols // m, m)
    # A stable sort of each small group is faster than kthvalue here (1.5x on a 4096 x 11008 CPU
    # matrix) and keeps the same tie rule: among equal scores the lower index is dropped first.
    lowest = torch.argsort(groups, dim=-1, stable=True)[..., : m - n]
    keep = torch.ones_like(groups, dtype=torch.bool)
    return keep.scatter_(-1, lowest, False).reshape(rows, cols)


def pattern_mask(score: torch.Tensor, pattern: Pattern, per_row: bool = True) -> torch.Tensor:
    """Keep-mask for `pattern`: N:M groups, or unstructured per row (or over the whole matrix)."""
    if pattern.kind == "nm":
        return nm_mask(score, pattern.n, pattern.m)
    if per_row:
        return unstructured_row_mask(score, pattern.sparsity)
    return unstructured_matrix_mask(score, pattern.sparsity)


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """1 bit per weight (uint8, little bit order), for saving."""
    bits = np.packbits(keep.detach().cpu().reshape(-1).numpy(), bitorder="little")
    return torch.from_numpy(bits)


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    numel = int(np.prod(shape))
    bits = np.unpackbits(packed.cpu().numpy(), count=numel, bitorder="little")
    return torch.from_numpy(bits.astype(bool)).reshape(shape)
