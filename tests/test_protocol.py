"""The protocol of every figure: sequence length per model (seqlen: model), protocol columns, and published
figures set beside ours only when measured alike."""
import json

import pandas as pd
import pytest

from test_tables import Results, make_config, md_table, write_published
from wanda_core import grid, protocol
from wanda_core.errors import WandaError


# --- seqlen: model ---

def test_seqlen_spec_and_rule():
    assert protocol.parse_seqlen("model") == "model" and protocol.parse_seqlen("2048") == 2048 and protocol.parse_seqlen(64) == 64
    for bad in ("long", "1", "2048.5", None):
        with pytest.raises(WandaError, match="seqlen needs"):
            protocol.parse_seqlen(bad)
    assert protocol.resolve_seqlen("model", 4096) == 4096
    assert protocol.resolve_seqlen("model", 131072, cap=8192) == 8192 and protocol.resolve_seqlen("model", 2048, cap=8192) == 2048
    assert protocol.resolve_seqlen(512, None) == 512  # a number needs no model
    with pytest.raises(WandaError, match="states no max_position_embeddings"):
        protocol.resolve_seqlen("model", None)


def seqlen_config(tmp_path, **models):
    config = make_config(models=models, datasets={"c": {"pydoc": "calibration"}, "wikitext2": {"pydoc": "evaluation"}})
    config["calibration"] = {"dataset": "c", "nsamples": 2, "seqlen": "model", "seeds": [0]}
    config["evals"]["perplexity"]["seqlen"] = "model"
    return config


def test_seqlen_model_is_planned_from_what_the_config_or_a_local_model_states(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = tmp_path / "llama1"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 2048}))
    config = seqlen_config(tmp_path,
                           llama2={"source": "meta-llama/Llama-2-7b-hf", "group": "G", "max_position_embeddings": 4096},
                           llama1={"source": str(local), "group": "G"},
                           fixed={"source": "org/other", "group": "G", "seqlen": 1024})
    assert [grid.seqlen(config, m, "calibration") for m in ("llama2", "llama1", "fixed")] == [4096, 2048, 1024]
    assert grid.seqlen(config, "llama2", "perplexity") == 4096
    assert grid.calibration_id(config, 0, "llama2") == "c_stream_n2_len4096_seed0"  # the resolved length names the file
    assert grid.calibration_id(config, 0) == "c_stream_n2_lenmodel_seed0"  # the setting as written (progressive chains)
    assert grid.seqlen_option(config, "llama2", "calibration") == "model --expect-seqlen 4096"
    assert grid.seqlen_option(config, "fixed", "perplexity") == 1024
    config["evals"]["perplexity"]["seqlen_cap"] = 3000
    assert grid.seqlen(config, "llama2", "perplexity") == 3000 and grid.seqlen(config, "llama2", "calibration") == 4096
    assert grid.seqlen_option(config, "llama2", "perplexity") == "model --seqlen-cap 3000 --expect-seqlen 3000"
    grid.check_config(config, files=False)

    # A stated length that the model's own config.json contradicts stops the plan.
    config["models"]["llama1"]["max_position_embeddings"] = 4096
    with pytest.raises(WandaError, match=r"models.llama1.max_position_embeddings: 4096, but .*config.json says 2048"):
        grid.seqlen(config, "llama1", "calibration")
    # A hub model with nothing stated cannot be planned: the message says what to add.
    config["models"]["llama1"] = {"source": "huggyllama/llama-7b", "group": "G"}
    with pytest.raises(WandaError, match=r"config calibration.seqlen: 'model' needs the max_position_embeddings of 'llama1'.*"
                                         r"add max_position_embeddings: N"):
        grid.check_config(config, files=False)
    # ... until it is materialized: its copy under resources/models/ says.
    (tmp_path / "resources" / "models" / "llama1").mkdir(parents=True)
    (tmp_path / "resources" / "models" / "llama1" / "config.json").write_text(json.dumps({"max_position_embeddings": 2048}))
    assert grid.seqlen(config, "llama1", "perplexity") == 2048


# --- published figures beside ours, like for like ---

CALIBRATION = {"dataset": "c", "sampler": "stream", "nsamples": 2, "seqlen": 8}


def compared_results(tmp_path, blocks, seqlen=64):
    config = make_config(published=write_published(tmp_path, blocks))
    r = Results(tmp_path)
    r.ppl_run("dense", "none", "noseed", 20.0, seqlen=seqlen)
    r.ppl_run("wanda", "unstructured-0.5", "seed0", 33.0, 0.5, seqlen=seqlen)
    return r.aggregate(config)


