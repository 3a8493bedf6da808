"""The sequential pruning engine, as in the Wanda and SparseGPT papers.

Capture the hidden states (and every other argument) entering block 0 for the calibration
windows; then block by block: run the dense block with hooks that accumulate input statistics
of its weight matrices, prune every matrix, and run the pruned block again to produce the next
block's inputs. Only the current block needs to be on the compute device.
"""
from __future__ import annotations

import contextlib
import logging
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import WandaError
from .masks import parse_pattern, pack_mask
from .methods import Stats, check_params, get_method
from .model import Target, find_blocks, find_targets, max_positions, resolve_device

log = logging.getLogger("wanda_core")
progress_log = logging.getLogger("wanda_core.progress")  # one line per block: where a long job is


class _StopForward(Exception):
    pass


def _to(obj, device, dtype=None):
    """Move the tensors of a (nested) argument structure to `device` (floating ones to `dtype`)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, dtype) if dtype is not None and obj.is_floating_point() else obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    return obj


def _move_outside_blocks(model, blocks, device) -> None:
    """Move every parameter and buffer that is not inside a decoder block (embeddings, rotary...)."""
    inside = {id(m) for m in blocks.modules()}
    for mod in model.modules():
        if id(mod) in inside:
            continue
        for p in mod._parameters.values():
            if p is not None:
                p.data = p.data.to(device)
        for key, buf in mod._buffers.items():
            if buf is not None:
                mod._buffers[key] = buf.to(device)


def _block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class BlockInputs:
    """Hidden states entering the current block, batch by batch, with the block's other arguments.

    The other arguments (attention mask, position ids, rotary embeddings, ...) are identical for
    batches of equal size, so they are kept once per batch size.
    """

    def __init__(self):
        self.hidden: list[torch.Tensor] = []
        self.extras: dict[int, tuple[tuple, dict]] = {}
        self.store = torch.device("cpu")  # where the hidden states are kept between blocks
        self.dtype = torch.float32  # the model's activation dtype

    def hook(self, module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.hidden.append(hidden.detach())
        self.extras.setdefault(hidden.shape[0], (tuple(args[1:]), kwargs))
        raise _StopForward

    def run(self, block, compute: torch.device, replace: bool, dtype: torch.dtype | None = None) -> None:
        """Run `block` on every batch; with replace=True its outputs become the new inputs.

        dtype: run in this dtype (the float32 fallback) instead of the stored one. A replacing run
        whose output overflows the stored dtype recomputes that batch in float32 and keeps it so.
        """
        for j, hidden in enumerate(self.hidden):
            out = self._forward(block, hidden, compute, dtype)
            if not replace:
                continue
            if not torch.isfinite(out).all() and (dtype or hidden.dtype) != torch.float32:
                log.warning("block output is not finite in %s; recomputing batch %d in float32", hidden.dtype, j)
                with in_float32(block):
                    out = self._forward(block, hidden, compute, torch.float32)
            stored = out.to(self.store, self.dtype)
            # Keep the wider dtype rather than infinities: the next block then falls back to float32 too.
            self.hidden[j] = stored if torch.isfinite(stored).all() else out.to(self.store)

    def _forward(self, block, hidden, compute, dtype):
        args, kwargs = self.extras[hidden.shape[0]]
        dtype = dtype or next(block.parameters()).dtype
        if dtype != self.dtype:  # rotary tables and masks follow the hidden states' dtype
            args, kwargs = _to(args, compute, dtype), _to(kwargs, compute, dtype)
        return _block_output(block(hidden.to(compute, dtype), *args, **kwargs))


@contextlib.contextmanager
def in_float32(module):
    """Run `module` in float32 for a while; every parameter and buffer gets its own dtype back after."""
    saved = [(t, t.data) for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    for t, data in saved:
        t.data = data.float()
    try:
        yield module
    finally:
        for t, data in saved:
            t.data = data


def capture_inputs(model, blocks, windows: torch.Tensor, compute, store, batch_size: int) -> BlockInputs:
    inputs = BlockInputs()
    # First among the pre-hooks: the capture stops the forward before anything else sees it.
    handle = blocks[0].register_forward_pre_hook(inputs.hook, with_kwargs=True, prepend=True)
    try:
        for start in range(0, windows.shape[0], batch_size):
            try:
                model(windows[start : start + batch_size].to(compute), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    if len(inputs.hidden) * batch_size < windows.shape[0]:
        raise WandaError("calibration forward pass never reached the first decoder block")
    inputs.hidden = [h.to(store) for h in inputs.hidden]
    inputs.store, inputs.dtype = store, inputs.hidden[0].dtype
    inputs.extras = {b: _to(e, compute) for b, e in inputs.extras.items()}
    return inputs


def _stat_hooks(targets: list[Target], stats: dict[str, Stats], kind: str) -> list:
    """Forward hooks that feed each matrix's inputs to its Stats. Experts see only their own tokens."""
    handles, by_experts = [], {}
    previous = {"x": None, "name": None}  # the input the last hook saw, and whose statistics it went to
    owner = {}  # matrix -> the matrix whose statistics it shares
    for t in targets:
        if t.kind == "expert":
            by_experts.setdefault(id(t.module), (t.module, []))[1].append(t)
            continue

        def hook(mod, args, out, name=t.name):
            x = args[0]
            if x is previous["x"]:
                # The same tensor as the matrix before (q/k/v, gate/up): one Stats object serves both,
                # which saves an x^T x product (SparseGPT) and its memory.
                owner[name] = previous["name"]
                stats[name] = stats[previous["name"]]
                return
            if owner.get(name, name) != name:
                raise WandaError(f"{name}: its input changed from one batch to the next; cannot share statistics")
            stats[name].add(x.detach(), kind)
            previous["x"], previous["name"] = x, name

        handles.append(t.module.register_forward_hook(hook))
    for experts, group in by_experts.values():
        handles.append(experts.register_forward_pre_hook(_expert_hook(group, stats, kind), with_kwargs=True))
    return handles


