"""SparseSwaps (Zimmer et al., 2025, arXiv 2512.10922): refine a base method's mask by optimal 1-swaps.

The mask only, not the weights. With every output row at the same sparsity the layer's error
||X W^T - X (W * M)^T||^2 splits into one term per row: for row w with pruned part r = w * (1 - m),
its error is r^T G r, G = sum x x^T (the Gram matrix of the calibration inputs). A 1-swap prunes a
kept weight q and regrows a pruned weight p, which changes the row error by exactly
  delta(p, q) = b_p + a_q - 2 w_p w_q G_pq,
  a_q = w_q^2 G_qq + 2 w_q c_q  (pruning q alone),  b_p = w_p^2 G_pp - 2 w_p c_p  (regrowing p alone),
with c = G r. Each step takes, in every row at once, the pair with the lowest delta and applies it
if delta < 0 (then c moves by G_q w_q - G_p w_p); a row stops at its first step without an
improving swap (it is then 1-swap optimal), or after max_swaps swaps.

Unstructured: every (pruned, kept) pair of the row, rows x in^2 per step (the paper's search; hours
per SmolLM2 on a CPU), or with `candidates: K` the K kept weights cheapest to prune alone against
the K pruned weights best to regrow alone (exact deltas among them; a row then stops when none of
those pairs improves). N:M: the pairs inside each group of M, always all of them (the pattern
stays N:M). The warm start is the base method's score compared within each row (Wanda, magnitude
or RIA): the equal sparsity per row the decoupling needs.
"""
import torch

from . import magnitude, ria, wanda
from .base import MatrixResult
from ..errors import WandaError
from ..masks import pattern_mask

NAME = "sparseswaps"
STATS = ("hessian", "sqnorm")
PARAMS = {"base": "wanda", "max_swaps": 1000, "candidates": None}
PATTERNS = ("unstructured", "nm")
BASES = {m.NAME: m for m in (wanda, magnitude, ria)}
CHUNK = {"cpu": 1 << 22, "cuda": 1 << 27}  # elements of one block of pair deltas (float64)


def stats_kinds(params: dict) -> tuple[str, ...]:
    base = params.get("base", PARAMS["base"])
    return ("hessian",) if base == "magnitude" else ("hessian", "sqnorm")


def check(pattern, params: dict) -> None:
    p = {**PARAMS, **params}
    if not isinstance(p["base"], str) or p["base"] not in BASES:
        raise WandaError(f"SparseSwaps base must be one of {', '.join(BASES)}, got {p['base']!r}")
    value = p["max_swaps"]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise WandaError(f"SparseSwaps max_swaps must be a whole number >= 0, got {value!r}")
    value = p["candidates"]
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise WandaError(f"SparseSwaps candidates must be a whole number >= 1 or null (all pairs), got {value!r}")


def warm_start(weight, stats, pattern, base: str) -> torch.Tensor:
    """The base method's keep-mask, its score compared within each row (equal sparsity per row)."""
    if base == "wanda":
        score = wanda.score(weight, stats)
    elif base == "ria":
        score = ria.score(weight, stats, ria.PARAMS["a"])
    else:
        score = weight.abs()
    return pattern_mask(score, pattern, per_row=True)


