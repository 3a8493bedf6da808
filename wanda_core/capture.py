"""Activation capture and statistics hooks: what the engine's block loop runs inside each block.

capture_inputs stops a forward of the calibration windows at the first decoder block and keeps what
enters it (BlockInputs: hidden states per batch, and the block's other arguments once per batch size);
BlockInputs then runs any block on them. stat_hooks feed each weight matrix's inputs to its Stats
during such a forward (experts see only their own tokens), and block_stats does one such forward,
recomputed in float32 when half-precision statistics overflow.
"""
from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F

from .errors import WandaError
from .methods import Stats
from .model import Target, block_arguments, max_positions
from .timing import untimed

log = logging.getLogger("wanda_core")


class _StopForward(Exception):
    pass


def to_device(obj, device, dtype=None):
    """Move the tensors of a (nested) argument structure to `device` (floating ones to `dtype`)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, dtype) if dtype is not None and obj.is_floating_point() else obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device, dtype) for k, v in obj.items()}
    return obj


def move_outside_blocks(model, blocks, device) -> None:
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


def block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class BlockInputs:
    """Hidden states entering the current block, batch by batch, with the block's other arguments.

    The other arguments (attention mask, position ids, rotary embeddings, ...) are identical for
    batches of equal size, so they are kept once per batch size.
    """

    def __init__(self):
        self.hidden: list[torch.Tensor] = []
        self.extras: dict[int, tuple[tuple, dict]] = {}
        self.own: dict[tuple[int, int], tuple[tuple, dict]] = {}  # (id(block), batch size) -> its own arguments, if not block 0's
        self.store = torch.device("cpu")  # where the hidden states are kept between blocks
        self.dtype = torch.float32  # the model's activation dtype
        self.autocast: torch.dtype | None = None  # block forwards in this dtype (bf16 on AMX CPUs)

    def hook(self, module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.hidden.append(hidden.detach())
        self.extras.setdefault(hidden.shape[0], (tuple(args[1:]), kwargs))
        raise _StopForward

    def run(self, block, compute: torch.device, dtype: torch.dtype | None = None) -> None:
        """Run `block` on every batch for its hooks (statistics); the outputs are dropped."""
        for hidden in self.hidden:
            self._forward(block, hidden, compute, dtype)

    def outputs(self, block, compute: torch.device, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """The block's outputs for every batch (the next block's inputs), the inputs left as they are."""
        return [self._output(block, hidden, compute, dtype) for hidden in self.hidden]

    def advance(self, block, compute: torch.device) -> None:
        """Replace the inputs by the block's outputs in place (one batch of extra memory)."""
        for j, hidden in enumerate(self.hidden):
            self.hidden[j] = self._output(block, hidden, compute, None)

    def _output(self, block, hidden, compute, dtype):
        out = self._forward(block, hidden, compute, dtype)
        if not torch.isfinite(out).all() and (dtype or hidden.dtype) != torch.float32:
            log.warning("block output is not finite in %s; recomputing it in float32", hidden.dtype)
            with in_float32(block):
                out = self._forward(block, hidden, compute, torch.float32)
        stored = out.to(self.store, self.dtype)
        if stored is out:  # checked above
            return out
        # Keep the wider dtype rather than infinities: the next block then falls back to float32 too.
        return stored if torch.isfinite(stored).all() else out.to(self.store)

    def _forward(self, block, hidden, compute, dtype):
        """dtype: run in this dtype (the float32 fallback) instead of the block's own."""
        args, kwargs = self.own.get((id(block), hidden.shape[0])) or self.extras[hidden.shape[0]]
        fast = self.autocast is not None and dtype is None  # never in the float32 fallback
        dtype = dtype or next(block.parameters()).dtype
        if dtype != self.dtype:  # rotary tables and masks follow the hidden states' dtype
            args, kwargs = to_device(args, compute, dtype), to_device(kwargs, compute, dtype)
        # cache_enabled=False: one_pass changes weights in the middle of a forward.
        with torch.autocast(compute.type, dtype=self.autocast, cache_enabled=False) if fast else contextlib.nullcontext():
            return block_output(block(hidden.to(compute, dtype), *args, **kwargs))


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
    inputs.extras = {b: to_device(e, compute) for b, e in inputs.extras.items()}
    inputs.own = {(k, b): to_device(e, compute) for b in inputs.extras for k, e in block_arguments(model, blocks, windows[:b].to(compute)).items()}
    return inputs


def calibration_inputs(model, blocks, calibration, batch_size: int, *, compute: torch.device, home: torch.device,
                       offload: bool | None, autocast: torch.dtype | None) -> BlockInputs:
    """The calibration windows' inputs to block 0 (checked), in batches of `batch_size`, for blocks computed on
    `compute` that live on `home`. offload: keep them on the CPU (None: only where they would not fit on the
    compute device). Whatever is outside the blocks (embeddings, rotary tables) moves to `compute`."""
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
        move_outside_blocks(model, blocks, compute)
    inputs = capture_inputs(model, blocks, calibration.long(), compute, store, batch_size)
    if store.type == "cpu" and compute.type == "cuda":
        inputs.hidden = [h.pin_memory() for h in inputs.hidden]
    inputs.autocast = autocast
    return inputs


