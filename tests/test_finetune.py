"""Recovery fine-tuning and progressive pruning on tiny models: the loss goes down, every pruned weight
stays exactly zero, a killed run resumes to the same result, and a progressive three-tier schedule ends
at the three-tier structure."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

import wanda_core as wc
from tiny_models import VOCAB, save_tiny, tiny_model
from wanda_core import finetune, grid
from wanda_core.cli import main
from wanda_core.errors import WandaError
from wanda_core.masks import unpack_mask

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tokens(n=2048, seed=0):
    """A token stream with structure a tiny model can learn in a few steps: a short phrase, repeated with noise."""
    g = torch.Generator().manual_seed(seed)
    phrase = torch.randint(3, VOCAB, (37,), generator=g)
    ids = phrase.repeat(n // 37 + 1)[:n].clone()
    noise = torch.rand(n, generator=g) < 0.05
    ids[noise] = torch.randint(3, VOCAB, (int(noise.sum()),), generator=g)
    return ids


def pruned_model(arch, method="wanda", pattern="2:4", **overrides):
    model = tiny_model(arch, **overrides)
    calib = finetune.training_windows(tokens(), 64)[:4]
    report = wc.prune(model, method, pattern, 0.5, calib, keep_masks=True, progress=False)
    masks = {t.name: unpack_mask(report["masks"][t.name], tuple(t.shape)) for t in wc.all_targets(model)}
    return model, masks


def weights(model):
    return {t.name: t.weight().detach().clone() for t in wc.all_targets(model)}


RECIPE = {"steps": 12, "seqlen": 32, "batch_size": 2, "checkpoint_every": 5}


@pytest.mark.parametrize("arch,targets", [("llama", ["q_proj", "v_proj"]), ("gpt2", ["c_attn"])])
def test_lora_lowers_the_loss_and_leaves_the_sparse_weights_untouched(arch, targets):
    model, masks = pruned_model(arch)
    before, sparsity = weights(model), wc.check_sparsity(model)
    net, report = finetune.train(model, {**RECIPE, "kind": "lora", "lr": 1e-2, "targets": targets},
                                 finetune.training_windows(tokens(), 32), masks, progress=False)
    losses = report["losses"]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    assert 0 < report["trainable_params"] < 0.2 * sum(p.numel() for p in model.parameters())
    base = net.unload()  # the model without the adapter's layers (not merged)
    assert wc.check_sparsity(base) == sparsity  # to the last weight of every matrix
    for name, w in weights(base).items():
        assert torch.equal(w, before[name]), name


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mixtral"])  # Linear, transposed Conv1D, fused experts
def test_masked_fine_tuning_lowers_the_loss_and_keeps_every_pruned_weight_zero(arch):
    model, masks = pruned_model(arch)
    before, sparsity = weights(model), wc.check_sparsity(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "embed" in n or "norm" in n or "wte" in n}
    net, report = finetune.train(model, {**RECIPE, "kind": "masked", "lr": 3e-3},
                                 finetune.training_windows(tokens(), 32), masks, progress=False)
    assert net is model and sum(report["losses"][-3:]) < sum(report["losses"][:3])
    assert wc.check_sparsity(model) == sparsity
    after = weights(model)
    for name, keep in masks.items():
        assert (after[name][~keep] == 0).all(), name
        assert not torch.equal(after[name], before[name]), f"{name} did not train"
    for n, p in frozen.items():
        assert torch.equal(p, dict(model.named_parameters())[n]), f"{n} should stay frozen"


def test_checkpoints_resume_to_the_result_of_an_uninterrupted_seeded_run(tmp_path):
    """In process: the run that leaves a checkpoint at step 5, started again, resumes there (masked and LoRA)."""
    windows = finetune.training_windows(tokens(), 32)
    for kind, lr in (("lora", 1e-2), ("masked", 3e-3)):
        recipe = {**RECIPE, "kind": kind, "lr": lr, "checkpoint_every": 5}
        results = []
        for run in range(3):  # 0: no checkpoint folder; 1: writes checkpoints; 2: resumes from step 10
            model, masks = pruned_model("llama")
            folder = tmp_path / kind if run else None
            net, report = finetune.train(model, recipe, windows, masks, folder, key="k", progress=False)
            results.append((report, {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}))
        assert results[0][0]["resumed_at"] is None and results[2][0]["resumed_at"] == 10
        for report, params in results[1:]:
            assert report["losses"] == results[0][0]["losses"]
            assert all(torch.equal(params[n], results[0][1][n]) for n in params)
        # A checkpoint made from other inputs is not resumed.
        model, masks = pruned_model("llama")
        _, report = finetune.train(model, recipe, windows, masks, tmp_path / kind, key="other", progress=False)
        assert report["resumed_at"] is None and report["losses"] == results[0][0]["losses"]


@pytest.mark.parametrize("kind", ["lora", "masked"])
def test_gradient_checkpointing_trains_the_same(kind):
    windows = finetune.training_windows(tokens(), 32)
    losses = []
    for checkpointing in (False, True):
        model, masks = pruned_model("llama")
        recipe = {**RECIPE, "steps": 4, "kind": kind, "lr": 1e-3, "gradient_checkpointing": checkpointing}
        losses.append(finetune.train(model, recipe, windows, masks, progress=False)[1]["losses"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_training_order_is_seeded_and_covers_every_window():
    seen = [i for step in range(10) for i in finetune.batch_indices(10, step, 1, seed=3)]
    assert sorted(seen) == list(range(10))  # one epoch visits each window once
    assert seen == [i for step in range(10) for i in finetune.batch_indices(10, step, 1, seed=3)]
    assert seen != [i for step in range(10) for i in finetune.batch_indices(10, step, 1, seed=4)]
    assert finetune.batch_indices(10, 2, 2, seed=3) == seen[4:6]  # samples 4 and 5 of the run, whatever the batch size
    second = [i for step in range(10, 20) for i in finetune.batch_indices(10, step, 1, seed=3)]
    assert sorted(second) == list(range(10)) and second != seen  # each epoch in its own order
    assert finetune.lr_at(finetune.check_recipe({"warmup": 4, "schedule": "linear"}), 1) == pytest.approx(0.5e-4)
    assert finetune.lr_at(finetune.check_recipe({"steps": 10, "schedule": "cosine"}), 10) == pytest.approx(0.0)


@pytest.mark.parametrize("recipe,message", [
    ({"kind": "qlora"}, "fine-tuning kind must be one of lora, masked"),
    ({"kind": "lora", "rnak": 8}, "fine-tuning recipe has no option 'rnak'"),
    ({"kind": "lora", "steps": 0}, "fine-tuning option steps must be an integer >= 1"),
    ({"kind": "lora", "lr": -1}, "fine-tuning option lr must be a positive number"),
    ({"kind": "lora", "dropout": 1.0}, "fine-tuning option dropout must be in [0, 1)"),
    ({"kind": "lora", "targets": []}, "fine-tuning option targets must be a list of module names"),
    ({"kind": "masked", "warmup": 20, "steps": 10}, "fine-tuning option warmup must be at most steps (10)"),
])
def test_bad_recipes_are_named(recipe, message):
    with pytest.raises(WandaError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        finetune.check_recipe(recipe)


def test_lora_targets_that_match_nothing_are_one_error_line():
    model, masks = pruned_model("llama")
    with pytest.raises(WandaError, match=r"LoRA targets \['c_attn'\]"):
        finetune.train(model, {**RECIPE, "kind": "lora", "targets": ["c_attn"]}, finetune.training_windows(tokens(), 32),
                       masks, progress=False)


# ---------------------------------------------------------------------------------------------
# progressive three-tier


def audit_three_tier(w: torch.Tensor, dense, nm, topk, k=15, b=16, n=2, m=4) -> dict:
    """Loop-per-block check that a matrix has the three-tier structure: its blocks can be given tiers
    with the configured counts, each block fitting its tier (a subset of a tier's pattern fits it)."""
    import math

    nonzero = w != 0
    levels = []
    for r in range(0, w.shape[0], b):
        for c in range(0, w.shape[1], b):
            blk = nonzero[r:r + b, c:c + b]
            fits_nm = all(int(blk[i, j:j + m].sum()) <= n for i in range(blk.shape[0]) for j in range(0, blk.shape[1], m))
            levels.append(2 if int(blk.sum()) <= k else 1 if fits_nm else 0)
    total = len(levels)
    n_dense = int(math.floor(total * dense + 1e-9))
    n_nm = min(total - n_dense, int(math.floor(total * nm + 1e-9)))
    need_dense, need_nm = levels.count(0), levels.count(1)
    return {"holds": need_dense <= n_dense and need_dense + need_nm <= n_dense + n_nm,
            "levels": (need_dense, need_nm, levels.count(2)), "counts": (n_dense, n_nm, total - n_dense - n_nm)}


SCHEDULE = [{"dense": 0.9, "nm": 0.1, "topk": 0.0}, {"dense": 0.65, "nm": 0.2, "topk": 0.15},
            {"dense": 0.35, "nm": 0.45, "topk": 0.2}]


def test_progressive_three_tier_ends_at_the_three_tier_structure():
    # Matrices of 8 x 8 blocks (hidden 128): enough blocks for every tier fraction to count.
    shape = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=256)
    model = tiny_model("llama", **shape)
    windows = finetune.training_windows(tokens(4096), 32)
    calib = windows[:8]
    previous = None
    for i, tiers in enumerate(SCHEDULE):
        report = wc.prune(model, "three_tier", "unstructured", 0.0, calib, {**tiers, "progressive": True},
                          keep_masks=True, progress=False)
        packed = report.pop("masks")
        if previous is not None:
            packed, report["sparsity"] = finetune.restrict_masks(model, packed, previous)
        masks = {t.name: unpack_mask(packed[t.name], tuple(t.shape)) for t in wc.all_targets(model)}
        if previous is not None:  # one way: a pruned weight never comes back
            assert all(not (masks[n] & ~previous[n]).any() for n in masks)
        for t in wc.all_targets(model):
            audit = audit_three_tier(t.weight(), **tiers)
            assert audit["holds"], (i, t.name, audit)
            assert audit["levels"] == audit["counts"], (i, t.name, audit)  # exactly the step's tiers
        finetune.train(model, {"kind": "masked", "steps": 3, "seqlen": 32, "lr": 1e-3}, windows, masks, progress=False)
        assert wc.check_sparsity(model)["overall"] == pytest.approx(report["sparsity"], rel=1e-12)
        previous = masks

    # The same structure as one-shot three-tier: the same number of zeros in every matrix.
    oneshot = tiny_model("llama", **shape)
    wc.prune(oneshot, "three_tier", "unstructured", 0.0, calib, progress=False)
    assert wc.check_sparsity(model) == wc.check_sparsity(oneshot)


