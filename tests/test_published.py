"""config/published.yaml: every block names its source and states its protocol, every row a model and method of
the paper's grid."""
from pathlib import Path

import yaml

from wanda_core import protocol
from wanda_core.grid import pattern_args

ROOT = Path(__file__).resolve().parents[1]


def test_published_blocks_are_well_formed():
    blocks = yaml.safe_load((ROOT / "config" / "published.yaml").read_text())
    paper = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
    sources = [b["source"] for b in blocks]
    assert len(set(sources)) == len(sources)  # one block per source: never merged
    for block in blocks:
        assert block.get("metric", "perplexity") in ("perplexity", "acc"), block["source"]
        # Every block states its protocol, each field known or 'unknown', and where it was read.
        assert set(block["protocol"]) <= {"eval", "calibration", "zeroshot", "seeds", "from"}, block["source"]
        assert block["protocol"]["from"].strip(), block["source"]
        stated = protocol.published_protocol(block)
        for key in ("eval_seqlen", "calibration_nsamples", "calibration_seqlen"):
            assert protocol.is_unknown(stated[key]) or int(stated[key]) > 0, (block["source"], key)
        seen = set()
        for row in block["rows"]:
            assert {"model", "method", "pattern", "value"} <= set(row) <= {"model", "method", "pattern", "value", "std"}, row
            assert row["model"] in paper["models"] and row["method"] in paper["methods"], row
            pattern_args(row["pattern"])  # a valid pattern label
            assert (row["method"] == "dense") == (row["pattern"] == "none"), row
            assert isinstance(row["value"], (int, float)) and row["value"] > 0, row
            key = (row["model"], row["method"], row["pattern"])
            assert key not in seen, f"{block['source']}: {key} twice"
            seen.add(key)


def test_the_readme_block_is_at_the_models_own_length():
    """locuslab/wanda main.py: model.seqlen = max_position_embeddings, which the paper config states for each model."""
    blocks = {b["source"]: b for b in yaml.safe_load((ROOT / "config" / "published.yaml").read_text())}
    paper = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
    readme = blocks["locuslab/wanda README (LLaMA-2 results)"]
    stated = protocol.published_protocol(readme)
    for row in readme["rows"]:
        positions = paper["models"][row["model"]]["max_position_embeddings"]
        assert stated["eval_seqlen"] == stated["calibration_seqlen"] == positions == 4096, row
    assert paper["calibration"]["seqlen"] == paper["evals"]["perplexity"]["seqlen"] == "model"
    assert protocol.is_unknown(protocol.published_protocol(blocks["Jiajun-Ji/wanda SUPPORTED_MODELS.md"])["eval_seqlen"])
