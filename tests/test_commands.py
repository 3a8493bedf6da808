"""wanda_core.commands: the options of the workflow's jobs, read back by the CLI's own parser."""
import shlex
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from tiny_models import save_tiny
from wanda_core import cli, commands, grid

ROOT = Path(__file__).resolve().parents[1]
# Values a shell would break or eat unquoted: spaces, both quotes, a JSON list and object, $ and ;.
AWKWARD = {"note": "it's a \"quoted\" word; $HOME", "list": [1, 2.5, "a b"], "table": {"k": [True, None]},
           "flag": False, "rate": 0.125, "count": 3}
SCHEDULE = [{"dense": 0.6, "nm": 0.2, "topk": 0.2}, {}]


def make_config(**changes) -> dict:
    """A small config with the schema's defaults filled, as the workflow sees it."""
    config = {
        "models": {"tiny": {"source": "models/tiny", "dtype": "bfloat16", "batch_size": 4}},
        "methods": {"dense": {"method": "dense"}, "wanda": {"method": "wanda"}, "magnitude": {"method": "magnitude"},
                    "three_tier": {"method": "three_tier"}},
        "patterns": ["unstructured-0.5", "2-4"],
        "datasets": {"calib": {"pydoc": "calibration"}, "eval": {"pydoc": "evaluation"}},
        "calibration": {"dataset": "calib", "nsamples": 2, "seqlen": 32},
        "evals": {"perplexity": {"datasets": ["eval"], "seqlen": 32}},
        "published": None, "device": "cpu",
        "finetune": {"recipes": {"masked": {"kind": "masked", "dataset": "calib", "steps": 2, "seqlen": 32},
                                 "lora": {"kind": "lora", "dataset": "calib", "steps": 2, "targets": ["q_proj", "v_proj"]}},
                     "progressive": {"prog": {"method": "three_tier", "recipe": "masked",
                                              "steps": [{"params": SCHEDULE[0]}, SCHEDULE[1]]}}},
    }
    for key, value in changes.items():
        config[key] = value
    validate(config, str(ROOT / "workflow" / "schemas" / "config.schema.yaml"))
    return config


def parsed(command: str, args: str):
    """`args` as `wanda-core <command>` reads them after one shell split, the files every job has added."""
    files = {"prune": ["--model", "m", "--out", "o"], "finetune": ["--model", "m", "--data", "d", "--out", "o"]}
    return cli.build_parser().parse_args([command, *files[command], *shlex.split(args)])


def test_prune_args_reach_the_cli_whole():
    config = make_config()
    config["models"]["tiny"].update(trust_remote_code=True, blocks="model.layers")
    config["methods"]["wanda"]["params"] = AWKWARD
    config["pruning"]["compute_dtype"] = "auto"
    files = {"model": "resources/models/tiny", "calibration": "calib dir/it's.safetensors"}
    a = parsed("prune", commands.prune_args(config, "tiny", "wanda", "unstructured-0.6", files))
    assert cli._params(a.param) == AWKWARD
    assert (a.method, a.pattern, a.sparsity, a.sparsity_from) == ("wanda", "unstructured", "0.6", None)
    assert (a.pipeline, a.compute_dtype, a.dtype, a.device, a.batch_size) == ("sequential", "auto", "bfloat16", "cpu", 4)
    assert (a.calibration, a.start_pruned, a.start_finetuned) == ("calib dir/it's.safetensors", None, None)
    assert (a.trust_remote_code, a.blocks) == (True, "model.layers")


def test_prune_args_follow_the_config():
    config = make_config(pruning={"pipeline": "one_pass"})
    a = parsed("prune", commands.prune_args(config, "tiny", "magnitude", "2-4", {}))
    assert (a.pattern, a.sparsity, a.param, a.pipeline, a.compute_dtype) == ("2:4", "0.5", None, "one_pass", None)
    assert (a.calibration, a.trust_remote_code, a.blocks) == (None, False, None)
    config["methods"]["magnitude"]["pipeline"] = "independent"  # a method's own pipeline comes first
    assert parsed("prune", commands.prune_args(config, "tiny", "magnitude", "2-4", {})).pipeline == "independent"


