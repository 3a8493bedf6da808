"""Three-tier blocks: the most important blocks stay dense, the next get N:M, the rest keep k weights.

Tiers are ranked by the Wanda score S = |W| * ||X||; the choices inside N:M and top-k blocks
use S ("wanda") or |W| ("magnitude"). The pattern's sparsity is ignored: the tier fractions
fix it (about 41% with the defaults). With progressive=True (a step of a progressive schedule,
wanda_core.finetune) a block never becomes denser than the weights it is given already are.
"""
from .base import MatrixResult
from .wanda import score
from ..block_masks import check_block, check_tiers, three_tier_mask, three_tier_step_mask
from ..errors import WandaError

NAME = "three_tier"
STATS = "sqnorm"
PARAMS = {"dense": 0.35, "nm": 0.45, "topk": 0.20, "k": 15, "block_size": 16, "n": 2, "m": 4, "inner_score": "wanda",
          "progressive": False}
PATTERNS = ("unstructured",)
INNER_SCORES = ("wanda", "magnitude")
OWN_PATTERN = True
PROGRESSIVE_PARAMS = {"progressive": True}  # a step of a progressive schedule never makes a block denser


def check(pattern, params: dict) -> None:
    if params["inner_score"] not in INNER_SCORES:
        raise WandaError(f"inner_score must be one of {', '.join(INNER_SCORES)}, got {params['inner_score']!r}")
    check_block(params["block_size"], params["k"], params["n"], params["m"])
    check_tiers(params["dense"], params["nm"], params["topk"])


def prune_matrix(weight, stats, pattern, dense=0.35, nm=0.45, topk=0.20, k=15, block_size=16, n=2, m=4,
                 inner_score="wanda", progressive=False) -> MatrixResult:
    s = score(weight, stats)
    inner = weight.abs() if inner_score == "magnitude" else None
    tiers = dict(dense=dense, nm=nm, topk=topk, k=k, b=block_size, n=n, m=m)
    if progressive:
        keep, counts = three_tier_step_mask(s, weight != 0, inner, **tiers)
    else:
        keep, counts = three_tier_mask(s, inner, **tiers)
    return MatrixResult(keep=keep, info={"tier_dense": counts["dense"], "tier_nm": counts["nm"], "tier_topk": counts["topk"]})
