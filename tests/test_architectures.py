"""Every supported architecture, pruned by the sequential engine: exact sparsity, untouched embeddings."""
import pytest
import torch

import wanda_core as wc
from tiny_models import ARCHS, VOCAB, tiny_model

CALIB = torch.randint(0, VOCAB, (6, 32), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))


def _untouched(model):
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    return {"emb": emb.detach().clone(), "head": head.detach().clone()}


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("arch", ARCHS)
def test_prune_every_architecture(arch, method, pattern):
    model = tiny_model(arch)
    before = _untouched(model)
    router_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".gate.weight" in n and "experts" not in n}
    targets = wc.all_targets(model)
    assert targets, arch
    report = wc.prune(model, method, pattern, 0.5, CALIB, batch_size=4, progress=False)

    assert len(report["layers"]) == len(targets)
    for t in targets:
        w = t.weight()
        zeros = (w == 0)
        if pattern == "2:4":
            groups = zeros.reshape(w.shape[0], -1, 4).sum(-1)
            assert (groups >= 2).all(), t.name
            if method == "wanda":
                assert (groups == 2).all(), t.name
        elif method == "wanda":
            # Wanda compares within each output row: every row at exactly the target.
            assert (zeros.sum(1) == w.shape[1] // 2).all(), t.name
        else:
            assert zeros.float().mean().item() >= 0.5 - 1e-6, t.name
    stats = wc.check_sparsity(model)
    assert stats["overall"] == pytest.approx(0.5, abs=0.02 if method == "sparsegpt" else 1e-9)
    after = _untouched(model)
    assert torch.equal(before["emb"], after["emb"]) and torch.equal(before["head"], after["head"])
    for n, p in model.named_parameters():
        if n in router_before:
            assert torch.equal(router_before[n], p), n
    with torch.no_grad():
        assert torch.isfinite(model(IDS, use_cache=False).logits).all()


def test_mixtral_prunes_each_expert_with_its_own_tokens():
    model = tiny_model("mixtral")
    experts = [t for t in wc.all_targets(model) if t.kind == "expert"]
    assert {t.param for t in experts} == {"gate_up_proj", "down_proj"}
    assert len(experts) == 2 * 2 * model.config.num_local_experts  # 2 blocks x 2 params x experts
    report = wc.prune(model, "wanda", "unstructured", 0.5, CALIB, batch_size=3, progress=False)
    rows = {r["layer"]: r for r in report["layers"]}
    for t in experts:
        w = t.weight()
        assert ((w == 0).sum(1) == w.shape[1] // 2).all(), t.name
    # Tokens are routed top-2 of 4: each expert sees fewer tokens than the attention layers do.
    total = CALIB.numel()
    assert all(rows[t.name]["tokens"] < total for t in experts)
    assert sum(rows[t.name]["tokens"] for t in experts if t.param == "down_proj" and ".layers.0." in t.name) == 2 * total
    attn = [r for r in report["layers"] if r["layer"].endswith("q_proj")]
    assert all(r["tokens"] == total for r in attn)


def test_gpt2_conv1d_is_pruned_per_output_row():
    model = tiny_model("gpt2")
    t = next(t for t in wc.all_targets(model) if t.name.endswith("mlp.c_fc"))
    assert t.kind == "conv1d" and t.shape == (t.module.nf, t.module.weight.shape[0])
    wc.prune(model, "wanda", "unstructured", 0.5, CALIB, progress=False)
    raw = t.module.weight  # stored [in, out]: per output row means per column here
    assert ((raw == 0).sum(0) == raw.shape[0] // 2).all()


def test_wanda_uses_activation_norms():
    # With one input column scaled up 1000x, Wanda keeps that column everywhere; magnitude does not care.
    model = tiny_model("llama")
    t = next(t for t in wc.all_targets(model) if t.name.endswith("layers.0.mlp.down_proj"))
    hook = t.module.register_forward_pre_hook(lambda m, a: (a[0] * torch.cat([torch.full((1,), 1000.0), torch.ones(a[0].shape[-1] - 1)]),))
    try:
        with torch.no_grad():
            t.set_weight(t.weight() * 0 + torch.linspace(1, 2, t.shape[1]))  # column 0 smallest by magnitude
        wc.prune(model, "wanda", "unstructured", 0.5, CALIB, progress=False)
    finally:
        hook.remove()
    assert (t.weight()[:, 0] != 0).all()


def test_block_streaming_keeps_results_identical():
    a, b = tiny_model("llama"), tiny_model("llama")
    wc.prune(a, "wanda", "unstructured", 0.5, CALIB, batch_size=4, progress=False)
    wc.prune(b, "wanda", "unstructured", 0.5, CALIB, batch_size=2, progress=False)
    for ta, tb in zip(wc.all_targets(a), wc.all_targets(b)):
        assert torch.equal(ta.weight() == 0, tb.weight() == 0), ta.name


def test_magnitude_needs_no_calibration():
    model = tiny_model("llama")
    report = wc.prune(model, "magnitude", "4:8", progress=False)
    assert report["sparsity"] == pytest.approx(0.5)


def test_encoder_decoder_is_rejected():
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=64))
    with pytest.raises(wc.WandaError, match="encoder-decoder"):
        wc.prune(model, "wanda", "unstructured", 0.5, CALIB, progress=False)


def test_model_without_blocks_is_rejected():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 10))
    with pytest.raises(wc.WandaError, match="cannot find the decoder blocks"):
        wc.find_blocks(model)


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="lottery"), "unknown method"),
    (dict(pattern="3:3"), "0 < N < M"),
    (dict(sparsity=1.0), "sparsity must be in"),
    (dict(calibration=None), "needs calibration"),
    (dict(params={"alpha": 1}), "has no option 'alpha'"),
])
def test_bad_arguments(kwargs, message):
    args = dict(method="wanda", pattern="unstructured", sparsity=0.5, calibration=CALIB, progress=False)
    args.update(kwargs)
    with pytest.raises(wc.WandaError, match=message):
        wc.prune(tiny_model("llama"), **args)


