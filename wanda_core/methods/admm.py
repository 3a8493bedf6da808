"""ADMM weight update with gradual mask selection (Boza, "Fast and Effective Weight Update for Pruned
Large Language Models", 2024; code fmfi-compbio/admm-pruning, lib/admm.py `AdmmPruner.fasterprune`).

Per matrix, with H = sum x x^T over the calibration tokens:
  s = sqrt(diag H) + 1e-8;  Hn = H / (s s^T) + percdamp * mean(diag) * I   (unit diagonal, then the ridge)
  W0 = W * s (so |W0| is Wanda's score |W| ||X||);  the target is W0 Hn.
ADMM with penalty rho (one inverse of Hn + rho I per matrix), from W = W0, U = 0:
  for t < iters:  if t < mask_iters: re-choose the mask from |W + U|;
                  Z = (W + U) * mask;  U += W - Z;  W = (W0 Hn + rho (Z - U)) (Hn + rho I)^-1
  result: (W + U) * mask, scaled back by 1 / s.
Mask choice (the authors' three branches): unstructured over the whole matrix (default) drops the
int(numel * sparsity) smallest |W + U|; per_row drops int(in * s_t) per output row; N:M keeps the
N largest of every M and, while s_t is below the N:M sparsity, also every other weight above the
int(numel * s_t)-th smallest of the rest. s_t = s - s (1 - (t + 1) / mask_iters)^3 is the cubic
schedule; the authors' whole-matrix branch computes it but chooses at the full sparsity from the
first iteration (gradual=None keeps each branch as the authors have it; true/false forces it).
mask_iters 0 chooses one mask from |W0| before the iterations (iters 0 as well: that mask, no update).
"""
import math

import torch

from .base import MatrixResult
from ..errors import WandaError
from ..masks import nm_mask, unstructured_matrix_mask, unstructured_row_mask

NAME = "admm"
STATS = "hessian"
PARAMS = {"iters": 20, "mask_iters": 15, "percdamp": 0.1, "rho": 1.0, "per_row": False, "gradual": None}
PATTERNS = ("unstructured", "nm")


def check(pattern, params: dict) -> None:
    p = {**PARAMS, **params}
    for key in ("iters", "mask_iters"):
        value = p[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise WandaError(f"ADMM {key} must be a whole number >= 0, got {value!r}")
    if p["mask_iters"] > p["iters"]:
        raise WandaError(f"ADMM mask_iters ({p['mask_iters']}) must not exceed iters ({p['iters']})")
    for key in ("percdamp", "rho"):
        value = p[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise WandaError(f"ADMM {key} must be a number > 0, got {value!r}")
    if not isinstance(p["per_row"], bool):
        raise WandaError(f"ADMM per_row must be true or false, got {p['per_row']!r}")
    if p["per_row"] and pattern.kind == "nm":
        raise WandaError("ADMM per_row applies to unstructured patterns only")
    if p["gradual"] not in (None, True, False):
        raise WandaError(f"ADMM gradual must be true, false or null (the authors' choice per branch), "
                         f"got {p['gradual']!r}")


def schedule(t: int, sparsity: float, mask_iters: int) -> float:
    """The cubic sparsity of mask re-choice t (0-based): reaches `sparsity` at t = mask_iters - 1."""
    return sparsity - sparsity * (1 - (t + 1) / mask_iters) ** 3


def choose_mask(Z: torch.Tensor, pattern, sparsity: float, per_row: bool) -> torch.Tensor:
    """Keep-mask from |Z| at `sparsity` (the schedule's current value)."""
    score = Z.abs()
    if pattern.kind == "nm":
        keep = nm_mask(score, pattern.n, pattern.m)
        if sparsity >= pattern.sparsity:
            return keep
        # Beyond the N:M weights (never cut), keep every other weight above the cut of the rest.
        return unstructured_matrix_mask(score.masked_fill(keep, float("inf")), sparsity)
    if per_row:
        return unstructured_row_mask(score, sparsity)
    return unstructured_matrix_mask(score, sparsity)


def prune_matrix(weight, stats, pattern, iters=20, mask_iters=15, percdamp=0.1, rho=1.0, per_row=False,
                 gradual=None) -> MatrixResult:
    if pattern.kind == "nm" and weight.shape[1] % pattern.m:
        raise WandaError(f"input width {weight.shape[1]} is not divisible by M={pattern.m} for an N:M pattern")
    H = stats.hessian.double()
    s = H.diagonal().sqrt() + 1e-8
    H = H / s.unsqueeze(0) / s.unsqueeze(1)
    H.diagonal().add_(percdamp * H.diagonal().mean())
    target = (weight.double() * s.unsqueeze(0)) @ H  # W0 Hn
    H.diagonal().add_(rho)
    Hinv = torch.linalg.inv(H).float()
    target = target.float()
    W = weight * s.float().unsqueeze(0)
    U = torch.zeros_like(W)
    gradual = (pattern.kind == "nm" or per_row) if gradual is None else gradual
    # mask_iters 0: one mask from |W0| (Wanda's score) before the iterations, as the authors' code allows
    keep = choose_mask(W, pattern, pattern.sparsity, per_row) if mask_iters == 0 else None
    for t in range(iters):
        if t < mask_iters:
            current = schedule(t, pattern.sparsity, mask_iters) if gradual else pattern.sparsity
            keep = choose_mask(W + U, pattern, current, per_row)
        Z = (W + U) * keep
        U += W - Z
        W = (target + rho * (Z - U)) @ Hinv
    Z = (W + U) * keep
    return MatrixResult(keep=keep, weight=Z / s.float().unsqueeze(0))
