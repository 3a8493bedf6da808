"""One timed prune in a fresh process, for bench/bench_peers.py: ours (wanda_core) or llm-compressor's oneshot.

Runs under either tool's virtualenv, so it imports only torch, transformers and safetensors at the
top and the tool inside its function. It loads the model and the calibration windows, times the
pruning call alone, then saves the pruned model with save_pretrained for the parent to evaluate,
and writes its figures as JSON to --result.

    python bench/peers_child.py --tool ours --config sequential:float32 --method wanda --pattern 2:4 \
        --model DIR --calib calib.safetensors --threads 1 --save OUT --result run.json
"""
import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_mib() -> float:
    """Peak resident memory of this process's address space (VmHWM). Not ru_maxrss: on Linux a child
    started by fork/vfork + exec inherits its parent's high-water mark there (the parent holds a model)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def prune_ours(model, windows, a) -> dict:
    """Our library's prune(); `a.config` is PIPELINE:DTYPE, passed only when not the defaults,
    so that a library without those keywords still runs the paper's sequential float32 pipeline."""
    import wanda_core as wc

    pipeline, dtype = a.config.split(":")
    kwargs = {}
    if pipeline != "sequential":
        kwargs["pipeline"] = pipeline
    if dtype != "float32":
        kwargs["compute_dtype"] = dtype
    report = wc.prune(model, a.method, a.pattern, a.sparsity, windows, batch_size=a.batch_size, device="cpu",
                      progress=False, **kwargs)
    # What actually ran: one_pass falls back to sequential when one batch of everything would not fit.
    return {"reported_sparsity": report["sparsity"], "pipeline_run": report.get("pipeline", "sequential"),
            "compute_dtype_run": report.get("compute_dtype")}


def prune_llmcompressor(model, windows, a) -> dict:
    """llm-compressor's oneshot with its Wanda or SparseGPT modifier, on the same token windows.

    The windows go in as an already tokenized datasets.Dataset (oneshot then skips tokenization),
    unshuffled, all of them; lm_head is ignored as our library never prunes it. oneshot's module
    names carry a trailing dot ("lm_head."), so the ignore entry is a regex, as in its own docs.
    """
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    modifier = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[a.method]
    mask_structure = "0:0" if a.pattern == "unstructured" else a.pattern
    recipe = modifier(sparsity=a.sparsity, mask_structure=mask_structure, targets=["Linear"], ignore=["re:.*lm_head"])
    data = Dataset.from_dict({"input_ids": windows.tolist()})
    t0 = time.perf_counter()  # the Dataset is input preparation; oneshot itself is timed by the caller
    oneshot(model=model, tokenizer=a.tokenizer, recipe=recipe, dataset=data, num_calibration_samples=len(windows),
            max_seq_length=windows.shape[1], shuffle_calibration_samples=False, batch_size=a.batch_size,
            pipeline=a.config)
    return {"oneshot_s": round(time.perf_counter() - t0, 3)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tool", choices=["ours", "llmcompressor"], required=True)
    p.add_argument("--config", required=True, help="ours: PIPELINE:DTYPE; llmcompressor: its pipeline name")
    p.add_argument("--method", choices=["wanda", "sparsegpt"], required=True)
    p.add_argument("--pattern", required=True, help="unstructured or N:M")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--model", required=True)
    p.add_argument("--calib", required=True, help="safetensors file with input_ids [nsamples, seqlen]")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--save", help="save the pruned model here (save_pretrained)")
    p.add_argument("--result", required=True)
    a = p.parse_args()

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(a.threads)
    if a.tool == "llmcompressor":
        import llmcompressor  # noqa: F401  (its import cost belongs to the process, not to the prune)
    else:
        import wanda_core  # noqa: F401
    import_s = time.perf_counter() - T_START

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    a.tokenizer = AutoTokenizer.from_pretrained(a.model) if a.tool == "llmcompressor" else None
    windows = load_file(a.calib)["input_ids"]
    load_s = time.perf_counter() - t0
    rss_loaded = peak_rss_mib()

    cpu0, t0 = cpu_seconds(), time.perf_counter()
    extra = (prune_ours if a.tool == "ours" else prune_llmcompressor)(model, windows, a)
    prune_s = time.perf_counter() - t0
    prune_cpu_s = cpu_seconds() - cpu0
    peak = peak_rss_mib()

    save_s = 0.0
    if a.save:
        t0 = time.perf_counter()
        kwargs = {"save_compressed": False} if a.tool == "llmcompressor" else {}  # plain dense safetensors
        model.save_pretrained(a.save, **kwargs)
        save_s = time.perf_counter() - t0

    result = {"prune_s": round(prune_s, 3), "prune_cpu_s": round(prune_cpu_s, 2), "import_s": round(import_s, 3),
              "load_s": round(load_s, 3), "save_s": round(save_s, 3), "peak_rss_mib": round(peak, 1),
              "rss_after_load_mib": round(rss_loaded, 1), "threads": torch.get_num_threads(), **extra}
    tmp = a.result + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, a.result)


if __name__ == "__main__":
    main()
