"""Methods from outside the package: a dotted module path (CLI and config) or an installed entry point,
run like a built-in one. The module is the worked example of docs/methods.md (examples/mypkg/norm_power.py),
so the page's example is the code that these tests run."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wanda_core.errors import WandaError
from wanda_core.masks import parse_pattern
from wanda_core.methods import ENTRY_POINT_GROUP, Stats, check_params, get_method, wanda
from wanda_core.pruned import read_masks
from wanda_core.request import resolve

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
EXAMPLE = EXAMPLES / "mypkg" / "norm_power.py"
PAGES = [ROOT / "docs" / "methods.md"]


def with_examples(**env) -> dict:
    """The environment of a subprocess that can import mypkg (and `env` on top)."""
    path = os.pathsep.join(p for p in (str(EXAMPLES), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **env}


@pytest.fixture
def mypkg(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    yield
    for name in [m for m in sys.modules if m == "mypkg" or m.startswith("mypkg.")]:
        del sys.modules[name]


def test_the_worked_example_is_on_the_page_and_short():
    code = EXAMPLE.read_text()
    assert len(code.splitlines()) < 40
    pages = [p for p in PAGES if p.is_file() and code in p.read_text()]
    assert pages, f"the text of {EXAMPLE.relative_to(ROOT)} is on none of {', '.join(str(p.relative_to(ROOT)) for p in PAGES)}"


def test_a_dotted_path_is_a_method(mypkg):
    module = get_method("mypkg.norm_power")
    assert module.NAME == "norm_power"
    request = resolve("mypkg.norm_power", "2:4", None, {"power": 0.5})
    assert request.params == {"power": 0.5, "per_row": True} and request.stats == ("sqnorm",)
    assert request.needs_calibration and not request.own_pattern
    with pytest.raises(WandaError, match="norm_power power must be a number >= 0, got -1"):
        resolve("mypkg.norm_power", "unstructured", 0.5, {"power": -1})
    with pytest.raises(WandaError, match="method 'norm_power' has no option 'alpha' \\(options: per_row, power\\)"):
        resolve("mypkg.norm_power", "unstructured", 0.5, {"alpha": 1})
    # power 1 is Wanda's score: the same mask, matrix for matrix
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(16, 32, generator=g), torch.randn(64, 32, generator=g)
    stats = Stats()
    stats.add(x, "sqnorm")
    for pattern in (parse_pattern("unstructured", 0.6), parse_pattern("2:4")):
        ours = module.prune_matrix(w.clone(), stats, pattern, **check_params(module, pattern, {}))
        assert torch.equal(ours.keep, wanda.prune_matrix(w.clone(), stats, pattern).keep)
        assert ours.info == {"norm_power": 1.0}


def test_unknown_and_broken_methods_are_one_line(mypkg, tmp_path, monkeypatch):
    with pytest.raises(WandaError) as e:
        get_method("lottery")
    message = str(e.value)
    assert message.startswith("unknown method 'lottery': choose one of admm, alps, block,") and "\n" not in message
    assert "dotted path (mypkg.my_method)" in message and ENTRY_POINT_GROUP in message
    with pytest.raises(WandaError, match="unknown method 'nopkg.mine': no module 'nopkg' on the Python path"):
        get_method("nopkg.mine")
    with pytest.raises(WandaError, match="unknown method 'mypkg.nothing': no module 'mypkg.nothing'"):
        get_method("mypkg.nothing")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "__init__.py").write_text("")
    (outside / "halfway.py").write_text("NAME = 'halfway'\nPARAMS = {}\n")
    (outside / "crashes.py").write_text("raise RuntimeError('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(WandaError, match="method 'outside.halfway' .* lacks STATS, PATTERNS, prune_matrix of the method contract"):
        get_method("outside.halfway")
    with pytest.raises(WandaError, match="method module 'outside.crashes' failed to import: RuntimeError: no GPU here"):
        get_method("outside.crashes")


def fake_distribution(root: Path, entry_points: str) -> None:
    """An installed package as importlib.metadata finds it: a *.dist-info folder on sys.path (no pip needed)."""
    info = root / "mypkg_methods-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mypkg-methods\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)


def test_an_installed_entry_point_is_a_method(mypkg, tmp_path, monkeypatch):
    fake_distribution(tmp_path, f"[{ENTRY_POINT_GROUP}]\nnorm_power = mypkg.norm_power\nbroken = mypkg.absent\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert get_method("norm_power") is get_method("mypkg.norm_power")
    assert resolve("norm_power", "unstructured", 0.5, {"per_row": False}).params == {"power": 1.0, "per_row": False}
    with pytest.raises(WandaError, match="method 'broken' \\(entry point mypkg.absent\\) failed to import: ModuleNotFoundError"):
        get_method("broken")
    with pytest.raises(WandaError, match="; installed: broken, norm_power; or add one"):
        get_method("lottery")
    assert get_method("wanda") is wanda  # a package cannot replace a built-in method


def test_cli_prunes_with_an_outside_method(tmp_path, tiny_dir, corpus, cli):
    calib = tmp_path / "calib.safetensors"
    assert cli("calibrate", "--model", tiny_dir, "--data", corpus, "--nsamples", 4, "--seqlen", 64, "--out", calib)[0] == 0
    assert cli("prune", "--model", tiny_dir, "--method", "wanda", "--pattern", "2:4", "--calibration", calib,
               "--out", tmp_path / "wanda.safetensors", "--quiet")[0] == 0
    out, report = tmp_path / "mine.safetensors", tmp_path / "mine.json"
    command = [sys.executable, "-m", "wanda_core", "--threads", "1", "prune", "--model", str(tiny_dir), "--method",
               "mypkg.norm_power", "--pattern", "2:4", "--calibration", str(calib), "--out", str(out), "--report",
               str(report), "--quiet"]
    proc = subprocess.run(command, capture_output=True, text=True, env=with_examples())
    assert proc.returncode == 0, proc.stderr
    meta = json.loads(report.read_text())
    assert meta["method"] == "norm_power" and meta["params"] == {"power": 1.0, "per_row": True}
    assert meta["sparsity"] == pytest.approx(0.5)
    ours, theirs = read_masks(out), read_masks(tmp_path / "wanda.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)  # power 1 is Wanda
    # A bad option of the outside method: one error line, exit status 2, nothing written.
    bad = tmp_path / "bad" / "mine.safetensors"
    proc = subprocess.run([*command[:-5], "--param", "power=-2", "--out", str(bad), "--quiet"], capture_output=True,
                          text=True, env=with_examples())
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and errors == ["error: norm_power power must be a number >= 0, got -2"], proc.stderr
    assert not bad.parent.exists()


def test_workflow_dry_run_plans_an_outside_method(tmp_path):
    from test_workflow import job_counts, smk
    from tiny_models import save_tiny

    config = {
        "models": {"tiny-llama": {"source": str(save_tiny("llama", tmp_path / "sources" / "tiny")), "group": "Tiny"}},
        # the config's key names the result files; a dotted key is a plain folder name
        "methods": {"dense": {"method": "dense"}, "norm.half": {"method": "mypkg.norm_power", "params": {"power": 0.5}},
                    "wanda": {"method": "wanda"}},
        "patterns": ["unstructured-0.5", "2-4"],
        "datasets": {"calib": {"pydoc": "calibration"}, "eval": {"pydoc": "evaluation"}},
        "calibration": {"dataset": "calib", "nsamples": 2, "seqlen": 64},
        "evals": {"perplexity": {"datasets": ["eval"], "seqlen": 64, "max_windows": 2}},
        "published": None,
    }
    for folder in ("run", "bad", "missing"):
        (tmp_path / folder).mkdir()
    proc = smk(tmp_path / "run", config, "-n", "-p", env=with_examples())
    assert job_counts(proc)["prune"] == 4  # norm.half and wanda at both patterns, like a built-in one
    text = proc.stdout + proc.stderr
    for pattern in ("unstructured-0.5", "2-4"):
        assert f"results/pruned/tiny-llama/norm.half/{pattern}/seed0.safetensors" in text
    commands = [line for line in text.splitlines() if "--method mypkg.norm_power" in line]
    assert len(commands) == 2 and all(re.search(r"--param '?power=0\.5", c) for c in commands), commands
    # Its options are checked with the config, before any job.
    config["methods"]["norm.half"]["params"] = {"power": "half"}
    proc = smk(tmp_path / "bad", config, "-n", env=with_examples())
    assert proc.returncode != 0 and "config methods.norm.half: norm_power power must be a number >= 0, got 'half'" in proc.stdout + proc.stderr
    # Without the module on the path: one line naming it.
    proc = smk(tmp_path / "missing", {**config, "methods": {"x": {"method": "nopkg.mine"}}}, "-n")
    assert proc.returncode != 0 and "config methods.x: unknown method 'nopkg.mine': no module 'nopkg'" in proc.stdout + proc.stderr
