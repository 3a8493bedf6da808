"""The pruning engine: block by block through the decoder, as in the Wanda and SparseGPT papers.

Capture the hidden states (and every other argument) entering block 0 for the calibration
windows (capture.py); then one block loop (each_block) brings each decoder block to the compute
device in turn, and a pipeline prunes it. PIPELINES holds one function per pipeline, each pruning
one block:
  sequential   (the papers') run the dense block with hooks that accumulate input statistics of
               its weight matrices, prune every matrix, run the pruned block again to produce
               the next block's inputs: two forwards per block.
  one_pass     run the block once, the whole calibration set as one batch; each matrix is pruned
               when the forward reaches it, from inputs that already went through the pruned
               matrices before it (SparseGPT's "true sequential" order), and the same forward
               produces the next block's inputs. Where it cannot run (the batch does not fit, or
               half-precision statistics overflow in a block) it calls `sequential`.
  independent  statistics of every matrix from the dense model's activations (one dense forward
               per block, no error propagation), as llm-compressor's "basic" pipeline.
Methods without statistics (magnitude, ...) take none of them: `without_statistics` prunes each
block's matrices as they are. A method that allocates sparsity per block (OWL) first runs a dense
pre-pass over the same block loop. Only the current block needs to be on the compute device.
Around it: capture.py (block inputs, statistics hooks), hardware.py (devices, memory, threads, the
heap), timing.py (PhaseTimer: the report's seconds_split).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from types import ModuleType

import torch
from tqdm.auto import tqdm

from . import hardware, memory
from .capture import BlockInputs, block_stats, calibration_inputs, move_outside_blocks, stat_hooks
from .errors import WandaError
from .masks import Pattern, pack_mask
from .methods import Stats
from .model import Target, find_blocks, find_targets, resolve_device
from .request import PruneRequest, resolve
from .timing import PhaseTimer

log = logging.getLogger("wanda_core")
progress_log = logging.getLogger("wanda_core.progress")  # one line per block: where a long job is


@dataclass
class Run:
    """One prune of one model: what every pass of the block loop needs, and what it records."""

    model: torch.nn.Module
    method: ModuleType  # the method's module (wanda_core/methods)
    params: dict  # its options, checked
    kinds: tuple  # the statistics it needs; empty for none
    path: str  # the decoder blocks' dotted path
    blocks: torch.nn.ModuleList
    pattern: Pattern  # the pattern that stands for all blocks (their mean sparsity)
    patterns: list[Pattern]  # one per block
    compute: torch.device  # where blocks run
    home: torch.device  # where blocks live between their turns
    autocast: torch.dtype | None  # block forwards in this dtype, or None for the model's own
    batch_size: int
    keep_masks: bool
    progress: bool
    name: str  # the model's, for progress bars and logs
    timer: PhaseTimer
    started: float  # time.perf_counter() at the start
    rows: dict = field(default_factory=dict)  # matrix name -> its report row, until its block is done
    masks: dict = field(default_factory=dict)  # matrix name -> packed keep-mask (keep_masks)
    updated: bool = False  # whether a method changed kept weights

    def where(self, i: int) -> str:
        return f"{self.name} block {i}"

    def last(self, i: int) -> bool:
        return i + 1 == len(self.blocks)


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
    autocast = hardware.autocast_dtype(compute_dtype, compute, next(blocks.parameters()).dtype)
    model_name = getattr(model.config, "_name_or_path", type(model).__name__) or type(model).__name__
    t0 = time.perf_counter()
    run = Run(model=model, method=m, params=params, kinds=kinds, path=path, blocks=blocks, pattern=pat, patterns=patterns,
              compute=compute, home=home, autocast=autocast, batch_size=batch_size, keep_masks=keep_masks,
              progress=progress, name=model_name, timer=PhaseTimer(compute), started=t0)
    if compute.type == "cuda":
        torch.cuda.reset_peak_memory_stats(compute)
    used = pipeline
    if kinds and pipeline == "one_pass" and not memory.one_batch_fits(model, blocks, calibration, compute, autocast):
        used = "sequential"
    if hasattr(m, "allocate"):
        with run.timer("forward"):
            inputs = calibration_inputs(model, blocks, calibration, batch_size, compute=compute, home=home,
                                        offload=offload_activations, autocast=autocast)
        run.patterns = _allocate(run, inputs)
        del inputs
    inputs = None
    if kinds:
        one_batch = len(calibration) if used == "one_pass" and calibration is not None else batch_size
        with run.timer("forward"):
            inputs = calibration_inputs(model, blocks, calibration, one_batch, compute=compute, home=home,
                                        offload=offload_activations, autocast=autocast)
    layers = _prune_blocks(run, PIPELINES[used] if kinds else without_statistics, inputs)
    if kinds and compute != home:
        move_outside_blocks(model, blocks, home)
    return _report(run, layers, pipeline, used)


def each_block(run: Run, desc: str, heap=None):
    """The block loop every pass shares: yields (index, block, its weight matrices) with the block on the
    compute device, and sends it home after. In the pruning pass (heap: hardware.freed_memory_kept's) each
    block done also bounds the kept heap and logs one progress line."""
    bar = tqdm(enumerate(run.blocks), total=len(run.blocks), desc=desc, disable=not run.progress)
    for i, block in bar:
        fetch_block(block, run.compute)
        yield i, block, find_targets(block, f"{run.path}.{i}")
        evict_block(block, run.home)
        if heap is None:
            continue
        heap.after_block()
        # Without a progress bar (workflow jobs), one line per block says where the job is; the CLI's
        # --log shows these lines (logger wanda_core.progress) on the terminal too.
        (progress_log.debug if run.progress else progress_log.info)(
            "%s %s %s: pruned block %d/%d (%.1f s)", run.name, run.method.NAME, run.pattern, i + 1, len(run.blocks),
            time.perf_counter() - run.started)


def _prune_blocks(run: Run, prune_block, inputs: BlockInputs | None) -> list[dict]:
    """The pruning pass: prune_block(run, i, block, targets, inputs) on every block; the report's rows."""
    layers = []
    with torch.no_grad(), hardware.freed_memory_kept() as heap:
        for i, block, targets in each_block(run, f"{run.method.NAME} {run.pattern} {run.name}", heap):
            prune_block(run, i, block, targets, inputs)
            layers += [run.rows.pop(t.name) for t in targets]
    return layers


# --- the pipelines: each prunes block i (on the compute device) and leaves the next block's inputs ---


def without_statistics(run: Run, i: int, block, targets: list[Target], inputs: None) -> None:
    """Methods that need no calibration statistics: each matrix as it is, no forward."""
    for t in targets:
        prune_target(run, i, t, None)


def sequential(run: Run, i: int, block, targets: list[Target], inputs: BlockInputs) -> None:
    """Statistics from a forward of the dense block, every matrix pruned, then the pruned block's outputs."""
    stats, _ = block_stats(block, targets, inputs, run.kinds, run.compute, run.where(i), run.batch_size, timer=run.timer)
    for t in targets:
        prune_target(run, i, t, stats.get(t.name))
    if not run.last(i):
        with run.timer("forward"):
            inputs.advance(block, run.compute)


def independent(run: Run, i: int, block, targets: list[Target], inputs: BlockInputs) -> None:
    """Statistics and the next block's inputs from one forward of the dense block, then every matrix pruned."""
    stats, outputs = block_stats(block, targets, inputs, run.kinds, run.compute, run.where(i), run.batch_size,
                                 outputs=not run.last(i), timer=run.timer)
    for t in targets:
        prune_target(run, i, t, stats.get(t.name))
    if outputs is not None:
        inputs.hidden = outputs


class _NotFinite(Exception):
    def __init__(self, name):
        self.name = name


def one_pass(run: Run, i: int, block, targets: list[Target], inputs: BlockInputs) -> None:
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
        prune_target(run, i, t, stats[t.name])
        done.add(t.name)

    handles = stat_hooks(targets, stats, run.kinds, run.batch_size, prune_reached, run.timer)
    try:
        with run.timer("forward"):
            outputs = inputs.outputs(block, run.compute)
    except _NotFinite as e:
        if saved is None:
            raise WandaError(f"{e.name}: calibration statistics are not finite even in float32 ({run.where(i)}); "
                             "the activations entering this block overflow") from None
        # fp16 activations overflow: this block goes the sequential way, which recomputes in float32.
        log.warning("%s: statistics of %s are not finite in %s; pruning this block sequentially", run.where(i), e.name,
                    next(block.parameters()).dtype)
        for t in targets:
            t.set_weight(saved[t.name])
        outputs = None
    finally:
        for h in handles:
            h.remove()
    if outputs is None:
        return sequential(run, i, block, targets, inputs)
    for t in targets:  # matrices the forward never reached (an expert no token chose)
        prune_reached(t)
    inputs.hidden = outputs


PIPELINES = {"sequential": sequential, "one_pass": one_pass, "independent": independent}


def prune_target(run: Run, i: int, t: Target, stats: Stats | None) -> None:
    """Prune one matrix of block i in place, and record its report row (and its mask)."""
    with run.timer("method"):
        started, tokens = time.perf_counter(), stats.count if stats is not None else 0
        weight = t.weight()
        w = weight.detach().float().clone()
        if run.kinds and (stats is None or stats.count == 0):
            log.warning("%s: no calibration token reached this matrix; pruning it as if all inputs were equal", t.name)
            stats = Stats.uniform(w.shape[1], run.kinds, w.device)
        named = {"name": t.name} if getattr(run.method, "MATRIX_NAME", False) else {}
        try:
            result = run.method.prune_matrix(w, stats, run.patterns[i], **run.params, **named)
        except WandaError as e:
            raise WandaError(f"{t.name}: {e}") from None
        new = result.weight if result.weight is not None else w.masked_fill_(~result.keep, 0.0)
        t.set_weight(new.to(weight.dtype))
        run.updated |= result.weight is not None
        if run.keep_masks:
            run.masks[t.name] = pack_mask(result.keep)
        run.rows[t.name] = {
            "layer": t.name, "block": i, "rows": t.shape[0], "cols": t.shape[1],
            "sparsity": 1.0 - result.keep.float().mean().item(), "block_sparsity": run.patterns[i].sparsity,
            "seconds": time.perf_counter() - started, "tokens": tokens,
            "peak_memory_bytes": hardware.peak_memory(run.compute), **result.info,
        }


def _allocate(run: Run, inputs: BlockInputs) -> list[Pattern]:
    """Per-block patterns from a dense pre-pass over the block loop: block_score of every block, then allocate (OWL)."""
    m, kinds, scores = run.method, (run.method.ALLOCATION_STATS,), []
    with torch.no_grad():
        for i, block, targets in each_block(run, f"{m.NAME} allocation {run.name}"):
            stats, outputs = block_stats(block, targets, inputs, kinds, run.compute, run.where(i), 0,
                                         outputs=not run.last(i), timer=run.timer)
            with run.timer("method"):
                scores.append(float(m.block_score([(t.name, t.weight().detach().float(), stats[t.name]) for t in targets], run.params)))
            if outputs is not None:
                inputs.hidden = outputs
    patterns = list(m.allocate(scores, run.pattern, run.params))
    if len(patterns) != len(run.blocks):
        raise WandaError(f"method {m.NAME!r} allocated {len(patterns)} patterns for {len(run.blocks)} blocks")
    log.info("%s %s: per-block sparsity %s", run.name, m.NAME, ", ".join(f"{p.sparsity:.3f}" for p in patterns))
    return patterns


def _report(run: Run, layers: list[dict], requested: str, pipeline: str) -> dict:
    """The prune's report: totals, the time split, and one row per weight matrix."""
    pat, patterns, kinds = run.pattern, run.patterns, run.kinds
    pruned = sum(r["sparsity"] * r["rows"] * r["cols"] for r in layers)
    total = sum(r["rows"] * r["cols"] for r in layers)
    target = sum(r["block_sparsity"] * r["rows"] * r["cols"] for r in layers) / max(total, 1)
    seconds = time.perf_counter() - run.started
    report = {
        "method": run.method.NAME, "pattern": str(pat), "target_sparsity": target, "params": run.params,
        "pipeline": pipeline if kinds else None,
        "compute_dtype": str(run.autocast).replace("torch.", "") if kinds and run.autocast else None,
        "sparsity": pruned / max(total, 1), "pruned_params": total, "seconds": seconds,
        "seconds_split": run.timer.split(seconds),  # the CLI adds the saving's seconds
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(run.compute) if run.compute.type == "cuda" else None,
        "updates_weights": run.updated, "layers": layers,
    }
    if kinds and requested != pipeline:
        report["pipeline_requested"] = requested
    if len({str(p) for p in patterns}) > 1 or (pat.kind == "unstructured" and len({p.sparsity for p in patterns}) > 1):
        report["block_sparsity"] = [p.sparsity for p in patterns]
        report["block_patterns"] = [str(p) for p in patterns]
    if run.keep_masks:
        report["masks"] = run.masks
    return report


def _block_patterns(request: PruneRequest, n_blocks: int) -> tuple[list[Pattern], Pattern]:
    """One pattern per block, and the pattern that stands for all of them (its mean sparsity)."""
    if request.block_sparsity is None:
        return [request.pattern] * n_blocks, request.pattern
    if len(request.block_sparsity) != n_blocks:
        raise WandaError(f"{len(request.block_sparsity)} block sparsities given for a model of {n_blocks} decoder blocks")
    return [Pattern("unstructured", s) for s in request.block_sparsity], request.pattern



def fetch_block(block, compute: torch.device) -> None:
    """Bring one decoder block to the compute device (a no-op when it lives there)."""
    block.to(compute)


def evict_block(block, home: torch.device) -> None:
    """Send a block back where the model's weights live, freeing the compute device for the next."""
    block.to(home)