def row_errors(weight: torch.Tensor, keep: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Each row's reconstruction error r^T G r with r its pruned weights (float64)."""
    r = weight.double() * ~keep
    return ((r @ gram.double()) * r).sum(1)


def prune_matrix(weight, stats, pattern, base="wanda", max_swaps=100, candidates=None) -> MatrixResult:
    keep = warm_start(weight, stats, pattern, base)
    G = stats.hessian.double()
    W = weight.double()
    c = (W * ~keep) @ G
    before = ((W * ~keep) * c).sum()
    swaps, steps = refine(keep, W, G, c, pattern, max_swaps, candidates)
    after = row_errors(weight, keep, G).sum()
    ratio = float(after / before) if before > 0 else 1.0
    return MatrixResult(keep=keep, info={"swaps": swaps, "swap_steps": steps, "swap_error_ratio": ratio})


def refine(keep, W, G, c, pattern, max_swaps, candidates) -> tuple[int, int]:
    """Optimal 1-swaps in place on `keep` (c = G r for the current mask); returns (swaps, steps run).
    The rows still swapping are kept as one compact batch: a row that stops leaves it."""
    rows = torch.arange(keep.shape[0], device=keep.device)
    sq = W * W * G.diagonal()  # w_j^2 G_jj
    w2 = 2 * W
    k = keep.clone()
    swaps = steps = 0
    while steps < max_swaps and rows.numel():
        t = w2 * c
        prune_cost = (sq + t).masked_fill_(~k, float("inf"))  # a_q, kept q only
        regrow_cost = (sq - t).masked_fill_(k, float("inf"))  # b_p, pruned p only
        if pattern.kind == "nm":
            delta, p, q = _best_in_groups(W, prune_cost, regrow_cost, G, pattern.m)
        else:
            delta, p, q = _best_pair(W, prune_cost, regrow_cost, G, candidates)
        better = delta < 0
        if not bool(better.any()):
            break
        steps += 1
        i = better.nonzero().squeeze(1)
        p, q = p[i], q[i]
        k[i, p] = True
        k[i, q] = False
        c[i] += G[q] * W[i, q].unsqueeze(1) - G[p] * W[i, p].unsqueeze(1)
        swaps += i.numel()
        if i.numel() < rows.numel():  # rows without an improving swap are done
            keep[rows] = k
            rows, k, W, sq, w2, c = rows[i], k[i], W[i], sq[i], w2[i], c[i]
    keep[rows] = k
    return swaps, steps


def _best_pair(w, prune_cost, regrow_cost, G, candidates):
    """Per row, the (pruned p, kept q) pair of lowest delta: among all pairs, or the candidates."""
    rows, cols = w.shape
    n_kept = int(torch.isfinite(prune_cost[0]).sum())
    kp = n_kept if candidates is None else min(candidates, n_kept)
    kr = cols - n_kept if candidates is None else min(candidates, cols - n_kept)
    if kp == 0 or kr == 0:
        none = torch.zeros(rows, dtype=torch.long, device=w.device)
        return torch.full((rows,), float("inf"), dtype=w.dtype, device=w.device), none, none
    a, q_idx = torch.topk(prune_cost, kp, dim=1, largest=False)
    b, p_idx = torch.topk(regrow_cost, kr, dim=1, largest=False)
    wq, wp = w.gather(1, q_idx), w.gather(1, p_idx)
    best = torch.empty(rows, dtype=w.dtype, device=w.device)
    where = torch.empty(rows, dtype=torch.long, device=w.device)
    step = max(1, CHUNK.get(w.device.type, CHUNK["cpu"]) // (kp * kr))
    for i in range(0, rows, step):
        s = slice(i, i + step)
        cross = G[p_idx[s].unsqueeze(2), q_idx[s].unsqueeze(1)]  # [rows, kr, kp]: G_pq
        delta = b[s].unsqueeze(2) + a[s].unsqueeze(1) - 2 * wp[s].unsqueeze(2) * wq[s].unsqueeze(1) * cross
        best[s], where[s] = delta.flatten(1).min(1)
    p = p_idx.gather(1, (where // kp).unsqueeze(1)).squeeze(1)
    q = q_idx.gather(1, (where % kp).unsqueeze(1)).squeeze(1)
    return best, p, q


def _best_in_groups(w, prune_cost, regrow_cost, G, m):
    """Per row, the (pruned p, kept q) pair of lowest delta inside one group of M inputs."""
    rows, cols = w.shape
    groups = cols // m
    blocks = G.reshape(groups, m, groups, m).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [groups, m, m]: G_pq
    best = torch.empty(rows, dtype=w.dtype, device=w.device)
    where = torch.empty(rows, dtype=torch.long, device=w.device)
    step = max(1, CHUNK.get(w.device.type, CHUNK["cpu"]) // (cols * m))
    for i in range(0, rows, step):
        s = slice(i, i + step)
        wg = w[s].reshape(-1, groups, m)
        # delta[row, group, p, q] = b_p + a_q - 2 w_p w_q G_pq  (inf unless p is pruned and q is kept)
        delta = (regrow_cost[s].reshape(-1, groups, m, 1) + prune_cost[s].reshape(-1, groups, 1, m)
                 - 2 * wg.unsqueeze(3) * wg.unsqueeze(2) * blocks)
        best[s], where[s] = delta.flatten(1).min(1)
    group, pair = where // (m * m), where % (m * m)
    return best, group * m + pair // m, group * m + pair % m
