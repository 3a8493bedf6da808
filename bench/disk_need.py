"""Disk a workflow config needs: the dense models under resources/ and every pruned-weights file, computed
from the config's grid and each model's architecture (exact parameter counts of a model built on the meta
device from its published dimensions; no download). Prints JSON and writes bench/results/disk_<config>.json.

    python bench/disk_need.py [--config config/paper.yaml]

A pruned file holds 1 bit per pruned weight (the mask) and, for methods that change the kept values
(SparseGPT), those values in the model's dtype; the file format before masks-only storage kept the
values of every method.
"""
import argparse
import math
import os
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, os.path.dirname(__file__))
from common import ROOT, write_result  # noqa: E402

# Published dimensions of the paper grid's models (their config.json on the Hub), by source.
ARCHITECTURES = {
    "huggyllama/llama-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000)),
    "huggyllama/llama-13b": ("llama", dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40, vocab_size=32000)),
    "huggyllama/llama-30b": ("llama", dict(hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52, vocab_size=32000)),
    "huggyllama/llama-65b": ("llama", dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64, vocab_size=32000)),
    "meta-llama/Llama-2-7b-hf": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000)),
    "meta-llama/Llama-2-13b-hf": ("llama", dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40, vocab_size=32000)),
    "meta-llama/Llama-2-70b-hf": ("llama", dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, vocab_size=32000)),
    "facebook/opt-125m": ("opt", dict(hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12, word_embed_proj_dim=768, vocab_size=50272)),
    "facebook/opt-350m": ("opt", dict(hidden_size=1024, ffn_dim=4096, num_hidden_layers=24, num_attention_heads=16, word_embed_proj_dim=512, do_layer_norm_before=False, vocab_size=50272)),
    "facebook/opt-1.3b": ("opt", dict(hidden_size=2048, ffn_dim=8192, num_hidden_layers=24, num_attention_heads=32, word_embed_proj_dim=2048, vocab_size=50272)),
    "facebook/opt-2.7b": ("opt", dict(hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32, word_embed_proj_dim=2560, vocab_size=50272)),
    "facebook/opt-6.7b": ("opt", dict(hidden_size=4096, ffn_dim=16384, num_hidden_layers=32, num_attention_heads=32, word_embed_proj_dim=4096, vocab_size=50272)),
    "facebook/opt-13b": ("opt", dict(hidden_size=5120, ffn_dim=20480, num_hidden_layers=40, num_attention_heads=40, word_embed_proj_dim=5120, vocab_size=50272)),
    "facebook/opt-30b": ("opt", dict(hidden_size=7168, ffn_dim=28672, num_hidden_layers=48, num_attention_heads=56, word_embed_proj_dim=7168, vocab_size=50272)),
    "facebook/opt-66b": ("opt", dict(hidden_size=9216, ffn_dim=36864, num_hidden_layers=64, num_attention_heads=72, word_embed_proj_dim=9216, vocab_size=50272)),
}
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "auto": 2}


def param_counts(source: str) -> dict:
    """Total parameters and those of the pruned set (the decoder blocks' linear layers), counted on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from wanda_core.model import all_targets

    model_type, dims = ARCHITECTURES[source]
    config = AutoConfig.for_model(model_type, **dims)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    pruned = sum(math.prod(t.shape) for t in all_targets(model))
    sizes = [math.prod(t.shape) for t in all_targets(model)]
    return {"params": sum(p.numel() for p in model.parameters()), "pruned_params": pruned, "matrix_sizes": sizes}


def pruned_file_bytes(sizes: list[int], sparsity: float | None, values: bool, dtype_bytes: int) -> int:
    masks = sum(math.ceil(n / 8) for n in sizes)
    kept = sum(n - int(n * sparsity) for n in sizes) if values else 0
    return masks + kept * dtype_bytes


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "config" / "paper.yaml"))
    args = p.parse_args()
    from wanda_core import grid

    config = yaml.safe_load(Path(args.config).read_text())
    config.setdefault("pruning", {"keep_pruned": True})
    runs = grid.runs(config)
    models, total_models, total_new, total_old = [], 0, 0, 0
    for name, spec in config["models"].items():
        if spec["source"] not in ARCHITECTURES:
            sys.exit(f"no architecture known for {spec['source']}: add its dimensions to ARCHITECTURES")
        counts = param_counts(spec["source"])
        b = BYTES[spec.get("dtype", "auto")]
        new = old = 0
        for run in runs:
            model, method, label = run.model, run.method, run.pattern
            if model != name or config["methods"][method]["method"] == "dense":
                continue
            kind = config["methods"][method]["method"]
            # N:M patterns 0.5; own structures (three_tier) and the baselines matched to them: 41%
            sparsity = grid.pattern_args(label)[1] if label != "none" and not label.startswith(grid.MATCH) else 0.41
            if sparsity is None:
                sparsity = 0.5
            updates = kind == "sparsegpt" or (config["methods"][method].get("params", {}).get("base") == "sparsegpt")
            new += pruned_file_bytes(counts["matrix_sizes"], sparsity, updates, b)
            old += pruned_file_bytes(counts["matrix_sizes"], sparsity, True, b)
        dense = counts["params"] * b
        models.append({"model": name, "params": counts["params"], "pruned_params": counts["pruned_params"],
                       "dense_gb": round(dense / 1e9, 2), "pruned_files_gb": round(new / 1e9, 2),
                       "pruned_files_gb_values_always": round(old / 1e9, 2)})
        total_models += dense
        total_new += new
        total_old += old
    result = {"config": os.path.relpath(args.config, ROOT), "pruned_variants": sum(1 for r in runs if config["methods"][r.method]["method"] != "dense"),
              "models": models, "dense_models_gb": round(total_models / 1e9, 1), "pruned_files_gb": round(total_new / 1e9, 1),
              "pruned_files_gb_values_always": round(total_old / 1e9, 1),
              "total_gb": round((total_models + total_new) / 1e9, 1),
              "note": "three_tier counted at 41% sparsity; calibration files and results are a few MB"}
    write_result(f"disk_{Path(args.config).stem}", result)


if __name__ == "__main__":
    main()
