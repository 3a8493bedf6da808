"""Input-norm power: score |W_ij| * ||X_j||^power, compared within each output row.

power 1 is Wanda's score, power 0 plain magnitude. A method from outside wanda_core:
`wanda-core prune --method mypkg.norm_power --param power=0.5 ...` with mypkg importable.
"""
import math

from wanda_core.errors import WandaError
from wanda_core.masks import pattern_mask
from wanda_core.methods.base import MatrixResult

NAME = "norm_power"
STATS = "sqnorm"  # the engine sums x_j^2 over the calibration tokens, for every input j
PARAMS = {"power": 1.0, "per_row": True}
PATTERNS = ("unstructured", "nm")


def check(pattern, params):
    """Runs before any model is loaded, with every option filled in: reject bad values in one line."""
    power = params["power"]
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not math.isfinite(power) or power < 0:
        raise WandaError(f"norm_power power must be a number >= 0, got {power!r}")
    if not isinstance(params["per_row"], bool):
        raise WandaError(f"norm_power per_row must be true or false, got {params['per_row']!r}")


def prune_matrix(weight, stats, pattern, power=1.0, per_row=True):
    """weight: [out, in] float32 (ours to modify); stats.sqnorm: [in]. Returns the keep-mask."""
    score = weight.abs() * stats.sqnorm.sqrt().pow(power).unsqueeze(0)
    keep = pattern_mask(score, pattern, per_row=per_row)  # True = kept; N:M or unstructured
    return MatrixResult(keep=keep, info={"norm_power": power})  # info: extra columns of the per-layer table
