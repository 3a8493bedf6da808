"""The engine under constraints: a simulated accelerator budget, and activations that overflow fp16."""
import logging

import pytest
import torch

import wanda_core as wc
from tiny_models import tiny_input_ids, tiny_model
from wanda_core import capture, engine, memory


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_one_block_resident_under_a_budget_smaller_than_the_model(method, monkeypatch):
    """Simulated accelerator: a block counts as resident between fetch_block and evict_block.

    The budget is half the model; it must hold one block, what lives outside the blocks and the
    calibration activations, never two blocks, and no block may run without being resident.
    """
    model = tiny_model("llama", num_hidden_layers=8)
    reference = tiny_model("llama", num_hidden_layers=8)
    _, blocks = wc.find_blocks(model)
    calibration = tiny_input_ids(batch=4, seq=64)

    outside = _bytes(model.parameters()) - _bytes(blocks.parameters())
    activations = calibration.numel() * model.config.hidden_size * 4
    budget = _bytes(model.parameters()) // 2
    one_block = max(_bytes(b.parameters()) for b in blocks)
    assert outside + one_block + activations < budget  # the test means something only if so

    resident, peak, runs = set(), [0], []
    fetch, evict = engine.fetch_block, engine.evict_block

    def fetch_tracked(block, device):
        resident.add(id(block))
        used = outside + activations + sum(_bytes(b.parameters()) for b in blocks if id(b) in resident)
        peak[0] = max(peak[0], used)
        assert used <= budget, f"{len(resident)} blocks resident: {used} bytes > budget {budget}"
        fetch(block, device)

    def evict_tracked(block, home):
        evict(block, home)
        resident.discard(id(block))

    def must_be_resident(i):
        def hook(module, args, kwargs):
            assert id(module) in resident, f"block {i} ran without being on the accelerator"
            runs.append(i)
        return hook

    for i, b in enumerate(blocks):
        b.register_forward_pre_hook(must_be_resident(i), with_kwargs=True)
    monkeypatch.setattr(engine, "fetch_block", fetch_tracked)
    monkeypatch.setattr(engine, "evict_block", evict_tracked)
    report = wc.prune(model, method, "unstructured", 0.5, calibration, device="cpu", batch_size=2, progress=False)

    assert not resident  # every block went home
    assert peak[0] == outside + activations + one_block
    # Each block ran twice per batch (statistics, then the pruned block for the next inputs; the last once).
    assert runs == [i for i in range(8) for _ in range(2 if i == 7 else 4)]
    # Streaming changes nothing in the result.
    wc.prune(reference, method, "unstructured", 0.5, calibration, batch_size=2, progress=False)
    for a, b in zip(wc.all_targets(model), wc.all_targets(reference)):
        assert torch.equal(a.weight(), b.weight()), a.name
    assert report["sparsity"] == pytest.approx(0.5)


def _overflowing_fp16_model():
    """A tiny LLaMA whose block-0 MLP activations exceed fp16's range (65504) but not fp32's."""
    model = tiny_model("llama", num_hidden_layers=3)
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        mlp.up_proj.weight.mul_(2e5)
        mlp.down_proj.weight.mul_(1e-5)
    return model


def test_overflowing_statistics_are_recomputed_in_float32(caplog):
    calibration = tiny_input_ids(batch=4, seq=64)
    fp16 = _overflowing_fp16_model().half()
    # The premise: in fp16 the down_proj inputs of block 0 are infinite.
    seen = []
    handle = fp16.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, o: seen.append(torch.isfinite(a[0]).all()))
    with torch.no_grad():
        fp16(calibration)
    handle.remove()
    assert not seen[0]

    fp32 = _overflowing_fp16_model().half().float()  # the same (fp16-representable) weights, in fp32
    with caplog.at_level(logging.WARNING, logger="wanda_core"):
        report = wc.prune(fp16, "wanda", "unstructured", 0.5, calibration, keep_masks=True, progress=False)
    warnings = [r.getMessage() for r in caplog.records if "recomputing" in r.getMessage()]
    assert any("model.layers.0.mlp.down_proj" in w and "float32" in w for w in warnings), warnings
    assert all(p.dtype == torch.float16 for p in fp16.parameters())  # the model keeps its dtype
    assert all(torch.isfinite(t.weight()).all() for t in wc.all_targets(fp16))
    assert report["sparsity"] == pytest.approx(0.5)

    # Block 0 saw exactly what a float32 run sees, so its masks are those of the float32 model.
    expected = wc.prune(fp32, "wanda", "unstructured", 0.5, calibration, keep_masks=True, progress=False)
    for name, packed in report["masks"].items():
        if name.startswith("model.layers.0."):
            assert torch.equal(packed, expected["masks"][name]), name


