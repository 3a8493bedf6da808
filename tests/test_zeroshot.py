"""Zero-shot accuracy with lm-eval on an offline task: in memory, exported, and bad task input."""
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import wanda_core as wc
from tiny_models import save_tiny
from wanda_core.cli import main

pytest.importorskip("lm_eval")
TASKS = Path(__file__).parent / "data" / "tasks"


@pytest.fixture(scope="module")
def pruned_tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("zs")
    src = save_tiny("llama", root / "tiny")
    model, _ = wc.load_model(src, device="cpu")
    calib = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    wc.prune(model, "wanda", "unstructured", 0.5, calib, progress=False)
    wc.save_pruned(model, root / "pruned.safetensors")
    return src, root / "pruned.safetensors", root


def test_in_memory_matches_exported_lm_eval_cli(pruned_tiny):
    src, pruned, root = pruned_tiny
    out = root / "zs.parquet"
    assert main(["eval-zeroshot", "--model", str(src), "--pruned", str(pruned), "--task", "tiny_mc",
                 "--include-path", str(TASKS), "--device", "cpu", "--out", str(out), "--quiet"]) == 0
    df = pd.read_parquet(out)
    assert set(df["metric"]) == {"acc", "acc_norm"} and (df["n"] == 36).all() and (df["num_fewshot"] == 0).all()
    assert df["lm_eval"].iloc[0].startswith("0.4") and df["stderr"].notna().all()
    assert (df["task_version"] == "1.0").all()  # tiny_mc.yaml's metadata version, as lm-eval reports it
    in_memory = df.set_index("metric")["value"].to_dict()

    exported = root / "exported"
    assert main(["export", "--model", str(src), "--pruned", str(pruned), "--out", str(exported)]) == 0
    assert (exported / "model.safetensors").is_file()
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(exported)  # a normal HF directory
    w = dict(plain.named_parameters())["model.layers.0.mlp.down_proj.weight"]
    assert (w == 0).float().mean().item() == pytest.approx(0.5)

    results = root / "lm_eval_out"
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={exported}",
                           "--tasks", "tiny_mc", "--include_path", str(TASKS), "--device", "cpu", "--batch_size", "1",
                           "--output_path", str(results)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported_results = json.loads(next(results.rglob("results_*.json")).read_text())
    assert str(exported_results["versions"]["tiny_mc"]) == df["task_version"].iloc[0]  # what lm-eval's own CLI records
    report = exported_results["results"]["tiny_mc"]
    assert report["acc,none"] == pytest.approx(in_memory["acc"], abs=1e-9)
    assert report["acc_norm,none"] == pytest.approx(in_memory["acc_norm"], abs=1e-9)


@pytest.mark.parametrize("args,message", [
    (["--task", "no_such_task"], "unknown zero-shot task 'no_such_task'"),
    (["--task", "broken_task", "--include-path", "{broken}"], "cannot load the data of task(s) broken_task"),
])
def test_bad_task_fails_before_the_model_loads(tmp_path, args, message):
    broken = tmp_path / "tasks"
    broken.mkdir()
    (broken / "broken.yaml").write_text(
        "task: broken_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: /no/such/file.jsonl\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{c}}'\ndoc_to_target: 0\n")
    args = [a.format(broken=broken) for a in args]
    # The model does not exist either: the task error must come first.
    proc = subprocess.run([sys.executable, "-m", "wanda_core", "eval-zeroshot", "--model", "./no/model", *args,
                           "--out", str(tmp_path / "out.parquet")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "out.parquet").exists()


def test_task_names_are_checked_from_a_cache_that_only_says_known(tmp_path, monkeypatch):
    from wanda_core import zeroshot

    monkeypatch.setenv("WANDA_CACHE", str(tmp_path / "cache" / "wanda-bench"))
    indexed = []
    real = zeroshot._task_manager
    monkeypatch.setattr(zeroshot, "_task_manager", lambda path: indexed.append(path) or real(path))

    zeroshot.check_task_names(["tiny_mc"], TASKS)  # first time: indexes and caches
    assert len(indexed) == 1 and len(list((tmp_path / "cache" / "wanda-bench").glob("*.json"))) == 1
    zeroshot.check_task_names(["tiny_mc", "tiny_mc_b"], TASKS)  # known: from the cache
    assert len(indexed) == 1
    with pytest.raises(wc.WandaError, match="unknown zero-shot task 'no_such_task'"):
        zeroshot.check_task_names(["tiny_mc", "no_such_task"], TASKS)  # not in the cache: indexes again
    assert len(indexed) == 2

    other = tmp_path / "tasks"  # another include folder has its own cache
    other.mkdir()
    (other / "other.yaml").write_text("task: other_mc\ndataset_path: json\noutput_type: multiple_choice\n")
    with pytest.raises(wc.WandaError, match="unknown zero-shot task 'tiny_mc'"):
        zeroshot.check_task_names(["tiny_mc"], other)
    assert len(indexed) == 3

    for cache in (tmp_path / "cache" / "wanda-bench").glob("*.json"):
        cache.write_text("{not json")  # a broken cache is rebuilt, never trusted
    zeroshot.check_task_names(["tiny_mc"], TASKS)
    assert len(indexed) == 4
    zeroshot.check_task_names(["tiny_mc"], TASKS)
    assert len(indexed) == 4


def test_task_name_cache_is_keyed_by_the_tasks_not_their_place(tmp_path, monkeypatch):
    """A copied or moved checkout finds the same cache entry; an edited task file gets a new one."""
    import shutil

    from wanda_core import zeroshot

    monkeypatch.setenv("WANDA_CACHE", str(tmp_path / "cache"))
    here, there = shutil.copytree(TASKS, tmp_path / "a" / "tasks"), shutil.copytree(TASKS, tmp_path / "b" / "elsewhere")
    assert zeroshot._task_index_cache(here) == zeroshot._task_index_cache(there) != zeroshot._task_index_cache(None)
    assert zeroshot._task_index_cache(here).parent == tmp_path / "cache"
    (there / "tiny_mc" / "tiny_mc_b.yaml").write_text((there / "tiny_mc" / "tiny_mc_b.yaml").read_text() + "\n# edited\n")
    assert zeroshot._task_index_cache(here) != zeroshot._task_index_cache(there)


def test_tasks_of_the_include_folder_load_without_indexing_lm_evals_own(monkeypatch):
    from wanda_core import zeroshot

    built = []
    real = zeroshot._task_manager
    monkeypatch.setattr(zeroshot, "_task_manager", lambda path, include_defaults=True: built.append(include_defaults) or real(path, include_defaults))
    loaded = zeroshot.load_tasks(["tiny_mc", "tiny_mc_b"], TASKS)
    assert set(loaded["tasks"]) == {"tiny_mc", "tiny_mc_b"} and built == [False]
    with pytest.raises(wc.WandaError, match="unknown zero-shot task 'no_such_task'"):
        zeroshot.load_tasks(["tiny_mc", "no_such_task"], TASKS)  # not in the folder: lm-eval's full index decides
    assert built == [False, False, True]