def test_a_progressive_step_never_makes_a_block_denser():
    from wanda_core import block_masks as bm

    g = torch.Generator().manual_seed(0)
    score = torch.rand(64, 64, generator=g)
    keep1, counts1 = bm.three_tier_step_mask(score, torch.ones_like(score, dtype=torch.bool), dense=0.5, nm=0.25, topk=0.25)
    assert counts1 == {"dense": 8, "nm": 4, "topk": 4}
    # The schedule asks for more dense blocks: none comes back; every block stays as sparse as it was.
    keep2, counts2 = bm.three_tier_step_mask(score * keep1, keep1, dense=0.75, nm=0.25, topk=0.0)
    assert counts2 == {"dense": 8, "nm": 4, "topk": 4}
    assert torch.equal(keep2 & keep1, keep1)
    # On a dense matrix the step mask has the tiers of the one-shot mask (blocks below the dense tier are
    # ranked by their score after N:M, as the seed fork's progressive pruning does).
    assert bm.three_tier_mask(score, dense=0.5, nm=0.25, topk=0.25)[1] == counts1


# ---------------------------------------------------------------------------------------------
# command line: results, evaluation, merge, and a killed job


@pytest.fixture(scope="module")
def pruned_file(tmp_path_factory, tiny_dir, corpus):
    folder = tmp_path_factory.mktemp("pruned")
    assert main(["calibrate", "--model", str(tiny_dir), "--data", str(corpus), "--nsamples", "4", "--seqlen", "64",
                 "--out", str(folder / "calib.safetensors")]) == 0
    assert main(["prune", "--model", str(tiny_dir), "--method", "wanda", "--pattern", "2:4", "--calibration",
                 str(folder / "calib.safetensors"), "--out", str(folder / "pruned.safetensors"), "--quiet"]) == 0
    return folder / "pruned.safetensors"


