"""ALPS (Meng et al., NeurIPS 2024): ADMM on the layer's reconstruction problem, then a CG back-solve.

Per matrix, with H = sum x x^T over the calibration tokens:
  H += percdamp * mean(diag H) * I;  s = sqrt(diag H) + 1e-8;  Hn = H / (s s^T)   (ridge, then unit diagonal)
  B0 = W * s (columns scaled);  the objective is tr((B - B0) Hn (B - B0)^T) under the support constraint.
ADMM (B free, D on the support, V the dual), from D = P(B0), V = 0, rho = 0.1:
  B = (B0 Hn - V + rho D) (Hn + rho I)^-1;  D = P(B + V / rho);  V += rho (B - D)
where P keeps the largest |.| over the whole matrix (unstructured) or the N largest of every M
inputs (N:M). (Hn + rho I)^-1 comes from one eigendecomposition of Hn per input. Every 3
iterations rho follows the support change since the last check (counted against the number of
kept weights k): x1.3 above 10% of k, x1.2 above 0.5%, else x1.1 if rho ever grew, else (rho has
only shrunk so far) /5 and D, V restart from the start; no change at all ends the solve once
rho has grown. rho is capped at 1e6, and after 30 iterations a change below 0.0003 of k ends it;
300 iterations at most. The support is then P(B), and the kept weights are re-fitted on it by 10
iterations of conjugate gradient on B Hn = B0 Hn restricted to the support (no preconditioner;
the authors' stop test looks at the unrestricted residual, which on a support stays far above it).
As in the authors' alps.py `ALPS_admm`; docs/methods.md says where we differ.
"""
import math

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from .base import MatrixResult
from ..errors import WandaError
from ..masks import nm_mask, unstructured_matrix_mask

NAME = "alps"
STATS = "hessian"
PARAMS = {"rho": 0.1, "max_iter": 300, "update_iter": 3, "switch_iter": 30, "percdamp": 0.01, "cg_iters": 10,
          "cg_rtol": 1e-4}
PATTERNS = ("unstructured", "nm")
RHO_CAP = 1e6


