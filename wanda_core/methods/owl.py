"""OWL, Outlier Weighed Layerwise sparsity (Yin et al., ICML 2024): a sparsity per decoder block.

Not a score: a dense pre-pass over the model computes, per block, its outlier ratio: the share
(in %) of the Wanda scores |W_ij| * ||X_j|| of ALL the block's matrices together that exceed M
times their mean. The ratios are rescaled to [0, 2 * lambda] and shifted so that their mean is
the target density; block i is then pruned at 1 - density_i by the base method (a sparsity <= 0
becomes 0.01, as in the authors' code), so blocks with more outliers are pruned less.
For N:M (the authors' wanda_owl_structure) the ratios are rescaled to [0, lambda], centred on
zero and rounded: block i keeps N + round(r_i) of every M (so lambda counts weights there: their
README prunes "5:8", our 3:8, with lambda 2 and outlier threshold 6).
The outlier ratio always uses Wanda scores, whatever the base, as the authors' code does.
"""
import math

import numpy as np
import torch

from . import magnitude, ria, sparsegpt, wanda
from .base import MatrixResult
from ..errors import WandaError
from ..masks import Pattern

NAME = "owl"
STATS = "sqnorm"
ALLOCATION_STATS = "sqnorm"
PARAMS = {"base": "wanda", "M": 5.0, "lambda": 0.08}
PATTERNS = ("unstructured", "nm")
BASES = {m.NAME: m for m in (wanda, sparsegpt, magnitude, ria)}


def _options(params: dict) -> tuple[object, float, float]:
    """(base module, M, lambda), checked."""
    params = {**PARAMS, **params}
    base = params["base"]
    if not isinstance(base, str) or base not in BASES:
        raise WandaError(f"OWL base must be one of {', '.join(BASES)}, got {base!r}")
    M, lam = params["M"], params["lambda"]
    for key, value in (("M", M), ("lambda", lam)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise WandaError(f"OWL option {key} must be a number, got {value!r}")
    if M <= 0:
        raise WandaError(f"OWL option M must be > 0, got {M}")
    if lam < 0:
        raise WandaError(f"OWL option lambda must be >= 0, got {lam}")
    return BASES[base], float(M), float(lam)


def stats_kinds(params: dict) -> tuple[str, ...]:
    """What the base method needs to prune (the allocation pre-pass gathers its own sqnorm)."""
    kinds = _options(params)[0].STATS
    return () if kinds is None else (kinds,) if isinstance(kinds, str) else tuple(kinds)


def check(pattern: Pattern, params: dict) -> None:
    """Before any model is loaded: the options, and that every block pattern OWL can produce is
    valid whatever the outlier ratios turn out to be."""
    base, _, lam = _options(params)
    if pattern.kind not in base.PATTERNS:
        raise WandaError(f"OWL base {base.NAME!r} does not support pattern {pattern}")
    if pattern.kind == "nm":
        shift = round(lam)  # r_i lies in [-lambda, lambda], so |round(r_i)| <= round(lambda)
        if pattern.n - shift < 1 or pattern.n + shift > pattern.m - 1:
            raise WandaError(f"OWL lambda {lam:g} could move {pattern} to {pattern.n - shift}:{pattern.m} or "
                             f"{pattern.n + shift}:{pattern.m}; keep 1 <= N - round(lambda) and N + round(lambda) <= M - 1")
    elif pattern.sparsity + 2 * lam >= 1:
        raise WandaError(f"OWL lambda {lam:g} is too large for sparsity {pattern.sparsity:g}: a block could reach "
                         f"sparsity {pattern.sparsity + 2 * lam:g}; keep sparsity + 2 * lambda < 1")


def prune_matrix(weight, stats, pattern, **params) -> MatrixResult:
    """Prune one matrix with the base method (and its default options) at this block's pattern."""
    base = _options(params)[0]
    return base.prune_matrix(weight, stats if base.STATS else None, pattern, **base.PARAMS)


def outlier_ratio(scores: list[torch.Tensor], M: float) -> float:
    """Share (%) of all the scores above M times their mean (the authors' check_outlier_mean)."""
    total = sum(float(s.double().sum()) for s in scores)
    numel = sum(s.numel() for s in scores)
    threshold = total / numel * M
    return sum(int((s > threshold).sum()) for s in scores) / numel * 100


def block_score(matrices: list[tuple[str, torch.Tensor, object]], params: dict) -> float:
    """The block's outlier ratio, from its dense weights and their input norms."""
    M = _options(params)[1]
    # An expert no calibration token chose has no statistics: its scores are all 0.
    return outlier_ratio([wanda.score(w, st) if st.sqnorm is not None else torch.zeros_like(w) for _, w, st in matrices], M)


def allocate(scores: list[float], pattern: Pattern, params: dict) -> list[Pattern]:
    """One pattern per block from the blocks' outlier ratios."""
    check(pattern, params)
    lam = _options(params)[2]
    ratios = np.asarray(scores, dtype=np.float64)
    spread = ratios.max() - ratios.min()
    if spread == 0:  # one block, or all alike: the authors' code divides by zero here
        return [pattern] * len(ratios)
    if pattern.kind == "nm":
        shifted = (ratios - ratios.min()) * (1 / spread * lam)
        shifted = np.round(shifted - np.mean(shifted))
        return [Pattern("nm", 1 - (pattern.n + int(r)) / pattern.m, pattern.n + int(r), pattern.m) for r in shifted]
    density = (ratios - ratios.min()) * (1 / spread * lam * 2)
    density = density - np.mean(density) + (1 - pattern.sparsity)
    sparsity = [1 - float(d) for d in density]
    return [Pattern("unstructured", s if s > 0 else 0.01) for s in sparsity]
