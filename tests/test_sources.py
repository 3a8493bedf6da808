"""Model sources: pypi: packages that ship a GGUF file or assemble one (chunked packages)."""
import sys
import textwrap

import pytest

import wanda_core as wc
from wanda_core.model import resolve_source

ASSEMBLER = '''
from pathlib import Path

MODEL_NAME = "tiny-model.gguf"
CALLS = []


def assemble(output_path=None):
    CALLS.append(output_path)
    if Path(output_path).exists():
        raise FileExistsError(output_path)  # as the real assemblers do without overwrite=True
    Path(output_path).write_bytes(b"".join(Path(__file__).with_name(f"part{i}").read_bytes() for i in range(2)))
    if "fail" in __name__:
        raise ValueError("Assembled file sha256 did not match expected value")
    return Path(output_path)
'''


@pytest.fixture
def packages(tmp_path, monkeypatch):
    """Installed-looking packages on sys.path: one with a .gguf file, assemblers that work or fail."""
    root = tmp_path / "site"
    for name in ("fake_gguf_shipped", "fake_gguf_chunked", "fake_gguf_chunked_fail", "fake_no_model"):
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text(textwrap.dedent(ASSEMBLER) if "chunked" in name else "")
        for i in range(2):
            (root / name / f"part{i}").write_bytes(b"GGUF" if i == 0 else b"-rest")
    (root / "fake_gguf_shipped" / "model.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("WANDA_CACHE", str(tmp_path / "cache"))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("fake_")]:
        del sys.modules[name]


def test_package_shipping_a_gguf_file_is_used_in_place(packages):
    assert resolve_source("pypi:fake-gguf-shipped") == (str(packages / "site" / "fake_gguf_shipped"), {"gguf_file": "model.gguf"})
    assert "fake_gguf_shipped" not in sys.modules  # found without importing it


def test_chunked_package_is_assembled_once_into_the_cache(packages):
    folder = packages / "cache" / "gguf" / "fake_gguf_chunked"
    assert resolve_source("pypi:fake-gguf-chunked") == (str(folder), {"gguf_file": "tiny-model.gguf"})
    assert (folder / "tiny-model.gguf").read_bytes() == b"GGUF-rest"
    assert resolve_source("pypi:fake-gguf-chunked")[1] == {"gguf_file": "tiny-model.gguf"}
    assert len(sys.modules["fake_gguf_chunked"].CALLS) == 1  # the second time the file is reused


def test_failed_assembly_leaves_nothing(packages):
    with pytest.raises(wc.WandaError, match="pypi:fake-gguf-chunked-fail: assembling its GGUF file failed: Assembled file sha256"):
        resolve_source("pypi:fake-gguf-chunked-fail")
    assert not any((packages / "cache" / "gguf" / "fake_gguf_chunked_fail").iterdir())


def test_package_without_a_model_is_named(packages):
    with pytest.raises(wc.WandaError, match="neither a .gguf file nor an assemble"):
        resolve_source("pypi:fake-no-model")
    with pytest.raises(wc.WandaError, match="'fake_not_there' is not installed"):
        resolve_source("pypi:fake-not-there")
