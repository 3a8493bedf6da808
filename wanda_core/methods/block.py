"""Block pruning: the least important fraction of b x b blocks (mean Wanda score) is zeroed.

The fraction is the pattern's sparsity.
"""
from .base import MatrixResult
from .wanda import score
from ..block_masks import block_mask, check_block

NAME = "block"
STATS = "sqnorm"
PARAMS = {"block_size": 16}
PATTERNS = ("unstructured",)


def check(pattern, params: dict) -> None:
    check_block(params["block_size"])


def prune_matrix(weight, stats, pattern, block_size=16) -> MatrixResult:
    keep, counts = block_mask(score(weight, stats), pattern.sparsity, b=block_size)
    return MatrixResult(keep=keep, info={"blocks_dense": counts["dense"], "blocks_zeroed": counts["zeroed"]})
