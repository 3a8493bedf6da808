"""Quantized checkpoints: refused before any work, unless transformers dequantizes them on load (FP8)."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import wanda_core as wc
from tiny_models import save_tiny

REFUSED = {
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm", "zero_point": True},
    "bitsandbytes": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
}


def with_quantization_config(path, quant: dict):
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = quant
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    return path


@pytest.mark.parametrize("method", REFUSED)
def test_quantized_checkpoint_is_refused_before_any_work(method, tmp_path, corpus, cli):
    # The weights stay float: only the config says quantized, and nothing may get as far as reading them.
    model = with_quantization_config(save_tiny("llama", tmp_path / f"tiny-{method}"), REFUSED[method])
    out = tmp_path / "out"
    for command in (["materialize", "--out", out / "model"],
                    ["calibrate", "--data", corpus, "--nsamples", 2, "--seqlen", 32, "--out", out / "calib.safetensors"],
                    ["prune", "--method", "magnitude", "--out", out / "pruned.safetensors", "--quiet"],
                    ["eval-ppl", "--data", corpus, "--seqlen", 32, "--out", out / "ppl.json", "--quiet"]):
        status, _, errors = cli(command[0], "--model", model, *command[1:])
        assert status == 2 and len(errors) == 1, (command, errors)
        assert f"holds {method}-quantized weights" in errors[0] and "unquantized" in errors[0], errors[0]
        assert not out.exists()


def write_fp8_checkpoint(path, block=16):
    """A tiny LLaMA whose block matrices are stored as FP8 (e4m3) with one scale per 16 x 16 block,
    the layout of fine-grained FP8 checkpoints (DeepSeek-V3 style: weight + weight_scale_inv)."""
    save_tiny("llama", path)
    weights = load_file(path / "model.safetensors")
    stored = {}
    for name, w in weights.items():
        if ".layers." in name and name.endswith("proj.weight"):
            rows, cols = w.shape
            tiles = w.reshape(rows // block, block, cols // block, block)
            scale = tiles.abs().amax(dim=(1, 3)) / torch.finfo(torch.float8_e4m3fn).max
            stored[name] = (tiles / scale[:, None, :, None]).reshape(rows, cols).to(torch.float8_e4m3fn)
            stored[name.replace(".weight", ".weight_scale_inv")] = scale
        else:
            stored[name] = w
    save_file(stored, path / "model.safetensors", metadata={"format": "pt"})
    with_quantization_config(path, {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [block, block]})
    return weights


def test_fp8_checkpoint_is_dequantized_on_load(tmp_path, cli):
    original = write_fp8_checkpoint(tmp_path / "tiny-fp8")
    model, _ = wc.load_model(tmp_path / "tiny-fp8", device="cpu")
    assert not hasattr(model.config, "quantization_config") and not getattr(model, "is_quantized", False)
    state = model.state_dict()
    assert not [k for k in state if "scale" in k]
    for t in wc.all_targets(model):
        assert type(t.module) is torch.nn.Linear and t.weight().dtype == torch.float32
        expected = original[f"{t.name}.weight"]
        # e4m3 keeps 3 mantissa bits: each value is within 1/16 of itself, so of the largest.
        assert (t.weight() - expected).abs().max() <= expected.abs().max() / 16, t.name
    report = wc.prune(model, "wanda", "2:4", calibration=torch.randint(0, 256, (4, 32)), progress=False)
    assert report["sparsity"] == 0.5

    # The exported model is a plain float checkpoint.
    pruned = tmp_path / "pruned.safetensors"
    wc.save_pruned(model, pruned)
    assert cli("export", "--model", tmp_path / "tiny-fp8", "--pruned", pruned, "--out", tmp_path / "export")[0] == 0
    assert "quantization_config" not in json.loads((tmp_path / "export" / "config.json").read_text())
