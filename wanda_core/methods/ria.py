"""RIA, Relative Importance and Activations (Zhang et al., ICLR 2024, "Plug-and-Play").

score_ij = (|W_ij| / sum_i |W_ij| + |W_ij| / sum_j |W_ij|) * ||X_j||_2 ** a
(each weight relative to its input column's and to its output row's absolute sum, times the
input norm to the power a). Unstructured pruning compares within the whole matrix, as the
authors' default (`per_row: true` compares within each output row, their --per_outneuron);
N:M keeps the N highest of each group. `reallocation: true` is their heuristic channel
reallocation for N:M: input channels are permuted so that each group of M mixes channels of
every importance level, N:M is chosen in that order, and the mask maps back to the original
columns (so the matrix is N:M only after the same permutation of its inputs). `lsa: true` then
refines that order as their --lsa does: for each slot k of the groups in turn, the slot-k
channels are reassigned among the groups by a linear sum assignment that maximizes the total
kept score (scipy's linear_sum_assignment; their --fast block split is not implemented).
"""
import torch

from .base import MatrixResult
from ..errors import WandaError
from ..masks import nm_mask, pattern_mask

NAME = "ria"
STATS = "sqnorm"
PARAMS = {"a": 0.5, "per_row": False, "reallocation": False, "lsa": False}
PATTERNS = ("unstructured", "nm")


def check(pattern, params: dict) -> None:
    a = params["a"]
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not a >= 0:
        raise WandaError(f"RIA exponent a must be a number >= 0, got {a!r}")
    for key in ("per_row", "reallocation", "lsa"):
        if not isinstance(params[key], bool):
            raise WandaError(f"RIA option {key} must be true or false, got {params[key]!r}")
    if params["reallocation"] and pattern.kind != "nm":
        raise WandaError("RIA reallocation applies to N:M patterns only")
    if params["lsa"] and not params["reallocation"]:
        raise WandaError("RIA lsa refines the channel reallocation: set reallocation too")


def score(weight: torch.Tensor, stats, a: float = 0.5) -> torch.Tensor:
    w = weight.abs()
    col_sums = w.sum(0, keepdim=True)  # over the output rows: one sum per input channel
    row_sums = w.sum(1, keepdim=True)  # over the inputs: one sum per output row
    # An all-zero row or column (already pruned) scores 0 there, instead of the reference's 0/0 = NaN.
    relative = w / col_sums.masked_fill(col_sums == 0, 1.0) + w / row_sums.masked_fill(row_sums == 0, 1.0)
    # The reference's activation factor is sqrt(mean of x^2) ** a: a constant factor away from this one.
    return relative * stats.sqnorm.sqrt().pow(a).unsqueeze(0)


def prune_matrix(weight, stats, pattern, a=0.5, per_row=False, reallocation=False, lsa=False) -> MatrixResult:
    s = score(weight, stats, a)
    if reallocation:
        order = reallocation_order(s, pattern.m)
        if lsa:
            order = lsa_order(s, order, pattern.n, pattern.m)
        keep = torch.empty_like(s, dtype=torch.bool)
        keep[:, order] = nm_mask(s[:, order], pattern.n, pattern.m)
        return MatrixResult(keep=keep)
    return MatrixResult(keep=pattern_mask(s, pattern, per_row=per_row))


def reallocation_order(s: torch.Tensor, m: int) -> torch.Tensor:
    """The reference's heuristic channel order: columns sorted by their total score and dealt out
    in M equal runs; position k of every group of M takes the next column of run k, runs of even k
    in ascending and of odd k in descending order (a snake), so each group mixes every level."""
    cols = s.shape[1]
    if cols % m:
        raise WandaError(f"input width {cols} is not divisible by M={m} for an N:M pattern")
    ranked = torch.sort(s.sum(0), stable=True).indices
    order = torch.empty_like(ranked)
    for k in range(m):
        run = ranked[cols * k // m : cols * (k + 1) // m]
        order[k::m] = run.flip(0) if k % 2 else run
    return order


def lsa_order(s: torch.Tensor, order: torch.Tensor, n: int, m: int, chunk: int = 64) -> torch.Tensor:
    """The reference's linear-sum-assignment pass over a channel order, slot by slot.

    With slot k of group g holding channel c and the group's other M - 1 channels fixed, the group
    keeps its N - 1 best others plus the better of c and its N-th best other: summed over the rows,
    gain[g, r] = top(N-1 others of g) + sum_i max(s[i, channel at slot k of group r], N-th other of g[i]).
    """
    from scipy.optimize import linear_sum_assignment

    rows, cols = s.shape
    groups = cols // m
    order = order.clone()
    for k in range(m):
        p = s[:, order].double().reshape(rows, groups, m)
        others = torch.cat([p[:, :, :k], p[:, :, k + 1 :]], dim=2).sort(dim=2, descending=True).values
        best = others[:, :, : n - 1].sum((0, 2))  # [groups]
        nth = others[:, :, n - 1]  # [rows, groups]
        slot = p[:, :, k]  # [rows, groups]: the candidates
        gain = torch.cat([torch.maximum(slot.unsqueeze(1), nth[:, g : g + chunk].unsqueeze(2)).sum(0)
                          for g in range(0, groups, chunk)])  # [groups, candidates]
        _, pick = linear_sum_assignment((gain + best.unsqueeze(1)).cpu().numpy(), maximize=True)
        at_k = order[k::m].clone()
        order[k::m] = at_k[torch.as_tensor(pick, device=order.device)]
    return order
