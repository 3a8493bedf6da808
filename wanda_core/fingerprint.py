"""What a cached artifact was made from: fingerprints of a model's weights and of a tokenizer.

A pruned-weights file records the fingerprint of the dense model it was pruned from, and a
calibration file that of the tokenizer that made its token ids. A stage that gets an input made
from something else stops and names the file, instead of writing a wrong number.
"""
from __future__ import annotations

import hashlib
import json

import torch

from .errors import WandaError

SAMPLE = 256  # values per tensor in a model fingerprint: cheap even for a 70B model


def model_fingerprint(model) -> dict:
    """Names and shapes of every weight (hashed), and the mean |value| of a strided sample of each.

    The means are compared with a tolerance, so the same checkpoint loaded in float32, bf16 or fp16
    matches, while another checkpoint of the same architecture does not.
    """
    h = hashlib.sha256()
    scales = []
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)};".encode())
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // SAMPLE)][:SAMPLE]
        scales.append(float(sample.double().abs().mean()))
    return {"shapes": h.hexdigest()[:16], "scales": [float(f"{s:.5g}") for s in scales]}


def check_model(expected: dict | str | None, model, what: str) -> None:
    """Stop if `model` is not the model `what` (a file) was made from."""
    if not expected:
        return
    expected = json.loads(expected) if isinstance(expected, str) else expected
    actual = model_fingerprint(model)
    if expected["shapes"] != actual["shapes"]:
        raise WandaError(f"{what} was made from a model with other layers or shapes than this one")
    a, b = torch.tensor(expected["scales"]), torch.tensor(actual["scales"])
    if not torch.allclose(a, b, rtol=2e-2, atol=1e-6):
        worst = int(((a - b).abs() / b.abs().clamp(min=1e-6)).argmax())
        name = [n for n, _ in model.named_parameters()][worst]
        raise WandaError(f"{what} was made from other weights than this model's (first difference: {name})")


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the vocabulary: token ids mean the same thing only under the same vocabulary."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def tensor_hash(tensor: torch.Tensor) -> str:
    raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()[:16]