def cli_finetune(tiny_dir, pruned, corpus, out, kind, *params):
    args = ["--threads", "1", "finetune", "--model", tiny_dir, "--pruned", pruned, "--kind", kind, "--data", corpus,
            "--out", out, "--quiet", "--param", "seqlen=64", "--param", "batch_size=2", *params]
    return [str(a) for a in args]


def ppl(tiny_dir, corpus, *args):
    out = json.loads(subprocess.run([sys.executable, "-m", "wanda_core", "--threads", "1", "eval-ppl", "--model", str(tiny_dir),
                                     "--data", str(corpus), "--seqlen", "64", "--max-windows", "4", "--quiet",
                                     *map(str, args)], capture_output=True, text=True, check=True).stdout)
    return out["perplexity"]


def test_cli_results_are_evaluated_and_merged(tmp_path, tiny_dir, corpus, pruned_file):
    lora, masked = tmp_path / "lora", tmp_path / "masked"
    assert main(cli_finetune(tiny_dir, pruned_file, corpus, lora, "lora", "--param", "steps=8", "--param", "lr=0.01")) == 0
    assert main(cli_finetune(tiny_dir, pruned_file, corpus, masked, "masked", "--param", "steps=8", "--param", "lr=0.001")) == 0
    assert sorted(p.name for p in lora.iterdir()) == ["adapter", "finetune.json"]
    assert sorted(p.name for p in masked.iterdir()) == ["finetune.json", "pruned.safetensors"]
    assert not list(tmp_path.glob("*.checkpoint"))  # removed once the run is complete
    report = finetune.read_report(lora)
    assert report["base"]["path"] == str(pruned_file) and report["sparsity"] == 0.5 and len(report["losses"]) == 8
    # The masked result is a pruned-weights file with the same masks.
    assert all(torch.equal(a, b) for a, b in zip(wc.pruned.read_masks(masked / "pruned.safetensors").values(),
                                                  wc.pruned.read_masks(pruned_file).values()))

    base = ppl(tiny_dir, corpus, "--pruned", pruned_file)
    unmerged = ppl(tiny_dir, corpus, "--pruned", pruned_file, "--finetuned", lora)
    masked_ppl = ppl(tiny_dir, corpus, "--pruned", pruned_file, "--finetuned", masked)
    assert unmerged < base and masked_ppl < base
    merged = tmp_path / "merged.safetensors"
    assert main(["merge-lora", "--model", str(tiny_dir), "--pruned", str(pruned_file), "--finetuned", str(lora),
                 "--out", str(merged)]) == 0
    model, _ = wc.load_model(tiny_dir, device="cpu")
    wc.load_pruned(model, merged)
    assert wc.check_sparsity(model)["overall"] == 0.5  # the masks re-applied after merging
    merged_ppl = ppl(tiny_dir, corpus, "--pruned", merged)
    assert merged_ppl != unmerged  # merging and re-masking is another model: measured, not assumed

    # Zero-shot evaluation of the adapter (lm-eval sees the model with its LoRA layers, unmerged).
    zs = tmp_path / "zs.parquet"
    assert main(["eval-zeroshot", "--model", str(tiny_dir), "--pruned", str(pruned_file), "--finetuned", str(lora),
                 "--task", "tiny_mc", "--include-path", str(ROOT / "tests" / "data" / "tasks"), "--limit", "4",
                 "--device", "cpu", "--out", str(zs), "--quiet"]) == 0
    rows = pd.read_parquet(zs)
    assert (rows["finetuned"] == str(lora)).all() and (rows["sparsity"] == 0.5).all() and rows["value"].between(0, 1).all()

    # A progressive step that starts from the LoRA result: the adapter merged, then pruned further,
    # inside the previous masks.
    step = tmp_path / "step2.safetensors"
    assert main(["prune", "--model", str(tiny_dir), "--method", "magnitude", "--sparsity", "0.75", "--start-pruned",
                 str(pruned_file), "--start-finetuned", str(lora), "--out", str(step), "--quiet"]) == 0
    new, old = wc.pruned.read_masks(step), wc.pruned.read_masks(pruned_file)
    assert all(not (new[n] & ~old[n]).any() for n in new)
    model, _ = wc.load_model(tiny_dir, device="cpu")
    wc.load_pruned(model, step)
    assert wc.check_sparsity(model)["overall"] >= 0.75


