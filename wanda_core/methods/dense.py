"""The unpruned baseline row."""
import torch

from .base import MatrixResult

NAME = "dense"
STATS = None
PARAMS: dict = {}
PATTERNS = ("unstructured", "nm")
OWN_PATTERN = True  # the unpruned baseline: one run, whatever the grid's patterns


def prune_matrix(weight, stats, pattern) -> MatrixResult:
    return MatrixResult(keep=torch.ones_like(weight, dtype=torch.bool))
