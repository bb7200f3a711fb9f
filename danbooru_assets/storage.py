"""Atomic file writes: a reader never sees a half-written file.

Every writer in the project (the Parquet IO manager, exporters, the sample-data
generator) goes through these helpers: write to a temporary sibling, then rename.
"""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:  # loaded where used: loading the code location imports neither
    import pandas as pd
    import pyarrow as pa


def temp_sibling(path: Path | str) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def dataframe_to_table(df: pd.DataFrame) -> pa.Table:
    import pyarrow as pa

    return pa.Table.from_pandas(df, preserve_index=False)


def atomic_write_parquet(path: Path | str, df: pd.DataFrame) -> None:
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(dataframe_to_table(df), tmp)


def add_tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add ``data`` as ``name`` with fixed metadata, so the same inputs give
    byte-identical archives (exports, keypoint tarballs)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))
