"""What a method gets and returns: the input statistics of one matrix, and the result of pruning it.

In a module of its own so that method modules (inside the package or not) import it directly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Stats:
    """Input statistics of one weight matrix, accumulated in float32 over calibration tokens.

    Kinds: "sqnorm" (Wanda), "hessian" (SparseGPT), "moments" (DSnoT: per-channel sum, and the
    within-sample squared deviations, each calibration sequence taken apart).
    """

    count: int = 0  # tokens
    sqnorm: torch.Tensor | None = None  # [in]: sum over tokens of x_j^2
    hessian: torch.Tensor | None = None  # [in, in]: sum over tokens of x x^T
    xsum: torch.Tensor | None = None  # [in]: sum over tokens of x_j
    within: torch.Tensor | None = None  # [in]: sum over sequences of sum over its tokens of (x_j - its mean of x_j)^2
    samples: int = 0  # sequences ("moments" only)

    def add(self, x: torch.Tensor, kind: str | tuple[str, ...]) -> None:
        """x: [batch, seq, features] (a batch of sequences) or [tokens, features] (one sequence)."""
        kinds = (kind,) if isinstance(kind, str) else tuple(kind)
        if x.numel() == 0:
            return
        if "moments" in kinds:
            self._add_moments(x)
        x = x.reshape(-1, x.shape[-1]).float()
        self.count += x.shape[0]
        if "sqnorm" in kinds:
            sq = (x * x).sum(0)
            self.sqnorm = sq if self.sqnorm is None else self.sqnorm.add_(sq)
        if "hessian" in kinds:
            h = x.t() @ x
            self.hessian = h if self.hessian is None else self.hessian.add_(h)

    def _add_moments(self, x: torch.Tensor) -> None:
        # Sequences stay apart: the variance DSnoT uses is pooled over sequences, each around its own mean.
        seqs = x.reshape(-1, x.shape[-2], x.shape[-1]).float() if x.dim() >= 3 else x.reshape(1, -1, x.shape[-1]).float()
        total = seqs.sum(1)  # [sequences, features]
        dev = seqs - (total / seqs.shape[1]).unsqueeze(1)
        within = (dev * dev).sum((0, 1))
        total = total.sum(0)
        self.xsum = total if self.xsum is None else self.xsum.add_(total)
        self.within = within if self.within is None else self.within.add_(within)
        self.samples += seqs.shape[0]

    def mean(self) -> torch.Tensor:
        return self.xsum / max(self.count, 1)

    def variance(self) -> torch.Tensor:
        """Pooled within-sequence variance: the token-weighted mean of each sequence's (biased) variance."""
        return self.within / max(self.count, 1)

    def finite(self) -> bool:
        tensors = (self.sqnorm, self.hessian, self.xsum, self.within)
        return all(v is None or bool(torch.isfinite(v).all()) for v in tensors)

    @staticmethod
    def uniform(in_features: int, kind: str | tuple[str, ...], device=None) -> "Stats":
        """Stand-in when no token reached a matrix (an unused expert): every input weighs the same
        (zero mean, unit variance), so nothing is left to reconstruct."""
        kinds = (kind,) if isinstance(kind, str) else tuple(kind)
        s = Stats(1)
        if "sqnorm" in kinds:
            s.sqnorm = torch.ones(in_features, device=device)
        if "hessian" in kinds:
            s.hessian = torch.eye(in_features, device=device)
        if "moments" in kinds:
            s.xsum, s.within, s.samples = torch.zeros(in_features, device=device), torch.ones(in_features, device=device), 1
        return s


@dataclass
class MatrixResult:
    keep: torch.Tensor  # bool [out, in]
    weight: torch.Tensor | None = None  # updated weights (SparseGPT); None means weight * keep
    info: dict = field(default_factory=dict)  # extra per-matrix figures (e.g. tier counts)
