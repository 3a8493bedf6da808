"""DSnoT, Dynamic Sparse No Training (Zhang et al., ICLR 2024): refine an initial mask, no training.

Pruning w_ij shifts output i by w_ij * x_j, in expectation by c_ij = w_ij * E[x_j] (the authors
scale E[x_j] by the tokens per calibration sequence: c_ij = w_ij * sum of x_j / sequences).
The expected error of row i is e_i = sum of c_ij over its pruned weights. Per row, each cycle
swaps one pruned weight back in (regrow) and one kept weight out (prune) to drive e_i to zero:

* regrow: when e_i > 0 the pruned weight with the largest c_ij / Var[x_j]^p, else the smallest
  (most negative), each taken once, in order;
* unstructured prune: among the kept weights in ascending order of the Wanda score, when e_i < 0
  the next with c_ij > 0, else the next with c_ij < 0;
* N:M prune: the kept weight of the regrown weight's group with the lowest initial score,
  so every group keeps N of M;
* a row stops for good at the first cycle where |e_i| <= update_threshold, or (same_sign) the
  swap would flip e_i's initial sign, or after max_cycles cycles.

Var[x_j] is the within-sequence variance pooled over the calibration sequences. As in the
authors' code, by default the MLP matrices keep their initial mask (only the matrices inside an
attention module are refined), same_sign applies to N:M only, and the initial mask is chosen per
output row: the initial scores are Wanda's, |W|, or SparseGPT's w^2 / [H^-1]_jj^2 (no weight update).

By default the cycle loops follow the authors' code in its corner cases too (reached only by rows
with fewer pruned weights of one sign than cycles, inputs of zero variance, or kept weights of zero
contribution): a regrow candidate the row already keeps is "regrown" (its c_ij leaves e_i, the mask
stays) while the prune still happens; kept weights of zero contribution all stand for the row's
first prune candidate; stopped rows rewrite their next candidates. strict_swaps=True only ever swaps
a pruned weight for a kept one and otherwise stops the row, so each row keeps its initial count
(N of every M). A row that would read past the end of a list (theirs: an index error) stops.
"""
import torch

from . import wanda
from .base import MatrixResult
from .sparsegpt import inverse_hessian_factor
from ..errors import WandaError
from ..masks import nm_mask, unstructured_row_mask

NAME = "dsnot"
STATS = ("sqnorm", "moments")
PARAMS = {"init": "wanda", "max_cycles": 50, "update_threshold": 0.1, "var_power": 1.0, "skip": "mlp", "same_sign": None,
          "strict_swaps": False}
PATTERNS = ("unstructured", "nm")
INITS = ("wanda", "magnitude", "sparsegpt")
SKIPS = ("mlp", "attention", "none")
MATRIX_NAME = True  # skip ("mlp", "attention") needs to know where the matrix lies


def stats_kinds(params: dict) -> tuple[str, ...]:
    return STATS + ("hessian",) if params.get("init", PARAMS["init"]) == "sparsegpt" else STATS


