"""ALPS and the ADMM weight update against their authors' code on SmolLM2-135M (issue #24); prints JSON.

The authors' per-matrix solvers are imported from their checkouts, never copied:
  --alps  a checkout of mazumder-lab/ALPS          (alps.py: ALPS_prune.ALPS_admm with cg_batch)
  --admm  a checkout of fmfi-compbio/admm-pruning  (lib/admm.py: AdmmPruner.fasterprune)
Their drivers (ALPS llama.py llama_sequential, admm-pruning lib/prune.py prune_admm) do what our
sequential pipeline does: the statistics of every matrix of a block from one forward of the dense
block, every matrix pruned, the pruned block run again for the next block's inputs. Their drivers
call the decoder layer the transformers 4.x way, so here their solvers run inside our pipeline, as a
method registered for this run, on X^T X accumulated as they accumulate it (sum of x x^T in float32).
Their code assumes CUDA: while it runs, device strings are mapped to the CPU (torch.Tensor.to and
torch.cuda.synchronize patched at run time; their files are not edited). Their printouts are dropped.

  block 0: ours and theirs on the same statistics of block 0 (dense inputs): per matrix, the share of
           mask entries that agree, the relative reconstruction error tr(E H E^T) / tr(W H W^T) of
           each, and the seconds of each solve.
  ppl:     the whole model pruned by their solver, WikiText-2 perplexity; calibration (32 x 512,
           get_wikitext2 sampling) and evaluation (first 64 x 512 of test) as bench_methods_smollm2.py,
           whose rows (bench/results/methods_smollm2_cpu.json, same label) give ours.

    python bench/bench_frontier_reference.py --alps /work/ref/ALPS --admm /work/ref/admm-pruning
        [--block0 alps:0.7,alps:2:4,...] [--ppl alps:0.7,alps:2:4,admm:0.6,admm:2:4] [--threads 1]
"""
import argparse
import contextlib
import importlib.util
import io
import json
import sys
import time
from pathlib import Path

import torch

from common import RESULTS, WIKITEXT, loadavg, machine_note, smollm2_dir, wikitext_windows, write_result

SETTINGS = ["alps:0.5", "alps:0.6", "alps:0.7", "alps:2:4", "admm:0.5", "admm:0.6", "admm:0.7", "admm:2:4"]


def _cuda(device) -> bool:
    return (isinstance(device, str) and device.startswith("cuda")) or (isinstance(device, torch.device) and device.type == "cuda")


@contextlib.contextmanager
def on_cpu():
    """Run CUDA-only code on the CPU: .to('cuda...') goes to the CPU, synchronize does nothing; stdout dropped."""
    to, sync = torch.Tensor.to, torch.cuda.synchronize

    def cpu_to(self, *args, **kwargs):
        args = tuple("cpu" if _cuda(a) else a for a in args)
        if _cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return to(self, *args, **kwargs)

    torch.Tensor.to, torch.cuda.synchronize = cpu_to, lambda *a, **k: None
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        torch.Tensor.to, torch.cuda.synchronize = to, sync


def load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    with on_cpu():
        spec.loader.exec_module(module)
    return module


def authors_method(kind: str, module):
    """A method module for our registry whose prune_matrix calls the authors' solver on one nn.Linear."""
    from wanda_core.methods import MatrixResult

    class Authors:
        NAME = f"{kind}_authors"
        STATS = "hessian"
        PARAMS: dict = {}
        PATTERNS = ("unstructured", "nm")

        @staticmethod
        def prune_matrix(weight, stats, pattern):
            layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            layer.weight.data = weight.clone()
            with on_cpu(), torch.no_grad():
                if kind == "alps":
                    solver = module.ALPS_prune(layer, nsamples=1, seqlen=1)
                    solver.XtX = stats.hessian.clone().float()
                    solver.ALPS_admm(sp=pattern.sparsity, nm_n=pattern.n, nm_m=pattern.m, rho=0.1)
                else:
                    if pattern.kind == "nm" and (pattern.n, pattern.m) != (2, 4):
                        raise ValueError("the authors' ADMM code prunes N:M as 2:4 only")
                    solver = module.AdmmPruner(layer)
                    solver.XX = stats.hessian.clone().float()
                    solver.fasterprune(pattern.sparsity, prune_n=pattern.n, prune_m=pattern.m, percdamp=0.1)
            w = layer.weight.data.float()
            return MatrixResult(keep=w != 0, weight=w)

    return Authors


class _Block0Done(Exception):
    pass


def block0_stats(model, calib):
    """Statistics (X^T X, sum x^2) of every matrix of block 0, from the dense block's forward."""
    import wanda_core as wc
    from wanda_core.methods import METHODS, MatrixResult

    saved = {}

    class Capture:
        NAME, STATS, PARAMS, PATTERNS = "capture_block0", ("hessian", "sqnorm"), {}, ("unstructured", "nm")
        MATRIX_NAME = True

        @staticmethod
        def prune_matrix(weight, stats, pattern, name=None):
            if name is not None and ".0." not in name:
                raise _Block0Done
            if name is not None:
                saved[name] = (weight.clone(), stats)
            return MatrixResult(keep=torch.ones_like(weight, dtype=torch.bool))

    METHODS[Capture.NAME] = Capture  # for this run only
    with contextlib.suppress(_Block0Done):
        wc.prune(model, "capture_block0", "unstructured", 0.5, calib, progress=False)
    return saved


