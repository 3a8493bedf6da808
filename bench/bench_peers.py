"""Ours against llm-compressor's oneshot, side by side in one run: Wanda and SparseGPT, 50% and 2:4.

Same model, same calibration windows (drawn once, saved, handed to both), same evaluation (our
perplexity function on WikiText-2 test, applied to both tools' pruned models). Each prune runs
in a fresh child process (bench/peers_child.py) under its tool's own virtualenv, with a fixed
number of torch threads; the runs alternate ours/peer/ours/peer so that load on a shared machine
hits both alike. Per cell: seconds of the pruning call (median of --repeats) and its CPU
seconds, the ratios ours/peer, process wall time, peak RSS, perplexity and measured sparsity.

llm-compressor is installed once, by this script, into a virtualenv of its own under --cache
(default ~/.cache/wanda-bench/peers; torch first, pinned to ours, so pip does not pull a CUDA
build). Our configurations come from --ours as PIPELINE:DTYPE; one that the installed
wanda_core.prune does not accept is skipped, with a note in the JSON.

    python bench/bench_peers.py [--repeats 2] [--threads 1,2] [--eval-windows 32] [--cells wanda:unstructured]
        [--ours sequential:float32,one_pass:float32,one_pass:bfloat16,independent:float32]

Writes bench/results/peers_cpu.json (--name) and prints a Markdown table. The defaults make 40
prunes and 21 evaluations: well over an hour on 2 cores; --cells and --repeats 1 cut it down, and
--peer-pipelines none leaves llm-compressor out (no virtualenv is made).

The JSON names the machine's instruction set (bench/common.py instruction_set(): /proc/cpuinfo flags,
torch's kernel level, whether bf16 is native) with a bf16/float32 matrix-product timing, and per cell
which of our settings was fastest, overall and within 2% of the paper pipeline's perplexity. Run under
bench/common.py AVX2_ONLY's variables (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
MKL_ENABLE_INSTRUCTIONS=AVX2), it is labelled "this machine restricted to AVX2".
"""
import argparse
import datetime
import hashlib
import inspect
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

LLMCOMPRESSOR = "0.14.0.1"  # needs transformers 5.15-5.17 and compressed-tensors 0.19.0 (its venv); torch 2.10-2.14
CHILD = Path(__file__).resolve().with_name("peers_child.py")
TARGETS = {"wanda": 0.5, "sparsegpt": 0.6}  # issue #15: our fastest setting within 2% of the paper pipeline's perplexity
PAPER = "sequential:float32"  # the paper's pipeline: two passes per block, float32


def log(msg):
    print(f"[bench_peers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wanda-bench" / "peers"


def folder_mib(path: Path) -> float:
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
    return round(total / 2**20, 1)


def peer_venv(cache: Path, version: str) -> dict:
    """llm-compressor's virtualenv, made on first use: torch pinned to ours (the CPU wheel), then llmcompressor.

    A marker file written last says the install completed; a folder without it is removed and made again.
    """
    import torch

    venv = cache / f"llmcompressor-{version}"
    marker = venv / "installed.json"
    python = venv / "bin" / "python"
    if not marker.is_file():
        if venv.exists():
            log(f"removing the incomplete virtualenv {venv}")
            shutil.rmtree(venv)
        torch_pin = torch.__version__.split("+")[0]
        log(f"installing llmcompressor=={version} (torch=={torch_pin} first) into {venv}")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run(pip + [f"torch=={torch_pin}"], check=True)
        subprocess.run(pip + [f"llmcompressor=={version}"], check=True)
        seconds = round(time.perf_counter() - t0, 1)
        marker.write_text(json.dumps({"install_s": seconds, "date": datetime.date.today().isoformat()}))
        log(f"installed in {seconds} s")
    info = json.loads(marker.read_text())
    probe = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
             "('llmcompressor', 'compressed-tensors', 'torch', 'transformers', 'datasets')}))")
    versions = json.loads(subprocess.run([str(python), "-c", probe], check=True, capture_output=True, text=True).stdout)
    return {"python": str(python), "path": str(venv), "size_mib": folder_mib(venv), "install_s": info["install_s"],
            "installed_on": info["date"], "versions": versions}


def our_versions() -> dict:
    import torch
    import transformers

    git = lambda *a: subprocess.run(["git", *a], cwd=common.ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": bool(git("status", "--porcelain", "--", "wanda_core")),
            "torch": torch.__version__, "transformers": transformers.__version__}


