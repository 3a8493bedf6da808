"""Models that ship their own code (auto_map) and blocks the discovery does not find: trust_remote_code, blocks.

The test writes a tiny hybrid model as a Hugging Face directory with its configuration, modeling and
tokenizer code: its decoder blocks alternate an attention block and an MLP block (as hybrid models
do), so no list of identical layers exists and the blocks must be named (`backbone.mixers`).
"""
import json
import textwrap

import pytest
import torch

import wanda_core as wc
from tiny_models import tiny_tokenizer

CONFIGURATION = '''
from transformers import PretrainedConfig


class TinyHybridConfig(PretrainedConfig):
    model_type = "tiny_hybrid"

    def __init__(self, vocab_size=256, hidden_size=64, num_mixers=4, num_heads=4, intermediate_size=128,
                 max_position_embeddings=512, **kwargs):
        self.vocab_size, self.hidden_size, self.num_mixers = vocab_size, hidden_size, num_mixers
        self.num_heads, self.intermediate_size = num_heads, intermediate_size
        self.max_position_embeddings = max_position_embeddings
        super().__init__(**kwargs)
'''

MODELING = '''
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_tiny_hybrid import TinyHybridConfig


class AttentionMixer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.heads = config.num_heads
        self.norm = nn.LayerNorm(config.hidden_size)
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.out = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden_states):
        b, s, h = hidden_states.shape
        q, k, v = self.qkv(self.norm(hidden_states)).view(b, s, 3, self.heads, h // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return hidden_states + self.out(y.transpose(1, 2).reshape(b, s, h))


class MLPMixer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm = nn.LayerNorm(config.hidden_size)
        self.up = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, hidden_states):
        return hidden_states + self.down(F.gelu(self.up(self.norm(hidden_states))))


class TinyHybridBackbone(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.mixers = nn.ModuleList(AttentionMixer(config) if i % 2 == 0 else MLPMixer(config)
                                    for i in range(config.num_mixers))
        self.norm = nn.LayerNorm(config.hidden_size)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for mixer in self.mixers:
            x = mixer(x)
        return self.norm(x)


class TinyHybridForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = TinyHybridConfig
    base_model_prefix = "backbone"

    def __init__(self, config):
        super().__init__(config)
        self.backbone = TinyHybridBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.05)

    def get_input_embeddings(self):
        return self.backbone.embed

    def set_input_embeddings(self, value):
        self.backbone.embed = value

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, labels=None, use_cache=None, **kwargs):
        logits = self.lm_head(self.backbone(input_ids))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return CausalLMOutputWithPast(loss=loss, logits=logits)
'''

TOKENIZATION = '''
from transformers import PreTrainedTokenizerFast


class TinyHybridTokenizer(PreTrainedTokenizerFast):
    """Byte-level, one token per byte: remote code only so that loading it needs trust_remote_code."""
'''

BLOCKS = "backbone.mixers"