def test_cli_bad_inputs_are_one_error_line(tmp_path, tiny_dir, corpus, pruned_file, capsys):
    lora = tmp_path / "lora"
    cases = [
        (cli_finetune(tiny_dir, pruned_file, corpus, lora, "lora", "--param", "rnak=4"), "fine-tuning recipe has no option 'rnak'"),
        (cli_finetune(tiny_dir, pruned_file, tmp_path / "none.txt", lora, "lora"), "data file not found"),
        (cli_finetune(tiny_dir, pruned_file, corpus, lora, "masked", "--param", "seqlen=4096"),
         "seqlen 4096 is longer than the model supports (512)"),
    ]
    for args, message in cases:
        assert main(args) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and message in err[0], err
    assert not lora.exists()
    # A LoRA result evaluated without (or with other) pruned weights than it was trained on.
    assert main(cli_finetune(tiny_dir, pruned_file, corpus, lora, "lora", "--param", "steps=2")) == 0
    capsys.readouterr()
    assert main(["eval-ppl", "--model", str(tiny_dir), "--finetuned", str(lora), "--data", str(corpus), "--seqlen", "64"]) == 2
    assert "was trained on pruned weights" in capsys.readouterr().err
    other = tmp_path / "other.safetensors"
    assert main(["prune", "--model", str(tiny_dir), "--method", "magnitude", "--out", str(other), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval-ppl", "--model", str(tiny_dir), "--pruned", str(other), "--finetuned", str(lora), "--data",
                 str(corpus), "--seqlen", "64"]) == 2
    assert "was trained on other weights than" in capsys.readouterr().err


