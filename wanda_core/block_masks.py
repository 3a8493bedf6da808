"""Block-structured masks: pure functions from a score tensor [out, in] to (keep, counts).

The matrix is cut into b x b blocks (edge blocks may be smaller when a side is not a multiple
of b). Blocks are ranked by their mean score, best first; equal means rank by row-major block
index, lower index first. Each block then gets one treatment:
  dense   keep everything
  nm      N:M inside the block: per row, each group of m consecutive inputs keeps its n best
  topk    keep only the block's k best weights (a block with <= k elements keeps all)
  zeroed  keep nothing

Everything is vectorized: the blocks of one kind are gathered into a [N, b, b] batch, masked
in one go and written back; there is no Python loop over blocks. Inside a block, ties follow
masks.py: among equal scores the lower index is pruned first. Scores must be finite (padding
uses -inf).
"""
from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F

from .errors import WandaError

# ---------------------------------------------------------------------------------------------
# parameter checks


def _int(name: str, value) -> int:
    if isinstance(value, bool):
        raise WandaError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise WandaError(f"{name} must be an integer, got {value!r}") from None


def check_fraction(name: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise WandaError(f"{name} must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= value <= 1.0:
        raise WandaError(f"{name} must be in [0, 1], got {value}")
    return value


def check_block(b, k=None, n=None, m=None):
    """Block size b, and where given k (weights a top-k block keeps) and n:m inside blocks; returns them as ints."""
    b = _int("block size", b)
    if b < 1:
        raise WandaError(f"block size must be >= 1, got {b}")
    if k is not None:
        k = _int("k", k)
        if not 0 <= k < b * b:
            raise WandaError(f"k must be in [0, {b * b}) for {b}x{b} blocks (k >= b*b would keep whole blocks), got {k}")
    if n is not None:
        n, m = _int("n", n), _int("m", m)
        if not 0 < n < m:
            raise WandaError(f"N:M inside blocks needs 0 < n < m, got {n}:{m}")
        if b % m:
            raise WandaError(f"block size {b} must be a multiple of m={m} so that N:M groups do not straddle blocks")
    return b, k, n, m


def check_tiers(dense, nm, topk) -> dict:
    """The three tier fractions: each in [0, 1], summing to 1."""
    fracs = {"dense": check_fraction("dense", dense), "nm": check_fraction("nm", nm), "topk": check_fraction("topk", topk)}
    if abs(sum(fracs.values()) - 1.0) > 1e-6:
        raise WandaError(f"tier fractions dense + nm + topk must sum to 1, got {dense} + {nm} + {topk} = {sum(fracs.values()):g}")
    return fracs


def _check_score(score: torch.Tensor, inner: torch.Tensor | None = None) -> None:
    if score.dim() != 2:
        raise WandaError(f"score must be a 2-D [out, in] tensor, got shape {tuple(score.shape)}")
    if inner is not None and inner.shape != score.shape:
        raise WandaError(f"inner score shape {tuple(inner.shape)} differs from score shape {tuple(score.shape)}")


def _count(total: int, frac: float) -> int:
    # floor(total * frac), with slack so that e.g. 100 * 0.29 = 28.999999999999996 still gives 29
    return min(total, int(math.floor(total * frac + 1e-9)))


# ---------------------------------------------------------------------------------------------
# block plumbing


def _blocks(x: torch.Tensor, b: int, fill: float) -> torch.Tensor:
    """[out, in] -> [Rb, Cb, b, b], padded with `fill` to multiples of b (a view when no padding)."""
    rows, cols = x.shape
    if rows % b or cols % b:
        x = F.pad(x, (0, -cols % b, 0, -rows % b), value=fill)
    rb, cb = x.shape[0] // b, x.shape[1] // b
    return x.reshape(rb, b, cb, b).permute(0, 2, 1, 3)


def _gather(blk: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Blocks `ids` (row-major block index) of a [Rb, Cb, b, b] tensor as one [N, b, b] batch."""
    return blk[ids // blk.shape[1], ids % blk.shape[1]]


def _assemble(shape, b: int, device, parts) -> torch.Tensor:
    """Keep-mask [out, in]: all True, except the blocks of each (ids, block_keep) in parts."""
    rows, cols = shape
    rb, cb = -(-rows // b), -(-cols // b)
    keep = torch.ones(rb * b, cb * b, dtype=torch.bool, device=device)
    blocks = keep.view(rb, b, cb, b).permute(0, 2, 1, 3)  # a view: writes land in keep
    for ids, block_keep in parts:  # at most three parts, one per block kind
        blocks[ids // cb, ids % cb] = block_keep
    return keep[:rows, :cols].contiguous()


def _block_sums(score: torch.Tensor, b: int):
    """Per-block score sums and true element counts (edge blocks may be smaller than b x b)."""
    rows, cols = score.shape
    sums = _blocks(score.float(), b, 0.0).sum((2, 3))
    rb, cb = sums.shape
    r = torch.full((rb,), b, dtype=torch.float32, device=score.device)
    c = torch.full((cb,), b, dtype=torch.float32, device=score.device)
    if rb:
        r[-1] = rows - (rb - 1) * b
    if cb:
        c[-1] = cols - (cb - 1) * b
    return sums, r[:, None] * c[None, :]


def _rank(imp: torch.Tensor) -> torch.Tensor:
    """Block indices, most important first; a stable sort puts equal blocks in index order."""
    return torch.sort(imp.reshape(-1), descending=True, stable=True).indices


def _topk_keep(blk: torch.Tensor, k: int) -> torch.Tensor:
    """[N, b, b] -> keep exactly the k best entries of each block (all finite ones if fewer)."""
    flat = blk.reshape(blk.shape[0], blk.shape[1] * blk.shape[2])
    keep = torch.zeros_like(flat, dtype=torch.bool)
    if k == 0 or flat.shape[0] == 0:
        return keep.reshape(blk.shape)
    # one value more than needed shows whether the k-th best is tied with the next one
    vals, idx = flat.topk(k + 1, dim=1)
    keep.scatter_(1, idx[:, :k], True)
    tied = vals[:, k - 1] == vals[:, k]
    # Only for tied blocks does the choice matter: keep the last tied entries (lower index
    # pruned first, as in masks.py). Blocks with fewer than k real entries land here too
    # (k-th value = -inf): padding is tied and cropped later, so all their real entries stay.
    if tied.any():
        sub, t = flat[tied], vals[tied, k - 1:k]
        above, at = sub > t, sub == t
        need = k - above.sum(1, keepdim=True)
        from_end = at.flip(1).cumsum(1).flip(1)
        keep[tied] = above | (at & (from_end <= need))
    return keep.reshape(blk.shape)


def _nm_keep(blk: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """[N, b, b] -> per row, each group of m consecutive entries keeps its n best.

    Counts, for every entry, how many group members beat it (pairwise compare, m*(m-1)/2
    passes: much faster than sorting groups of 4). A later index wins ties, as in masks.nm_mask.
    Edge blocks whose real width is not a multiple of m: the trailing partial group is padded
    with -inf, which loses every comparison, so it keeps min(n, width) entries. Read as a full
    group whose missing inputs are zero, it still satisfies "at most n of every m".
    """
    g = blk.reshape(*blk.shape[:-1], blk.shape[-1] // m, m)
    # entry j starts beaten by all j earlier entries, then each pair moves one point
    count = torch.int8 if m < 128 else torch.int32
    beaten = [torch.full(g.shape[:-1], j, dtype=count, device=g.device) for j in range(m)]
    for i in range(m):
        for j in range(i + 1, m):
            j_wins = (g[..., j] >= g[..., i]).to(count)
            beaten[i] += j_wins
            beaten[j] -= j_wins
    return (torch.stack(beaten, -1) < n).reshape(blk.shape)


# ---------------------------------------------------------------------------------------------
# public masks


def block_importance(score: torch.Tensor, b: int) -> torch.Tensor:
    """[ceil(out/b), ceil(in/b)] mean score of each block over the elements it really has."""
    _check_score(score)
    b = check_block(b)[0]
    sums, counts = _block_sums(score, b)
    return sums / counts


def three_tier_mask(score, inner=None, dense=0.35, nm=0.45, topk=0.20, k=15, b=16, n=2, m=4):
    """Top `dense` of blocks stay dense, the next `nm` get n:m, the rest keep their k best.

    Tiers are assigned by `score`; the choices inside N:M and top-k blocks use `inner`
    (defaults to `score`). Returns (keep bool [out, in], {"dense", "nm", "topk"} block counts).
    """
    _check_score(score, inner)
    b, k, n, m = check_block(b, k, n, m)
    fracs = check_tiers(dense, nm, topk)

    order = _rank(block_importance(score, b))
    total = order.numel()
    n_dense = _count(total, fracs["dense"])
    n_nm = min(total - n_dense, _count(total, fracs["nm"]))
    blk = _blocks((score if inner is None else inner).float(), b, float("-inf"))

    nm_ids, tk_ids = order[n_dense:n_dense + n_nm], order[n_dense + n_nm:]
    nm_keep, tk_keep = _nm_keep(_gather(blk, nm_ids), n, m), _topk_keep(_gather(blk, tk_ids), k)
    keep = _assemble(score.shape, b, score.device, [(nm_ids, nm_keep), (tk_ids, tk_keep)])
    return keep, {"dense": n_dense, "nm": n_nm, "topk": total - n_dense - n_nm}


def block_levels(nonzero: torch.Tensor, b: int = 16, k: int = 15, n: int = 2, m: int = 4) -> torch.Tensor:
    """Per block (row-major), the sparsest three-tier treatment its non-zero pattern already fits:
    2 = at most k non-zeros (top-k), 1 = at most n of every m consecutive inputs per row (N:M),
    0 = neither (dense). Padding outside the matrix counts as zero."""
    b, k, n, m = check_block(b, k, n, m)
    blk = _blocks(nonzero.float(), b, 0.0)  # [Rb, Cb, b, b]
    rb, cb = blk.shape[:2]
    nm_ok = (blk.reshape(rb, cb, b, b // m, m).sum(-1) <= n).all(-1).all(-1)
    topk_ok = blk.sum((2, 3)) <= k
    return torch.where(topk_ok, 2, torch.where(nm_ok, 1, 0)).reshape(-1)


def three_tier_step_mask(score, nonzero, inner=None, dense=0.35, nm=0.45, topk=0.20, k=15, b=16, n=2, m=4):
    """One step of a progressive three-tier schedule: like three_tier_mask, but a block never
    moves to a denser tier than its current non-zero pattern (`nonzero`, bool [out, in]) fits.

    As in the seed fork's progressive pruning: the dense tier takes the most important blocks
    that are still dense; blocks that are already top-k stay top-k; the remaining blocks are
    ranked by their score after N:M (so that blocks pruned to N:M in an earlier step and dense
    ones just demoted compete on equal terms), the best go to N:M and the rest to top-k.
    Returns (keep, counts) as three_tier_mask; counts may differ from the fractions only when
    the schedule asks to make blocks denser again (dense fraction rising, top-k falling).
    """
    _check_score(score, inner)
    if nonzero.shape != score.shape:
        raise WandaError(f"non-zero pattern shape {tuple(nonzero.shape)} differs from score shape {tuple(score.shape)}")
    b, k, n, m = check_block(b, k, n, m)
    fracs = check_tiers(dense, nm, topk)

    levels = block_levels(nonzero, b, k, n, m)
    order = _rank(block_importance(score, b))
    total = order.numel()
    still_dense = order[levels[order] == 0]
    dense_ids = still_dense[:_count(total, fracs["dense"])]
    rest = torch.ones(total, dtype=torch.bool, device=score.device)
    rest[dense_ids] = False
    rest &= levels != 2
    rest_ids = rest.nonzero().squeeze(1)

    blk = _blocks((score if inner is None else inner).float(), b, float("-inf"))
    rest_nm = _nm_keep(_gather(blk, rest_ids), n, m)
    counts = _block_sums(score, b)[1]
    kept = torch.where(rest_nm, _gather(_blocks(score.float(), b, 0.0), rest_ids), 0.0).sum((1, 2))
    by_nm = rest_ids[_rank(kept / counts.reshape(-1)[rest_ids])]
    n_nm = min(by_nm.numel(), _count(total, fracs["nm"]))
    nm_ids = by_nm[:n_nm]
    tk = torch.ones(total, dtype=torch.bool, device=score.device)
    tk[dense_ids] = False
    tk[nm_ids] = False
    tk_ids = tk.nonzero().squeeze(1)
    nm_keep = _nm_keep(_gather(blk, nm_ids), n, m)
    keep = _assemble(score.shape, b, score.device, [(nm_ids, nm_keep), (tk_ids, _topk_keep(_gather(blk, tk_ids), k))])
    return keep, {"dense": dense_ids.numel(), "nm": n_nm, "topk": tk_ids.numel()}


def block_mask(score, sparsity, b=16):
    """The floor(B * sparsity) least important blocks are zeroed; the rest stay dense."""
    _check_score(score)
    b = check_block(b)[0]
    sparsity = check_fraction("sparsity", sparsity)
    order = _rank(block_importance(score, b))
    n_zero = _count(order.numel(), sparsity)
    ids = order[order.numel() - n_zero:]
    keep = _assemble(score.shape, b, score.device, [(ids, False)])
    return keep, {"dense": order.numel() - n_zero, "zeroed": n_zero}


def block_topk_mask(score, sparsity, k=15, b=16):
    """The floor(B * sparsity) least important blocks keep only their k best; the rest stay dense."""
    _check_score(score)
    b, k = check_block(b, k)[:2]
    sparsity = check_fraction("sparsity", sparsity)
    order = _rank(block_importance(score, b))
    n_topk = _count(order.numel(), sparsity)
    blk = _blocks(score.float(), b, float("-inf"))
    ids = order[order.numel() - n_topk:]
    keep = _assemble(score.shape, b, score.device, [(ids, _topk_keep(_gather(blk, ids), k))])
    return keep, {"dense": order.numel() - n_topk, "topk": n_topk}


def hybrid_nm_mask(score, top_ratio=0.6, threshold=0.8, k=15, b=16, n=2, m=4):
    """Among the top floor(B * top_ratio) blocks, a block gets n:m when that keeps at least
    `threshold` of its total score, else it stays dense; every other block keeps its k best."""
    _check_score(score)
    b, k, n, m = check_block(b, k, n, m)
    top_ratio = check_fraction("top_ratio", top_ratio)
    threshold = check_fraction("threshold", threshold)
    sums, counts = _block_sums(score, b)
    order = _rank(sums / counts)
    n_top = _count(order.numel(), top_ratio)
    blk = _blocks(score.float(), b, float("-inf"))

    cand_ids = order[:n_top]
    cand = _gather(blk, cand_ids)
    cand_keep = _nm_keep(cand, n, m)
    # padding (-inf) can be "kept" in short groups and outside the matrix: never count it
    kept = torch.where(cand_keep & (cand > float("-inf")), cand, 0.0).sum((1, 2))
    use_nm = kept >= threshold * sums.reshape(-1)[cand_ids]
    nm_ids, nm_keep = cand_ids[use_nm], cand_keep[use_nm]

    tk_ids = order[n_top:]
    keep = _assemble(score.shape, b, score.device, [(nm_ids, nm_keep), (tk_ids, _topk_keep(_gather(blk, tk_ids), k))])
    n_nm = nm_ids.numel()
    return keep, {"dense": n_top - n_nm, "nm": n_nm, "topk": order.numel() - n_top}
