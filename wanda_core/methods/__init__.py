"""One module per pruning method, behind one registry.

A method is any module that implements this contract (the built-in ones below, a module of an
installed package under the entry-point group `wanda_core.methods`, or any importable module given
by its dotted path: `--method mypkg.my_method`, `method: mypkg.my_method` in the config).

Required:
  NAME       its name (in logs and reports)
  STATS      the calibration statistics it needs: None, a kind ("sqnorm", "hessian", "moments")
             or a tuple of kinds (see base.Stats)
  PARAMS     its options and their defaults: {name: default}
  PATTERNS   the pattern kinds it accepts: "unstructured", "nm"
  prune_matrix(weight, stats, pattern, **params) -> MatrixResult
             weight: the [out_features, in_features] float32 matrix (a copy the method may modify);
             stats: a base.Stats with the kinds asked for (None when it asks for none);
             pattern: a masks.Pattern; params: every option, defaults filled in and checked.
Optional:
  check(pattern, params)  rejects bad option values with a WandaError (one line) before any model is
             loaded; it gets every option (defaults filled in) and must not run the method
  stats_kinds(params)     the statistics it needs, where they depend on its options (instead of STATS)
  OWN_PATTERN = True      its options fix the structure: the pattern's sparsity is ignored, and the
             workflow runs it once (pattern label "none")
  PROGRESSIVE_PARAMS      options every step of a progressive schedule sets (three_tier: never move
             a block to a denser tier); ignored when the last step is compared with the target
  MATRIX_NAME = True      prune_matrix also gets name=, the matrix's dotted name in the model
  ALLOCATION_STATS, block_score(matrices, params) -> float, allocate(scores, pattern, params)
             a sparsity per decoder block (OWL): a dense pre-pass scores each block from
             matrices = [(name, float32 weight, Stats)], and allocate gives one Pattern per block.
"""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from types import ModuleType

from ..errors import WandaError, first_line
from ..masks import Pattern
from .base import MatrixResult, Stats
from . import admm, alps, block, block_topk, dense, dsnot, hybrid_nm, magnitude, owl, ria, sparsegpt, sparseswaps, three_tier, wanda

__all__ = ["METHODS", "ENTRY_POINT_GROUP", "MatrixResult", "Stats", "get_method", "check_params", "stats_kinds",
           "needs_calibration"]

METHODS = {m.NAME: m for m in (dense, magnitude, wanda, sparsegpt, three_tier, block, block_topk, hybrid_nm,
                               ria, owl, dsnot, alps, admm, sparseswaps)}
ENTRY_POINT_GROUP = "wanda_core.methods"
REQUIRED = ("NAME", "STATS", "PARAMS", "PATTERNS", "prune_matrix")


def installed() -> dict:
    """The methods that installed packages declare: entry-point name -> entry point."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def get_method(name: str) -> ModuleType:
    """The method module `name` names: a built-in method, a dotted module path, or an installed entry point."""
    if name in METHODS:
        return METHODS[name]
    if "." in name:
        return check_contract(_import(name), name)
    if name not in _loaded:  # the grid asks for a method many times: read the installed packages once
        eps = installed()
        if name not in eps:
            raise WandaError(f"unknown method {name!r}{_how_to_add(eps)}")
        try:
            _loaded[name] = check_contract(eps[name].load(), name)
        except WandaError:
            raise
        except Exception as e:  # the package's own import error: name it on one line
            raise WandaError(f"method {name!r} (entry point {eps[name].value}) failed to import: "
                             f"{type(e).__name__}: {first_line(e)}") from None
    return _loaded[name]


_loaded: dict[str, ModuleType] = {}  # entry points loaded so far


def _import(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and name.startswith(e.name):  # the module itself (or its package) is not there
            raise WandaError(f"unknown method {name!r}: no module {e.name!r} on the Python path{_how_to_add(installed())}") from None
        raise WandaError(f"method module {name!r} failed to import: {type(e).__name__}: {first_line(e)}") from None
    except Exception as e:
        raise WandaError(f"method module {name!r} failed to import: {type(e).__name__}: {first_line(e)}") from None


def _how_to_add(eps: dict) -> str:
    others = f"; installed: {', '.join(sorted(eps))}" if eps else ""
    return (f": choose one of {', '.join(sorted(METHODS))}{others}; or add one: a module implementing the method "
            f"contract, given by its dotted path (mypkg.my_method) or installed under the entry-point group "
            f"{ENTRY_POINT_GROUP} (docs/methods.md)")


def check_contract(module, name: str):
    """A method from outside the package: the attributes the engine reads are there and well formed."""
    missing = [a for a in REQUIRED if not hasattr(module, a)]
    if missing:
        raise WandaError(f"method {name!r} ({getattr(module, '__name__', module)}) lacks {', '.join(missing)} "
                         f"of the method contract (docs/methods.md)")
    if not isinstance(module.PARAMS, dict) or not callable(module.prune_matrix):
        raise WandaError(f"method {name!r}: PARAMS must be a dict of option defaults and prune_matrix a function")
    if not module.PATTERNS or set(module.PATTERNS) - {"unstructured", "nm"}:
        raise WandaError(f"method {name!r}: PATTERNS must name 'unstructured' and/or 'nm', got {module.PATTERNS!r}")
    return module


def stats_kinds(method, params: dict) -> tuple[str, ...]:
    """The calibration statistics a method needs with these options (empty: no calibration)."""
    if hasattr(method, "stats_kinds"):
        return tuple(method.stats_kinds(params))
    kinds = method.STATS
    kinds = () if kinds is None else (kinds,) if isinstance(kinds, str) else tuple(kinds)
    if hasattr(method, "allocate"):  # a dense pre-pass over the model decides each block's sparsity
        kinds = tuple(dict.fromkeys((*kinds, method.ALLOCATION_STATS)))
    return kinds


def needs_calibration(method, params: dict | None = None) -> bool:
    """Whether pruning needs calibration windows: for statistics, or for a per-block allocation
    (OWL over magnitude prunes without statistics, but its allocation pre-pass needs them)."""
    return bool(stats_kinds(method, {**method.PARAMS, **(params or {})})) or hasattr(method, "allocate")


def check_params(method, pattern: Pattern, params: dict) -> dict:
    """Every option of `method` for `pattern`, defaults filled in; unknown options, unsupported
    patterns and bad values (the method's check) fail here, before any model is loaded. Runs nothing."""
    unknown = set(params) - set(method.PARAMS)
    if unknown:
        allowed = ", ".join(sorted(method.PARAMS)) or "none"
        raise WandaError(f"method {method.NAME!r} has no option {sorted(unknown)[0]!r} (options: {allowed})")
    if pattern.kind not in method.PATTERNS:
        raise WandaError(f"method {method.NAME!r} does not support pattern {pattern}")
    params = {**method.PARAMS, **params}
    if hasattr(method, "check"):
        method.check(pattern, params)
    return params
