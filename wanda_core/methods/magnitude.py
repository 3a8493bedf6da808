"""Magnitude pruning: score |W|. Unstructured compares within the whole matrix, as the Wanda reference does."""
from .base import MatrixResult
from ..masks import pattern_mask

NAME = "magnitude"
STATS = None
PARAMS: dict = {}
PATTERNS = ("unstructured", "nm")


def prune_matrix(weight, stats, pattern) -> MatrixResult:
    return MatrixResult(keep=pattern_mask(weight.abs(), pattern, per_row=False))