def _full_precision(hook):
    """Statistics and pruning inside a hook never run under the forward's autocast (bf16 compute)."""

    def run(mod, args, *kwargs):
        first = next(t for t in (*args, *(kwargs[0].values() if kwargs else ())) if isinstance(t, torch.Tensor))
        with torch.autocast(first.device.type, enabled=False):
            return hook(mod, args, *kwargs)

    return run


def stat_hooks(targets: list[Target], stats: dict[str, Stats], kinds: tuple, chunk: int = 0, prune=None,
               timer=untimed) -> list:
    """Forward pre-hooks that feed each matrix's inputs to its Stats. Experts see only their own tokens.

    chunk: add the inputs `chunk` samples at a time (bounded float32 copies, and the same summation
    order as batches of that size). prune(target): called once a matrix has seen all its inputs,
    before its own forward (one_pass). timer: a PhaseTimer, which counts the additions as statistics.
    """
    handles, by_experts = [], {}
    previous = {"x": None, "name": None}  # the input the last hook saw, and whose statistics it went to
    owner = {}  # matrix -> the matrix whose statistics it shares
    for t in targets:
        if t.kind == "expert":
            by_experts.setdefault(id(t.module), (t.module, []))[1].append(t)
            continue

        @_full_precision
        def hook(mod, args, t=t):
            x, name = args[0], t.name
            if x is previous["x"]:
                # The same tensor as the matrix before (q/k/v, gate/up): one Stats object serves both,
                # which saves an x^T x product (SparseGPT) and its memory.
                owner[name] = previous["name"]
                stats[name] = stats[previous["name"]]
            elif owner.get(name, name) != name:
                raise WandaError(f"{name}: its input changed from one batch to the next; cannot share statistics")
            else:
                with timer("statistics"):
                    for part in x.detach().split(chunk) if chunk and x.dim() > 2 else (x.detach(),):
                        stats[name].add(part, kinds)
                previous["x"], previous["name"] = x, name
            if prune is not None:
                prune(t)

        handles.append(t.module.register_forward_pre_hook(hook))
    for experts, group in by_experts.values():
        handles.append(experts.register_forward_pre_hook(_expert_hook(group, stats, kinds, prune, timer), with_kwargs=True))
    return handles


def _expert_hook(targets: list[Target], stats: dict[str, Stats], kinds: tuple, prune=None, timer=untimed):
    """Statistics of fused experts: route each expert's tokens through its own up/gate slice."""
    by_param = {(t.param, t.expert): t for t in targets}

    @_full_precision
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
            with timer("statistics"):
                stats[up.name].add(x, kinds)
            if prune is not None:
                prune(up)  # one_pass: down_proj's statistics then come from the pruned up/gate
            h = F.linear(x, up.weight())
            bias = getattr(mod, f"{up_name}_bias", None)
            if bias is not None:
                h = h + bias[e]
            h = mod._apply_gate(h) if getattr(mod, "has_gate", True) and hasattr(mod, "_apply_gate") else mod.act_fn(h)
            down = by_param.get(("down_proj", e))
            if down is not None:
                with timer("statistics"):
                    stats[down.name].add(h, kinds)
                if prune is not None:
                    prune(down)

    return hook


def block_stats(block, targets, inputs: BlockInputs, kinds: tuple, compute, where: str, chunk: int = 0,
                outputs: bool = False, timer=untimed) -> tuple[dict[str, Stats], list | None]:
    """Input statistics of every matrix of `block` (and, with outputs=True, its outputs from the same
    forward); recomputed in float32 if they overflow."""
    for dtype in (None, torch.float32):
        stats = {t.name: Stats() for t in targets}
        handles = stat_hooks(targets, stats, kinds, chunk, timer=timer)
        try:
            with in_float32(block) if dtype else contextlib.nullcontext(), timer("forward"):
                outs = inputs.outputs(block, compute, dtype) if outputs else inputs.run(block, compute, dtype)
        finally:
            for h in handles:
                h.remove()
        bad = [name for name, s in stats.items() if not s.finite()]
        if not bad:
            return stats, outs
        if dtype is None and next(block.parameters()).dtype != torch.float32:
            log.warning("%s: statistics of %s are not finite in %s; recomputing this block's statistics in float32",
                        where, ", ".join(bad), next(block.parameters()).dtype)
            continue
        break
    raise WandaError(f"{bad[0]}: calibration statistics are not finite even in float32 ({where}); the activations entering this block overflow")