def test_statistics_that_overflow_even_in_float32_name_the_layer():
    model = tiny_model("llama", num_hidden_layers=2)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.fill_(float("inf"))
    with pytest.raises(wc.WandaError, match=r"model\.layers\.1\.mlp\.down_proj: calibration statistics are not finite even in float32"):
        wc.prune(model, "wanda", "unstructured", 0.5, tiny_input_ids(batch=2, seq=32), progress=False)


def test_matrices_reading_one_input_share_their_statistics(monkeypatch):
    """q/k/v read one tensor, gate/up another: a LLaMA block builds 4 Hessians, not 7, with the same result."""
    from wanda_core.methods import Stats

    calls = []
    add = Stats.add
    monkeypatch.setattr(Stats, "add", lambda self, x, kinds: (calls.append(id(self)), add(self, x, kinds))[1])
    model = tiny_model("llama", num_hidden_layers=2)
    calibration = tiny_input_ids(batch=4, seq=32)
    wc.prune(model, "sparsegpt", "unstructured", 0.5, calibration, batch_size=2, progress=False)
    assert len(calls) == 2 * 2 * 4  # blocks x batches x (qkv, o, gate/up, down)

    # Each matrix pruned alone, with statistics of its own, gives the same weights.
    reference = tiny_model("llama", num_hidden_layers=2)
    monkeypatch.setattr(Stats, "add", add)
    monkeypatch.setattr(capture, "stat_hooks", _unshared_hooks)
    wc.prune(reference, "sparsegpt", "unstructured", 0.5, calibration, batch_size=2, progress=False)
    for a, b in zip(wc.all_targets(model), wc.all_targets(reference)):
        assert torch.equal(a.weight(), b.weight()), a.name


def _unshared_hooks(targets, stats, kinds, chunk=0, prune=None, timer=None):
    def hook(mod, args, name):
        stats[name].add(args[0].detach(), kinds)

    return [t.module.register_forward_pre_hook(lambda m, a, name=t.name: hook(m, a, name)) for t in targets]


# --- memory at 4096: what the engine allocates, and LLaMA-2-70B at 128 x 4096 ---

# LLaMA-2-70B's proportions at a CPU's scale: intermediate 3.5 x hidden, 8 query heads per KV head.
LLAMA2_70B = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                  vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)
SCALED_70B = dict(hidden_size=128, intermediate_size=448, num_attention_heads=8, num_key_value_heads=1, head_dim=16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_memory_account_is_what_the_engine_allocates(method, dtype):
    """wanda_core.memory's account of a block's peak (activations, statistics, the largest phase) against every
    byte the real engine allocates while it prunes a model with LLaMA-2-70B's proportions. The weights were
    there before; that only one block of them is ever on the device is the test above."""
    model = tiny_model("llama", num_hidden_layers=2, max_position_embeddings=1024, **SCALED_70B).to(dtype)
    calibration = tiny_input_ids(batch=8, seq=256)
    peak = memory.allocated_peak(lambda: wc.prune(model, method, "unstructured", 0.5, calibration, batch_size=4, progress=False))
    account = memory.prune_account(model.config, 8, 256, method, batch_size=4, dtype_bytes=dtype.itemsize)
    allocated = account["peak"] - account["outside_weights"] - account["block_weights"]
    assert allocated == pytest.approx(peak, rel=0.01), account


def test_a_llama2_70b_block_at_4096_fits_an_80gb_gpu():
    """128 x 4096 calibration tokens of LLaMA-2-70B in fp16, batches of 8: the account at its real shapes (its
    weights counted on the meta device) is within an 80 GB GPU with room to spare, without offloading the
    activations; the engine's own rule (offload when they exceed 40% of the free memory) keeps them there."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=1, **LLAMA2_70B)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    budget = 80 * 10**9
    for method in ("wanda", "sparsegpt"):
        account = memory.prune_account(config, 128, 4096, method, batch_size=8, dtype_bytes=2)
        assert account["block_weights"] == 2 * block  # the account's shapes are the model's
        assert account["outside_weights"] == 2 * (sum(p.numel() for p in model.parameters()) - block)
        assert account["activations"] == pytest.approx(128 * 4096 * 8192 * 2, rel=1e-3)  # 8.6 GB, one copy in fp16
        assert account["activations"] < 0.4 * budget  # not offloaded
        assert account["peak"] < 0.5 * budget, account  # half the GPU: CUDA's context, caches and workspaces fit beside