def _expert_hook(targets: list[Target], stats: dict[str, Stats], kind: str):
    """Statistics of fused experts: route each expert's tokens through its own up/gate slice."""
    by_param = {(t.param, t.expert): t for t in targets}

    def hook(mod, args, kwargs):
        names = ("hidden_states", "top_k_index", "top_k_weights")
        values = dict(zip(names, args), **{k: v for k, v in kwargs.items() if k in names})
        hidden, index = values["hidden_states"].detach(), values["top_k_index"]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        up_name = "gate_up_proj" if ("gate_up_proj", 0) in by_param else "up_proj"
        for e in range(getattr(mod, up_name).shape[0]):
            tokens = (index == e).any(dim=-1).nonzero().squeeze(-1)
            if tokens.numel() == 0:
                continue
            x = hidden[tokens]
            up = by_param[(up_name, e)]
            stats[up.name].add(x, kind)
            h = F.linear(x, up.weight())
            bias = getattr(mod, f"{up_name}_bias", None)
            if bias is not None:
                h = h + bias[e]
            h = mod._apply_gate(h) if getattr(mod, "has_gate", True) and hasattr(mod, "_apply_gate") else mod.act_fn(h)
            down = by_param.get(("down_proj", e))
            if down is not None:
                stats[down.name].add(h, kind)

    return hook


def _prune_matrix(t: Target, method, stats: Stats | None, pattern, params: dict) -> tuple[torch.Tensor, dict]:
    weight = t.weight()
    w = weight.detach().float().clone()
    if method.STATS and (stats is None or stats.count == 0):
        log.warning("%s: no calibration token reached this matrix; pruning it as if all inputs were equal", t.name)
        stats = Stats.uniform(w.shape[1], method.STATS, w.device)
    try:
        result = method.prune_matrix(w, stats, pattern, **params)
    except WandaError as e:
        raise WandaError(f"{t.name}: {e}") from None
    new = result.weight if result.weight is not None else w.masked_fill_(~result.keep, 0.0)
    t.set_weight(new.to(weight.dtype))
    return result.keep, result.info