def parse(setting: str):
    from wanda_core.masks import parse_pattern

    method, spec = setting.split(":", 1)
    pattern = parse_pattern(spec) if ":" in spec else parse_pattern("unstructured", float(spec))
    label = f"{method} {spec}" if ":" in spec else f"{method} {round(float(spec) * 100)}%"
    return method, pattern, label


def relative_error(w, new, hessian):
    e = (new - w).double()
    h = hessian.double()
    return float(((e @ h) * e).sum() / ((w.double() @ h) * w.double()).sum())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--alps", type=Path, help="checkout of mazumder-lab/ALPS")
    p.add_argument("--admm", type=Path, help="checkout of fmfi-compbio/admm-pruning")
    p.add_argument("--block0", default=",".join(SETTINGS), help="settings compared on block 0 (method:sparsity or method:N:M)")
    p.add_argument("--ppl", default="", help="settings pruned whole by the authors' solver and evaluated")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--name", default="frontier_reference_cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start_load = loadavg()

    import wanda_core as wc
    from wanda_core.methods import METHODS, get_method

    modules = {}
    if args.alps:
        modules["alps"] = load_module("alps_authors", args.alps / "alps.py")
    if args.admm:
        modules["admm"] = load_module("admm_authors", args.admm / "lib" / "admm.py")
    for kind, module in modules.items():
        METHODS[f"{kind}_authors"] = authors_method(kind, module)
    settings = [parse(s) for s in args.block0.split(",") if s]
    ppl_settings = [parse(s) for s in args.ppl.split(",") if s]
    missing = {m for m, _, _ in settings + ppl_settings} - set(modules)
    if missing:
        p.error(f"no checkout given for {sorted(missing)}")

    model, tok = wc.load_model(smollm2_dir(), device="cpu")
    calib = wikitext_windows(tok, 32, 512)
    result = {"bench": "frontier_reference", "model": "SmolLM2-135M-Instruct (float32, CPU)",
              "calibration": "wikitext-2 valid.txt, lines joined with ' ', 32 x 512, Wanda get_wikitext2 sampling, seed 0",
              "eval": f"wikitext-2 test.txt, lines joined with '\\n\\n', first {args.windows} windows x 512",
              "sources": {k: str(v) for k, v in (("alps", args.alps), ("admm", args.admm)) if v},
              "threads": args.threads, "block0": [], "ppl": []}
    if settings:
        stats = block0_stats(model, calib)
        for method, pattern, label in settings:
            for name, (w, st) in stats.items():
                row = {"run": label, "matrix": name.split(".", 3)[-1]}
                for who, m in (("ours", get_method(method)), ("authors", get_method(f"{method}_authors"))):
                    t0 = time.perf_counter()
                    r = m.prune_matrix(w.clone(), st, pattern)
                    row[f"{who}_seconds"] = round(time.perf_counter() - t0, 2)
                    row[f"{who}_error"] = round(relative_error(w, r.weight, st.hessian), 6)
                    row[f"{who}_keep"] = r.keep
                row["mask_agreement"] = round(float((row.pop("ours_keep") == row.pop("authors_keep")).float().mean()), 6)
                row["loadavg"] = loadavg()
                result["block0"].append(row)
                print(row, file=sys.stderr, flush=True)
    if ppl_settings:
        test = wc.tokenize(tok, wc.read_corpus(WIKITEXT / "test.txt"))
        dense = {k: v.clone() for k, v in model.state_dict().items()}
        ours_rows = {}
        with contextlib.suppress(OSError, ValueError):
            ours_rows = {r["run"]: r for r in json.loads((RESULTS / "methods_smollm2_cpu.json").read_text())["rows"]}
        for method, pattern, label in ppl_settings:
            model.load_state_dict(dense)
            t0 = time.perf_counter()
            report = wc.prune(model, f"{method}_authors", "unstructured" if pattern.kind == "unstructured" else str(pattern),
                              pattern.sparsity if pattern.kind == "unstructured" else None, calib, progress=False)
            seconds = time.perf_counter() - t0
            ppl = wc.perplexity(model, test, 512, args.windows, batch_size=4, progress=False)
            ours = ours_rows.get(label, {})
            row = {"run": label, "authors_ppl": round(ppl, 3), "authors_prune_seconds": round(seconds, 1),
                   "authors_sparsity": round(report["sparsity"], 4), "ours_ppl": ours.get("ppl"),
                   "ours_prune_seconds": ours.get("prune_seconds"), "loadavg": loadavg()}
            if ours.get("ppl"):
                row["ppl_ratio_ours_over_authors"] = round(ours["ppl"] / ppl, 4)
            result["ppl"].append(row)
            print(row, file=sys.stderr, flush=True)
    result["machine"] = machine_note(start_load)
    write_result(args.name, result)


if __name__ == "__main__":
    main()
