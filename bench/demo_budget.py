"""What a finished workflow run's jobs spent their time on, from Snakemake's benchmark files.

Reads results/benchmarks/<rule>/... (every compute job's wall seconds, CPU seconds, peak RSS) and
results/benchmark.parquet (each evaluation's own seconds, without start-up, and each prune call's
seconds and split), and sums them per rule, per model and rule, and per method of the prune jobs.
Start-up (interpreter, imports, model load, saving) is a job's wall time less the work it reports.
Prints JSON and writes bench/results/<--name>.json.

    python bench/demo_budget.py [--results results] [--name demo_budget_cpu] [--wall-s 1234 --load 11.9]
"""
import argparse
import json
import os
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, os.path.dirname(__file__))
from common import loadavg, machine_note, write_result  # noqa: E402

from wanda_core.cost import read_benchmark  # noqa: E402


def jobs(results: Path) -> pd.DataFrame:
    """One row per benchmark file: rule, model, the rest of its path, wall_s, cpu_s, max_rss_mib."""
    rows = []
    for path in sorted((results / "benchmarks").rglob("*.tsv")):
        rel = path.relative_to(results / "benchmarks")
        rule, model = rel.parts[0], rel.parts[1]
        method = rel.parts[2] if rule in ("prune", "perplexity", "zeroshot", "finetune") and len(rel.parts) > 3 else None
        rows.append({"rule": rule, "model": model, "method": method, "job": str(rel.with_suffix("")), **read_benchmark(path)})
    return pd.DataFrame(rows)


def summary(frame: pd.DataFrame, keys: list[str]) -> list[dict]:
    g = frame.groupby(keys, dropna=False).agg(jobs=("job", "count"), wall_s=("wall_s", "sum"), cpu_s=("cpu_s", "sum"),
                                             max_rss_mib=("max_rss_mib", "max"))
    g = g.sort_values("cpu_s", ascending=False).round(1).reset_index()
    return json.loads(g.to_json(orient="records"))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default="results", type=Path)
    p.add_argument("--name", default="demo_budget_cpu")
    p.add_argument("--wall-s", type=float, help="the whole run's wall seconds, if measured")
    p.add_argument("--note", default="", help="how the run was made (load, cores)")
    a = p.parse_args()
    j = jobs(a.results)
    if not len(j):
        sys.exit(f"no benchmark files under {a.results}/benchmarks")
    df = pd.read_parquet(a.results / "benchmark.parquet")
    # Work the jobs report: each evaluation's own seconds (one per result file), each prune call's seconds.
    evals = df.drop_duplicates(["model", "method", "pattern", "seed", "dataset", "finetune"])
    evals = evals[evals["eval_wall_s"].notna()] if "eval_wall_s" in evals else evals.iloc[:0]
    prunes = df[df["prune_wall_s"].notna()].drop_duplicates(["model", "method", "pattern", "seed"]) if "prune_wall_s" in df else df.iloc[:0]
    split = {phase: round(float(prunes[f"prune_{phase}_s"].sum()), 1) for phase in ("forward", "statistics", "method", "saving", "other")
             if f"prune_{phase}_s" in prunes}
    total_cpu, total_wall = float(j["cpu_s"].sum()), float(j["wall_s"].sum())
    result = {
        "bench": "demo_budget", "results": str(a.results), "note": a.note, "run_wall_s": a.wall_s,
        "jobs": len(j), "jobs_wall_s": round(total_wall, 1), "jobs_cpu_s": round(total_cpu, 1),
        "by_rule": summary(j, ["rule"]), "by_model_rule": summary(j, ["model", "rule"]),
        "prune_by_method": summary(j[j["rule"] == "prune"], ["model", "method"]),
        "evaluations": {"jobs": len(evals), "wall_s": round(float(evals["eval_wall_s"].sum()), 1),
                        "evaluating_s": round(float(evals["eval_seconds"].sum()), 1),
                        "start_up_s": round(float((evals["eval_wall_s"] - evals["eval_seconds"]).sum()), 1)},
        "prunes": {"jobs": len(prunes), "wall_s": round(float(prunes["prune_wall_s"].sum()), 1),
                   "pruning_s": round(float(prunes["prune_seconds"].sum()), 1), "split_s": split,
                   "start_up_and_saving_s": round(float((prunes["prune_wall_s"] - prunes["prune_seconds"]).sum()), 1)},
        "machine": machine_note(loadavg()),
    }
    write_result(a.name, result)


if __name__ == "__main__":
    main()
