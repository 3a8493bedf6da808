"""The unpruned baseline row."""
import torch

from . import MatrixResult

NAME = "dense"
STATS = None
PARAMS: dict = {}
PATTERNS = ("unstructured", "nm")


def prune_matrix(weight, stats, pattern) -> MatrixResult:
    return MatrixResult(keep=torch.ones_like(weight, dtype=torch.bool))