def test_width_not_divisible_names_the_layer():
    model = tiny_model("llama", intermediate_size=130)  # down_proj has 130 inputs
    with pytest.raises(wc.WandaError, match=r"model\.layers\.0\.mlp\.down_proj: input width 130 is not divisible by M=4"):
        wc.prune(model, "wanda", "2:4", calibration=CALIB, progress=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_each_block_gets_the_arguments_of_a_forward(arch):
    # Pruning nothing, the engine must run every block exactly as the model's own forward does: the
    # same inputs and the same attention mask and rotary tables (Gemma 3's global layers have their own).
    model = tiny_model(arch)
    _, blocks = wc.find_blocks(model)
    outputs = {}

    def record(i):
        def hook(mod, args, kwargs, out):
            if out is (args[0] if args else kwargs.get("hidden_states")):
                return  # block_arguments' stub: the engine reading the blocks' arguments, no block ran
            outputs.setdefault(i, []).append((out[0] if isinstance(out, (tuple, list)) else out).detach().clone())
        return hook

    handles = [b.register_forward_hook(record(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            model(CALIB[:4], use_cache=False)
        reference = {i: o[0] for i, o in outputs.items()}
        outputs.clear()
        wc.prune(model, "wanda", "unstructured", 0.0, CALIB[:4], batch_size=4, progress=False)
    finally:
        for h in handles:
            h.remove()
    assert set(outputs) == set(reference)
    for i, outs in outputs.items():
        for out in outs:
            torch.testing.assert_close(out, reference[i], msg=f"{arch} block {i}")


def test_gemma3_layers_of_each_kind_get_their_own_arguments():
    from wanda_core.model import block_arguments

    model = tiny_model("gemma3")
    _, blocks = wc.find_blocks(model)
    own = block_arguments(model, blocks, CALIB[:2])
    assert list(own) == [id(blocks[1])]  # the global layer; the sliding one has block 0's arguments
    assert not any(b.__dict__.get("forward") for b in blocks)  # the stubs are gone