def check(pattern, params: dict) -> None:
    p = {**PARAMS, **params}
    if p["init"] not in INITS:
        raise WandaError(f"DSnoT init must be one of {', '.join(INITS)}, got {p['init']!r}")
    if p["skip"] not in SKIPS:
        raise WandaError(f"DSnoT skip must be one of {', '.join(SKIPS)}, got {p['skip']!r}")
    if isinstance(p["max_cycles"], bool) or not isinstance(p["max_cycles"], int) or p["max_cycles"] < 0:
        raise WandaError(f"DSnoT max_cycles must be a whole number >= 0, got {p['max_cycles']!r}")
    for key in ("update_threshold", "var_power"):
        value = p[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
            raise WandaError(f"DSnoT {key} must be a number >= 0, got {value!r}")
    if p["same_sign"] not in (None, True, False):
        raise WandaError(f"DSnoT same_sign must be true, false or null (the authors' choice per pattern), got {p['same_sign']!r}")
    if not isinstance(p["strict_swaps"], bool):
        raise WandaError(f"DSnoT strict_swaps must be true or false, got {p['strict_swaps']!r}")


def in_attention(name: str) -> bool:
    """Whether a matrix lies inside an attention module of its decoder block (LLaMA self_attn.*,
    GPT-2 attn.*, GPT-NeoX attention.*, Falcon/BLOOM self_attention.*). Everything else in a block
    (LLaMA mlp.*, OPT fc1/fc2, experts, ...) counts as MLP, as in the authors' OPT code."""
    parts = name.split(".")
    block = next((i for i, p in enumerate(parts) if p.isdigit()), -1)  # the block index
    return any("attn" in p.lower() or "attention" in p.lower() for p in parts[block + 1 :])


def initial_score(weight, stats, init: str) -> torch.Tensor:
    if init == "wanda":
        return wanda.score(weight, stats)
    if init == "magnitude":
        return weight.abs()
    w = weight.clone()  # SparseGPT's selection score on the weights as they are (dead inputs zeroed)
    d = torch.diag(inverse_hessian_factor(stats.hessian, stats.count, w, 0.01))
    return w * w / (d * d).unsqueeze(0)


def prune_matrix(weight, stats, pattern, name=None, init="wanda", max_cycles=50, update_threshold=0.1,
                 var_power=1.0, skip="mlp", same_sign=None, strict_swaps=False) -> MatrixResult:
    score = initial_score(weight, stats, init)
    if pattern.kind == "nm":
        keep = nm_mask(score, pattern.n, pattern.m)
    else:
        keep = unstructured_row_mask(score, pattern.sparsity)
    skipped = name is not None and skip != "none" and in_attention(name) == (skip == "attention")
    if skipped or max_cycles == 0:
        return MatrixResult(keep=keep, info={"dsnot_swaps": 0, "dsnot_cycles": 0})
    contrib = weight * (stats.xsum / max(stats.samples, 1)).unsqueeze(0)
    regrow_score = contrib.masked_fill(keep, 0.0)
    error = regrow_score.sum(1)  # expected output change of each row from its pruned weights
    if var_power:
        var = stats.variance()
        if strict_swaps:  # theirs: a constant input divides by zero (its kept weights' 0 / 0 sort last)
            var = var.clamp_min(torch.finfo(torch.float32).tiny)
        regrow_score = regrow_score / var.pow(var_power).unsqueeze(0)
        if strict_swaps:
            regrow_score.masked_fill_(keep, 0.0)
    regrow_order = torch.sort(regrow_score, dim=1, stable=True).indices
    if pattern.kind == "nm":
        swaps, cycles = _refine_nm(keep, contrib, error, regrow_order, score, pattern.m, max_cycles, update_threshold,
                                   True if same_sign is None else same_sign, strict_swaps)
    else:
        swaps, cycles = _refine_unstructured(keep, contrib, error, regrow_order, wanda.score(weight, stats), max_cycles,
                                             update_threshold, bool(same_sign), strict_swaps)
    return MatrixResult(keep=keep, info={"dsnot_swaps": swaps, "dsnot_cycles": cycles})


class _Cursor:
    """Per row, two read positions into an ordered candidate list: one walking up from the start,
    one down from the end. `take(high)` reads, per row, at the end the row asks for and moves on."""

    def __init__(self, order: torch.Tensor):
        rows, n = order.shape
        self.order = order
        self.lo = torch.zeros(rows, dtype=torch.long, device=order.device)
        self.hi = torch.full((rows,), n - 1, dtype=torch.long, device=order.device)

    def take(self, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, whether each row read inside its list) for rows reading at the end where `high`.
        Once the two ends cross, a row reads again what it read from the other end (as theirs does)."""
        n = self.order.shape[1]
        pos = torch.where(high, self.hi, self.lo)
        inside = (pos >= 0) & (pos < n)
        idx = self.order.gather(1, pos.clamp(0, n - 1).unsqueeze(1)).squeeze(1)
        self.lo += (~high).long()
        self.hi -= high.long()
        return idx, inside


def _swap_rule(active, error, after, sign0, threshold, same_sign):
    """Rows that swap this cycle; a row that stops never resumes."""
    active &= error.abs() > threshold
    if same_sign:
        active &= torch.sign(after) == sign0
    return active


def _swap(keep, error, active, written, row, p_idx, r_idx, p_val, r_val) -> int:
    """One cycle's mask writes and error updates, in place; returns the swaps (active rows).

    As the authors' code, every `written` row writes keep[p] = not active, keep[r] = active: the
    active rows swap, the stopped ones rewrite what is normally already there. The error takes the
    pruned weight's contribution, then gives up the regrown one: two roundings in their order, so a
    row that ends within rounding of the threshold stops at the same cycle as theirs."""
    keep[row[written], p_idx[written]] = ~active[written]
    keep[row[written], r_idx[written]] = active[written]
    error += torch.where(active, p_val, torch.zeros_like(error))
    error -= torch.where(active, r_val, torch.zeros_like(error))
    return int(active.sum())


def _refine_unstructured(keep, contrib, error, regrow_order, wanda_score, max_cycles, threshold, same_sign, strict):
    """Swap in place on `keep`; returns (swaps, cycles run)."""
    rows = keep.shape[0]
    n_kept = int(keep[0].sum())  # the initial mask keeps the same number in every row
    # Prune candidates: the kept weights in ascending Wanda order, those with c < 0 first (read from
    # the start when e >= 0) and those with c > 0 last in reverse (read from the end when e < 0).
    kept_by_wanda = torch.sort(wanda_score.masked_fill(~keep, float("inf")), dim=1, stable=True).indices[:, :n_kept]
    c = contrib.gather(1, kept_by_wanda)
    pos = torch.arange(n_kept, device=keep.device).expand_as(c)
    key = torch.where(c < 0, pos, torch.where(c > 0, 3 * n_kept - pos, n_kept + pos))
    order = torch.argsort(key, dim=1)
    if not strict:  # their index trick sends the kept weights of zero contribution to the first kept weight
        sorted_c = c.gather(1, order)
        order = order.masked_fill(~((sorted_c < 0) | (sorted_c > 0)), 0)
    prune, regrow = _Cursor(kept_by_wanda.gather(1, order)), _Cursor(regrow_order)
    sign0 = torch.sign(error)
    active = torch.ones(rows, dtype=torch.bool, device=keep.device)
    live = active.clone()  # rows that never read past an end of a list (theirs: an index error)
    row = torch.arange(rows, device=keep.device)
    swaps = cycles = 0
    while cycles < max_cycles and bool(active.any()):
        cycles += 1
        r_idx, r_inside = regrow.take(error > 0)
        p_idx, p_inside = prune.take(error < 0)
        p_val, r_val = contrib[row, p_idx], contrib[row, r_idx]
        live &= p_inside & r_inside
        active &= live
        if strict:  # only a pruned weight for a kept one: a row whose candidates run out stops
            active &= keep[row, p_idx] & ~keep[row, r_idx]
        active = _swap_rule(active, error, error + p_val - r_val, sign0, threshold, same_sign)
        swaps += _swap(keep, error, active, active if strict else live, row, p_idx, r_idx, p_val, r_val)
    return swaps, cycles


def _refine_nm(keep, contrib, error, regrow_order, score, m, max_cycles, threshold, same_sign, strict):
    rows = keep.shape[0]
    prunable = score.masked_fill(~keep, float("inf"))  # pruned (and, later, regrown) weights are never pruned
    regrow = _Cursor(regrow_order)
    sign0 = torch.sign(error)
    active = torch.ones(rows, dtype=torch.bool, device=keep.device)
    live = active.clone()
    row = torch.arange(rows, device=keep.device)
    offsets = torch.arange(m, device=keep.device)
    swaps = cycles = 0
    while cycles < max_cycles and bool(active.any()):
        cycles += 1
        r_idx, r_inside = regrow.take(error > 0)
        start = r_idx - r_idx % m
        group = start.unsqueeze(1) + offsets
        # The group's lowest initial score, ties as torch.topk breaks them (theirs).
        p_idx = start + torch.topk(prunable.gather(1, group), 1, dim=1, largest=False).indices.squeeze(1)
        p_val, r_val = contrib[row, p_idx], contrib[row, r_idx]
        live &= r_inside
        active &= live
        if strict:  # only a pruned weight for a kept one: the row stops when its group has none left
            active &= ~keep[row, r_idx] & torch.isfinite(prunable[row, p_idx])
        active = _swap_rule(active, error, error + p_val - r_val, sign0, threshold, same_sign)
        written = active if strict else live
        prunable[row[written], p_idx[written]] = float("inf")
        swaps += _swap(keep, error, active, written, row, p_idx, r_idx, p_val, r_val)
    return swaps, cycles
