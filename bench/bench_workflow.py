"""The workflow's own overhead: DAG building, no-op reruns and per-job start-up; prints JSON.

  (a) `snakemake -n` of the paper grid (config/paper.yaml, 1504 jobs) and of the demo config
  (b) a tiny completed workflow (tiny random LLaMA, pydoc text) run again: the no-op rerun
  (c) one job's start-up: `wanda-core --help`, model loading (tiny, SmolLM2-135M) against the
      wall time of whole small jobs (eval-ppl), as a share

Everything runs in a temporary --directory: nothing is written under results/ of the repository.

    python bench/bench_workflow.py [--repeats 3] [--keep]
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

import common

ROOT = common.ROOT
VENV_BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "tests"))  # tiny_models: random tiny HF models, no download


def wall(cmd, cwd=ROOT, check=True, env=None):
    """Seconds a command takes, and its output."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - t0
    if check and proc.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return seconds, proc


def median_wall(cmd, repeats, **kw):
    times = [wall(cmd, **kw)[0] for _ in range(repeats)]
    return {"median_s": round(statistics.median(times), 3), "runs_s": [round(t, 3) for t in times]}


def smk(workdir, config, *args):
    return [str(VENV_BIN / "snakemake"), "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(config), "--cores", "2", *args]


def job_total(proc):
    m = re.search(r"^total\s+(\d+)$", proc.stdout + proc.stderr, flags=re.M)
    return int(m.group(1)) if m else 0


def profile_dry_run(workdir, config, tmp, top=8):
    """cProfile of one dry run: where the DAG building time goes, in our code (Snakefile, rules, wanda_core)."""
    import pstats

    out = tmp / "dry_run.prof"
    cmd = [sys.executable, "-m", "cProfile", "-o", str(out), "-m", "snakemake", *smk(workdir, config, "-n", "--quiet", "all")[1:]]
    wall(cmd)
    stats = pstats.Stats(str(out)).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
    total = max(v[3] for v in stats.values())
    ours = [(f"{Path(f).relative_to(ROOT)}:{line}({name})", v[3]) for (f, line, name), v in stats.items()
            if f.startswith(str(ROOT)) and ".venv" not in f and name != "<module>"]
    ours.sort(key=lambda x: -x[1])
    return {"profiled_total_s": round(total, 2),
            "top_in_repo": [{"function": n, "cumulative_s": round(t, 2), "share": round(t / total, 3)} for n, t in ours[:top]]}


def tiny_config(tmp, source):
    config = {
        "models": {"tiny-llama": {"source": str(source), "group": "Tiny", "label": "Tiny-LLaMA"}},
        "methods": {"dense": {"method": "dense", "label": "Dense"}, "magnitude": {"method": "magnitude", "label": "Magnitude"},
                    "wanda": {"method": "wanda", "label": "Wanda"}},
        "patterns": ["unstructured-0.5"],
        "datasets": {"calib": {"pydoc": "calibration"}, "eval": {"pydoc": "evaluation"}},
        "calibration": {"dataset": "calib", "nsamples": 4, "seqlen": 64},
        "evals": {"perplexity": {"datasets": ["eval"], "seqlen": 64, "max_windows": 2}},
        "published": None,
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


LOAD = "import time, sys; t0 = time.perf_counter(); import wanda_core as wc; t1 = time.perf_counter(); " \
       "wc.load_model(sys.argv[1], dtype='float32', device='cpu'); print(t1 - t0, time.perf_counter() - t1)"


def job_share(model, data, seqlen, windows, tmp, repeats):
    """One eval-ppl job, timed from outside, against the seconds it spends computing (its own 'seconds' field)."""
    out = tmp / "ppl.json"
    cmd = [str(VENV_BIN / "wanda-core"), "--threads", "2", "eval-ppl", "--model", str(model), "--data", str(data),
           "--seqlen", str(seqlen), "--max-windows", str(windows), "--batch-size", "2", "--dtype", "float32",
           "--device", "cpu", "--out", str(out), "--quiet"]
    rows = []
    for _ in range(repeats):
        seconds, _ = wall(cmd)
        compute = json.loads(out.read_text())["seconds"]
        imports, load = map(float, wall([sys.executable, "-c", LOAD, str(model)])[1].stdout.split())
        rows.append((seconds, compute, imports, load))
    seconds, compute, imports, load = (statistics.median(r[i] for r in rows) for i in range(4))
    # import and load are timed in a separate process; the rest (interpreter, tokenizing, writing) is what remains
    return {"job_wall_s": round(seconds, 3), "compute_s": round(compute, 3), "import_wanda_core_s": round(imports, 3),
            "model_load_s": round(load, 3), "other_s": round(seconds - compute - imports - load, 3),
            "not_compute_share": round(1 - compute / seconds, 3), "import_and_load_share": round((imports + load) / seconds, 3),
            "command": " ".join(cmd[1:]).replace(str(tmp), "$TMP")}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smollm2", default=common.SMOLLM2)
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args()
    start_load, tmp = common.loadavg(), Path(tempfile.mkdtemp(prefix="bench_workflow_"))
    result = {"bench": "workflow", "snakemake": wall([str(VENV_BIN / "snakemake"), "--version"])[1].stdout.strip()}

    # (a) DAG building: dry runs (the paper grid never runs here, it needs the Hub and GPUs)
    # The first run fills a fresh cache of lm-eval's task names (8 s of indexing); the others use it.
    os.environ["XDG_CACHE_HOME"] = str(tmp / "cache")
    cold, proc = wall(smk(tmp / "paper", ROOT / "config" / "paper.yaml", "-n"))
    result["dry_run_paper"] = {"jobs": job_total(proc), "cold_task_cache_s": round(cold, 3),
                               **median_wall(smk(tmp / "paper", ROOT / "config" / "paper.yaml", "-n"), args.repeats)}
    result["dry_run_paper"]["quiet"] = median_wall(smk(tmp / "paper", ROOT / "config" / "paper.yaml", "-n", "--quiet", "all"), args.repeats)
    result["dry_run_paper"]["per_job_ms"] = round(1000 * result["dry_run_paper"]["median_s"] / max(result["dry_run_paper"]["jobs"], 1), 2)
    _, proc = wall(smk(tmp / "demo", ROOT / "config" / "config.yaml", "-n"))
    result["dry_run_demo"] = {"jobs": job_total(proc), **median_wall(smk(tmp / "demo", ROOT / "config" / "config.yaml", "-n"), args.repeats)}
    result["dry_run_paper"]["profile"] = profile_dry_run(tmp / "paper", ROOT / "config" / "paper.yaml", tmp)
    result["snakemake_version_s"] = median_wall([str(VENV_BIN / "snakemake"), "--version"], args.repeats)
    print(json.dumps({k: result[k] for k in ("dry_run_paper", "dry_run_demo")}), file=sys.stderr, flush=True)

    # (b) a tiny workflow: first run, then the no-op rerun
    from tiny_models import save_tiny

    source = save_tiny("llama", tmp / "tiny-llama-src")
    config = tiny_config(tmp, source)
    work = tmp / "tiny"
    _, proc = wall(smk(work, config, "-n"))
    jobs = job_total(proc)
    first, _ = wall(smk(work, config))
    result["tiny_workflow"] = {
        "jobs": jobs, "first_run_s": round(first, 2), "first_run_per_job_s": round(first / max(jobs, 1), 2),
        "noop_rerun": median_wall(smk(work, config), args.repeats),
        "noop_dry_run": median_wall(smk(work, config, "-n"), args.repeats),
    }
    print(json.dumps(result["tiny_workflow"]), file=sys.stderr, flush=True)

    # (c) per-job start-up against whole small jobs
    result["startup"] = {
        "python_s": median_wall([sys.executable, "-c", "pass"], args.repeats),
        "import_torch_s": median_wall([sys.executable, "-c", "import torch"], args.repeats),
        "import_transformers_model_s": median_wall([sys.executable, "-c", "import transformers; transformers.LlamaForCausalLM"], args.repeats),
        "wanda_core_help_s": median_wall([str(VENV_BIN / "wanda-core"), "--help"], args.repeats),
    }
    data = work / "resources" / "data" / "eval.jsonl"
    result["job_tiny"] = job_share(work / "resources" / "models" / "tiny-llama", data, 64, 2, tmp, args.repeats)
    if (Path(args.smollm2) / "config.json").is_file():
        result["job_smollm2"] = job_share(args.smollm2, data, 512, 2, tmp, args.repeats)
    result.update(note="2 shared cores (tests ran beside): seconds are noisy; see loadavg", machine=common.machine_note(start_load))
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    common.write_result("workflow_cpu", result)


if __name__ == "__main__":
    main()