def test_a_killed_finetune_job_resumes_to_the_uninterrupted_result(tmp_path, tiny_dir, corpus, pruned_file):
    """SIGKILL a fine-tuning process after its first checkpoint; the rerun resumes and ends bit-identical."""
    params = ["--param", "steps=300", "--param", "checkpoint_every=20", "--param", "lr=0.005"]
    reference = tmp_path / "reference"
    assert main(cli_finetune(tiny_dir, pruned_file, corpus, reference, "lora", *params)) == 0

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "wanda_core", *cli_finetune(tiny_dir, pruned_file, corpus, out, "lora", *params)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = Path(f"{out}.checkpoint") / "state.pt"
    deadline = time.monotonic() + 300
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert state.exists(), "the run ended before its first checkpoint"
    assert not out.exists()  # nothing that looks complete

    assert main(cli_finetune(tiny_dir, pruned_file, corpus, out, "lora", *params)) == 0
    resumed, expected = finetune.read_report(out), finetune.read_report(reference)
    assert resumed["resumed_at"] and resumed["resumed_at"] % 20 == 0
    assert resumed["losses"] == expected["losses"]
    from safetensors.torch import load_file

    a, b = (load_file(p / "adapter" / "adapter_model.safetensors") for p in (out, reference))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not state.parent.exists() and not list(tmp_path.rglob(".*.tmp"))


# ---------------------------------------------------------------------------------------------
# workflow: config checks, tables, and a schedule that reuses a shorter one's steps


def ft_config(source, **finetune_section):
    return {
        "models": {"tiny": {"source": str(source), "group": "Tiny", "label": "Tiny-LLaMA"}},
        "methods": {"dense": {"method": "dense", "label": "Dense"}, "wanda": {"method": "wanda", "label": "Wanda"},
                    "three_tier": {"method": "three_tier", "label": "Three-tier"}},
        "patterns": ["2-4"],
        "datasets": {"calib": {"pydoc": "calibration"}, "eval": {"pydoc": "evaluation"}},
        "calibration": {"dataset": "calib", "nsamples": 4, "seqlen": 64, "seed": 0},
        "evals": {"perplexity": {"datasets": ["eval"], "seqlen": 64, "max_windows": 2, "batch_size": 1},
                  "zeroshot": {"tasks": []}},
        "published": None, "device": "cpu",
        "finetune": {"recipes": {}, "runs": [], "progressive": {}, **finetune_section},
    }


RECIPES = {"lora": {"kind": "lora", "label": "LoRA", "dataset": "calib", "steps": 4, "seqlen": 64, "lr": 0.01},
           "masked": {"kind": "masked", "label": "masked FT", "dataset": "calib", "steps": 3, "seqlen": 64, "lr": 0.001}}


