"""The tests leave nothing behind: the caches the code writes point under pytest's temporary folder.

tests/conftest.py points them there before anything imports transformers, and fails the session when a
home cache (Hugging Face's, wanda-bench's) changed while it ran; these check that the setting holds.
"""
import os
import subprocess
import sys
from pathlib import Path

from conftest import CACHE_VARIABLES, snapshot, snapshot_changes


def test_caches_point_under_pytests_folder(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    for key in CACHE_VARIABLES:
        assert Path(os.environ[key]).is_relative_to(base), (key, os.environ[key])
    import transformers.utils.hub
    from huggingface_hub import constants

    from wanda_core.model import cache_dir

    # Read when these libraries were imported: the variables were set before.
    assert Path(transformers.utils.hub.HF_MODULES_CACHE).is_relative_to(base)
    assert Path(constants.HF_HUB_CACHE).is_relative_to(base) and cache_dir().is_relative_to(base)


def test_a_subprocess_writes_its_remote_code_modules_under_pytests_folder(tmp_path, tmp_path_factory):
    """What transformers copies for a model that ships its code (test_remote_code's kind) lands in HF_MODULES_CACHE."""
    code = ("from transformers.dynamic_module_utils import create_dynamic_module; create_dynamic_module('wanda_isolation');"
            "import transformers.utils.hub as h; print(h.HF_MODULES_CACHE)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True).stdout
    modules = Path(out.strip().splitlines()[-1])
    assert modules.is_relative_to(tmp_path_factory.getbasetemp()) and (modules / "wanda_isolation").is_dir()


def test_snapshot_sees_added_changed_and_removed_files(tmp_path):
    (tmp_path / "a").write_text("1")
    before = snapshot([tmp_path, tmp_path / "missing"])
    (tmp_path / "a").write_text("22")
    (tmp_path / "b").mkdir()
    assert snapshot_changes(before, snapshot([tmp_path, tmp_path / "missing"])) == \
        [f"added {tmp_path / 'b'}", f"changed {tmp_path / 'a'}"]
    assert snapshot_changes(before, before) == []
