"""Tiny, randomly initialised causal LMs for tests.

Everything is built from configs with ``AutoModelForCausalLM.from_config``:
nothing is downloaded and no tokenizer files are needed (feed integer
``input_ids`` in ``[0, VOCAB)`` directly).

Common shape: hidden 64, 2 layers, 4 attention heads (head_dim 16), 2 KV heads
where the architecture supports GQA, MLP intermediate 128 (MoE: 4 experts,
top-2, expert intermediate 64), vocab 256, >= 512 positions, untied lm_head.

Every linear layer (``nn.Linear`` and GPT-2 ``Conv1D``) inside the decoder
blocks has an input width divisible by 8, so 2:4 and 4:8 semi-structured
patterns apply to all of them.

``tiny_config(arch, **overrides)`` accepts extra config attributes, e.g.
``tiny_config("falcon", new_decoder_architecture=True, num_kv_heads=2)``.

An arch is a transformers model_type, or a name for a variant of one (``MODEL_TYPE``):
``llama3`` is a LLaMA-3 config (GQA and llama3 rope scaling; Yi and DeepSeek-LLM are LLaMA
configs too), ``gemma3`` the text model of Gemma 3 (sliding-window and global layers).
Attention windows (GPT-Neo local layers, Gemma 3 sliding layers) are 8 tokens, shorter than the
test sequences, so the layers of each kind really differ.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS  # 16
INTERMEDIATE = 128
NUM_EXPERTS = 4
TOP_K = 2
EXPERT_INTERMEDIATE = 64
VOCAB = 256
MAX_POS = 512

ARCHS: list[str] = [
    "llama",
    "mistral",
    "qwen2",
    "gemma",
    "phi",
    "opt",
    "gpt2",
    "gpt_neox",
    "bloom",
    "falcon",
    "mixtral",
    "qwen2_moe",
    "gptj",
    "gpt_neo",
    "llama3",
    "gemma3",
]

# Arch names that are not transformers model types.
MODEL_TYPE = {"llama3": "llama", "gemma3": "gemma3_text"}
WINDOW = 8

# Shared by the llama-like configs (model_type -> AutoConfig kwargs).
_LLAMA_LIKE = dict(
    hidden_size=HIDDEN,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    head_dim=HEAD_DIM,
    intermediate_size=INTERMEDIATE,
    max_position_embeddings=MAX_POS,
)

# Token ids must be < VOCAB; the defaults of several configs point past it.
_SPECIAL_TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)

_CONFIGS: dict[str, dict] = {
    "llama": dict(_LLAMA_LIKE),
    # sliding_window >= sequence lengths used in tests, so it never kicks in.
    "mistral": dict(_LLAMA_LIKE, sliding_window=MAX_POS),
    "qwen2": dict(_LLAMA_LIKE, use_sliding_window=False),
    "gemma": dict(_LLAMA_LIKE),
    # partial_rotary_factor 0.5 -> rotary dim 8 of head_dim 16.
    "phi": dict(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=MAX_POS,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
    ),
    # OPT has no GQA; word_embed_proj_dim == hidden so there are no
    # project_in/project_out linears.
    "opt": dict(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        ffn_dim=INTERMEDIATE,
        word_embed_proj_dim=HIDDEN,
        max_position_embeddings=MAX_POS,
        dropout=0.0,
    ),
    # GPT-2 uses Conv1D (weight [in, out]); n_inner sets the MLP width.
    "gpt2": dict(
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        n_inner=INTERMEDIATE,
        n_positions=MAX_POS,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    ),
    # rotary_pct (partial_rotary_factor) 0.25 -> rotary dim 4 of head_dim 16.
    "gpt_neox": dict(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=MAX_POS,
    ),
    # BLOOM: alibi (no position embeddings), MLP width is fixed at 4*hidden=256,
    # so dense_4h_to_h has in_features 256.
    "bloom": dict(hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS),
    # Falcon-7B layout: multi-query (1 shared KV head), parallel attn+MLP,
    # rotary. num_kv_heads is ignored while multi_query=True; it is HEADS so
    # that the override multi_query=False also works (transformers' old
    # layout breaks if num_kv_heads != num_attention_heads there). For the
    # Falcon-40B layout pass new_decoder_architecture=True, num_kv_heads=2.
    "falcon": dict(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_kv_heads=HEADS,
        ffn_hidden_size=INTERMEDIATE,
        max_position_embeddings=MAX_POS,
        multi_query=True,
        new_decoder_architecture=False,
        parallel_attn=True,
        alibi=False,
        bias=False,
    ),
    # Mixtral: intermediate_size is the per-expert width.
    "mixtral": dict(
        _LLAMA_LIKE,
        intermediate_size=EXPERT_INTERMEDIATE,
        num_local_experts=NUM_EXPERTS,
        num_experts_per_tok=TOP_K,
        sliding_window=None,
    ),
    "qwen2_moe": dict(
        _LLAMA_LIKE,
        moe_intermediate_size=EXPERT_INTERMEDIATE,
        shared_expert_intermediate_size=INTERMEDIATE,
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=TOP_K,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        use_sliding_window=False,
    ),
    # GPT-J: rotary_dim must be <= head_dim (16); n_inner sets the MLP width.
    "gptj": dict(
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        n_inner=INTERMEDIATE,
        rotary_dim=8,
        n_positions=MAX_POS,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    ),
    # GPT-Neo: global and local (windowed) attention alternate; MLP width set by intermediate_size.
    "gpt_neo": dict(
        hidden_size=HIDDEN,
        num_layers=LAYERS,
        num_heads=HEADS,
        attention_types=[[["global", "local"], LAYERS // 2]],
        window_size=WINDOW,
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=MAX_POS,
        resid_dropout=0.0,
        embed_dropout=0.0,
        attention_dropout=0.0,
    ),
    # LLaMA-3 (and Yi, DeepSeek-LLM: LLaMA configs): GQA, rope theta 500000 with llama3 frequency scaling
    # (original context 64 of 512, so the scaling changes the low frequencies).
    "llama3": dict(
        _LLAMA_LIKE,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=64),
    ),
    # Gemma 3: a sliding-window layer then a global one, each with its own rotary base; q/k norms,
    # four norms per block, embeddings scaled by sqrt(hidden).
    "gemma3": dict(
        _LLAMA_LIKE,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=WINDOW,
        query_pre_attn_scalar=HEAD_DIM,
    ),
}

# Where each arch keeps its decoder-block ModuleList (dotted attribute path
# from the *ForCausalLM model).
BLOCKS_PATH: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "gemma": "model.layers",
    "phi": "model.layers",
    "opt": "model.decoder.layers",
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
    "bloom": "transformer.h",
    "falcon": "transformer.h",
    "mixtral": "model.layers",
    "qwen2_moe": "model.layers",
    "gptj": "transformer.h",
    "gpt_neo": "transformer.h",
    "llama3": "model.layers",
    "gemma3": "model.layers",
    "gemma3_text": "model.layers",
}


def tiny_config(arch: str, **overrides):
    """A tiny transformers config for ``arch`` (see module docstring)."""
    if arch not in _CONFIGS:
        raise KeyError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    kwargs = dict(_CONFIGS[arch])
    kwargs.update(vocab_size=VOCAB, tie_word_embeddings=False, **_SPECIAL_TOKENS)
    kwargs.update(overrides)
    return AutoConfig.for_model(MODEL_TYPE.get(arch, arch), **kwargs)


def tiny_model(arch: str, seed: int = 0, **overrides):
    """A tiny random ``*ForCausalLM`` in eval mode, float32, on CPU.

    Weights are a deterministic function of ``(arch, seed, overrides)``.
    """
    cfg = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model.eval()


def get_blocks(model, arch: str | None = None):
    """The decoder-block ``nn.ModuleList`` of a tiny model."""
    arch = arch or model.config.model_type
    obj = model
    for name in BLOCKS_PATH[arch].split("."):
        obj = getattr(obj, name)
    return obj


def tiny_input_ids(batch: int = 2, seq: int = 32, seed: int = 0) -> torch.Tensor:
    """Deterministic random token ids in ``[0, VOCAB)``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def tiny_tokenizer():
    """A byte-level tokenizer with exactly VOCAB=256 tokens (one per byte, no merges): no files needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    # Ids 0/1/2 double as pad/bos/eos (as in the tiny configs), so tools that need them (lm-eval) work.
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=MAX_POS, pad_token=alphabet[0],
                                   bos_token=alphabet[1], eos_token=alphabet[2])


def save_tiny(arch: str, path, seed: int = 0, **overrides):
    """A tiny random model with its byte-level tokenizer as a plain Hugging Face directory."""
    model = tiny_model(arch, seed=seed, **overrides)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