def prune(
    model,
    method: str = "wanda",
    pattern: str = "unstructured",
    sparsity: float | None = 0.5,
    calibration: torch.Tensor | None = None,
    params: dict | None = None,
    device=None,
    batch_size: int = 8,
    offload_activations: bool | None = None,
    keep_masks: bool = False,
    progress: bool = True,
) -> dict:
    """Prune `model` in place; returns a report with one row per weight matrix.

    device: where blocks are computed (default CUDA if available); blocks that live elsewhere
    are moved there one at a time and back. offload_activations: keep the calibration
    activations on the CPU (default: only when they would not fit on the compute device).
    """
    m = get_method(method)
    pat = parse_pattern(pattern, None if "nm" == _kind(pattern) else sparsity)
    params = check_params(m, pat, dict(params or {}))
    path, blocks = find_blocks(model)
    home = next(blocks.parameters()).device
    compute = resolve_device(device) if device is not None else home
    model_name = getattr(model.config, "_name_or_path", type(model).__name__) or type(model).__name__
    inputs = None
    if m.STATS:
        inputs = _prepare_calibration(model, blocks, calibration, compute, home, batch_size, offload_activations)

    layers, masks = [], {}
    t0 = time.perf_counter()
    if compute.type == "cuda":
        torch.cuda.reset_peak_memory_stats(compute)
    bar = tqdm(enumerate(blocks), total=len(blocks), desc=f"{m.NAME} {pat} {model_name}", disable=not progress)
    with torch.no_grad():
        for i, block in bar:
            fetch_block(block, compute)
            targets = find_targets(block, f"{path}.{i}")
            stats = _block_stats(block, targets, inputs, m.STATS, compute, f"{model_name} block {i}") if m.STATS else {}
            for t in targets:
                tb = time.perf_counter()
                keep, info = _prune_matrix(t, m, stats.get(t.name), pat, params)
                if keep_masks:
                    masks[t.name] = pack_mask(keep)
                layers.append({
                    "layer": t.name, "block": i, "rows": t.shape[0], "cols": t.shape[1],
                    "sparsity": 1.0 - keep.float().mean().item(), "seconds": time.perf_counter() - tb,
                    "tokens": stats[t.name].count if t.name in stats else 0, "peak_memory_bytes": _peak_memory(compute), **info,
                })
            if inputs is not None and i + 1 < len(blocks):
                inputs.run(block, compute, replace=True)
            evict_block(block, home)
            # Without a progress bar (workflow jobs), one line per block says where the job is; the CLI's
            # --log shows these lines (logger wanda_core.progress) on the terminal too.
            (progress_log.debug if progress else progress_log.info)(
                "%s %s %s: pruned block %d/%d (%.1f s)", model_name, m.NAME, pat, i + 1, len(blocks), time.perf_counter() - t0)
    if inputs is not None and compute != home:
        _move_outside_blocks(model, blocks, home)
    pruned = sum(r["sparsity"] * r["rows"] * r["cols"] for r in layers)
    total = sum(r["rows"] * r["cols"] for r in layers)
    report = {
        "method": m.NAME, "pattern": str(pat), "target_sparsity": pat.sparsity, "params": params,
        "sparsity": pruned / max(total, 1), "pruned_params": total, "seconds": time.perf_counter() - t0,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(compute) if compute.type == "cuda" else None,
        "layers": layers,
    }
    if keep_masks:
        report["masks"] = masks
    return report


def _peak_memory(device: torch.device) -> int:
    """Peak accelerator memory so far, or on the CPU the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _kind(pattern: str) -> str:
    return "nm" if ":" in str(pattern) else "unstructured"


def _prepare_calibration(model, blocks, calibration, compute, home, batch_size, offload) -> BlockInputs:
    if calibration is None:
        raise WandaError("this method needs calibration windows (calibration=...)")
    calibration = torch.as_tensor(calibration)
    if calibration.dim() != 2 or calibration.shape[0] == 0 or calibration.shape[1] < 2:
        raise WandaError(f"calibration windows must be a [nsamples, seqlen] tensor, got shape {tuple(calibration.shape)}")
    if batch_size < 1:
        raise WandaError(f"batch_size must be at least 1, got {batch_size}")
    limit = max_positions(model)
    if limit and calibration.shape[1] > limit:
        raise WandaError(f"calibration seqlen {calibration.shape[1]} is longer than the model supports ({limit})")
    hidden = getattr(model.config, "hidden_size", None) or model.get_input_embeddings().weight.shape[1]
    if offload is None:
        offload = False
        if compute.type == "cuda":
            need = calibration.numel() * hidden * next(model.parameters()).element_size()
            offload = need > 0.4 * torch.cuda.mem_get_info(compute)[0]
    store = torch.device("cpu") if offload else compute
    if compute != home:
        _move_outside_blocks(model, blocks, compute)
    inputs = capture_inputs(model, blocks, calibration.long(), compute, store, batch_size)
    if store.type == "cpu" and compute.type == "cuda":
        inputs.hidden = [h.pin_memory() for h in inputs.hidden]
    return inputs


def _block_stats(block, targets, inputs: BlockInputs, kind: str, compute, where: str) -> dict[str, Stats]:
    """Input statistics of every matrix of `block`; recomputed in float32 if they overflow."""
    for dtype in (None, torch.float32):
        stats = {t.name: Stats() for t in targets}
        handles = _stat_hooks(targets, stats, kind)
        try:
            with in_float32(block) if dtype else contextlib.nullcontext():
                inputs.run(block, compute, replace=False, dtype=dtype)
        finally:
            for h in handles:
                h.remove()
        bad = [name for name, s in stats.items() if not s.finite()]
        if not bad:
            return stats
        if dtype is None and next(block.parameters()).dtype != torch.float32:
            log.warning("%s: statistics of %s are not finite in %s; recomputing this block's statistics in float32",
                        where, ", ".join(bad), next(block.parameters()).dtype)
            continue
        break
    raise WandaError(f"{bad[0]}: calibration statistics are not finite even in float32 ({where}); the activations entering this block overflow")


def fetch_block(block, compute: torch.device) -> None:
    """Bring one decoder block to the compute device (a no-op when it lives there)."""
    block.to(compute)


def evict_block(block, home: torch.device) -> None:
    """Send a block back where the model's weights live, freeing the compute device for the next."""
    block.to(home)