@pytest.mark.parametrize("section,message", [
    ({"recipes": {"x": {"kind": "lora", "dataset": "c4"}}}, "finetune.recipes.x.dataset: 'c4' is not in datasets"),
    ({"recipes": {"x": {"kind": "lora", "dataset": "calib", "rank": 0}}}, "finetune.recipes.x: fine-tuning option rank"),
    ({"recipes": RECIPES, "runs": [{"recipe": "qlora"}]}, "finetune.runs[0].recipe: 'qlora' is not in finetune.recipes"),
    ({"recipes": RECIPES, "runs": [{"recipe": "lora", "methods": ["wanda"], "patterns": ["unstructured-0.5"]}]},
     "finetune.runs[0]: selects no pruned model"),
    ({"recipes": RECIPES, "progressive": {"p": {"method": "three_tier", "recipe": "masked",
                                                "steps": [{"params": {"dense": 0.6, "nm": 0.4, "topk": 0.0}}]}}},
     "the last step must reach the method's own structure"),
    ({"recipes": RECIPES, "progressive": {"p": {"method": "three_tier", "recipe": "masked",
                                                "steps": [{"params": {"dense": 0.6}}, {}]}}}, "must sum to 1"),
    ({"recipes": RECIPES, "progressive": {"lora": {"method": "three_tier", "recipe": "masked", "steps": [{}]}}},
     "the name is also a recipe's"),
])
def test_bad_finetune_config_is_named(section, message):
    with pytest.raises(WandaError) as e:
        grid.check_config(ft_config("unused", **section))
    assert message in str(e.value)


def test_progressive_steps_share_cached_prefixes():
    config = ft_config("unused", recipes=RECIPES, progressive={
        "short": {"method": "three_tier", "recipe": "masked", "steps": [{"params": SCHEDULE[0]}, {}]},
        "long": {"method": "three_tier", "recipe": "masked", "steps": [{"params": SCHEDULE[0]}, {"params": SCHEDULE[1]}, {}]},
    })
    grid.check_config(config)
    short, long = (grid.progressive_steps(config, n) for n in ("short", "long"))
    assert short[0]["chain"] == long[0]["chain"] and short[1]["chain"] != long[1]["chain"]
    assert long[2]["chain"].startswith(long[1]["chain"] + "/") and long[2]["chain"].count("/") == 2
    assert all(s["params"]["progressive"] is True for s in short + long)
    final = grid.Run("tiny", "three_tier", "none", "seed0")  # three-tier calibrates: the first seed's
    assert grid.progressive_runs(config) == [(final, "short"), (final, "long")]
    assert grid.chain_step(config, long[1]["chain"])["params"]["dense"] == 0.65


def smk(workdir, config, *args):
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(workdir / "config.yaml"), "--cores", "2", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)


def test_workflow_fine_tunes_evaluates_and_reuses_progressive_steps(tmp_path):
    source = save_tiny("llama", tmp_path / "tiny")
    config = ft_config(source, recipes=RECIPES, runs=[{"recipe": "lora", "methods": ["wanda"]}], progressive={
        "prog": {"label": "progressive", "method": "three_tier", "recipe": "masked",
                 "steps": [{"params": SCHEDULE[0]}, {}]}})
    work = tmp_path / "work"
    work.mkdir()
    proc = smk(work, config)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    df = pd.read_parquet(work / "results" / "benchmark.parquet").set_index(["method", "finetune"], drop=False)
    assert set(df["method_label"]) == {"Dense", "Wanda", "Wanda + LoRA", "Three-tier", "Three-tier + progressive"}
    assert df.loc[("wanda", "lora"), "sparsity"].item() == 0.5 == df.loc[("wanda", None), "sparsity"].item()
    assert df.loc[("three_tier", "prog"), "sparsity"].item() == df.loc[("three_tier", None), "sparsity"].item()
    table = (work / "results" / "tables" / "perplexity.md").read_text()
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("|")]
    assert rows.index("Wanda + LoRA") == rows.index("Wanda") + 1  # its own row, under the pruned model's
    assert rows.index("Three-tier + progressive") == rows.index("Three-tier") + 1

    # A longer schedule that begins with the same step reuses it: only its new steps run.
    config["finetune"]["progressive"]["longer"] = {"method": "three_tier", "recipe": "masked",
                                                   "steps": [{"params": SCHEDULE[0]}, {"params": SCHEDULE[1]}, {}]}
    dry = smk(work, config, "-n")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    text = dry.stdout + dry.stderr
    counts = dict(re_counts(text))
    assert counts == {"progressive_prune": 2, "progressive_finetune": 2, "perplexity_progressive": 1, "aggregate": 1,
                      "all": 1}, text[-3000:]


def re_counts(text):
    import re

    table = text.split("Job stats:")[1].split("\n\n")[0]
    return [(k, int(v)) for k, v in re.findall(r"^(\w+)\s+(\d+)$", table, flags=re.M) if k != "total"]
