"""SparseGPT: one-shot pruning with OBS weight updates (Frantar & Alistarh, 2023).

H = (2/N) sum x x^T; columns are processed left to right in blocks; inside a block, each
pruned weight's error is spread over the not-yet-processed columns through the upper Cholesky
factor of H^-1, and the block's accumulated error is applied to all later columns at once.
"""
import contextlib

import torch

from .base import MatrixResult
from ..errors import WandaError
from ..masks import nm_mask, unstructured_matrix_mask

NAME = "sparsegpt"
STATS = "hessian"
PARAMS = {"blocksize": 128, "percdamp": 0.01}
PATTERNS = ("unstructured", "nm")


def check(pattern, params: dict) -> None:
    blocksize, percdamp = params["blocksize"], params["percdamp"]
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise WandaError(f"SparseGPT blocksize must be a whole number >= 1, got {blocksize!r}")
    if pattern.kind == "nm" and blocksize % pattern.m:
        raise WandaError(f"SparseGPT blocksize {blocksize} must be a multiple of M={pattern.m}")
    if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not percdamp >= 0:
        raise WandaError(f"SparseGPT percdamp must be a number >= 0, got {percdamp!r}")


def inverse_hessian_factor(hessian: torch.Tensor, count: int, weight: torch.Tensor, percdamp: float):
    """Upper Cholesky factor of (H + damp I)^-1. Zeroes weight columns of dead inputs (in place)."""
    H = hessian.float() * (2.0 / max(count, 1))
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    weight[:, dead] = 0.0
    damp = percdamp * torch.mean(torch.diag(H))
    H.diagonal().add_(damp)
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.cholesky_inverse(L)
        return torch.linalg.cholesky(Hinv, upper=True)
    except torch.linalg.LinAlgError as e:
        raise WandaError(f"SparseGPT: Hessian is not positive definite (raise percdamp): {e}") from None


def prune_matrix(weight, stats, pattern, blocksize=128, percdamp=0.01) -> MatrixResult:
    W = weight  # float32 copy owned by us
    rows, cols = W.shape
    if pattern.kind == "nm" and cols % pattern.m:
        raise WandaError(f"input width {cols} is not divisible by M={pattern.m} for an N:M pattern")
    with _one_cpu_thread(W.device):  # LAPACK's Cholesky rounds differently with more threads: masks would follow
        Hinv = inverse_hessian_factor(stats.hessian, stats.count, W, percdamp)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        Err1 = torch.zeros_like(W1)
        if pattern.kind == "unstructured":
            # Exactly int(numel * sparsity) weights of this column block, lowest w^2 / [H^-1]_jj^2.
            mask1 = ~unstructured_matrix_mask(W1 * W1 / (d * d).unsqueeze(0), pattern.sparsity)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        with _one_cpu_thread(W.device):
            _prune_columns(W1, Hinv1, d, mask1, Err1, pattern)
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        pruned[:, i1:i2] = mask1
    keep = ~pruned
    return MatrixResult(keep=keep, weight=W * keep)


def _prune_columns(W1, Hinv1, d, mask1, Err1, pattern) -> None:
    """Column by column inside one block: prune, and spread each column's error over the later ones."""
    for i in range(W1.shape[1]):
        if pattern.kind == "nm" and i % pattern.m == 0:
            # The N:M choice uses the weights as already updated by earlier columns.
            g = W1[:, i : i + pattern.m]
            mask1[:, i : i + pattern.m] = ~nm_mask(g * g / (d[i : i + pattern.m] ** 2).unsqueeze(0), pattern.n, pattern.m)
        w = W1[:, i]
        q = w.masked_fill(mask1[:, i], 0.0)
        err = (w - q) / Hinv1[i, i]
        W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
        W1[:, i] = q
        Err1[:, i] = err


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """The per-column updates are too small to split between CPU threads: every op would wait on a
    barrier, 25x slower when another process shares the cores. The block-wide update keeps them all.
    The Cholesky factorizations run on one thread too: their rounding depends on the thread count
    (SmolLM2's SparseGPT 2:4 masks differed between 1 and 2 threads), on one thread it does not."""
    if device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