def test_matched_baseline_takes_its_sparsity_from_the_report():
    config = make_config()
    report = "results/pruned/tiny/three_tier/none/seed0.json"
    a = parsed("prune", commands.prune_args(config, "tiny", "wanda", "match-three_tier", {"match": report}))
    assert (a.pattern, a.sparsity, a.sparsity_from) == ("unstructured", None, report)


def test_progressive_step_honours_pipeline_and_compute_dtype():
    config = make_config(pruning={"pipeline": "independent", "compute_dtype": "bfloat16"})
    first, second = grid.progressive_steps(config, "prog")
    files = {"calibration": "c.safetensors", "start_pruned": f"p/{first['chain']}/pruned.safetensors",
             "start_finetuned": f"p/{first['chain']}/finetuned"}
    a = parsed("prune", commands.progressive_prune_args(config, "tiny", second["chain"], files))
    assert (a.method, a.pipeline, a.compute_dtype, a.dtype, a.batch_size) == ("three_tier", "independent", "bfloat16", "bfloat16", 4)
    assert cli._params(a.param) == second["params"] and cli._params(a.param)["progressive"] is True
    assert (a.calibration, a.start_pruned, a.start_finetuned) == tuple(files.values())
    a = parsed("prune", commands.progressive_prune_args(config, "tiny", first["chain"], {"calibration": "c.safetensors"}))
    assert cli._params(a.param) == first["params"] and a.start_pruned is None
    # The step runs as every other prune of its method: the same flags but its options and start.
    config["methods"]["three_tier"]["params"] = {"topk": 0.1}
    step = grid.progressive_steps(config, "prog")[1]
    same = parsed("prune", commands.prune_args(config, "tiny", "three_tier", step["pattern"], files))
    a = parsed("prune", commands.progressive_prune_args(config, "tiny", step["chain"], files))
    assert {k: v for k, v in vars(a).items() if k != "param"} == {k: v for k, v in vars(same).items() if k != "param"}


def test_finetune_args():
    config = make_config()
    config["models"]["tiny"]["blocks"] = "model.layers"
    masked, lora = grid.recipe(config, "masked"), grid.recipe(config, "lora")
    a = parsed("finetune", commands.finetune_args(config, "tiny", masked, "pruned dir/w.safetensors"))
    assert (a.kind, a.pruned, a.dtype, a.device, a.blocks) == ("masked", "pruned dir/w.safetensors", "float32", "cpu", "model.layers")
    assert {"kind": "masked", **cli._params(a.param)} == masked
    a = parsed("finetune", commands.finetune_args(config, "tiny", lora))  # the dense model; LoRA keeps the model's dtype
    assert (a.kind, a.pruned, a.dtype) == ("lora", None, "bfloat16")
    assert cli._params(a.param)["targets"] == ["q_proj", "v_proj"]


def test_dry_run_progressive_steps_get_pipeline_and_compute_dtype(tmp_path):
    from test_workflow import smk

    config = make_config(pruning={"pipeline": "one_pass", "compute_dtype": "bfloat16"})
    config["models"]["tiny"]["source"] = str(save_tiny("llama", tmp_path / "tiny"))
    config["methods"]["wanda"]["params"] = {"variant": True}
    proc = smk(tmp_path, config, "-n", "-p")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    prunes = [line for line in (proc.stdout + proc.stderr).splitlines() if " prune --model " in line]
    progressive = [line for line in prunes if "results/progressive/" in line]
    assert len(progressive) == 2 and len(prunes) == 5 + 2  # wanda and magnitude at 2 patterns, three_tier; the steps
    for line in prunes:
        assert "--pipeline one_pass --compute-dtype bfloat16" in line, line
    assert all("--start-pruned" in line for line in progressive if "/2-" in line.split("--out ")[1])
    assert all("--param variant=true" in line for line in prunes if "--method wanda" in line)
