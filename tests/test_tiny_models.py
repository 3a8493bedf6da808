"""Sanity checks for the tiny random model fixtures in ``tiny_models``."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from tiny_models import ARCHS, VOCAB, get_blocks, tiny_config, tiny_input_ids, tiny_model


def _block_linear_in_features(block: nn.Module) -> dict[str, int]:
    widths = {}
    for name, mod in block.named_modules():
        if isinstance(mod, nn.Linear):
            widths[name] = mod.in_features
        elif isinstance(mod, Conv1D):  # GPT-2: weight is [in, out]
            widths[name] = mod.weight.shape[0]
    return widths


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_forward_and_shapes(arch):
    cfg = tiny_config(arch)
    assert cfg.vocab_size == VOCAB
    assert cfg.tie_word_embeddings is False

    model = tiny_model(arch)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()

    blocks = get_blocks(model, arch)
    assert isinstance(blocks, nn.ModuleList)
    assert len(blocks) == 2

    for i, block in enumerate(blocks):
        widths = _block_linear_in_features(block)
        assert widths, f"{arch} block {i} has no linear layers"
        bad = {n: w for n, w in widths.items() if w % 8}
        assert not bad, f"{arch} block {i}: in_features not divisible by 8: {bad}"

    ids = tiny_input_ids(2, 32)
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    assert logits.shape == (2, 32, VOCAB)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mixtral"])
def test_tiny_model_is_deterministic(arch):
    a = tiny_model(arch, seed=0).state_dict()
    b = tiny_model(arch, seed=0).state_dict()
    c = tiny_model(arch, seed=1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
