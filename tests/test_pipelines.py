"""The three pipelines (sequential, one_pass, independent) and bf16 compute, on tiny models."""
import contextlib
import logging

import pytest
import torch

import wanda_core as wc
from tiny_models import ARCHS, tiny_input_ids, tiny_model
from wanda_core import hardware
from wanda_core.masks import parse_pattern, unpack_mask
from wanda_core.methods import Stats, wanda

PIPELINES = ["sequential", "one_pass", "independent"]


def _prune(method, pipeline, arch="llama", layers=3, seed=0, **kw):
    model = tiny_model(arch, num_hidden_layers=layers) if arch in ("llama", "mistral", "qwen2", "gemma", "mixtral", "qwen2_moe") else tiny_model(arch)
    calibration = tiny_input_ids(batch=kw.pop("batch", 6), seq=kw.pop("seq", 32), seed=seed)
    report = wc.prune(model, method, kw.pop("pattern", "unstructured"), kw.pop("sparsity", 0.5), calibration,
                      batch_size=2, keep_masks=True, progress=False, pipeline=pipeline, **kw)
    return model, report


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_every_pipeline_gives_magnitudes_masks_bit_for_bit(pattern):
    reports = [_prune("magnitude", p, pattern=pattern)[1] for p in PIPELINES]
    for r in reports[1:]:
        assert r["masks"].keys() == reports[0]["masks"].keys()
        assert all(torch.equal(r["masks"][k], reports[0]["masks"][k]) for k in r["masks"])


def test_wanda_block0_masks_agree_where_the_inputs_are_the_same():
    seq, one, ind = (_prune("wanda", p)[1]["masks"] for p in PIPELINES)
    qkv = [k for k in seq if k.startswith("model.layers.0.self_attn.") and k.split(".")[-1] in ("q_proj", "k_proj", "v_proj")]
    assert len(qkv) == 3
    for k in qkv:  # block 0's input is the same in every pipeline
        assert torch.equal(seq[k], one[k]) and torch.equal(seq[k], ind[k]), k
    for k in seq:  # independent and sequential see the same dense block 0
        if k.startswith("model.layers.0."):
            assert torch.equal(seq[k], ind[k]), k
    # Later blocks: one_pass and independent see other inputs, so some mask differs somewhere.
    later = [k for k in seq if not k.startswith("model.layers.0.")]
    assert any(not torch.equal(seq[k], ind[k]) for k in later)
    assert any(not torch.equal(seq[k], one[k]) for k in seq if k.endswith(("o_proj", "down_proj")))


def test_one_pass_prunes_o_proj_from_the_pruned_attention():
    """Block 0's o_proj in one_pass: Wanda on the inputs that q/k/v already pruned produce (true sequential)."""
    calibration = tiny_input_ids(batch=6, seq=32)
    model = tiny_model("llama", num_hidden_layers=3)
    reference = tiny_model("llama", num_hidden_layers=3)
    report = wc.prune(model, "wanda", "unstructured", 0.5, calibration, keep_masks=True, progress=False, pipeline="one_pass")

    attn = reference.model.layers[0].self_attn
    seen = {}
    hook = attn.o_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].detach()))
    hq = attn.q_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("q", a[0].detach()))
    with torch.no_grad():
        reference(calibration)
    seen.pop("x")  # the dense attention's output; the pruned one comes below
    stats = Stats()
    stats.add(seen["q"], "sqnorm")
    pattern = parse_pattern("unstructured", 0.5)
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj"):
            lin = getattr(attn, name)
            lin.weight.mul_(wanda.prune_matrix(lin.weight.clone(), stats, pattern).keep)
        reference(calibration)  # the hook above stores o_proj's input, now behind the pruned q/k/v
    hook.remove()
    hq.remove()
    o_stats = Stats()
    o_stats.add(seen["x"], "sqnorm")
    expected = wanda.prune_matrix(attn.o_proj.weight.clone(), o_stats, pattern).keep
    got = unpack_mask(report["masks"]["model.layers.0.self_attn.o_proj"], tuple(expected.shape))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_one_pass_runs_each_block_once(method):
    model = tiny_model("llama", num_hidden_layers=4)
    runs = []
    for i, b in enumerate(model.model.layers):
        b.register_forward_pre_hook(lambda m, a, k, i=i: runs.append(i), with_kwargs=True)
    report = wc.prune(model, method, "2:4", None, tiny_input_ids(batch=6, seq=32), batch_size=2, progress=False,
                      pipeline="one_pass")
    assert runs == [0, 1, 2, 3]
    assert report["pipeline"] == "one_pass" and report["sparsity"] == pytest.approx(0.5)


def test_independent_runs_each_block_once_per_batch():
    model = tiny_model("llama", num_hidden_layers=3)
    runs = []
    for i, b in enumerate(model.model.layers):
        b.register_forward_pre_hook(lambda m, a, k, i=i: runs.append(i), with_kwargs=True)
    wc.prune(model, "wanda", "unstructured", 0.5, tiny_input_ids(batch=6, seq=32), batch_size=2, progress=False,
             pipeline="independent")
    assert runs == [0, 0, 0, 1, 1, 1, 2, 2, 2]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("pipeline", ["one_pass", "independent"])
