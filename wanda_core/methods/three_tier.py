"""Three-tier blocks: the most important blocks stay dense, the next get N:M, the rest keep k weights.

Tiers are ranked by the Wanda score S = |W| * ||X||; the choices inside N:M and top-k blocks
use S ("wanda") or |W| ("magnitude"). The pattern's sparsity is ignored: the tier fractions
fix it (about 41% with the defaults). With progressive=True (a step of a progressive schedule,
wanda_core.finetune) a block never becomes denser than the weights it is given already are.
"""
from . import MatrixResult
from .wanda import score
from ..block_masks import three_tier_mask, three_tier_step_mask
from ..errors import WandaError

NAME = "three_tier"
STATS = "sqnorm"
PARAMS = {"dense": 0.35, "nm": 0.45, "topk": 0.20, "k": 15, "block_size": 16, "n": 2, "m": 4, "inner_score": "wanda",
          "progressive": False}
PATTERNS = ("unstructured",)
INNER_SCORES = ("wanda", "magnitude")


def prune_matrix(weight, stats, pattern, dense=0.35, nm=0.45, topk=0.20, k=15, block_size=16, n=2, m=4,
                 inner_score="wanda", progressive=False) -> MatrixResult:
    if inner_score not in INNER_SCORES:
        raise WandaError(f"inner_score must be one of {', '.join(INNER_SCORES)}, got {inner_score!r}")
    if pattern.kind not in PATTERNS:
        raise WandaError(f"method {NAME!r} does not support pattern {pattern}")
    s = score(weight, stats)
    inner = weight.abs() if inner_score == "magnitude" else None
    tiers = dict(dense=dense, nm=nm, topk=topk, k=k, b=block_size, n=n, m=m)
    if progressive:
        keep, counts = three_tier_step_mask(s, weight != 0, inner, **tiers)
    else:
        keep, counts = three_tier_mask(s, inner, **tiers)
    return MatrixResult(keep=keep, info={"tier_dense": counts["dense"], "tier_nm": counts["nm"], "tier_topk": counts["topk"]})
