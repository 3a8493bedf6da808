"""Aggregation: a failed evaluation shows as 'failed' with its reason, never as a number."""
import pandas as pd

from wanda_core import io, tables


def test_failed_perplexity_is_a_failure_in_every_output(tmp_path):
    config = {
        "models": {"m": {"group": "G", "label": "Model"}},
        "methods": {"dense": {"method": "dense", "label": "Dense"}, "wanda": {"method": "wanda", "label": "Wanda"},
                    "magnitude": {"method": "magnitude", "label": "Magnitude"}},
        "calibration": {"dataset": "c", "nsamples": 2, "seqlen": 8, "seed": 0},
        "published": None,
    }
    results = {("dense", "none"): (7.5, "ok"), ("wanda", "unstructured-0.5"): (9.25, "ok"),
               ("magnitude", "unstructured-0.5"): (float("nan"), "failed: the model's logits are NaN in windows 0-0")}
    files = []
    for (method, pattern), (value, status) in results.items():
        path = tmp_path / "results" / "ppl" / "m" / method / pattern / "wikitext2.parquet"
        io.write_table([{"perplexity": value, "status": status, "seconds": 1.0}], path)
        files.append(str(path))
    out = {k: tmp_path / f"out.{k}" for k in ("benchmark", "table", "csv", "zeroshot_table", "zeroshot_csv", "plot")}
    out = {k: str(v) + (".parquet" if k == "benchmark" else ".csv" if k.endswith("csv") else ".png" if k == "plot" else ".md")
           for k, v in out.items()}
    text = tables.aggregate(files, [], [], config, out)

    df = pd.read_parquet(out["benchmark"]).set_index("method")
    assert df.loc["magnitude", "status"] == "failed: the model's logits are NaN in windows 0-0"
    assert (df.loc[["dense", "wanda"], "status"] == "ok").all()
    row = next(line for line in text.splitlines() if line.startswith("| G | Model"))
    assert row.split("|")[4:-1] == [" 7.50 ", " 9.25 ", " failed "]
    assert pd.read_csv(out["csv"])["Magnitude"].tolist() == ["failed"]
