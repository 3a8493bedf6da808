import json

import pytest
import torch

import wanda_core as wc


def test_windows_are_seeded_and_shaped():
    ids = torch.arange(1000)
    a = wc.calibration_windows(ids, nsamples=5, seqlen=64, seed=0)
    b = wc.calibration_windows(ids, nsamples=5, seqlen=64, seed=0)
    c = wc.calibration_windows(ids, nsamples=5, seqlen=64, seed=1)
    assert a.shape == (5, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert ((a[:, 1:] - a[:, :-1]) == 1).all()  # consecutive tokens


@pytest.mark.parametrize("kwargs,message", [
    (dict(nsamples=0), "nsamples must be at least 1"),
    (dict(seqlen=1000), "too few for windows of seqlen=1000"),
])
def test_windows_bad_input(kwargs, message):
    with pytest.raises(wc.WandaError, match=message):
        wc.calibration_windows(torch.arange(1000), **{"nsamples": 2, "seqlen": 64, **kwargs})


def test_save_load_windows(tmp_path):
    w = wc.calibration_windows(torch.arange(500), 3, 16, 0)
    wc.save_windows(w, tmp_path / "c.safetensors", {"seed": 0})
    assert torch.equal(wc.load_windows(tmp_path / "c.safetensors"), w)
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temporary left behind


def test_read_corpus_formats(tmp_path):
    (tmp_path / "a.txt").write_text(" = T = \n line one \n")
    assert wc.read_corpus(tmp_path / "a.txt") == " = T = \n\n\n line one \n"
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ["x", "y"]) + "\n")
    assert wc.read_corpus(tmp_path / "b.jsonl") == "x\n\ny"
    import pandas as pd

    pd.DataFrame({"text": ["p", "q"]}).to_parquet(tmp_path / "c.parquet")
    assert wc.read_corpus(tmp_path / "c.parquet", join=" ") == "p q"


def test_read_corpus_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(wc.WandaError, match="data file is empty"):
        wc.read_corpus(tmp_path / "empty.txt")
    with pytest.raises(wc.WandaError, match="data file not found"):
        wc.read_corpus(tmp_path / "missing.txt")
    (tmp_path / "bad.jsonl").write_text('{"title": 1}\n')
    with pytest.raises(wc.WandaError, match="bad.jsonl:1"):
        wc.read_corpus(tmp_path / "bad.jsonl")
