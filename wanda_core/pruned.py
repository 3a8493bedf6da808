"""Pruned weights in a compact file: per matrix a bit-packed keep-mask, and the kept values only
when the method changed them (SparseGPT's updates), in the model's dtype.

A mask costs 1 bit per weight, so a file of a method that keeps the dense values (magnitude, Wanda,
RIA, the block patterns) is 1/32 of a float32 model. Evaluations load the dense model and apply
this file instead of pruning again; the masks alone can also be re-applied (apply_masks).
"""
from __future__ import annotations

import json

import torch

from .errors import WandaError
from .fingerprint import check_model
from .io import atomic_path
from .masks import pack_mask, unpack_mask
from .model import all_targets


def save_pruned(model, path, masks: dict | None = None, metadata: dict | None = None, values: bool = True) -> None:
    """Write the mask of every pruned matrix, and with values=True its kept values (a method that
    changed them). `masks`: packed masks from prune(keep_masks=True); without them the mask is
    taken as the non-zero pattern of the weights."""
    from safetensors.torch import save_file

    tensors, shapes = {}, {}
    for t in all_targets(model):
        w = t.weight().detach()
        packed = masks[t.name] if masks is not None else pack_mask(w != 0)
        tensors[f"{t.name}.mask"] = packed
        if values:
            keep = unpack_mask(packed, tuple(w.shape)).to(w.device)
            tensors[f"{t.name}.values"] = w[keep].cpu().contiguous()
        shapes[t.name] = list(w.shape)
    meta = {k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in (metadata or {}).items()}
    meta["shapes"] = json.dumps(shapes)
    meta["values"] = json.dumps(values)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def _read(path):
    from safetensors import safe_open

    try:
        f = safe_open(str(path), framework="pt")
        return f, json.loads(f.metadata()["shapes"])
    except FileNotFoundError:
        raise WandaError(f"pruned-weights file not found: {path}") from None
    except Exception as e:
        raise WandaError(f"cannot read pruned-weights file {path}: {e}") from None


def read_metadata(path) -> dict:
    f, _ = _read(path)
    return dict(f.metadata())


def read_masks(path) -> dict:
    """The keep-mask of every pruned matrix in the file: {name: bool tensor [out, in]} (on the CPU)."""
    f, shapes = _read(path)
    return {name: unpack_mask(f.get_tensor(f"{name}.mask"), tuple(shape)) for name, shape in shapes.items()}


def _apply(model, path, with_values: bool) -> int:
    f, shapes = _read(path)
    check_model(f.metadata().get("model_fingerprint"), model, f"pruned-weights file {path}")
    with_values = with_values and json.loads(f.metadata().get("values", "true"))
    targets = {t.name: t for t in all_targets(model)}
    missing = sorted(set(shapes) ^ set(targets))
    if missing:
        raise WandaError(f"pruned-weights file {path} does not match the model (layer {missing[0]})")
    with torch.no_grad():
        for name, t in targets.items():
            w = t.weight()
            if list(w.shape) != shapes[name]:
                raise WandaError(f"pruned-weights file {path}: {name} has shape {shapes[name]}, the model {list(w.shape)}")
            keep = unpack_mask(f.get_tensor(f"{name}.mask"), tuple(w.shape)).to(w.device)
            if with_values:
                new = torch.zeros_like(w)
                new[keep] = f.get_tensor(f"{name}.values").to(w.device, w.dtype)
            else:
                new = w.masked_fill(~keep, 0)
            t.set_weight(new)
    return len(targets)


def load_pruned(model, path) -> int:
    """Replace every pruned matrix of the dense `model` by the file's weights (its masks applied to
    the model's own values when the file has none); returns how many."""
    return _apply(model, path, with_values=True)


def apply_masks(model, path) -> int:
    """Zero the weights the file's masks drop, keeping the model's own values (no SparseGPT update)."""
    return _apply(model, path, with_values=False)