def write_remote_code_model(path):
    """The tiny hybrid model (random weights, seed 0) with its code, as a plain HF directory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path.mkdir(parents=True)
    for name, code in [("configuration_tiny_hybrid.py", CONFIGURATION), ("modeling_tiny_hybrid.py", MODELING),
                       ("tokenization_tiny_hybrid.py", TOKENIZATION)]:
        (path / name).write_text(textwrap.dedent(code))
    auto_map = {"AutoConfig": "configuration_tiny_hybrid.TinyHybridConfig",
                "AutoModelForCausalLM": "modeling_tiny_hybrid.TinyHybridForCausalLM"}
    (path / "config.json").write_text(json.dumps({"model_type": "tiny_hybrid", "auto_map": auto_map}))
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, trust_remote_code=True).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    tok_config = json.loads((path / "tokenizer_config.json").read_text())
    tok_config.update(tokenizer_class="TinyHybridTokenizer",
                      auto_map={"AutoTokenizer": [None, "tokenization_tiny_hybrid.TinyHybridTokenizer"]})
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    return path


@pytest.fixture(scope="module")
def remote_dir(tmp_path_factory):
    return write_remote_code_model(tmp_path_factory.mktemp("remote") / "tiny-hybrid")


def test_remote_code_needs_trust(remote_dir):
    with pytest.raises(wc.WandaError, match="ships its own modeling code .* --trust-remote-code"):
        wc.load_model(remote_dir, device="cpu")
    with pytest.raises(wc.WandaError, match="ships its own modeling code"):
        wc.load_tokenizer(remote_dir)
    tokenizer = wc.load_tokenizer(remote_dir, trust_remote_code=True)
    assert type(tokenizer).__name__ == "TinyHybridTokenizer"


def test_unknown_blocks_are_named_by_the_user(remote_dir):
    model, tokenizer = wc.load_model(remote_dir, device="cpu", trust_remote_code=True)
    assert type(model).__name__ == "TinyHybridForCausalLM" and type(tokenizer).__name__ == "TinyHybridTokenizer"
    with pytest.raises(wc.WandaError, match="cannot find the decoder blocks .* --blocks"):
        wc.find_blocks(model)
    with pytest.raises(wc.WandaError, match="has no such module .*backbone, lm_head"):
        wc.load_model(remote_dir, device="cpu", trust_remote_code=True, blocks="transformer.h")
    with pytest.raises(wc.WandaError, match="not a non-empty list of blocks"):
        wc.load_model(remote_dir, device="cpu", trust_remote_code=True, blocks="backbone.embed")

    model, _ = wc.load_model(remote_dir, device="cpu", trust_remote_code=True, blocks=BLOCKS)
    assert wc.find_blocks(model)[0] == BLOCKS
    targets = wc.all_targets(model)
    assert [t.name for t in targets[:4]] == [f"{BLOCKS}.0.qkv", f"{BLOCKS}.0.out", f"{BLOCKS}.1.up", f"{BLOCKS}.1.down"]
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    report = wc.prune(model, "wanda", "2:4", calibration=calib, progress=False)
    assert report["sparsity"] == 0.5 and len(report["layers"]) == 8
    assert wc.check_sparsity(model)["overall"] == 0.5


def test_remote_code_model_through_the_command_line(tmp_path, remote_dir, corpus, cli):
    calib, pruned, export = tmp_path / "calib.safetensors", tmp_path / "pruned.safetensors", tmp_path / "export"
    status, _, errors = cli("calibrate", "--model", remote_dir, "--data", corpus, "--nsamples", 4, "--seqlen", 32, "--out", calib)
    assert status == 2 and len(errors) == 1 and "--trust-remote-code" in errors[0] and not calib.exists()
    assert cli("calibrate", "--model", remote_dir, "--trust-remote-code", "--data", corpus, "--nsamples", 4,
               "--seqlen", 32, "--out", calib)[0] == 0
    status, _, errors = cli("prune", "--model", remote_dir, "--trust-remote-code", "--method", "wanda",
                            "--calibration", calib, "--out", pruned, "--quiet")
    assert status == 2 and len(errors) == 1 and "--blocks" in errors[0] and not pruned.exists()
    common = ["--model", remote_dir, "--trust-remote-code", "--blocks", BLOCKS]
    assert cli("prune", *common, "--method", "wanda", "--calibration", calib, "--out", pruned, "--quiet")[0] == 0
    status, out, _ = cli("sparsity", *common, "--pruned", pruned)
    assert status == 0 and json.loads(out)["overall"] == 0.5
    status, out, _ = cli("eval-ppl", *common, "--pruned", pruned, "--data", corpus, "--seqlen", 32, "--max-windows", 2, "--quiet")
    assert status == 0 and json.loads(out)["perplexity"] > 1
    assert cli("export", *common, "--pruned", pruned, "--out", export)[0] == 0

    # The export carries its code and loads in plain transformers (with trust_remote_code), sparse.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (export / "modeling_tiny_hybrid.py").is_file()
    model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True)
    assert type(AutoTokenizer.from_pretrained(export, trust_remote_code=True)).__name__ == "TinyHybridTokenizer"
    up = model.backbone.mixers[1].up.weight
    assert ((up == 0).sum(1) == up.shape[1] // 2).all()


def test_workflow_passes_the_model_flags(tmp_path, remote_dir, corpus):
    # Every rule that loads the model gets its flags (calibrate, which loads only the tokenizer, no --blocks);
    # the command line test above runs those commands for real.
    from test_workflow import smk

    config = {
        "models": {"tiny-hybrid": {"source": str(remote_dir), "group": "Remote", "trust_remote_code": True, "blocks": BLOCKS}},
        "methods": {"dense": {"method": "dense"}, "wanda": {"method": "wanda"}},
        "datasets": {"text": {"path": str(corpus)}},
        "calibration": {"dataset": "text", "nsamples": 2, "seqlen": 32},
        "evals": {"perplexity": {"datasets": ["text"], "seqlen": 32, "max_windows": 2}},
    }
    proc = smk(tmp_path, config, "-n", "-p")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    commands = [line for line in (proc.stdout + proc.stderr).splitlines() if "wanda-core" in line]
    by_stage = {stage: [c for c in commands if f" {stage} --model" in c] for stage in ("calibrate", "prune", "eval-ppl")}
    assert [len(c) for c in by_stage.values()] == [1, 1, 2], proc.stdout + proc.stderr
    assert "--trust-remote-code --data" in by_stage["calibrate"][0]
    for command in by_stage["prune"] + by_stage["eval-ppl"]:
        assert f"--trust-remote-code --blocks {BLOCKS}" in command, command