def test_a_published_figure_of_another_protocol_is_not_set_beside_ours(tmp_path):
    rows = [{"model": "m", "method": "wanda", "pattern": "unstructured-0.5", "value": 32.0}]
    text, out = compared_results(tmp_path, [
        {"source": "Same", "protocol": {"eval": {"seqlen": 64, "windows": "all"}, "calibration": CALIBRATION}, "rows": rows},
        {"source": "Longer", "protocol": {"eval": {"seqlen": 4096, "windows": "all"}, "calibration": CALIBRATION, "seeds": 5},
         "rows": [{**rows[0], "value": 30.5, "std": 0.25}]},
        {"source": "Other calibration", "protocol": {"eval": {"seqlen": 64, "windows": "all"},
                                                     "calibration": {**CALIBRATION, "nsamples": 128}}, "rows": rows},
        {"source": "Unstated", "protocol": {"eval": "unknown (2048 inferred)", "calibration": "unknown"}, "rows": rows},
        {"source": "No protocol", "rows": rows},
    ])
    delta = pd.read_csv(out["published_csv"]).set_index("source")
    assert delta.loc["Same", "compared"] and delta.loc["Same", "ours"] == 33.0 and delta.loc["Same", "difference"] == 1.0
    for source in ("Longer", "Other calibration", "Unstated", "No protocol"):
        assert not delta.loc[source, "compared"] and pd.isna(delta.loc[source, "ours"]) and pd.isna(delta.loc[source, "difference"])
    assert delta.loc["Longer", "comparison"] == "not compared: published at 4096, ours at 64"
    assert delta.loc["Other calibration", "comparison"] == "not compared: calibration samples: published 128, ours 2"
    assert delta.loc["Unstated", "comparison"] == ("not compared: published eval length unknown (2048 inferred); "
                                                   "published eval windows unknown; published calibration unknown")
    assert delta.loc["Longer", "published_std"] == 0.25 and "mean of 5 seeds" in delta.loc["Longer", "protocol"]
    shown = md_table((tmp_path / "results" / "out-published_table.md").read_text(), "Ours against published figures")
    shown = shown.set_index("source")
    assert shown.loc["Same", "ours"] == "33.00" and shown.loc["Same", "comparison"] == "same protocol"
    assert shown.loc["Longer", "ours"] == "" and shown.loc["Longer", "published"] == "30.50 ± 0.25"
    assert shown.loc["Longer", "comparison"] == "not compared: published at 4096, ours at 64"
    # Our table names both protocols under it: ours, and each published block's.
    caption = text.split("## WikiText-2 perplexity, Model (G)\n")[1].split("\n\n")[1]
    assert caption.startswith("Protocol: WikiText-2 in windows of 64 tokens, every whole window of the text; "
                              "calibration c, 2 windows of 8 tokens (stream sampler), seed 0.")
    assert "Longer: eval 4096 tokens, the whole test set; calibration c 2 x 8 (stream); mean of 5 seeds" in caption
    assert "Unstated: unknown" in caption


def test_protocol_columns_on_every_row(tmp_path):
    r = Results(tmp_path)
    r.ppl_run("dense", "none", "noseed", 20.0)
    r.ppl_run("wanda", "unstructured-0.5", "seed0", 33.0, 0.5)
    r.zeroshot_run("wanda", "unstructured-0.5", "seed0", {"boolq": 0.6, "rte": 0.5}, sparsity=0.5)
    config = make_config()
    config["evals"]["zeroshot"] = {"tasks": ["boolq", "rte"]}
    text, out = r.aggregate(config)
    df = pd.read_parquet(out["benchmark"])
    ppl = df[df["metric"] == "perplexity"].set_index("method")
    assert ppl.loc["wanda", ["calibration_dataset", "calibration_sampler", "calibration_nsamples", "calibration_seqlen", "seed"]].tolist() \
        == ["c", "stream", 2, 8, 0]
    assert ppl.loc["wanda", ["eval_dataset", "eval_seqlen", "eval_windows", "eval_tokens"]].tolist() == ["wikitext2", 64, 10, 640]
    assert ppl.loc["dense", ["calibration_dataset", "calibration_nsamples"]].isna().all()  # no calibration: none
    zs = df[df["metric"] == "acc"].set_index("eval_dataset")
    assert zs.loc["boolq", "task_version"] == "2.0" and zs.loc["rte", "task_version"] == "1.0" and (zs["lm_eval"] == "0.4.13").all()
    assert "Protocol: lm-eval 0.4.13, 0-shot, task versions boolq 2.0, rte 1.0." in text
