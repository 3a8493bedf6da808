"""What the engine keeps on the compute device while it prunes a LLaMA-style model, block by block.

An account, by part, of the bytes allocated on the compute device during the sequential pipeline
(engine.prune), from the model's shapes and the calibration set's: to say before a run whether a
model at a sequence length fits a GPU, and whether the calibration activations must be offloaded.
It follows the engine's code; its transient terms were read from torch's profiler on the CPU, and a
test (tests/test_engine.py) holds it against the allocations measured while the real engine prunes
LLaMA-shaped models with the proportions of LLaMA-2-70B. Not in it: the CUDA context, the caching
allocator's reserve and fragmentation, and library workspaces (cuBLAS, cuSOLVER, kthvalue on CUDA).
"""
from __future__ import annotations

STAT_BYTES = 4  # statistics and pruning work in float32


def llama_shapes(config) -> dict:
    """Dimensions of a LLaMA-style config (a transformers config or a dict of its fields)."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    hidden, heads = get("hidden_size"), get("num_attention_heads")
    head_dim = get("head_dim") or hidden // heads
    return {"hidden": hidden, "intermediate": get("intermediate_size"), "heads": heads,
            "kv_heads": get("num_key_value_heads") or heads, "head_dim": head_dim, "vocab": get("vocab_size"),
            "tied": bool(get("tie_word_embeddings", False))}


def prune_account(config, nsamples: int, seqlen: int, method: str = "wanda", batch_size: int = 8,
                  dtype_bytes: int = 2, offload_activations: bool = False) -> dict:
    """Bytes on the compute device while one decoder block is pruned (the peak over its phases), by part.

    Parts: outside_weights (embeddings, lm_head, final norm: moved to the device when blocks are
    streamed), block_weights (the one block there), activations (the hidden states of every calibration
    window between blocks; one batch when they are offloaded to CPU memory), statistics (every matrix's,
    kept until the block is pruned: SparseGPT's Hessians are in x in float32), and the largest of the
    block's phases: `forward` (a batch through the dense block: its MLP, or down_proj's input where the
    statistics hook copies it to float32) and `prune` (the working set of pruning its largest matrix). A batch through the pruned block, which
    makes the next block's inputs, holds less than `forward`. dtype_bytes: the model's (2 for fp16/bf16).
    """
    if method not in ("wanda", "sparsegpt"):
        raise ValueError(f"no memory account for method {method!r} (wanda, sparsegpt)")
    s = llama_shapes(config)
    h, i, v, e = s["hidden"], s["intermediate"], s["vocab"], dtype_bytes
    attn, kv = s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
    tokens = batch_size * seqlen  # one batch
    # Matrices (out, in) and the inputs they read: q/k/v one, o one, gate/up one, down one (shared statistics).
    matrices = [(attn, h), (kv, h), (kv, h), (h, attn), (i, h), (i, h), (h, i)]
    inputs = [h, attn, h, i]
    parts = {
        "outside_weights": (v * h * (1 if s["tied"] else 2) + h) * e,
        "block_weights": (sum(o * n for o, n in matrices) + 2 * h) * e,
        # Plus the blocks' other arguments: the rotary cos and sin of one window.
        "activations": (tokens if offload_activations else nsamples * seqlen) * h * e + 2 * seqlen * s["head_dim"] * e,
    }
    if method == "wanda":
        parts["statistics"] = sum(inputs) * STAT_BYTES
        hook = tokens * i * STAT_BYTES  # x * x of down_proj's input
        # The matrix in float32 (a copy of the weights, then its score), and kthvalue's own copy of the scores.
        work = max(5 * o * n * STAT_BYTES for o, n in matrices)
    else:
        parts["statistics"] = sum(n * n for n in inputs) * STAT_BYTES
        hook = i * i * STAT_BYTES  # the batch's x^T x, before it is added to the Hessian
        # H (damped), its Cholesky factor, the inverse, the inverse's upper factor; the matrix in float32.
        work = max(4 * n * n * STAT_BYTES + o * n * STAT_BYTES for o, n in matrices)
    upcast = tokens * i * STAT_BYTES if e != STAT_BYTES else 0  # the hook's float32 copy of down_proj's input
    # A batch in the MLP holds the residual stream, the normed input, act(gate), up and their product; at
    # down_proj's input only the product is left, with the hook's float32 copy and its x*x or x^T x. The
    # previous block's statistics are gone by then (they live in the pipeline's call for that block).
    mlp = 2 * tokens * h * e + 3 * tokens * i * e
    at_down = 2 * tokens * h * e + tokens * i * e + upcast + hook
    forward = parts["statistics"] + max(mlp, at_down)
    # A batch through the pruned block (the next block's inputs) holds less: the same MLP, one block's statistics.
    phases = {"forward": forward - parts["statistics"], "prune": work}
    phase = max(phases, key=phases.get)
    parts[phase] = phases[phase]
    return {**parts, "phase": phase, "peak": sum(v for k, v in parts.items() if k != "phase")}


def allocated_peak(fn) -> int:
    """The most bytes of CPU tensors alive at once while fn() runs, from the allocations and frees that
    torch's profiler records (what the account above is checked against)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def one_batch_fits(model, blocks, calibration, compute, autocast) -> bool:
    """Whether a block forward of the whole calibration set as one batch fits in memory (the one_pass pipeline)."""
    import logging

    import torch

    from .hardware import available_memory
    from .model import find_targets

    if calibration is None:
        return True  # the engine's capture names the problem
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
        free = available_memory() * 0.5
    if need <= free:
        return True
    logging.getLogger("wanda_core").info(
        "one_pass: the whole calibration set (%d x %d) as one batch needs about %.1f GB per block forward, "
        "more than the %.1f GB available; using the sequential pipeline", nsamples, seqlen, need / 2**30, free / 2**30)
    return False
