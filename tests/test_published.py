"""config/published.yaml: every block names its source, every row a model and method of the paper's grid."""
from pathlib import Path

import yaml

from wanda_core.grid import pattern_args

ROOT = Path(__file__).resolve().parents[1]


def test_published_blocks_are_well_formed():
    blocks = yaml.safe_load((ROOT / "config" / "published.yaml").read_text())
    paper = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
    sources = [b["source"] for b in blocks]
    assert len(set(sources)) == len(sources)  # one block per source: never merged
    for block in blocks:
        assert block.get("metric", "perplexity") in ("perplexity", "acc"), block["source"]
        seen = set()
        for row in block["rows"]:
            assert set(row) == {"model", "method", "pattern", "value"}, row
            assert row["model"] in paper["models"] and row["method"] in paper["methods"], row
            pattern_args(row["pattern"])  # a valid pattern label
            assert (row["method"] == "dense") == (row["pattern"] == "none"), row
            assert isinstance(row["value"], (int, float)) and row["value"] > 0, row
            key = (row["model"], row["method"], row["pattern"])
            assert key not in seen, f"{block['source']}: {key} twice"
            seen.add(key)
