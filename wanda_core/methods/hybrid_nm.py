"""Hybrid N:M: the top blocks get N:M where it keeps most of their score (else stay dense),
every other block keeps its k best weights. Scores are Wanda's; the pattern's sparsity is ignored.
"""
from .base import MatrixResult
from .wanda import score
from ..block_masks import check_block, check_fraction, hybrid_nm_mask

NAME = "hybrid_nm"
STATS = "sqnorm"
PARAMS = {"top_ratio": 0.6, "threshold": 0.8, "k": 15, "block_size": 16, "n": 2, "m": 4}
PATTERNS = ("unstructured",)
OWN_PATTERN = True


def check(pattern, params: dict) -> None:
    check_block(params["block_size"], params["k"], params["n"], params["m"])
    check_fraction("top_ratio", params["top_ratio"])
    check_fraction("threshold", params["threshold"])


def prune_matrix(weight, stats, pattern, top_ratio=0.6, threshold=0.8, k=15, block_size=16, n=2, m=4) -> MatrixResult:
    keep, counts = hybrid_nm_mask(score(weight, stats), top_ratio=top_ratio, threshold=threshold, k=k, b=block_size, n=n, m=m)
    return MatrixResult(keep=keep, info={"blocks_dense": counts["dense"], "blocks_nm": counts["nm"], "blocks_topk": counts["topk"]})