def check(pattern, params: dict) -> None:
    p = {**PARAMS, **params}
    for key in ("max_iter", "update_iter", "switch_iter", "cg_iters"):
        value = p[key]
        low = 1 if key in ("max_iter", "update_iter") else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise WandaError(f"ALPS {key} must be a whole number >= {low}, got {value!r}")
    for key in ("rho", "percdamp", "cg_rtol"):
        value = p[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise WandaError(f"ALPS {key} must be a number > 0, got {value!r}")


def project(Z: torch.Tensor, pattern) -> torch.Tensor:
    """Keep-mask of the support projection: the largest |Z| of the matrix, or N of every M inputs."""
    if pattern.kind == "nm":
        return nm_mask(Z * Z, pattern.n, pattern.m)
    return unstructured_matrix_mask(Z * Z, pattern.sparsity)


def update_rho(rho: float, change: int, k: float, grew: bool) -> tuple[float, bool, bool, bool]:
    """One step of the authors' rho schedule from the support change since the last check.
    Returns (rho, grew, restart, stop): restart = D and V go back to their start, stop = end the solve."""
    if change / k > 0.1:
        return min(rho * 1.3, RHO_CAP), True, False, False
    if change / k > 0.005:
        return min(rho * 1.2, RHO_CAP), True, False, False
    if change > 0:
        return (min(rho * 1.1, RHO_CAP), True, False, False) if grew else (rho / 5, False, True, False)
    return (rho, grew, False, True) if grew else (rho / 5, False, False, False)


# q/k/v (and gate/up) share one statistics tensor: one eigendecomposition serves them all. The entry
# goes with the tensor (the engine drops a block's statistics once the block is pruned).
_eigen_cache = WeakTensorKeyDictionary()


def eigen(hessian: torch.Tensor, percdamp: float):
    """(Hn, s, L, Q): normalized_hessian and the eigendecomposition of Hn (in float64; float32 out)."""
    key = (hessian._version, percdamp)
    cached = _eigen_cache.get(hessian)
    if cached is not None and cached[0] == key:
        return cached[1]
    Hn, s = normalized_hessian(hessian, percdamp)
    L, Q = torch.linalg.eigh(Hn)
    value = (Hn.float(), s.float(), L.float(), Q.float())
    _eigen_cache[hessian] = (key, value)
    return value


def normalized_hessian(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(Hn, s): the ridge-damped H scaled to a unit diagonal, and the column scales s."""
    H = hessian.double().clone()
    H.diagonal().add_(percdamp * H.diagonal().mean())
    s = H.diagonal().sqrt() + 1e-8
    return H / s.unsqueeze(0) / s.unsqueeze(1), s


def prune_matrix(weight, stats, pattern, rho=0.1, max_iter=300, update_iter=3, switch_iter=30, percdamp=0.01,
                 cg_iters=10, cg_rtol=1e-4) -> MatrixResult:
    if pattern.kind == "nm" and weight.shape[1] % pattern.m:
        raise WandaError(f"input width {weight.shape[1]} is not divisible by M={pattern.m} for an N:M pattern")
    Hn, s, L, Q = eigen(stats.hessian, percdamp)
    B0 = weight * s.unsqueeze(0)  # [out, in]: rows are outputs (the authors work on the transpose)
    target = B0 @ Hn  # B0 Hn: the dense solution's right-hand side
    numel = B0.numel()  # k: the weights kept
    k = numel - int(numel * pattern.sparsity) if pattern.kind == "unstructured" else numel * pattern.n / pattern.m

    def inverse(r):  # (Hn + r I)^-1 from the eigendecomposition
        return (Q / (L + r)) @ Q.t()

    keep0 = project(B0, pattern)
    D0 = B0 * keep0
    D, V, keep_prev = D0.clone(), torch.zeros_like(B0), keep0
    Hinv = inverse(rho)
    grew = False
    it = 0
    for it in range(1, max_iter + 1):
        B = (target - V + rho * D) @ Hinv
        Z = B + V / rho
        keep = project(Z, pattern)
        D = Z * keep
        V += rho * (B - D)
        if it % update_iter:
            continue
        change = int((keep != keep_prev).sum())
        rho, grew, restart, stop = update_rho(rho, change, k, grew)
        if stop:
            break
        if restart:  # rho only shrank so far: start again from the projected dense weights
            D, V = D0.clone(), torch.zeros_like(B0)
        keep_prev = keep
        Hinv = inverse(rho)
        if it > switch_iter and change / k < 0.0003:
            break
    keep = project(B, pattern)
    B = conjugate_gradient(Hn, target, keep, B * keep, cg_iters, cg_rtol)
    return MatrixResult(keep=keep, weight=B / s.unsqueeze(0), info={"alps_iters": it, "alps_rho": rho})


def conjugate_gradient(A, rhs, keep, X, iters, rtol):
    """Rows of X (on the support `keep`) towards X A = rhs restricted to the support: plain CG, one
    system per row, all rows at once. Stops when every input column's residual norm over the rows is
    within rtol of rhs's (the authors' test, on the unrestricted residual), or after `iters` steps."""
    mask = keep.to(X.dtype)
    full = rhs - X @ A  # the unrestricted residual
    R = full * mask
    limit = rtol * rhs.norm(dim=0)
    P, rr = None, None
    for _ in range(iters):
        rr_new = (R * R).sum(1, keepdim=True)
        P = R.clone() if P is None else R + rr_new / rr.masked_fill(rr == 0, 1e-8) * P
        rr = rr_new
        AP = P @ A
        pap = (P * AP).sum(1, keepdim=True)
        alpha = rr / pap.masked_fill(pap == 0, 1e-8)
        X = X + alpha * P
        full = full - alpha * AP
        R = full * mask
        if bool((full.norm(dim=0) <= limit).all()):
            break
    return X
