"""Pruned-weights files: masks alone when the method keeps the dense values, values only when it changes them;
the pipeline and compute dtype are recorded; CLI flags for both."""
import json

import pytest
import torch

import wanda_core as wc
from tiny_models import save_tiny
from wanda_core.cli import main
from wanda_core.pruned import read_metadata


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("pruned-file")
    model_dir = save_tiny("llama", root / "tiny-llama")
    calib = root / "calib.safetensors"
    wc.save_windows(torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(0)), calib)
    return root, model_dir, calib


def _prune(tiny, method, *extra):
    root, model_dir, calib = tiny
    out = root / f"{method}-{'-'.join(extra) or 'default'}.safetensors"
    code = main(["prune", "--model", str(model_dir), "--method", method, "--calibration", str(calib), "--out", str(out),
                 "--quiet", *extra])
    return code, out


@pytest.mark.parametrize("method,values", [("wanda", False), ("magnitude", False), ("three_tier", False), ("sparsegpt", True)])
def test_values_are_stored_only_when_the_method_changes_them(tiny, method, values):
    code, out = _prune(tiny, method)
    assert code == 0
    meta = read_metadata(out)
    assert json.loads(meta["values"]) is values
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        assert any(k.endswith(".values") for k in f.keys()) is values

    # Applied to the dense model, the file gives exactly the weights of pruning in memory.
    _, model_dir, calib = tiny
    model, _ = wc.load_model(model_dir, device="cpu")
    wc.prune(model, method, "unstructured", 0.5, wc.load_windows(calib), progress=False)
    fresh, _ = wc.load_model(model_dir, device="cpu")
    wc.load_pruned(fresh, out)
    for a, b in zip(wc.all_targets(model), wc.all_targets(fresh)):
        assert torch.equal(a.weight(), b.weight()), a.name


def test_a_mask_file_is_a_32nd_of_the_float32_weights(tiny):
    _, wanda = _prune(tiny, "wanda")
    _, sparsegpt = _prune(tiny, "sparsegpt")
    pruned_params = sum(t.weight().numel() for t in wc.all_targets(wc.load_model(tiny[1], device="cpu")[0]))
    header = 16 * 1024  # safetensors header and metadata
    assert wanda.stat().st_size <= pruned_params / 8 + header
    assert sparsegpt.stat().st_size >= pruned_params / 8 + pruned_params * 0.5 * 4


def test_pipeline_and_compute_dtype_are_recorded(tiny):
    code, out = _prune(tiny, "wanda", "--pipeline", "one_pass", "--compute-dtype", "bfloat16")
    assert code == 0
    meta = read_metadata(out)
    assert meta["pipeline"] == "one_pass" and meta["compute_dtype"] == "bfloat16"


def test_per_block_sparsity_from_the_command_line(tiny):
    code, out = _prune(tiny, "wanda", "--sparsity", "0.25,0.75")
    assert code == 0
    assert json.loads(read_metadata(out)["block_sparsity"]) == [0.25, 0.75]


@pytest.mark.parametrize("args,message", [
    (["--pipeline", "fast"], "error: unknown pipeline 'fast': choose one of sequential, one_pass, independent"),
    (["--compute-dtype", "int8"], "error: unknown compute dtype 'int8'"),
    (["--sparsity", "0.5,x"], "error: --sparsity needs a number or comma-separated numbers"),
    (["--sparsity", "0.5,0.5,0.5"], "error: 3 block sparsities given for a model of 2 decoder blocks"),
])
def test_bad_pipeline_arguments(tiny, capsys, args, message):
    code, out = _prune(tiny, "wanda", *args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(message), err
    assert not out.exists()