def test_pipelines_on_every_architecture(arch, pipeline):
    model, report = _prune("sparsegpt" if arch in ("llama", "gpt2", "mixtral") else "wanda", pipeline, arch=arch)
    assert report["pipeline"] == pipeline
    assert report["sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert wc.check_sparsity(model)["overall"] >= 0.5 - 1e-6
    assert all(torch.isfinite(t.weight()).all() for t in wc.all_targets(model))


def test_one_pass_falls_back_to_sequential_when_one_batch_does_not_fit(monkeypatch, caplog):
    monkeypatch.setattr(hardware, "available_memory", lambda: 1000)
    with caplog.at_level(logging.INFO, logger="wanda_core"):
        model, report = _prune("wanda", "one_pass")
    assert report["pipeline"] == "sequential" and report["pipeline_requested"] == "one_pass"
    assert any("using the sequential pipeline" in r.getMessage() for r in caplog.records)
    _, sequential = _prune("wanda", "sequential")
    assert all(torch.equal(report["masks"][k], sequential["masks"][k]) for k in report["masks"])


def test_one_pass_overflowing_fp16_block_is_pruned_sequentially(caplog):
    from test_engine import _overflowing_fp16_model

    calibration = tiny_input_ids(batch=4, seq=64)
    fp16 = _overflowing_fp16_model().half()
    with caplog.at_level(logging.WARNING, logger="wanda_core"):
        report = wc.prune(fp16, "wanda", "unstructured", 0.5, calibration, keep_masks=True, progress=False, pipeline="one_pass")
    assert any("pruning this block sequentially" in r.getMessage() for r in caplog.records)
    assert all(torch.isfinite(t.weight()).all() for t in wc.all_targets(fp16))
    assert report["sparsity"] == pytest.approx(0.5)


def test_bf16_compute_keeps_float32_weights_and_exact_sparsity():
    model, report = _prune("sparsegpt", "one_pass", compute_dtype="bfloat16")
    assert report["compute_dtype"] == "bfloat16"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert report["sparsity"] == pytest.approx(0.5)
    _, wanda_report = _prune("wanda", "sequential", compute_dtype="bfloat16")
    _, wanda_fp32 = _prune("wanda", "sequential")
    # bf16 forwards change the statistics a little: most of the mask stays, not all of it.
    same = [torch.equal(wanda_report["masks"][k], wanda_fp32["masks"][k]) for k in wanda_fp32["masks"]]
    assert any(same)


def test_per_block_sparsity():
    model, report = _prune("wanda", "sequential", sparsity=[0.3, 0.5, 0.7])
    assert report["block_sparsity"] == [0.3, 0.5, 0.7]
    by_block = {}
    for r in report["layers"]:
        by_block.setdefault(r["block"], []).append(r["sparsity"])
        assert r["block_sparsity"] == [0.3, 0.5, 0.7][r["block"]]
    assert [min(v) for v in by_block.values()] == pytest.approx([0.3, 0.5, 0.7], abs=0.02)
    assert report["target_sparsity"] == pytest.approx(0.5)
    with pytest.raises(wc.WandaError, match="2 block sparsities given for a model of 3 decoder blocks"):
        _prune("wanda", "sequential", sparsity=[0.3, 0.5])


def test_bad_pipeline_and_compute_dtype():
    with pytest.raises(wc.WandaError, match="unknown pipeline 'fast': choose one of sequential, one_pass, independent"):
        _prune("wanda", "fast")
    with pytest.raises(wc.WandaError, match="unknown compute dtype 'int8'"):
        _prune("wanda", "sequential", compute_dtype="int8")


@pytest.mark.parametrize("method,pattern", [("wanda", "unstructured"), ("sparsegpt", "2:4")])
def test_one_pass_masks_do_not_depend_on_where_memory_comes_from(monkeypatch, method, pattern):
    """hardware.freed_memory_kept (one_pass's speed-up: large tensors from glibc's heap) changes no value:
    masks and weights are bit-identical with and without it. On SmolLM2 the mask hashes before and after
    it are in bench/results/one_pass_floor_cpu.json."""
    kept, kept_report = _prune(method, "one_pass", pattern=pattern, sparsity=None if ":" in pattern else 0.5)
    monkeypatch.setattr(hardware, "freed_memory_kept", lambda: contextlib.nullcontext(hardware.NoHeap()))
    plain, plain_report = _prune(method, "one_pass", pattern=pattern, sparsity=None if ":" in pattern else 0.5)
    assert kept_report["masks"].keys() == plain_report["masks"].keys()
    assert all(torch.equal(kept_report["masks"][k], plain_report["masks"][k]) for k in kept_report["masks"])
    assert all(torch.equal(a, b) for a, b in zip(kept.state_dict().values(), plain.state_dict().values()))


def test_freed_memory_kept_reuses_keeps_within_its_limit_and_hands_back():
    """Inside, a 64 MB tensor comes from the heap (no page faults once one was freed); freed memory over
    the limit is handed back after a block, and all of it when the context ends."""
    import resource

    if hardware.platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")

    def faults_of_two_allocations():
        torch.empty(2**24).fill_(1.0)  # 64 MB, freed at once
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(2**24).fill_(1.0)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    def resident():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * hardware.os.sysconf("SC_PAGE_SIZE")

    with hardware.freed_memory_kept() as heap:
        heap.after_block()  # the limit: twice what is free now, at least 256 MB
        # The fewest of three tries: the kernel may reclaim idle heap pages now and then (DAMON).
        assert min(faults_of_two_allocations() for _ in range(3)) < 1000  # 16384 when mapped afresh
        assert heap.limit >= 2**28
        heap.limit = heap.libc.mallinfo2().fordblks + 2**29  # what is free now, and 512 MB
        torch.empty(2**26).fill_(1.0)  # 256 MB, freed at once: kept, within the limit
        kept = resident()
        heap.after_block()
        assert resident() > kept - 2**27
        heap.limit = 2**26  # 64 MB: now more than that is free, and handed back
        heap.after_block()
        assert resident() < kept - 2**27
        torch.empty(2**26).fill_(1.0)
        kept = resident()
    assert resident() < kept - 2**27
