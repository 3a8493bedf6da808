"""The command line stages on a tiny model: outputs, round trips, and one clear error per bad input."""
import json
import math
import subprocess
import sys

import pytest
import torch

import wanda_core as wc
from tiny_models import save_tiny
from wanda_core.cli import main


def run(*args):
    return main([str(a) for a in args])


def test_calibrate_prune_eval_roundtrip(tmp_path, tiny_dir, corpus):
    calib = tmp_path / "calib.safetensors"
    assert run("calibrate", "--model", tiny_dir, "--data", corpus, "--nsamples", 4, "--seqlen", 64, "--out", calib) == 0
    windows = wc.load_windows(calib)
    assert windows.shape == (4, 64)

    pruned = tmp_path / "pruned.safetensors"
    stats = tmp_path / "stats.parquet"
    assert run("prune", "--model", tiny_dir, "--method", "sparsegpt", "--pattern", "2:4", "--calibration", calib,
               "--out", pruned, "--stats", stats, "--report", tmp_path / "report.json", "--quiet") == 0
    import pandas as pd

    df = pd.read_parquet(stats)
    assert set(df.columns) >= {"layer", "block", "rows", "cols", "sparsity", "seconds", "method", "pattern"}
    assert (df["sparsity"] == 0.5).all() and len(df) == 14

    # The file reproduces exactly the weights of pruning in memory (SparseGPT updates included).
    model, _ = wc.load_model(tiny_dir, device="cpu")
    wc.prune(model, "sparsegpt", "2:4", calibration=windows, progress=False)
    fresh, _ = wc.load_model(tiny_dir, device="cpu")
    assert wc.load_pruned(fresh, pruned) == 14
    for a, b in zip(wc.all_targets(model), wc.all_targets(fresh)):
        assert torch.equal(a.weight(), b.weight()), a.name

    # Masks alone re-applied to the dense model give the same zeros but the dense values.
    dense, _ = wc.load_model(tiny_dir, device="cpu")
    original = [t.weight().clone() for t in wc.all_targets(dense)]
    wc.apply_masks(dense, pruned)
    for t, w, p in zip(wc.all_targets(dense), original, wc.all_targets(fresh)):
        assert torch.equal(t.weight() == 0, p.weight() == 0)
        assert torch.equal(t.weight()[t.weight() != 0], w[t.weight() != 0])

    out = tmp_path / "ppl.json"
    assert run("eval-ppl", "--model", tiny_dir, "--pruned", pruned, "--data", corpus, "--seqlen", 64,
               "--max-windows", 3, "--out", out, "--quiet") == 0
    import json

    result = json.loads(out.read_text())
    assert math.isfinite(result["perplexity"]) and result["perplexity"] > 1
    assert run("sparsity", "--model", tiny_dir, "--pruned", pruned, "--out", tmp_path / "s.json") == 0
    assert json.loads((tmp_path / "s.json").read_text())["overall"] == pytest.approx(0.5)


def test_perplexity_matches_hf_loss(tiny_dir):
    model, _ = wc.load_model(tiny_dir, device="cpu")
    ids = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(0))
    windows = ids[:192].reshape(3, 64)
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss.item() for w in windows]
    expected = math.exp(sum(losses) / 3)  # equal window sizes: mean of means is the token mean
    assert wc.perplexity(model, ids, seqlen=64, batch_size=2, progress=False) == pytest.approx(expected, rel=1e-5)
    assert wc.perplexity(model, ids, seqlen=64, max_windows=1, progress=False) == pytest.approx(math.exp(losses[0]), rel=1e-5)


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "empty.txt").write_text("\n \n")
    (root / "short.txt").write_text("a few words only")
    (root / "broken.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 20)
    from transformers import T5Config

    T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=64).save_pretrained(root / "t5")
    return root


