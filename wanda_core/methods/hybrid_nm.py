"""Hybrid N:M: the top blocks get N:M where it keeps most of their score (else stay dense),
every other block keeps its k best weights. Scores are Wanda's; the pattern's sparsity is ignored.
"""
from . import MatrixResult
from .wanda import score
from ..block_masks import hybrid_nm_mask
from ..errors import WandaError

NAME = "hybrid_nm"
STATS = "sqnorm"
PARAMS = {"top_ratio": 0.6, "threshold": 0.8, "k": 15, "block_size": 16, "n": 2, "m": 4}
PATTERNS = ("unstructured",)


def prune_matrix(weight, stats, pattern, top_ratio=0.6, threshold=0.8, k=15, block_size=16, n=2, m=4) -> MatrixResult:
    if pattern.kind not in PATTERNS:
        raise WandaError(f"method {NAME!r} does not support pattern {pattern}")
    keep, counts = hybrid_nm_mask(score(weight, stats), top_ratio=top_ratio, threshold=threshold, k=k, b=block_size, n=n, m=m)
    return MatrixResult(keep=keep, info={"blocks_dense": counts["dense"], "blocks_nm": counts["nm"], "blocks_topk": counts["topk"]})
