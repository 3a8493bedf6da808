"""Text corpora, token streams and calibration windows."""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch

from .errors import WandaError, first_line
from .io import atomic_path

log = logging.getLogger("wanda_core")


def read_records(path) -> list[str]:
    """The records of a local corpus: .txt one per line (line ends kept); .jsonl the "text" field of
    each line; .parquet the "text" column. prepare_dataset() writes one JSONL record per document.
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
    if not "".join(records).strip():
        raise WandaError(f"data file is empty: {path}")
    return records


def read_corpus(path, join: str = "\n\n") -> str:
    """The records of a local corpus joined with `join` (the Wanda paper joins WikiText-2 lines with "\\n\\n")."""
    return join.join(read_records(path))


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D LongTensor token stream."""
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


# Calibration samplers: how windows are drawn, and how a corpus's records are joined into the one
# token stream a stream sampler draws from (None: documents stay apart). The two reference draws
# are those of locuslab/wanda lib/data.py (after SparseGPT's datautils.py): get_wikitext2 and get_c4.
SAMPLERS = {
    "stream": "\n\n",  # torch.Generator(seed) starts over one stream (our default for local corpora)
    "stream_python_random": " ",  # get_wikitext2: Python's random starts over the train lines joined with " "
    "c4_documents": None,  # get_c4: Python's random draws a document, then a start inside it
}


def sampler_join(sampler: str) -> str | None:
    """How `sampler` joins a corpus's records into one stream (None: it draws whole documents)."""
    if sampler not in SAMPLERS:
        raise WandaError(f"unknown calibration sampler {sampler!r}: use {', '.join(SAMPLERS)}")
    return SAMPLERS[sampler]


def calibration_windows(token_ids_or_docs, nsamples: int = 128, seqlen: int = 2048, seed: int = 0,
                        sampler: str = "stream", tokenizer=None) -> torch.Tensor:
    """`nsamples` windows of `seqlen` consecutive tokens, drawn by `sampler`: LongTensor [nsamples, seqlen].

    stream, stream_python_random: token_ids_or_docs is one token stream (1-D).
    c4_documents: a sequence of documents, each token ids, or text that `tokenizer` tokenizes when it
    is drawn (so a 356k-document C4 shard costs only the drawn documents).
    """
    sampler_join(sampler)
    if nsamples < 1:
        raise WandaError(f"nsamples must be at least 1, got {nsamples}")
    if seqlen < 2:
        raise WandaError(f"seqlen must be at least 2, got {seqlen}")
    if sampler == "c4_documents":
        return _document_windows(token_ids_or_docs, nsamples, seqlen, seed, tokenizer)
    token_ids = torch.as_tensor(token_ids_or_docs).reshape(-1).long()
    n = token_ids.numel()
    if n <= seqlen:
        raise WandaError(f"the corpus has {n} tokens, too few for windows of seqlen={seqlen}")
    if sampler == "stream":
        g = torch.Generator().manual_seed(int(seed))
        starts = torch.randint(0, n - seqlen, (nsamples,), generator=g).tolist()
    else:  # get_wikitext2: random.seed(seed), then one randint(0, n - seqlen - 1) per sample
        rng = random.Random(int(seed))
        starts = [rng.randint(0, n - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([token_ids[s : s + seqlen] for s in starts])


def _document_windows(docs, nsamples: int, seqlen: int, seed: int, tokenizer) -> torch.Tensor:
    """get_c4's draw: random.seed(seed); per sample, randint(0, len(docs) - 1) until a document has
    more than seqlen tokens (each tokenized alone, with the tokenizer's special tokens), then
    randint(0, n - seqlen - 1) for the start of [start, start + seqlen)."""
    if not len(docs):
        raise WandaError("the calibration corpus has no documents")
    rng = random.Random(int(seed))
    too_short: set[int] = set()  # the reference would draw forever if every document were too short
    windows = []
    for _ in range(nsamples):
        while True:
            i = rng.randint(0, len(docs) - 1)
            if i in too_short:
                continue
            doc = docs[i]
            if isinstance(doc, str):
                if tokenizer is None:
                    raise WandaError("the c4_documents sampler needs a tokenizer for text documents")
                doc = tokenize(tokenizer, doc)
            ids = torch.as_tensor(doc).reshape(-1).long()
            if ids.numel() > seqlen:
                break
            too_short.add(i)
            if len(too_short) == len(docs):
                raise WandaError(f"no document of the calibration corpus has more than seqlen={seqlen} tokens")
        start = rng.randint(0, ids.numel() - seqlen - 1)
        windows.append(ids[start : start + seqlen])
    return torch.stack(windows)


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
        records = read_records(spec["path"])
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
