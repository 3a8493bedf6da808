"""Block top-k: the least important fraction of b x b blocks keeps only its k best weights.

The fraction is the pattern's sparsity; the other blocks stay dense. Scores are Wanda's.
"""
from .base import MatrixResult
from .wanda import score
from ..block_masks import block_topk_mask, check_block

NAME = "block_topk"
STATS = "sqnorm"
PARAMS = {"k": 15, "block_size": 16}
PATTERNS = ("unstructured",)


def check(pattern, params: dict) -> None:
    check_block(params["block_size"], params["k"])


def prune_matrix(weight, stats, pattern, k=15, block_size=16) -> MatrixResult:
    keep, counts = block_topk_mask(score(weight, stats), pattern.sparsity, k=k, b=block_size)
    return MatrixResult(keep=keep, info={"blocks_dense": counts["dense"], "blocks_topk": counts["topk"]})
