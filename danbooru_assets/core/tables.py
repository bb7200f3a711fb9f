"""Atomic file writes: a reader never sees a half-written file.

Every writer in the project (the Parquet IO manager, exporters, the sample-data
generator) goes through these helpers: write to a temporary sibling, then rename.

A process killed mid-write (kill -9, out of memory) leaves its temporary sibling
(``.<name>.tmp-<8 hex>``) behind. :func:`remove_stale_temps` removes such files once
nobody can still own them: a writer writes its temporary file without pause and renames
it at once, so one untouched for :data:`STALE_TEMP_AGE_S` belongs to a dead writer. The
age, not a process id, decides, because several machines may write one shared folder.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tarfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:  # loaded where used: loading the code location imports neither
    import pandas as pd
    import pyarrow as pa


# A temporary file untouched this long was left by a writer that died (see the module doc).
STALE_TEMP_AGE_S = 3600.0
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.tmp-[0-9a-f]{8}$")


def temp_sibling(path: Path | str) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


def temp_target(name: str) -> str | None:
    """The file a temporary sibling's ``name`` was meant to become, or None when
    ``name`` is not a temporary sibling."""
    match = _TEMP_NAME.match(name)
    return match["target"] if match else None


def remove_stale_temps(
    folder: Path | str,
    target_suffix: str = "",
    target_name: str | None = None,
    max_age_s: float = STALE_TEMP_AGE_S,
) -> list[Path]:
    """Remove temporary siblings in ``folder`` (not below it) whose target ends with
    ``target_suffix`` (or is ``target_name``) and that nobody has written to for
    ``max_age_s`` seconds; return what was removed. A younger one may belong to a live
    writer and stays."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    cutoff = time.time() - max_age_s
    removed = []
    with os.scandir(folder) as entries:
        for entry in entries:
            target = temp_target(entry.name)
            if target is None or not target.endswith(target_suffix):
                continue
            if target_name is not None and target != target_name:
                continue
            try:
                if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
            except FileNotFoundError:  # its writer renamed or removed it meanwhile
                continue
    return removed


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