@pytest.mark.parametrize("case,args,message", [
    ("unknown method", ["prune", "--method", "lottery"], "unknown method 'lottery'"),
    ("bad pattern", ["prune", "--method", "wanda", "--pattern", "4:4"], "N:M pattern needs 0 < N < M"),
    ("sparsity 1", ["prune", "--method", "wanda", "--sparsity", "1.0"], "sparsity must be in [0, 1)"),
    ("negative sparsity", ["prune", "--method", "magnitude", "--sparsity", "-0.5"], "sparsity must be in [0, 1)"),
    ("bad option", ["prune", "--method", "wanda", "--param", "alpha=2"], "has no option 'alpha'"),
    ("missing model", ["eval-ppl", "--model", "./no/such/model", "--data", "{corpus}"], "model source not found: ./no/such/model"),
    ("truncated gguf", ["eval-ppl", "--model", "{bad}/broken.gguf", "--data", "{corpus}"], "cannot load"),
    ("encoder-decoder", ["eval-ppl", "--model", "{bad}/t5", "--data", "{corpus}"], "encoder-decoder"),
    ("empty corpus", ["calibrate", "--model", "{tiny}", "--data", "{bad}/empty.txt"], "data file is empty"),
    ("seqlen > corpus", ["calibrate", "--model", "{tiny}", "--data", "{bad}/short.txt", "--seqlen", "64"], "too few for windows of seqlen=64"),
    ("nsamples 0", ["calibrate", "--model", "{tiny}", "--data", "{corpus}", "--nsamples", "0"], "nsamples must be at least 1"),
    ("seqlen > model", ["eval-ppl", "--model", "{tiny}", "--data", "{corpus}", "--seqlen", "4096"], "longer than the model supports (512)"),
    ("bad seqlen", ["calibrate", "--model", "{tiny}", "--data", "{corpus}", "--seqlen", "long"], "seqlen needs a number of tokens or 'model'"),
    ("planned length not the model's", ["eval-ppl", "--model", "{tiny}", "--data", "{corpus}", "--seqlen", "model", "--expect-seqlen", "4096"],
     "--seqlen model gives 512 tokens for model"),
])
def test_bad_input_one_error_line_no_output(case, args, message, tmp_path, tiny_dir, corpus, bad_inputs):
    out = tmp_path / "out" / "result.safetensors"
    args = [a.format(corpus=corpus, bad=bad_inputs, tiny=tiny_dir) for a in args]
    if args[0] == "prune":
        args += ["--model", str(tiny_dir), "--calibration", str(tmp_path / "none.safetensors")]
    proc = subprocess.run([sys.executable, "-m", "wanda_core", *args, "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_seqlen_model_is_the_models_context_length(tmp_path, tiny_dir, corpus):
    """--seqlen model: the model's max_position_embeddings (512 here), at most --seqlen-cap; recorded with its rule."""
    calib = tmp_path / "calib.safetensors"
    assert run("calibrate", "--model", tiny_dir, "--data", corpus, "--nsamples", 2, "--seqlen", "model", "--out", calib) == 0
    windows, meta = wc.load_windows(calib, with_metadata=True)
    assert windows.shape == (2, 512) and meta["seqlen"] == "512" and meta["seqlen_rule"] == "model"
    assert meta["max_position_embeddings"] == "512"
    assert run("calibrate", "--model", tiny_dir, "--data", corpus, "--nsamples", 2, "--seqlen", "model", "--seqlen-cap", 96,
               "--expect-seqlen", 96, "--out", calib) == 0
    assert wc.load_windows(calib).shape == (2, 96)

    out = tmp_path / "ppl.json"
    assert run("eval-ppl", "--model", tiny_dir, "--data", corpus, "--seqlen", "model", "--seqlen-cap", 128,
               "--max-windows", 3, "--out", out, "--quiet") == 0
    result = json.loads(out.read_text())
    assert (result["seqlen"], result["seqlen_rule"], result["max_position_embeddings"]) == (128, "model", 512)
    assert result["windows"] == 3 and result["tokens"] == 3 * 128 and result["text_tokens"] > 3 * 128
    assert run("eval-ppl", "--model", tiny_dir, "--data", corpus, "--seqlen", 64, "--out", out, "--quiet") == 0
    result = json.loads(out.read_text())  # every whole window of the text, the tail dropped
    assert result["seqlen_rule"] == "fixed" and result["windows"] == result["text_tokens"] // 64


@pytest.fixture(scope="module")
def pruned_tiny(tmp_path_factory, tiny_dir, corpus):
    root = tmp_path_factory.mktemp("pruned")
    assert run("calibrate", "--model", tiny_dir, "--data", corpus, "--nsamples", 2, "--seqlen", 32, "--out", root / "calib.safetensors") == 0
    assert run("prune", "--model", tiny_dir, "--method", "wanda", "--calibration", root / "calib.safetensors",
               "--out", root / "pruned.safetensors", "--quiet") == 0
    return root


def test_artifacts_record_what_they_were_made_from(pruned_tiny, tiny_dir):
    meta = wc.pruned.read_metadata(pruned_tiny / "pruned.safetensors")
    calibration = json.loads(meta["calibration"])
    assert calibration["nsamples"] == "2" and calibration["seqlen"] == "32" and len(calibration["hash"]) == 16
    assert calibration["tokenizer"] and json.loads(meta["params"]) == {"variant": False}
    assert meta["wanda_core"] == wc.__version__ and json.loads(meta["model_fingerprint"])["shapes"]
    _, calib_meta = wc.load_windows(pruned_tiny / "calib.safetensors", with_metadata=True)
    assert calib_meta["tokenizer"] == calibration["tokenizer"] and calib_meta["model"] == str(tiny_dir)


def _cli(*args):
    proc = subprocess.run([sys.executable, "-m", "wanda_core", *map(str, args)], capture_output=True, text=True)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    return proc, errors


def test_inputs_made_from_something_else_are_refused(tmp_path, pruned_tiny, tiny_dir, corpus):
    other = save_tiny("llama", tmp_path / "other-llama", seed=1)  # same shapes, other weights
    proc, errors = _cli("eval-ppl", "--model", other, "--pruned", pruned_tiny / "pruned.safetensors", "--data", corpus,
                        "--seqlen", 32, "--out", tmp_path / "out" / "ppl.json")
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    assert f"pruned-weights file {pruned_tiny / 'pruned.safetensors'} was made from other weights" in errors[0]
    gpt2 = save_tiny("gpt2", tmp_path / "tiny-gpt2")
    proc, errors = _cli("sparsity", "--model", gpt2, "--pruned", pruned_tiny / "pruned.safetensors")
    assert proc.returncode == 2 and "was made from a model with other layers or shapes" in errors[0], proc.stderr

    # Calibration windows of another tokenizer (its fingerprint differs) cannot calibrate this model.
    windows, meta = wc.load_windows(pruned_tiny / "calib.safetensors", with_metadata=True)
    wc.save_windows(windows, tmp_path / "foreign.safetensors", {**meta, "tokenizer": "0123456789abcdef", "model": "gpt2-xl"})
    proc, errors = _cli("prune", "--model", tiny_dir, "--method", "wanda", "--calibration", tmp_path / "foreign.safetensors",
                        "--out", tmp_path / "out" / "p.safetensors")
    assert proc.returncode == 2 and "was made with another tokenizer (gpt2-xl)" in errors[0], proc.stderr
    wc.save_windows(windows + 1000, tmp_path / "ids.safetensors", {})
    proc, errors = _cli("prune", "--model", tiny_dir, "--method", "wanda", "--calibration", tmp_path / "ids.safetensors",
                        "--out", tmp_path / "out" / "p.safetensors")
    assert proc.returncode == 2 and "outside this model's vocabulary of 256" in errors[0], proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["pruned.safetensors", "calib.safetensors"])
def test_truncated_cache_files_are_named(tmp_path, pruned_tiny, tiny_dir, corpus, name):
    broken = tmp_path / name
    data = (pruned_tiny / name).read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    if name == "pruned.safetensors":
        args = ["eval-ppl", "--model", tiny_dir, "--pruned", broken, "--data", corpus, "--seqlen", 32]
        message = f"cannot read pruned-weights file {broken}"
    else:
        args = ["prune", "--model", tiny_dir, "--method", "wanda", "--calibration", broken]
        message = f"cannot read calibration file {broken}"
    proc, errors = _cli(*args, "--out", tmp_path / "out" / "result.json")
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_non_finite_perplexity_is_recorded_as_a_failure(tmp_path, corpus):
    model_dir = save_tiny("llama", tmp_path / "broken-llama")
    from safetensors.torch import load_file, save_file

    weights = load_file(model_dir / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")  # a broken weight, as after an overflow
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    proc = subprocess.run([sys.executable, "-m", "wanda_core", "eval-ppl", "--model", str(model_dir), "--data", str(corpus),
                           "--seqlen", "32", "--max-windows", "2", "--out", str(tmp_path / "ppl.json"), "--quiet"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "ppl.json").read_text())
    assert math.isnan(result["perplexity"]) and result["status"].startswith("failed: the model's logits are NaN")


def test_prune_mistakes_are_named(tmp_path, tiny_dir):
    out = tmp_path / "out" / "pruned.safetensors"
    # A method that needs calibration windows, without them: say so, and how to make them.
    proc, errors = _cli("prune", "--model", tiny_dir, "--method", "wanda", "--out", out)
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    assert "method 'wanda' needs calibration windows" in errors[0] and "wanda-core calibrate" in errors[0]
    # An explicit sparsity that the N:M pattern would silently override.
    proc, errors = _cli("prune", "--model", tiny_dir, "--method", "magnitude", "--pattern", "2:4", "--sparsity", "0.9", "--out", out)
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    assert "--sparsity 0.9 contradicts --pattern 2:4" in errors[0] and "1 - N/M = 0.5" in errors[0]
    assert "Traceback" not in proc.stderr and not out.parent.exists()
    # Without --sparsity an N:M pattern takes its own (1:4 -> 0.75, not the unstructured default 0.5).
    assert run("prune", "--model", tiny_dir, "--method", "magnitude", "--pattern", "1:4", "--out", out,
               "--report", tmp_path / "r.json", "--quiet") == 0
    assert json.loads((tmp_path / "r.json").read_text())["sparsity"] == pytest.approx(0.75)


def test_help_lists_commands_methods_and_defaults():
    from wanda_core.methods import METHODS

    top = subprocess.run([sys.executable, "-m", "wanda_core", "--help"], capture_output=True, text=True)
    assert top.returncode == 0
    for command in ("calibrate", "prune", "eval-ppl", "eval-zeroshot", "export", "sparsity", "prepare-data", "materialize"):
        assert f"\n    {command} " in top.stdout, (command, top.stdout)
    prune = subprocess.run([sys.executable, "-m", "wanda_core", "prune", "--help"], capture_output=True, text=True)
    assert prune.returncode == 0
    for name, method in METHODS.items():
        line = next((line for line in prune.stdout.splitlines() if line.startswith(f"  {name} ")), None)
        assert line, (name, prune.stdout)
        assert ("needs --calibration" in line) == bool(method.STATS)
        assert all(f"{k}={v}" in line for k, v in method.PARAMS.items()), line
    text = " ".join(prune.stdout.split())
    assert "(default: 8)" in text and "(default: unstructured)" in text and "(default: 0.5)" in text


def test_every_option_has_its_help():
    import argparse

    from wanda_core.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    missing = [(name, a.option_strings) for name, p in [("", parser), *commands.items()] for a in p._actions
               if a.option_strings and not a.help]
    assert missing == []
    text = subprocess.run([sys.executable, "-m", "wanda_core", "eval-ppl", "--help"], capture_output=True, text=True).stdout
    text = " ".join(text.split())
    assert "--data DATA evaluation text" in text and "--seqlen SEQLEN tokens per window" in text
    assert "--max-windows MAX_WINDOWS evaluate only the first N windows" in text


@pytest.mark.parametrize("args,error", [
    (["prune", "--method", "lottery", "--out", "p.safetensors"], "error: unknown method 'lottery'"),
    (["eval-ppl", "--data", "missing.txt"], "error: "),
])
def test_bad_input_prints_its_error_line_alone(tmp_path, tiny_dir, args, error):
    """Without --log nothing comes before the error line (the thread count is logged only into a job's log)."""
    proc = subprocess.run([sys.executable, "-m", "wanda_core", args[0], "--model", str(tiny_dir), *args[1:]],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith(error), proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_log_option_keeps_progress_on_the_terminal(tmp_path, tiny_dir, pruned_tiny):
    """--log (what the workflow's rules use): the whole log goes to the file, one line per block to the terminal."""
    log = tmp_path / "logs" / "prune.log"
    proc = subprocess.run([sys.executable, "-m", "wanda_core", "--log", str(log), "prune", "--model", str(tiny_dir),
                           "--method", "wanda", "--pattern", "2:4", "--calibration", str(pruned_tiny / "calib.safetensors"),
                           "--out", str(tmp_path / "p.safetensors"), "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0, log.read_text()
    terminal = proc.stderr.splitlines()
    assert len(terminal) == 3, terminal
    assert f"{tiny_dir} wanda 2:4: pruned block 1/2 (" in terminal[0] and "pruned block 2/2 (" in terminal[1], terminal
    assert "wanda 2:4: sparsity 0.5000" in terminal[2], terminal
    text = log.read_text()
    assert "loading model" in text and "pruned block 2/2" in text and "torch threads" in text
    # An error: one line on the terminal naming the log, the same line in the log.
    proc = subprocess.run([sys.executable, "-m", "wanda_core", "--log", str(log), "prune", "--model", str(tiny_dir),
                           "--method", "lottery", "--out", str(tmp_path / "q.safetensors")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown method 'lottery'") and f"(log: {log})" in proc.stderr
    assert "error: unknown method 'lottery'" in log.read_text()


def test_thread_count_follows_the_idle_cores(monkeypatch):
    """Without --threads: as many torch threads as cores are idle (never more than --max-threads, at least 1)."""
    import os

    from wanda_core import hardware

    idle, usable = hardware.free_cores(0.05)
    assert 1 <= idle <= usable == len(os.sched_getaffinity(0))
    saved = torch.get_num_threads()
    try:
        monkeypatch.setattr(hardware, "free_cores", lambda: (2, 2))
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        hardware.set_threads(0, 0)
        assert torch.get_num_threads() == 2 and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
        hardware.set_threads(0, 1)
        assert torch.get_num_threads() == 1
        monkeypatch.setattr(hardware, "free_cores", lambda: (1, 2))  # one core busy: one thread
        hardware.set_threads(0, 2)
        assert torch.get_num_threads() == 1
        hardware.set_threads(2, 0)  # --threads: exactly that
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)
