"""Recovery fine-tuning of SmolLM2-135M: WikiText-2 test perplexity before and after a short recovery.

For each pruned model (Wanda 2:4, three-tier, magnitude 50% by default): prune with 16 x 256 WikiText-2
valid calibration windows, measure perplexity, fine-tune on WikiText-2 valid (a LoRA adapter by
default: locuslab/wanda's rank 8, alpha 16, q_proj + v_proj, lr 1e-4), and measure again: with the
adapter unmerged, and merged into the weights with the masks re-applied. Prints JSON and writes
bench/results/finetune_smollm2_<kind>_cpu.json (--name; --quick writes nothing).

    python bench/bench_finetune.py                  # 200 LoRA steps of 1 x 256 tokens per model
    python bench/bench_finetune.py --kind masked --lr 2e-5
    python bench/bench_finetune.py --quick          # a smoke run: 4 steps, 2 evaluation windows
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import WIKITEXT, loadavg, machine_note, smollm2_dir, write_result  # noqa: E402

RUNS = {"wanda-2:4": ("wanda", "2:4", 0.5), "three_tier": ("three_tier", "unstructured", 0.0),
        "magnitude-50%": ("magnitude", "unstructured", 0.5)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    p.add_argument("--kind", default="lora", choices=["lora", "masked"])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seqlen", type=int, default=256, help="training window")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--lr", type=float, default=None, help="default: the recipe's (LoRA 1e-4, masked 2e-5)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="q_proj,v_proj", help="LoRA targets, or all-linear")
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="4 steps, 2 evaluation windows: checks that the script runs")
    p.add_argument("--name", default=None, help="results file bench/results/NAME.json (default finetune_smollm2_<kind>_cpu)")
    args = p.parse_args()
    if args.quick:
        args.steps, args.eval_windows = 4, 2
    torch.set_num_threads(args.threads)

    import wanda_core as wc
    from wanda_core import finetune
    from wanda_core.masks import unpack_mask

    model_dir = smollm2_dir()
    model, tok = wc.load_model(model_dir, "float32", "cpu")
    valid = wc.tokenize(tok, wc.read_corpus(WIKITEXT / "valid.txt"))
    test = wc.tokenize(tok, wc.read_corpus(WIKITEXT / "test.txt"))
    calib = wc.calibration_windows(valid, 16, 256, seed=0)
    train = finetune.training_windows(valid, args.seqlen)
    recipe = {"kind": args.kind, "steps": args.steps, "seqlen": args.seqlen, "batch_size": args.batch_size,
              "rank": args.rank, "gradient_checkpointing": args.gradient_checkpointing,
              "targets": args.targets if args.targets == "all-linear" else args.targets.split(",")}
    if args.lr:
        recipe["lr"] = args.lr
    recipe = finetune.check_recipe(recipe)

    def ppl(m):
        return wc.perplexity(m, test, args.eval_seqlen, args.eval_windows, batch_size=1, progress=False)

    started = loadavg()
    rows = [{"run": "dense", "ppl_pruned": round(ppl(model), 3)}]
    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    for name in args.runs.split(","):
        method, pattern, sparsity = RUNS[name]
        model, _ = wc.load_model(model_dir, "float32", "cpu")  # dense again
        report = wc.prune(model, method, pattern, sparsity, calib, keep_masks=True, progress=False)
        masks = {t.name: unpack_mask(report["masks"][t.name], tuple(t.shape)) for t in wc.all_targets(model)}
        before = ppl(model)
        pruned_state = {t.name: t.weight().detach().clone() for t in wc.all_targets(model)}
        load = loadavg()
        net, ft = finetune.train(model, recipe, train, masks, progress=True)
        row = {"run": name, "sparsity": round(report["sparsity"], 4), "ppl_pruned": round(before, 3)}
        if args.kind == "lora":
            row["ppl_finetuned"] = round(ppl(model), 3)  # the adapter attached, unmerged
            merged = net.merge_and_unload()
            finetune.apply_keep(merged, masks)
            row["ppl_merged_remasked"] = round(ppl(merged), 3)
            row["sparsity_after"] = round(finetune.base_sparsity(merged), 4)
        else:
            row["ppl_finetuned"] = round(ppl(model), 3)
            row["sparsity_after"] = round(wc.check_sparsity(model)["overall"], 4)
            row["changed_params"] = int(sum(int((t.weight() != pruned_state[t.name]).sum()) for t in wc.all_targets(model)))
        row.update({"loss_first": round(ft["loss_first"], 4), "loss_last": round(ft["loss_last"], 4),
                    "seconds_per_step": round(ft["seconds_per_step"], 3), "train_seconds": round(ft["seconds"], 1),
                    "trainable_params": ft["trainable_params"], "loadavg_during": [load, loadavg()]})
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    result = {
        "bench": "finetune_smollm2", "model": "SmolLM2-135M-Instruct (float32, CPU)", "threads": args.threads,
        "calibration": "wikitext-2 valid 16x256 seed 0", "training": f"wikitext-2 valid, {train.shape[0]} windows of {args.seqlen}",
        "eval": f"wikitext-2 test {args.eval_windows}x{args.eval_seqlen}", "recipe": recipe, "loadavg_start": started,
        "loadavg_end": loadavg(), "time": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows, "machine": machine_note(started),
    }
    if args.quick:  # a check that the script runs: nothing written
        print(json.dumps(result, indent=1))
    else:
        write_result(args.name or f"finetune_smollm2_{args.kind}_cpu", result)


if __name__ == "__main__":
    main()
