"""Gemma-3-270M (a real trained model of another architecture than LLaMA) pruned on WikiText-2.

Gemma 3 differs from LLaMA where pruning code breaks: sliding-window and global attention layers
with their own masks and rotary tables, q/k norms, four norms per block, scaled embeddings, a
262k-token vocabulary and tied embeddings. Settings are short (the lm_head alone is 170M
parameters): the paper's orderings still hold.
"""
import json
import math

import pytest
import torch

import wanda_core as wc

pytestmark = pytest.mark.slow

NSAMPLES, CALIB_SEQLEN = 8, 128
EVAL_SEQLEN, EVAL_WINDOWS = 256, 4


@pytest.fixture(scope="module")
def setup(gemma3_dir, wikitext):
    model, tok = wc.load_model(gemma3_dir, device="cpu")
    calib = wc.calibration_windows(wc.tokenize(tok, wc.read_corpus(wikitext / "valid.txt")), NSAMPLES, CALIB_SEQLEN, seed=0)
    test_ids = wc.tokenize(tok, wc.read_corpus(wikitext / "test.txt"))
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    return model, calib, test_ids, dense


@pytest.fixture(scope="module")
def ppl(setup):
    model, calib, test_ids, dense = setup
    results = {}

    def run(method, pattern="unstructured"):
        if (method, pattern) not in results:
            model.load_state_dict(dense)
            report = wc.prune(model, method, pattern, 0.5, calib, keep_masks=True, progress=False)
            value = wc.perplexity(model, test_ids, EVAL_SEQLEN, EVAL_WINDOWS, batch_size=2, progress=False)
            results[(method, pattern)] = (value, report, wc.check_sparsity(model))
        return results[(method, pattern)]

    return run


def test_gemma3_is_what_we_think(setup):
    model = setup[0]
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert set(model.config.layer_types) == {"sliding_attention", "full_attention"}
    path, blocks = wc.find_blocks(model)
    assert path == "model.layers" and len(blocks) == 18
    names = {t.name.split(".", 3)[-1] for t in wc.all_targets(model)}
    assert names == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    # Norms (four per block and q/k norms), embeddings and the tied lm_head are never pruned.
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_ordering_dense_wanda_magnitude(ppl):
    dense, _, _ = ppl("dense")
    magnitude, rep_m, stats_m = ppl("magnitude")
    wanda, rep_w, stats_w = ppl("wanda")
    print(f"\nGemma-3-270M WikiText-2 PPL: dense {dense:.2f} magnitude {magnitude:.2f} wanda {wanda:.2f}")
    assert all(math.isfinite(x) for x in (dense, magnitude, wanda))
    assert dense < wanda < magnitude
    assert 20 < dense < 1000  # a trained model (215 here; 127 at seqlen 512), not noise (vocab 262144: ~2.6e5)
    for rep, stats in ((rep_m, stats_m), (rep_w, stats_w)):
        # check_sparsity counts exactly the zeros the engine reports, matrix by matrix.
        assert rep["sparsity"] == pytest.approx(0.5, abs=1e-4)
        assert stats["overall"] == pytest.approx(rep["sparsity"], abs=1e-12)
        for row in rep["layers"]:
            assert stats["layers"][row["layer"]] == pytest.approx(row["sparsity"], abs=1e-12), row["layer"]


def test_three_tier_audit(ppl):
    # Every matrix holds all three tiers in the default proportions (35% of its 16x16 blocks dense,
    # 45% 2:4, 20% keeping their 15 best), and its mask drops exactly what those tiers imply.
    from wanda_core.masks import unpack_mask

    dense, _, _ = ppl("dense")
    three, report, stats = ppl("three_tier")
    print(f"\nthree_tier PPL {three:.2f}, sparsity {report['sparsity']:.4f}")
    assert math.isfinite(three) and dense < three
    assert report["sparsity"] == pytest.approx(0.45 * 0.5 + 0.20 * (256 - 15) / 256, abs=0.002)
    for r in report["layers"]:
        blocks = r["rows"] * r["cols"] // 256
        assert r["tier_dense"] + r["tier_nm"] + r["tier_topk"] == blocks, r["layer"]
        assert r["tier_dense"] == int(0.35 * blocks) and r["tier_nm"] == int(0.45 * blocks), r["layer"]
        dropped = r["tier_nm"] * 128 + r["tier_topk"] * (256 - 15)
        keep = unpack_mask(report["masks"][r["layer"]], (r["rows"], r["cols"]))
        assert int((~keep).sum()) == dropped, r["layer"]
        # The weights' zeros: the dropped ones, and Q4_K_M weights that were 0 already in the blocks kept.
        assert stats["layers"][r["layer"]] >= dropped / (r["rows"] * r["cols"]), r["layer"]


def test_export_loads_in_plain_transformers(ppl, setup, tmp_path, gemma3_dir, cli):
    from transformers import AutoModelForCausalLM

    model, _, _, dense = setup
    _, report, _ = ppl("wanda")
    # Wanda only zeroes weights: its masks on the dense weights are the pruned model.
    model.load_state_dict(dense)
    pruned = tmp_path / "wanda.safetensors"
    wc.save_pruned(model, pruned, report["masks"])
    wc.load_pruned(model, pruned)
    assert cli("export", "--model", gemma3_dir, "--pruned", pruned, "--dtype", "float32", "--out", tmp_path / "export")[0] == 0
    assert json.loads((tmp_path / "export" / "config.json").read_text())["model_type"] == "gemma3_text"
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    assert wc.check_sparsity(exported)["overall"] == pytest.approx(report["sparsity"], abs=1e-12)
    ids = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
