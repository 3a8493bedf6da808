"""Text corpora, token streams and calibration windows."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .errors import WandaError, first_line
from .io import atomic_path

log = logging.getLogger("wanda_core")


def read_corpus(path, join: str = "\n\n") -> str:
    """The records of a local corpus joined with `join` (the Wanda paper joins WikiText-2 lines with "\\n\\n").

    .txt: one record per line; .jsonl: the "text" field of each line; .parquet: the "text" column.
    """
    path = Path(path)
    if not path.is_file():
        raise WandaError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line)["text"])
                    except (ValueError, KeyError, TypeError):
                        raise WandaError(f"{path}:{n}: not a JSON object with a 'text' field") from None
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise WandaError(f"{path}: no 'text' column")
        records = [t for t in table.column("text").to_pylist() if t is not None]
    else:
        records = path.read_text(encoding="utf-8").splitlines(keepends=True)
    text = join.join(records)
    if not text.strip():
        raise WandaError(f"data file is empty: {path}")
    return text


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D LongTensor token stream."""
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(token_ids, nsamples: int = 128, seqlen: int = 2048, seed: int = 0) -> torch.Tensor:
    """`nsamples` windows of `seqlen` consecutive tokens at seeded random offsets: LongTensor [nsamples, seqlen]."""
    token_ids = torch.as_tensor(token_ids).reshape(-1).long()
    if nsamples < 1:
        raise WandaError(f"nsamples must be at least 1, got {nsamples}")
    if seqlen < 2:
        raise WandaError(f"seqlen must be at least 2, got {seqlen}")
    if token_ids.numel() <= seqlen:
        raise WandaError(f"the corpus has {token_ids.numel()} tokens, too few for windows of seqlen={seqlen}")
    g = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, token_ids.numel() - seqlen, (nsamples,), generator=g)
    return torch.stack([token_ids[s : s + seqlen] for s in starts.tolist()])


def save_windows(windows: torch.Tensor, path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    meta = {k: str(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        save_file({"input_ids": windows.long().contiguous()}, str(tmp), metadata=meta)


def load_windows(path, with_metadata: bool = False):
    """The windows of a calibration file (and its metadata: what they were made from)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            windows = f.get_tensor("input_ids")
            metadata = dict(f.metadata() or {})
    except FileNotFoundError:
        raise WandaError(f"calibration file not found: {path}") from None
    except Exception as e:
        raise WandaError(f"cannot read calibration file {path}: {e}") from None
    if windows.dim() != 2:
        raise WandaError(f"calibration file {path}: input_ids must be [nsamples, seqlen], got {tuple(windows.shape)}")
    return (windows, metadata) if with_metadata else windows


def pydoc_topics(part: str) -> list[str]:
    """A corpus that ships with Python itself: the standard library's pydoc topic texts.

    Every fourth topic (sorted by name) is the evaluation part, the rest the calibration part.
    """
    import pydoc_data.topics

    items = sorted(pydoc_data.topics.topics.items())
    if part not in ("calibration", "evaluation"):
        raise WandaError(f"pydoc corpus part must be 'calibration' or 'evaluation', got {part!r}")
    return [text for i, (_, text) in enumerate(items) if (i % 4 == 3) == (part == "evaluation")]


def hub_records(spec: dict) -> list[str]:
    """Text records of a Hugging Face data set (needs the 'datasets' package and the network)."""
    try:
        import datasets
    except ImportError:
        raise WandaError("a hub data set needs the 'datasets' package: pip install datasets") from None
    try:
        ds = datasets.load_dataset(spec["hub"], spec.get("name"), split=spec.get("split", "train"),
                                   data_files=spec.get("data_files"))
    except Exception as e:
        raise WandaError(f"cannot load data set {spec['hub']}: {first_line(e)}") from None
    texts = ds[spec.get("field", "text")]
    return texts[: spec["max_records"]] if spec.get("max_records") else texts


def prepare_dataset(spec: dict, out) -> int:
    """Materialize a data set once as JSONL records ({"text": ...}); returns the record count.

    spec: {"path": local .txt/.jsonl/.parquet} | {"pydoc": "calibration"|"evaluation"} | {"hub": id, ...}.
    read_corpus() of the result equals read_corpus() of a local source.
    """
    if "path" in spec:
        path = Path(spec["path"])
        if not path.is_file():
            raise WandaError(f"data file not found: {path}")
        text = read_corpus(path, join="\x00")  # validates the file; records are split back below
        records = text.split("\x00")
    elif "pydoc" in spec:
        records = pydoc_topics(spec["pydoc"])
    elif "hub" in spec:
        records = hub_records(spec)
    else:
        raise WandaError(f"data set spec needs one of 'path', 'pydoc' or 'hub', got {sorted(spec)}")
    if not "".join(records).strip():
        raise WandaError(f"data set is empty: {spec}")
    with atomic_path(out) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps({"text": r}, ensure_ascii=False) + "\n")
    return len(records)
