"""The pruning engine: block by block through the decoder, as in the Wanda and SparseGPT papers.

Capture the hidden states (and every other argument) entering block 0 for the calibration
windows; then block by block, with one of three pipelines:
  sequential   (the papers') run the dense block with hooks that accumulate input statistics of
               its weight matrices, prune every matrix, run the pruned block again to produce
               the next block's inputs: two forwards per block.
  one_pass     run the block once, the whole calibration set as one batch; each matrix is pruned
               when the forward reaches it, from inputs that already went through the pruned
               matrices before it (SparseGPT's "true sequential" order), and the same forward
               produces the next block's inputs.
  independent  statistics of every matrix from the dense model's activations (one dense forward
               per block, no error propagation), as llm-compressor's "basic" pipeline.
Only the current block needs to be on the compute device.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import platform
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import WandaError
from .masks import Pattern, pack_mask
from .methods import Stats
from .request import PruneRequest, resolve
from .model import DTYPES, Target, block_arguments, find_blocks, find_targets, max_positions, resolve_device

log = logging.getLogger("wanda_core")
progress_log = logging.getLogger("wanda_core.progress")  # one line per block: where a long job is


class _StopForward(Exception):
    pass


class PhaseTimer:
    """Seconds of a prune per phase: forward (capture and propagation), statistics, method (score,
    mask, weight update) and saving (the CLI's). Each second counts once: a phase entered inside
    another (statistics hooks and one_pass's pruning run inside a block forward) pauses the outer
    one. On CUDA every switch synchronizes, so that queued kernels count in the phase that queued them."""

    PHASES = ("forward", "statistics", "method", "saving")

    def __init__(self, device: torch.device | None = None):
        self.seconds = dict.fromkeys(self.PHASES, 0.0)
        self._stack: list[str] = []
        self._since = time.perf_counter()
        self._cuda = device is not None and device.type == "cuda"

    def _switch(self) -> None:
        if self._cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self._stack:
            self.seconds[self._stack[-1]] += now - self._since
        self._since = now

    @contextlib.contextmanager
    def __call__(self, phase: str):
        self._switch()
        self._stack.append(phase)
        try:
            yield
        finally:
            self._switch()
            self._stack.pop()

    def split(self, total: float) -> dict:
        """The phases' seconds, and what none of them covers (model moves, bookkeeping) as 'other'."""
        out = {k: round(v, 3) for k, v in self.seconds.items()}
        out["other"] = round(max(total - sum(self.seconds.values()), 0.0), 3)
        return out


def _untimed(phase: str):
    return contextlib.nullcontext()


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


class _KeptHeap:
    """The heap while freed_memory_kept() is on: after_block() hands freed memory back once more is
    kept than twice what the first block left free (its forward's temporaries), so that long-lived
    tensors scattered between freed ones (pruned weights, masks) cannot grow the process without bound."""

    def __init__(self, libc):
        self.libc, self.limit = libc, None

    def after_block(self) -> None:
        free = self.libc.mallinfo2().fordblks
        if self.limit is None:
            self.limit = max(2 * free, 256 * 2**20)
        elif free > self.limit:
            self.libc.malloc_trim(0)


class _NoHeap:
    def after_block(self) -> None:
        pass


@contextlib.contextmanager
def freed_memory_kept():
    """Large CPU tensors from the heap, and freed memory kept there for the next block, while inside.

    glibc serves every allocation over 32 MB with its own mmap and unmaps it when freed, so the next
    tensor of that size faults all its pages in again, zeroed by the kernel. A block forward of the
    whole calibration set (one_pass: 32 x 512 tokens of SmolLM2 make 100 MB MLP activations) spent a
    sixth of its CPU time there; batches of 8 hardly any. Values are unchanged: only where memory
    comes from. Yields an object whose after_block() bounds what is kept (call it after each block);
    after, glibc's limits are set back and the kept memory is returned (malloc_trim).
    """
    libc = None
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        with contextlib.suppress(OSError):
            libc = ctypes.CDLL("libc.so.6")
    if libc is None or not hasattr(libc, "mallinfo2"):  # mallinfo2: glibc 2.33 and later
        yield _NoHeap()
        return
    libc.mallinfo2.restype = _MallInfo2
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield _KeptHeap(libc)
    finally:
        libc.mallopt(_M_MMAP_MAX, 65536)  # glibc's defaults
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
        libc.malloc_trim(0)


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
            args, kwargs = _to(args, compute, dtype), _to(kwargs, compute, dtype)
        # cache_enabled=False: one_pass changes weights in the middle of a forward.
        with torch.autocast(compute.type, dtype=self.autocast, cache_enabled=False) if fast else contextlib.nullcontext():
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
    inputs.own = {(k, b): _to(e, compute) for b in inputs.extras for k, e in block_arguments(model, blocks, windows[:b].to(compute)).items()}
    return inputs


def _full_precision(hook):
    """Statistics and pruning inside a hook never run under the forward's autocast (bf16 compute)."""

    def run(mod, args, *kwargs):
        first = next(t for t in (*args, *(kwargs[0].values() if kwargs else ())) if isinstance(t, torch.Tensor))
        with torch.autocast(first.device.type, enabled=False):
            return hook(mod, args, *kwargs)

    return run


def _stat_hooks(targets: list[Target], stats: dict[str, Stats], kinds: tuple, chunk: int = 0, prune=None,
                timer=_untimed) -> list:
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


def _expert_hook(targets: list[Target], stats: dict[str, Stats], kinds: tuple, prune=None, timer=_untimed):
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


PIPELINES = ("sequential", "one_pass", "independent")


def _prune_matrix(t: Target, method, stats: Stats | None, pattern, params: dict, kinds: tuple) -> tuple[torch.Tensor, dict, bool]:
    """Prune one matrix in place; returns (keep-mask, extra figures, whether kept values changed)."""
    weight = t.weight()
    w = weight.detach().float().clone()
    if kinds and (stats is None or stats.count == 0):
        log.warning("%s: no calibration token reached this matrix; pruning it as if all inputs were equal", t.name)
        stats = Stats.uniform(w.shape[1], kinds, w.device)
    named = {"name": t.name} if getattr(method, "MATRIX_NAME", False) else {}
    try:
        result = method.prune_matrix(w, stats, pattern, **params, **named)
    except WandaError as e:
        raise WandaError(f"{t.name}: {e}") from None
    new = result.weight if result.weight is not None else w.masked_fill_(~result.keep, 0.0)
    t.set_weight(new.to(weight.dtype))
    return result.keep, result.info, result.weight is not None


def prune(
    model,
    method: str = "wanda",
    pattern: str = "unstructured",
    sparsity: float | list[float] | None = 0.5,
    calibration: torch.Tensor | None = None,
    params: dict | None = None,
    device=None,
    batch_size: int = 8,
    offload_activations: bool | None = None,
    keep_masks: bool = False,
    progress: bool = True,
    pipeline: str = "sequential",
    compute_dtype=None,
) -> dict:
    """Prune `model` in place; returns a report with one row per weight matrix.

    sparsity: one fraction, or one per decoder block (unstructured). pipeline: "sequential" (the
    papers'), "one_pass" or "independent" (see the module's docstring). compute_dtype: run block
    forwards in this dtype (e.g. "bfloat16" on CPUs with AMX) while statistics stay float32.
    device: where blocks are computed (default CUDA if available); blocks that live elsewhere
    are moved there one at a time and back. offload_activations: keep the calibration
    activations on the CPU (default: only when they would not fit on the compute device).
    """
    request = resolve(method, pattern, sparsity, params)
    m, params, kinds = request.module, request.params, request.stats
    if pipeline not in PIPELINES:
        raise WandaError(f"unknown pipeline {pipeline!r}: choose one of {', '.join(PIPELINES)}")
    path, blocks = find_blocks(model)
    patterns, pat = _block_patterns(request, len(blocks))
    home = next(blocks.parameters()).device
    compute = resolve_device(device) if device is not None else home
    autocast = _compute_dtype(compute_dtype, compute, next(blocks.parameters()).dtype)
    model_name = getattr(model.config, "_name_or_path", type(model).__name__) or type(model).__name__
    requested = pipeline
    t0 = time.perf_counter()
    timer = PhaseTimer(compute)
    if compute.type == "cuda":
        torch.cuda.reset_peak_memory_stats(compute)
    if kinds and pipeline == "one_pass" and not _one_batch_fits(model, blocks, calibration, compute, autocast):
        pipeline = "sequential"
    if hasattr(m, "allocate"):
        with timer("forward"):
            inputs = _prepare_calibration(model, blocks, calibration, compute, home, batch_size, offload_activations, autocast)
        patterns = _allocate(m, params, pat, path, blocks, inputs, compute, home, progress, model_name, timer)
        del inputs
    inputs = None
    if kinds:
        one_batch = len(calibration) if pipeline == "one_pass" and calibration is not None else batch_size
        with timer("forward"):
            inputs = _prepare_calibration(model, blocks, calibration, compute, home, one_batch, offload_activations, autocast)

    layers, masks, updated = [], {}, False
    bar = tqdm(enumerate(blocks), total=len(blocks), desc=f"{m.NAME} {pat} {model_name}", disable=not progress)
    with torch.no_grad(), freed_memory_kept() as heap:
        for i, block in bar:
            fetch_block(block, compute)
            targets = find_targets(block, f"{path}.{i}")
            rows = {}

            @timer("method")
            def prune_one(t, stats, i=i, rows=rows):
                nonlocal updated
                tb = time.perf_counter()
                keep, info, changed = _prune_matrix(t, m, stats, patterns[i], params, kinds)
                updated |= changed
                if keep_masks:
                    masks[t.name] = pack_mask(keep)
                rows[t.name] = {
                    "layer": t.name, "block": i, "rows": t.shape[0], "cols": t.shape[1],
                    "sparsity": 1.0 - keep.float().mean().item(), "block_sparsity": patterns[i].sparsity,
                    "seconds": time.perf_counter() - tb, "tokens": stats.count if stats is not None else 0,
                    "peak_memory_bytes": _peak_memory(compute), **info,
                }

            where = f"{model_name} block {i}"
            last = i + 1 == len(blocks)
            if not kinds:
                for t in targets:
                    prune_one(t, None)
            elif pipeline == "one_pass":
                _one_pass_block(block, targets, inputs, kinds, compute, prune_one, batch_size, where, last, timer)
            else:
                stats, outputs = _block_stats(block, targets, inputs, kinds, compute, where, batch_size,
                                              outputs=pipeline == "independent" and not last, timer=timer)
                for t in targets:
                    prune_one(t, stats.get(t.name))
                if outputs is not None:
                    inputs.hidden = outputs
                elif not last:
                    with timer("forward"):
                        inputs.advance(block, compute)
            layers += [rows[t.name] for t in targets]
            evict_block(block, home)
            heap.after_block()
            # Without a progress bar (workflow jobs), one line per block says where the job is; the CLI's
            # --log shows these lines (logger wanda_core.progress) on the terminal too.
            (progress_log.debug if progress else progress_log.info)(
                "%s %s %s: pruned block %d/%d (%.1f s)", model_name, m.NAME, pat, i + 1, len(blocks), time.perf_counter() - t0)
    if kinds and compute != home:
        _move_outside_blocks(model, blocks, home)
    pruned = sum(r["sparsity"] * r["rows"] * r["cols"] for r in layers)
    total = sum(r["rows"] * r["cols"] for r in layers)
    target = sum(r["block_sparsity"] * r["rows"] * r["cols"] for r in layers) / max(total, 1)
    seconds = time.perf_counter() - t0
    report = {
        "method": m.NAME, "pattern": str(pat), "target_sparsity": target, "params": params,
        "pipeline": pipeline if kinds else None, "compute_dtype": str(autocast).replace("torch.", "") if kinds and autocast else None,
        "sparsity": pruned / max(total, 1), "pruned_params": total, "seconds": seconds,
        "seconds_split": timer.split(seconds),  # the CLI adds the saving's seconds
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(compute) if compute.type == "cuda" else None,
        "updates_weights": updated, "layers": layers,
    }
    if kinds and requested != pipeline:
        report["pipeline_requested"] = requested
    if len({str(p) for p in patterns}) > 1 or (pat.kind == "unstructured" and len({p.sparsity for p in patterns}) > 1):
        report["block_sparsity"] = [p.sparsity for p in patterns]
        report["block_patterns"] = [str(p) for p in patterns]
    if keep_masks:
        report["masks"] = masks
    return report


def _block_patterns(request: PruneRequest, n_blocks: int) -> tuple[list[Pattern], Pattern]:
    """One pattern per block, and the pattern that stands for all of them (its mean sparsity)."""
    if request.block_sparsity is None:
        return [request.pattern] * n_blocks, request.pattern
    if len(request.block_sparsity) != n_blocks:
        raise WandaError(f"{len(request.block_sparsity)} block sparsities given for a model of {n_blocks} decoder blocks")
    return [Pattern("unstructured", s) for s in request.block_sparsity], request.pattern


def _compute_dtype(compute_dtype, compute: torch.device, model_dtype: torch.dtype) -> torch.dtype | None:
    """The autocast dtype of block forwards, or None to run them in the model's own dtype."""
    if compute_dtype in (None, "", "none"):
        return None
    if compute_dtype == "auto":
        # bf16 where the hardware computes it natively (AMX / avx512_bf16 CPUs, CUDA); else as loaded.
        native = torch.cuda.is_bf16_supported() if compute.type == "cuda" else _cpu_has_bf16()
        dtype = torch.bfloat16 if native else model_dtype
    else:
        try:
            dtype = compute_dtype if isinstance(compute_dtype, torch.dtype) else DTYPES[str(compute_dtype).replace("torch.", "")]
        except KeyError:
            raise WandaError(f"unknown compute dtype {compute_dtype!r}: choose one of {', '.join(DTYPES)}, auto or none") from None
    return None if dtype == model_dtype else dtype


def _cpu_has_bf16() -> bool:
    from .hardware import bf16_native

    return bf16_native("cpu")


def _one_batch_fits(model, blocks, calibration, compute: torch.device, autocast) -> bool:
    """Whether a block forward of the whole calibration set as one batch fits in memory (one_pass)."""
    if calibration is None:
        return True  # _prepare_calibration names the problem
    nsamples, seqlen = torch.as_tensor(calibration).shape[:2]
    tokens = nsamples * seqlen
    cfg = model.config
    hidden = getattr(cfg, "hidden_size", None) or model.get_input_embeddings().weight.shape[1]
    widest = max(max(t.shape) for t in find_targets(blocks[0], "block"))
    size = torch.finfo(autocast or next(blocks.parameters()).dtype).bits // 8
    # Inputs, outputs and residual of the block, the widest intermediate three times (gate, up, their
    # product), and float32 statistics chunks; eager attention also holds its score matrices.
    need = tokens * (3 * hidden + 3 * widest) * max(size, 4)
    if getattr(cfg, "_attn_implementation", "eager") == "eager":
        need += nsamples * (getattr(cfg, "num_attention_heads", 1) or 1) * seqlen * seqlen * 4
    if compute.type == "cuda":
        free = torch.cuda.mem_get_info(compute)[0] * 0.8
    else:
        free = _available_memory() * 0.5
    if need <= free:
        return True
    log.info("one_pass: the whole calibration set (%d x %d) as one batch needs about %.1f GB per block forward, "
             "more than the %.1f GB available; using the sequential pipeline", nsamples, seqlen, need / 2**30, free / 2**30)
    return False


def _available_memory() -> int:
    with contextlib.suppress(OSError, ValueError, StopIteration):
        line = next(line for line in open("/proc/meminfo") if line.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class _NotFinite(Exception):
    def __init__(self, name):
        self.name = name


def _one_pass_block(block, targets, inputs: BlockInputs, kinds, compute, prune_one, batch_size, where, last,
                    timer=_untimed) -> None:
    """Run the block once on the whole calibration set (one batch) and prune each matrix as the
    forward reaches it: every sample has then gone through the pruned matrices before it."""
    stats = {t.name: Stats() for t in targets}
    done = set()
    half = next(block.parameters()).dtype != torch.float32
    saved = {t.name: t.weight().detach().clone() for t in targets} if half else None

    def prune_reached(t):
        if t.name in done:
            return
        if stats[t.name].count and not stats[t.name].finite():
            raise _NotFinite(t.name)
        prune_one(t, stats[t.name])
        done.add(t.name)

    handles = _stat_hooks(targets, stats, kinds, batch_size, prune_reached, timer)
    try:
        with timer("forward"):
            outputs = inputs.outputs(block, compute)
    except _NotFinite as e:
        if saved is None:
            raise WandaError(f"{e.name}: calibration statistics are not finite even in float32 ({where}); "
                             "the activations entering this block overflow") from None
        # fp16 activations overflow: this block goes the sequential way, which recomputes in float32.
        log.warning("%s: statistics of %s are not finite in %s; pruning this block sequentially", where, e.name,
                    next(block.parameters()).dtype)
        for t in targets:
            t.set_weight(saved[t.name])
        outputs = None
    finally:
        for h in handles:
            h.remove()
    if outputs is None:
        stats, _ = _block_stats(block, targets, inputs, kinds, compute, where, batch_size, timer=timer)
        for t in targets:
            prune_one(t, stats.get(t.name))
        if not last:
            with timer("forward"):
                inputs.advance(block, compute)
        return
    for t in targets:  # matrices the forward never reached (an expert no token chose)
        prune_reached(t)
    inputs.hidden = outputs


def _allocate(m, params, pattern, path, blocks, inputs: BlockInputs, compute, home, progress, model_name,
              timer=_untimed) -> list[Pattern]:
    """Per-block patterns from a dense pre-pass: block_score of every block, then allocate (OWL)."""
    kinds = (m.ALLOCATION_STATS,)
    scores = []
    bar = tqdm(enumerate(blocks), total=len(blocks), desc=f"{m.NAME} allocation {model_name}", disable=not progress)
    with torch.no_grad():
        for i, block in bar:
            fetch_block(block, compute)
            targets = find_targets(block, f"{path}.{i}")
            stats, outputs = _block_stats(block, targets, inputs, kinds, compute, f"{model_name} block {i}", 0,
                                          outputs=i + 1 < len(blocks), timer=timer)
            with timer("method"):
                scores.append(float(m.block_score([(t.name, t.weight().detach().float(), stats[t.name]) for t in targets], params)))
            if outputs is not None:
                inputs.hidden = outputs
            evict_block(block, home)
    patterns = list(m.allocate(scores, pattern, params))
    if len(patterns) != len(blocks):
        raise WandaError(f"method {m.NAME!r} allocated {len(patterns)} patterns for {len(blocks)} blocks")
    log.info("%s %s: per-block sparsity %s", model_name, m.NAME, ", ".join(f"{p.sparsity:.3f}" for p in patterns))
    return patterns


def _peak_memory(device: torch.device) -> int:
    """Peak accelerator memory so far, or on the CPU the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _kind(pattern: str) -> str:
    return "nm" if ":" in str(pattern) else "unstructured"


def _prepare_calibration(model, blocks, calibration, compute, home, batch_size, offload, autocast=None) -> BlockInputs:
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
    inputs.autocast = autocast
    return inputs


def _block_stats(block, targets, inputs: BlockInputs, kinds: tuple, compute, where: str, chunk: int = 0,
                 outputs: bool = False, timer=_untimed) -> tuple[dict[str, Stats], list | None]:
    """Input statistics of every matrix of `block` (and, with outputs=True, its outputs from the same
    forward); recomputed in float32 if they overflow."""
    for dtype in (None, torch.float32):
        stats = {t.name: Stats() for t in targets}
        handles = _stat_hooks(targets, stats, kinds, chunk, timer=timer)
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


def fetch_block(block, compute: torch.device) -> None:
    """Bring one decoder block to the compute device (a no-op when it lives there)."""
    block.to(compute)


def evict_block(block, home: torch.device) -> None:
    """Send a block back where the model's weights live, freeing the compute device for the next."""
    block.to(home)
