import json
import random

import pytest
import torch

import wanda_core as wc
from wanda_core.data import prepare_dataset


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


# The reference draws of locuslab/wanda lib/data.py, written out here with the random module by hand.
class CharTokenizer:
    """One token per character, plus a BOS of 1 as LLaMA's tokenizer adds; counts the texts it tokenized."""

    def __init__(self):
        self.calls = 0

    def __call__(self, text, return_attention_mask=False, verbose=False):
        self.calls += 1
        return {"input_ids": [1] + [ord(c) for c in text]}


def test_stream_python_random_is_get_wikitext2s_draw():
    ids = torch.arange(1000) * 3
    random.seed(7)
    starts = [random.randint(0, 1000 - 64 - 1) for _ in range(5)]  # get_wikitext2: i = randint(0, n - seqlen - 1)
    expected = torch.stack([ids[i : i + 64] for i in starts])  # inp = input_ids[:, i:j], j = i + seqlen
    got = wc.calibration_windows(ids, 5, 64, seed=7, sampler="stream_python_random")
    assert torch.equal(got, expected)
    assert not torch.equal(got, wc.calibration_windows(ids, 5, 64, seed=7))  # the torch stream draws elsewhere


def test_c4_documents_is_get_c4s_draw():
    # Documents of 40..89 characters (41..90 tokens with BOS): with seqlen 60 a third are too short, and
    # the document of exactly 60 tokens (59 characters) must be rejected too (get_c4 keeps n > seqlen).
    docs = ["".join(chr(97 + (d * 7 + k) % 26) for k in range(40 + (d * 37) % 50)) for d in range(50)]
    seqlen, nsamples, seed = 60, 12, 3
    tokens = [[1] + [ord(c) for c in doc] for doc in docs]
    assert any(len(t) == seqlen for t in tokens)
    random.seed(seed)
    expected, rejected = [], []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(docs) - 1)
            if len(tokens[i]) > seqlen:
                break
            rejected.append(len(tokens[i]))
        start = random.randint(0, len(tokens[i]) - seqlen - 1)
        expected.append(tokens[i][start : start + seqlen])
    assert seqlen in rejected  # this seed redraws, once on the document of exactly seqlen tokens
    tok = CharTokenizer()
    got = wc.calibration_windows(docs, nsamples, seqlen, seed, sampler="c4_documents", tokenizer=tok)
    assert got.tolist() == expected
    assert tok.calls <= nsamples + len(rejected)  # only drawn documents are tokenized
    # Documents given as token ids draw the same windows.
    assert torch.equal(wc.calibration_windows(tokens, nsamples, seqlen, seed, sampler="c4_documents"), got)


def test_c4_documents_tokenizes_only_what_it_draws():
    tok = CharTokenizer()
    docs = ["x" * 100] * 100_000
    windows = wc.calibration_windows(docs, 4, 50, 0, sampler="c4_documents", tokenizer=tok)
    assert windows.shape == (4, 50) and tok.calls == 4


@pytest.mark.parametrize("docs,kwargs,message", [
    (["short", "texts"], dict(tokenizer=CharTokenizer()), "no document of the calibration corpus has more than seqlen=64"),
    ([], {}, "has no documents"),
    (["x" * 100], {}, "needs a tokenizer"),
])
def test_c4_documents_bad_input(docs, kwargs, message):
    with pytest.raises(wc.WandaError, match=message):
        wc.calibration_windows(docs, 2, 64, 0, sampler="c4_documents", **kwargs)


def test_unknown_sampler():
    with pytest.raises(wc.WandaError, match="unknown calibration sampler 'wikitext'"):
        wc.calibration_windows(torch.arange(100), 2, 8, 0, sampler="wikitext")


def test_read_records_keeps_documents_apart(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ["one\n\ndoc", "two"]))
    assert wc.read_records(tmp_path / "d.jsonl") == ["one\n\ndoc", "two"]
    out = tmp_path / "prepared.jsonl"
    assert prepare_dataset({"path": str(tmp_path / "d.jsonl")}, out) == 2
    assert wc.read_records(out) == ["one\n\ndoc", "two"]


def test_calibrate_cli_records_its_sampler(tmp_path, capsys):
    from tiny_models import save_tiny
    from wanda_core.cli import main

    tiny = save_tiny("llama", tmp_path / "tiny-llama")
    docs = tmp_path / "docs.jsonl"
    prepare_dataset({"pydoc": "calibration"}, docs)
    drawn = {}
    for sampler in wc.data.SAMPLERS:
        out = tmp_path / f"{sampler}.safetensors"
        assert main(["calibrate", "--model", str(tiny), "--data", str(docs), "--nsamples", "4", "--seqlen", "64",
                     "--sampler", sampler, "--out", str(out)]) == 0
        drawn[sampler], meta = wc.load_windows(out, with_metadata=True)
        assert drawn[sampler].shape == (4, 64) and meta["sampler"] == sampler
    assert not torch.equal(drawn["stream"], drawn["stream_python_random"])
    assert not torch.equal(drawn["stream"], drawn["c4_documents"])
    capsys.readouterr()
    assert main(["calibrate", "--model", str(tiny), "--data", str(docs), "--sampler", "wikitext",
                 "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "error: unknown calibration sampler 'wikitext'" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
