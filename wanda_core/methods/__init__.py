"""One module per pruning method, behind one registry.

A method module defines:
  NAME       the registry key
  STATS      which calibration statistics it needs: None, a kind ("sqnorm", "hessian", "moments")
             or a tuple of kinds; a module whose needs depend on its options defines stats_kinds(params)
  PARAMS     its options with their defaults
  PATTERNS   the pattern kinds it accepts ("unstructured", "nm")
  prune_matrix(weight, stats, pattern, **params) -> MatrixResult
where `weight` is the [out_features, in_features] float32 matrix (a copy the method may modify);
a prune_matrix with a `name` parameter also gets the matrix's dotted name.
Optional: check(pattern, params) validates options before any model is loaded (check_params).
Optional per-block allocation (OWL): ALLOCATION_STATS, block_score(matrices, params) -> float for
each block of a dense pre-pass (matrices: [(name, float32 weight, Stats)]), and
allocate(scores, pattern, params) -> one Pattern per block.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import WandaError
from ..masks import Pattern


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


from . import admm, alps, block, block_topk, dense, dsnot, hybrid_nm, magnitude, owl, ria, sparsegpt, sparseswaps, three_tier, wanda  # noqa: E402

METHODS = {m.NAME: m for m in (dense, magnitude, wanda, sparsegpt, three_tier, block, block_topk, hybrid_nm,
                               ria, owl, dsnot, alps, admm, sparseswaps)}


def register(module) -> None:
    METHODS[module.NAME] = module


def get_method(name: str):
    try:
        return METHODS[name]
    except KeyError:
        raise WandaError(f"unknown method {name!r}: choose one of {', '.join(sorted(METHODS))}") from None


def stats_kinds(method, params: dict) -> tuple[str, ...]:
    """The calibration statistics a method needs with these options (empty: no calibration)."""
    if hasattr(method, "stats_kinds"):
        return tuple(method.stats_kinds(params))
    kinds = method.STATS
    kinds = () if kinds is None else (kinds,) if isinstance(kinds, str) else tuple(kinds)
    if hasattr(method, "allocate"):  # a dense pre-pass over the model decides each block's sparsity
        kinds = tuple(dict.fromkeys((*kinds, method.ALLOCATION_STATS)))
    return kinds


def needs_calibration(method, params: dict | None = None) -> bool:
    """Whether pruning needs calibration windows: for statistics, or for a per-block allocation
    (OWL over magnitude prunes without statistics, but its allocation pre-pass needs them)."""
    return bool(stats_kinds(method, {**method.PARAMS, **(params or {})})) or hasattr(method, "allocate")


def check_params(method, pattern: Pattern, params: dict) -> dict:
    """Fill defaults, reject unknown options and unsupported patterns."""
    unknown = set(params) - set(method.PARAMS)
    if unknown:
        allowed = ", ".join(sorted(method.PARAMS)) or "none"
        raise WandaError(f"method {method.NAME!r} has no option {sorted(unknown)[0]!r} (options: {allowed})")
    if pattern.kind not in method.PATTERNS:
        raise WandaError(f"method {method.NAME!r} does not support pattern {pattern}")
    params = {**method.PARAMS, **params}
    # Bad option values (fractions not summing to 1, k >= b*b, ...) fail here, on a small matrix,
    # rather than after a model has been loaded and calibrated.
    cols = 16 * (pattern.m or 4)
    dummy = torch.rand(16, cols, generator=torch.Generator().manual_seed(0))
    if hasattr(method, "check"):
        method.check(pattern, params)
    kinds = stats_kinds(method, params)
    stats = Stats.uniform(cols, kinds) if kinds else None
    try:
        method.prune_matrix(dummy, stats, pattern, **params)
    except TypeError as e:
        raise WandaError(f"method {method.NAME!r}: bad options {params}: {e}") from None
    return params
