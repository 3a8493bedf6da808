"""Block top-k: the least important fraction of b x b blocks keeps only its k best weights.

The fraction is the pattern's sparsity; the other blocks stay dense. Scores are Wanda's.
"""
from . import MatrixResult
from .wanda import score
from ..block_masks import block_topk_mask
from ..errors import WandaError

NAME = "block_topk"
STATS = "sqnorm"
PARAMS = {"k": 15, "block_size": 16}
PATTERNS = ("unstructured",)


def prune_matrix(weight, stats, pattern, k=15, block_size=16) -> MatrixResult:
    if pattern.kind not in PATTERNS:
        raise WandaError(f"method {NAME!r} does not support pattern {pattern}")
    keep, counts = block_topk_mask(score(weight, stats), pattern.sparsity, k=k, b=block_size)
    return MatrixResult(keep=keep, info={"blocks_dense": counts["dense"], "blocks_topk": counts["topk"]})
