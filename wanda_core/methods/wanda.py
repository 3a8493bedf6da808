"""Wanda: score |W_ij| * ||X_j||_2, compared within each output row (Sun et al., 2023)."""
import torch

from .base import MatrixResult
from ..errors import WandaError
from ..masks import pattern_mask

NAME = "wanda"
STATS = "sqnorm"
PARAMS = {"variant": False}
PATTERNS = ("unstructured", "nm")


def check(pattern, params: dict) -> None:
    if not isinstance(params["variant"], bool):
        raise WandaError(f"Wanda variant must be true or false, got {params['variant']!r}")


def score(weight: torch.Tensor, stats) -> torch.Tensor:
    return weight.abs() * stats.sqnorm.sqrt().unsqueeze(0)


def prune_matrix(weight, stats, pattern, variant=False) -> MatrixResult:
    s = score(weight, stats)
    if variant and pattern.kind == "unstructured":
        keep, alpha = adaptive_mask(s, pattern.sparsity)
        return MatrixResult(keep=keep, info={"alpha": alpha})
    return MatrixResult(keep=pattern_mask(s, pattern, per_row=True))


def _mask_for_alpha(sorted_scores, cumsum, row_sums, scores, alpha):
    # Per row, prune the lowest scores whose cumulative sum stays within alpha of the row's total.
    n_pruned = (cumsum <= row_sums * alpha).sum(dim=1, keepdim=True)
    threshold = sorted_scores.gather(1, (n_pruned - 1).clamp(min=0))
    pruned = (scores <= threshold) & (n_pruned > 0)
    return ~pruned, pruned.float().mean().item()


def adaptive_mask(scores: torch.Tensor, sparsity: float, tol: float = 1e-3):
    """The reference's Wanda variant: one alpha per matrix, found by bisection to meet the target."""
    sorted_scores = torch.sort(scores, dim=1, stable=True).values
    cumsum = sorted_scores.cumsum(dim=1)
    row_sums = scores.sum(dim=1, keepdim=True)
    lo, hi, alpha = 0.0, 0.8, 0.4
    keep, current = _mask_for_alpha(sorted_scores, cumsum, row_sums, scores, alpha)
    while abs(current - sparsity) > tol and hi - lo >= tol:
        if current > sparsity:
            hi, alpha = alpha, (alpha + lo) / 2
        else:
            lo, alpha = alpha, (alpha + hi) / 2
        keep, current = _mask_for_alpha(sorted_scores, cumsum, row_sums, scores, alpha)
    return keep, alpha