def machine() -> dict:
    isa = common.instruction_set()
    return {"nproc": os.cpu_count(), "cpu": isa["cpu"], "instruction_set": isa, "matmul": matmul_probe()}


def matmul_probe(threads: int = 1) -> dict:
    """Milliseconds of one [4096 x 576] @ [576 x 1536] product (SmolLM2's MLP, 4096 tokens) in float32
    and in bfloat16, median of 5, on `threads` threads: how this machine (or its restriction) computes bf16."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(4096, 576, generator=torch.Generator().manual_seed(0)), torch.randn(576, 1536)
    out = {}
    try:
        for dtype in (torch.float32, torch.bfloat16):
            x, y = a.to(dtype), b.to(dtype)
            x @ y
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                x @ y
                times.append(time.perf_counter() - t0)
            out[f"{str(dtype).removeprefix('torch.')}_ms"] = round(statistics.median(times) * 1000, 1)
    finally:
        torch.set_num_threads(saved)
    out["bf16_over_fp32"] = round(out["bfloat16_ms"] / out["float32_ms"], 2)
    return out


def unsupported(config: str) -> str | None:
    """Why our installed library cannot run PIPELINE:DTYPE (None if it can)."""
    import wanda_core

    pipeline, dtype = config.split(":")
    accepted = inspect.signature(wanda_core.prune).parameters
    if pipeline != "sequential" and "pipeline" not in accepted:
        return f"wanda_core.prune has no 'pipeline' keyword (needed for {pipeline})"
    if dtype != "float32" and "compute_dtype" not in accepted:
        return f"wanda_core.prune has no 'compute_dtype' keyword (needed for {dtype})"
    return None


def run_child(tool, config, cell, threads, a, calib, work: Path, python, save: Path | None) -> dict:
    """One prune in a fresh process; its own figures plus the process wall time measured from here."""
    method, pattern = cell
    result = work / "run.json"
    result.unlink(missing_ok=True)
    cmd = [python, str(CHILD), "--tool", tool, "--config", config, "--method", method, "--pattern", pattern,
           "--sparsity", str(a.sparsity), "--model", a.model, "--calib", str(calib), "--threads", str(threads),
           "--batch-size", str(a.batch_size if tool == "ours" else a.peer_batch_size), "--result", str(result)]
    if save:
        cmd += ["--save", str(save)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    if tool == "ours":
        env["PYTHONPATH"] = str(common.ROOT)  # this checkout's wanda_core, not the editable install's
    load = common.loadavg()
    with open(work / "child.log", "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=a.child_timeout)
        wall = time.perf_counter() - t0
    if proc.returncode:
        lines = (work / "child.log").read_text(errors="replace").strip().splitlines()
        print("\n".join(lines[-15:]), file=sys.stderr)
        return {"error": lines[-1] if lines else f"exit status {proc.returncode}", "loadavg_start": load}
    run = json.loads(result.read_text())
    run["process_s"] = round(wall - run["save_s"], 2)  # interpreter start, imports, model load and prune
    run["loadavg_start"] = load
    return run


def evaluate(folder: Path, dense: dict, test_ids, a) -> dict:
    """Our perplexity on a pruned model saved by either tool, with checks that it is what it claims to be."""
    import torch
    from transformers import AutoModelForCausalLM

    import wanda_core as wc

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    sparsity = wc.check_sparsity(model)
    targets = {t.name + ".weight" for t in wc.all_targets(model)}
    params = dict(model.named_parameters(remove_duplicate=False))
    # Everything outside the pruned matrices (embeddings, lm_head, norms) must be bit-identical to the dense model.
    changed = sorted(n for n, p in params.items() if n not in targets and not torch.equal(p, dense[n]))
    missing = sorted(set(dense) - set(params))
    layer_sparsity = list(sparsity["layers"].values())
    ppl = wc.perplexity(model, test_ids, a.eval_seqlen, a.eval_windows, batch_size=4, progress=False)
    return {"ppl": round(ppl, 3), "sparsity": round(sparsity["overall"], 5),
            "layer_sparsity_min_max": [round(min(layer_sparsity), 5), round(max(layer_sparsity), 5)],
            "untouched_outside_targets": not changed and not missing, "changed_outside_targets": changed + missing}


def cell_name(cell) -> str:
    return f"{cell[0]} {'50%' if cell[1] == 'unstructured' else cell[1]}"


def summarize(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[-1]["error"]}
    med = lambda key: round(statistics.median(r[key] for r in ok), 2)  # noqa: E731
    return {"seconds": med("prune_s"), "seconds_runs": [r["prune_s"] for r in ok], "cpu_seconds": med("prune_cpu_s"),
            "process_s": med("process_s"), "import_s": med("import_s"), "load_s": med("load_s"),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in ok), "rss_after_load_mib": max(r["rss_after_load_mib"] for r in ok),
            "loadavg_at_runs": [r["loadavg_start"][0] for r in runs], "failed_runs": len(runs) - len(ok),
            **{k: ok[0][k] for k in ("pipeline_run", "compute_dtype_run") if k in ok[0]}}


def targets_check(rows: list[dict]) -> list[dict]:
    """Per cell and thread count: our fastest configuration whose perplexity is within 2% of the paper
    pipeline's, and its time over llm-compressor's (the issue's targets apply to the 50% cells)."""
    out = []
    for key in sorted({(r["method"], r["pattern"], r["threads"]) for r in rows}):
        same = [r for r in rows if (r["method"], r["pattern"], r["threads"]) == key and "seconds" in r and "ppl" in r]
        paper = next((r for r in same if r["tool"] == "ours" and r["config"] == PAPER), None)
        peer = next((r for r in same if r["tool"] == "llmcompressor"), None)
        if not paper or not peer:
            continue
        close = [r for r in same if r["tool"] == "ours" and r["ppl"] <= 1.02 * paper["ppl"]]
        best = min(close, key=lambda r: r["seconds"])
        entry = {"method": key[0], "pattern": key[1], "threads": key[2], "fastest_within_2pct": best["config"],
                 "seconds": best["seconds"], "ppl": best["ppl"], "paper_ppl": paper["ppl"], "peer_seconds": peer["seconds"],
                 "ratio": round(best["seconds"] / peer["seconds"], 3), "cpu_ratio": round(best["cpu_seconds"] / peer["cpu_seconds"], 3)}
        if key[1] == "unstructured" and key[0] in TARGETS:
            entry["target_ratio"] = TARGETS[key[0]]
            entry["met"] = entry["ratio"] <= TARGETS[key[0]]
        out.append(entry)
    return out


def fastest(rows: list[dict]) -> list[dict]:
    """Per cell and thread count: which of our settings was fastest, and the fastest whose perplexity is
    within 2% of the paper pipeline's (the one to use on this machine)."""
    out = []
    for key in sorted({(r["method"], r["pattern"], r["threads"]) for r in rows}):
        ours = [r for r in rows if (r["method"], r["pattern"], r["threads"]) == key and r["tool"] == "ours" and "seconds" in r]
        if not ours:
            continue
        paper = next((r for r in ours if r["config"] == PAPER), None)
        best = min(ours, key=lambda r: r["seconds"])
        entry = {"method": key[0], "pattern": key[1], "threads": key[2], "fastest": best["config"], "seconds": best["seconds"],
                 "by_config": {r["config"]: r["seconds"] for r in ours}}
        if paper and "ppl" in paper:
            close = [r for r in ours if "ppl" in r and r["ppl"] <= 1.02 * paper["ppl"]]
            pick = min(close, key=lambda r: r["seconds"])
            entry.update(fastest_within_2pct=pick["config"], fastest_within_2pct_seconds=pick["seconds"],
                         vs_paper=round(pick["seconds"] / paper["seconds"], 3))
        out.append(entry)
    return out


def table(rows: list[dict]) -> str:
    head = ("| method | pattern | threads | tool | config | prune s (median) | ours/peer | prune CPU s | ours/peer CPU "
            "| process s | peak RSS MiB | ppl | sparsity |")
    lines = [head, "|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|"]
    for r in rows:
        if "seconds" not in r:
            why = r.get("skipped") or r.get("error", "")
            lines.append(f"| {r['method']} | {r['pattern']} | {r['threads']} | {r['tool']} | {r['config']} | "
                         f"{'skipped' if 'skipped' in r else 'failed'}: {why} | | | | | | | |")
            continue
        ratio = f"{r['ratio_to_peer']:.2f}" if r.get("ratio_to_peer") is not None else ""
        cpu_ratio = f"{r['cpu_ratio_to_peer']:.2f}" if r.get("cpu_ratio_to_peer") is not None else ""
        ppl = f"{r['ppl']:.2f}" if "ppl" in r else ""
        sp = f"{r['sparsity']:.3f}" if "sparsity" in r else ""
        lines.append(f"| {r['method']} | {r['pattern']} | {r['threads']} | {r['tool']} | {r['config']} | {r['seconds']:.1f} | "
                     f"{ratio} | {r['cpu_seconds']:.1f} | {cpu_ratio} | {r['process_s']:.1f} | {r['peak_rss_mib']:.0f} | {ppl} | {sp} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="plain HF directory (default: bench/common.py smollm2_dir())")
    p.add_argument("--data", default=str(common.WIKITEXT), help="folder with valid.txt and test.txt")
    p.add_argument("--cells", default="wanda:unstructured,sparsegpt:unstructured,wanda:2:4,sparsegpt:2:4",
                   help="METHOD:PATTERN,... (PATTERN unstructured or N:M)")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--ours", default=f"{PAPER},one_pass:float32,one_pass:bfloat16,independent:float32",
                   help="our configurations, PIPELINE:DTYPE,... (include the paper's, sequential:float32)")
    p.add_argument("--peer-pipelines", default="sequential",
                   help="llm-compressor pipelines, e.g. sequential,basic; none: ours only (no llm-compressor install)")
    p.add_argument("--threads", default="1", help="torch threads per child, e.g. 1,2 (one set of columns each)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="our calibration batch size (our default)")
    p.add_argument("--peer-batch-size", type=int, default=1, help="oneshot's batch_size (its default)")
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--eval-threads", type=int, default=os.cpu_count())
    p.add_argument("--llmcompressor", default=LLMCOMPRESSOR, help="version to install and time")
    p.add_argument("--cache", type=Path, default=default_cache(), help="where llm-compressor's virtualenv lives")
    p.add_argument("--child-timeout", type=float, default=3600)
    p.add_argument("--name", default="peers_cpu", help="results file bench/results/NAME.json")
    p.add_argument("--probe-only", action="store_true",
                   help="only the machine: instruction set and the bf16/float32 matmul timing (no prunes)")
    a = p.parse_args()
    if a.probe_only:
        common.write_result(a.name, {"bench": "peers (--probe-only)", "date": datetime.datetime.now().isoformat(timespec="seconds"),
                                     "machine": {**machine(), "loadavg": common.loadavg()}})
        return

    import torch

    import wanda_core as wc

    a.model = a.model or common.smollm2_dir()
    loadavg_before = common.loadavg()
    machine_info = machine()
    log(f"instruction set: {machine_info['instruction_set']['best']}, torch kernels {machine_info['instruction_set']['torch_capability']}"
        f"{', ' + machine_info['instruction_set']['restricted_to'] if machine_info['instruction_set']['restricted_to'] else ''}; "
        f"bf16 matmul {machine_info['matmul']['bf16_over_fp32']}x float32's time")
    started = time.perf_counter()
    peers = [] if a.peer_pipelines == "none" else a.peer_pipelines.split(",")
    peer = peer_venv(a.cache, a.llmcompressor) if peers else None
    cells = [tuple(c.split(":", 1)) for c in a.cells.split(",")]
    threads = [int(t) for t in a.threads.split(",")]
    columns = [("ours", c) for c in a.ours.split(",")] + [("llmcompressor", c) for c in peers]
    skipped = {c: why for tool, c in columns if tool == "ours" and (why := unsupported(c))}
    for c, why in skipped.items():
        log(f"skipping ours {c}: {why}")
    active = [col for col in columns if col[1] not in skipped or col[0] != "ours"]

    torch.set_num_threads(a.eval_threads)
    tok = wc.load_tokenizer(a.model)
    windows = wc.calibration_windows(wc.tokenize(tok, wc.read_corpus(Path(a.data) / "valid.txt")), a.nsamples, a.seqlen, a.seed)
    test_ids = wc.tokenize(tok, wc.read_corpus(Path(a.data) / "test.txt"))
    from transformers import AutoModelForCausalLM

    dense_model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    dense = dict(dense_model.named_parameters(remove_duplicate=False))  # never modified: the reference
    dense_ppl = wc.perplexity(dense_model, test_ids, a.eval_seqlen, a.eval_windows, batch_size=4, progress=False)
    log(f"dense perplexity {dense_ppl:.3f} ({a.eval_windows} x {a.eval_seqlen} tokens of test.txt)")

    runs: dict[tuple, list] = {}
    evals: dict[tuple, dict] = {}
    total = len(cells) * len(threads) * a.repeats * len(active)
    done = 0
    with tempfile.TemporaryDirectory(prefix="bench_peers_") as tmp:
        work = Path(tmp)
        calib = work / "calib.safetensors"
        wc.save_windows(windows, calib, {"source": "wikitext-2 valid.txt", "seed": a.seed})
        for cell in cells:
            for n in threads:
                for rep in range(a.repeats):
                    for tool, config in active:  # alternating: ours..., peer, ours..., peer
                        key = (cell, n, tool, config)
                        save = work / "pruned" if (cell, tool, config) not in evals else None
                        done += 1
                        log(f"[{done}/{total}] {tool} {config} {cell_name(cell)} threads={n} repeat {rep + 1}")
                        python = peer["python"] if tool == "llmcompressor" else sys.executable
                        run = run_child(tool, config, cell, n, a, calib, work, python, save)
                        runs.setdefault(key, []).append(run)
                        log("  " + (f"failed: {run['error']}" if "error" in run else
                                    f"prune {run['prune_s']:.1f} s, process {run['process_s']:.1f} s, peak RSS {run['peak_rss_mib']:.0f} MiB"))
                        if save and "error" not in run:
                            evals[(cell, tool, config)] = evaluate(save, dense, test_ids, a)
                            log(f"  perplexity {evals[(cell, tool, config)]['ppl']:.3f}, sparsity {evals[(cell, tool, config)]['sparsity']:.4f}")
                            shutil.rmtree(save)

    rows = []
    for cell in cells:
        for n in threads:
            for tool, config in columns:
                row = {"method": cell[0], "pattern": cell[1], "threads": n, "tool": tool, "config": config}
                if tool == "ours" and config in skipped:
                    rows.append({**row, "skipped": skipped[config]})
                    continue
                rows.append({**row, **summarize(runs[(cell, n, tool, config)]), **evals.get((cell, tool, config), {})})
    for r in rows:
        peer_row = next((q for q in rows if q["tool"] == "llmcompressor" and "seconds" in q
                         and (q["method"], q["pattern"], q["threads"]) == (r["method"], r["pattern"], r["threads"])), None)
        if r["tool"] == "ours" and "seconds" in r and peer_row:
            r["ratio_to_peer"] = round(r["seconds"] / peer_row["seconds"], 3)
            # CPU seconds: less sensitive than wall time to other work on a shared machine (with 1 thread)
            r["cpu_ratio_to_peer"] = round(r["cpu_seconds"] / peer_row["cpu_seconds"], 3)

    result = {
        "bench": "peers", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python bench/bench_peers.py " + " ".join(sys.argv[1:]),
        "model": a.model,
        "calibration": {"data": "wikitext-2 valid.txt (lines joined by blank lines)", "nsamples": a.nsamples, "seqlen": a.seqlen,
                        "seed": a.seed, "input_ids_sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16],
                        "ours_batch_size": a.batch_size, "peer_batch_size": a.peer_batch_size},
        "evaluation": {"data": "wikitext-2 test.txt (lines joined by blank lines)", "seqlen": a.eval_seqlen,
                       "windows": a.eval_windows, "function": "wanda_core.perplexity", "dense_ppl": round(dense_ppl, 3)},
        "timing": {"repeats": a.repeats, "order": "alternating " + " / ".join(f"{t} {c}" for t, c in active),
                   "seconds": "wall time of the pruning call alone (ours: wanda_core.prune; peer: oneshot), median",
                   "cpu_seconds": "user + system CPU time of the child during that call, median",
                   "process_s": "child process wall time less the save of the pruned model: interpreter, imports, model load, prune",
                   "peak_rss_mib": "VmHWM of the child after the prune (model load included), max over repeats"},
        "versions": {"ours": our_versions(), "llmcompressor_venv": peer["versions"] if peer else None},
        "peer": {"oneshot": "sparsity, mask_structure 0:0 or N:M, targets [Linear], ignore ['re:.*lm_head'], "
                            "dataset = the same input_ids windows, shuffle off",
                 "venv": peer["path"], "venv_size_mib": peer["size_mib"], "install_s": peer["install_s"],
                 "installed_on": peer["installed_on"]} if peer else "not run (--peer-pipelines none)",
        "machine": {**machine_info, "loadavg_before": loadavg_before, "loadavg_after": common.loadavg()},
        "total_s": round(time.perf_counter() - started, 1),
        "rows": rows,
        "targets": targets_check(rows),
        "fastest": fastest(rows),
        "notes": [f"ours {c} skipped: {why}" for c, why in skipped.items()],
    }
    common.write_result(a.name, result, echo=False)
    print(json.dumps({"instruction_set": machine_info["instruction_set"], "matmul": machine_info["matmul"],
                      "fastest": result["fastest"], "targets": result["targets"]}, indent=1))
    print(table(rows))
    log(f"wrote bench/results/{a.name}.json ({result['total_s']} s)")


if __name__ == "__main__":
    main()
