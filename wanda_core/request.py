"""A prune request, resolved and checked once: (method, pattern, sparsity, options) -> PruneRequest.

The workflow's config check, the CLI and the engine all go through `resolve`, so a bad request
fails the same way everywhere, before any model is loaded. Nothing here runs a method.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from .errors import WandaError
from .masks import Pattern, parse_pattern
from .methods import check_params, get_method, needs_calibration, stats_kinds


@dataclass(frozen=True)
class PruneRequest:
    method: str  # as given: a built-in name, an installed entry point's name or a dotted module path
    module: ModuleType  # the method's module (the contract in wanda_core.methods)
    pattern: Pattern  # the pattern of every block; with a sparsity per block, their mean
    params: dict  # every option of the method, defaults filled in, checked
    stats: tuple[str, ...]  # the calibration statistics the method needs with these options
    block_sparsity: tuple[float, ...] | None = None  # one sparsity per decoder block (unstructured only)

    @property
    def needs_calibration(self) -> bool:
        """Calibration windows are needed for statistics, or for a per-block allocation pre-pass (OWL)."""
        return needs_calibration(self.module, self.params)

    @property
    def own_pattern(self) -> bool:
        return own_pattern(self.module)


def own_pattern(module) -> bool:
    """Whether a method's options fix its structure (the pattern's sparsity is ignored)."""
    return bool(getattr(module, "OWN_PATTERN", False))


def pattern_of(pattern: str | Pattern, sparsity: float | None) -> Pattern:
    """The pattern of a request: an N:M pattern fixes its own sparsity, so `sparsity` only counts for
    unstructured ones (and is checked there)."""
    if isinstance(pattern, Pattern):
        return pattern
    return parse_pattern(pattern, None if ":" in str(pattern) else sparsity)


def resolve(method: str, pattern: str | Pattern = "unstructured", sparsity=0.5, params: dict | None = None) -> PruneRequest:
    """Check a prune request and fill in what follows from it. sparsity: one fraction, a list of one
    per decoder block (unstructured only; the engine checks the count), or None for N:M."""
    module = get_method(method)
    block_sparsity = None
    if isinstance(sparsity, (list, tuple)):
        if ":" in str(pattern):
            raise WandaError(f"a sparsity per block applies to unstructured patterns, not {pattern}")
        if not sparsity:
            raise WandaError("a sparsity per block needs at least one value")
        block_sparsity = tuple(pattern_of(pattern, s).sparsity for s in sparsity)
        sparsity = sum(block_sparsity) / len(block_sparsity)
    pat = pattern_of(pattern, sparsity)
    params = check_params(module, pat, dict(params or {}))
    return PruneRequest(method, module, pat, params, stats_kinds(module, params), block_sparsity)
