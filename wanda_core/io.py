"""Writing outputs atomically: a temporary name in the same folder, renamed when complete."""
from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path`; renames it to `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; results are for the whole group
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_stale(path: Path) -> None:
    """Temporaries left by a writer of `path` that was killed (one writer per output, as in Snakemake)."""
    import shutil

    ours = re.compile(rf"\.{re.escape(path.name)}\.\w{{8}}\.tmp")  # tempfile's names, as made below
    for old in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if not ours.fullmatch(old.name):
            continue
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def write_json(obj, path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def write_table(rows: list[dict], path) -> None:
    """Rows to Parquet (or CSV/JSON by extension), atomically."""
    import pandas as pd

    df = pd.DataFrame(rows)
    with atomic_path(path) as tmp:
        suffix = Path(path).suffix
        if suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        elif suffix == ".csv":
            df.to_csv(tmp, index=False)
        else:
            tmp.write_text(df.to_json(orient="records", indent=2))


@contextlib.contextmanager
def atomic_dir(path):
    """Yields a temporary folder beside `path`; it replaces `path` only if the block succeeds."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        old = None
        if path.exists():  # moved aside, not deleted, until the new folder is in place
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
