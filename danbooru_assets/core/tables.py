"""Stored tables and atomic file writes: a reader never sees a half-written file.

Every writer in the project (the Parquet IO manager, side tables of assets, exporters,
the sample-data generator) goes through these helpers: write to a temporary sibling,
then rename. :func:`write_parquet`/:func:`write_arrow` are the one Parquet writer; they
and :func:`write_bytes` take a local path or an fsspec URL (``s3://…``, ``memory://…``).
:class:`ShardTables` reads the stored shards of a per-shard asset lazily.

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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Mapping

from upath import UPath

if TYPE_CHECKING:  # loaded where used: loading the code location imports neither
    import pandas as pd
    import pyarrow as pa

PARQUET_SUFFIX = ".parquet"
# A damaged table set aside: ``0065.parquet.damaged-20261203T185300Z``.
DAMAGED_INFIX = ".damaged-"


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


def is_local(path: UPath | Path | str) -> bool:
    """Whether ``path`` is on the local file system (not an fsspec URL)."""
    return getattr(UPath(path), "protocol", "") in ("", "file", "local")


def _atomic_write(path: UPath | Path | str, write_local: Callable[[str], None], data_for_remote: Callable[[], bytes]) -> None:
    path = UPath(path)
    if is_local(path):
        with atomic_path(path.path) as tmp:  # the project's one local temp-then-rename
            write_local(str(tmp))
        return
    # Object stores: write a temporary sibling, then move it over the target.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(temp_sibling(path.name).name)
    try:
        with tmp.open("wb") as f:
            f.write(data_for_remote())
        tmp.fs.mv(tmp.path, path.path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_arrow(path: UPath | Path | str, table: pa.Table) -> None:
    """Write an Arrow table to ``path`` (local or fsspec URL) as Parquet, atomically."""
    import pyarrow.parquet as pq

    def encoded() -> bytes:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        return buf.getvalue()

    _atomic_write(path, lambda local: pq.write_table(table, local), encoded)


def write_parquet(path: UPath | Path | str, df: pd.DataFrame) -> None:
    """Write ``df`` to ``path`` (local or fsspec URL) as Parquet, atomically."""
    write_arrow(path, dataframe_to_table(df))


def write_bytes(path: UPath | Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` (local or fsspec URL) atomically."""

    def write_local(local: str) -> None:
        with open(local, "wb") as f:
            f.write(data)

    _atomic_write(path, write_local, lambda: data)


class DamagedTableError(ValueError):
    """A stored table that exists but cannot be read as Parquet (cut short, zero bytes,
    overwritten by something else); the message names the file."""

    def __init__(self, path: UPath | Path | str, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: damaged, not a readable Parquet table ({reason})")


def read_arrow(path: UPath | Path | str, columns: list[str] | None = None) -> pa.Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # ParquetFile skips the dataset layer of read_table: ~4x less fixed cost per file,
    # which matters for 1,000 small shard files.
    path = UPath(path)
    try:
        if is_local(path):
            return pq.ParquetFile(str(path.path)).read(columns=columns)
        with path.open("rb") as f:
            return pq.ParquetFile(f).read(columns=columns)
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError) as exc:  # pyarrow names neither the file nor what to do
        raise DamagedTableError(path, str(exc).strip() or type(exc).__name__) from exc


def read_parquet(path: UPath | Path | str, columns: list[str] | None = None) -> pd.DataFrame:
    return read_arrow(path, columns).to_pandas()


@dataclass
class SetAside:
    """A damaged stored table renamed out of the way (see :func:`read_or_set_aside`)."""

    path: str
    moved_to: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path} could not be read ({self.reason}); moved aside to {Path(self.moved_to).name}, recomputing"


def read_or_set_aside(
    path: UPath | Path | str, columns: list[str] | None = None
) -> tuple[pd.DataFrame | None, SetAside | None]:
    """A stage's own stored table, to reuse its rows: ``(table, None)``; ``(None, None)``
    when there is none. A damaged one (:class:`DamagedTableError`) is renamed to
    ``<name>.damaged-<UTC time>`` beside it, never deleted and never read again (no
    reader lists that name), and ``(None, SetAside)`` says so: the caller computes the
    shard afresh and names the file in its log and metadata."""
    path = UPath(path)
    if not path.exists():
        return None, None
    try:
        return read_parquet(path, columns), None
    except DamagedTableError as exc:
        moved = path.with_name(f"{path.name}{DAMAGED_INFIX}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
        if is_local(path):
            os.replace(path.path, moved.path)
        else:
            path.fs.mv(path.path, moved.path)
        return None, SetAside(str(path), str(moved), exc.reason)


def remove_stale_temp_files(
    folder: UPath | Path | str, target_suffix: str = PARQUET_SUFFIX, target_name: str | None = None
) -> list[str]:
    """Remove what killed writes left in ``folder`` (see :func:`remove_stale_temps`);
    local folders only: an object store's move is one request, and its temporary objects
    carry no reliable modification time across stores."""
    folder = UPath(folder)
    if not is_local(folder):
        return []
    return [str(p) for p in remove_stale_temps(folder.path, target_suffix, target_name)]


def prune_shard_files(folder: UPath | Path | str, keep: set[str]) -> None:
    """Remove ``<shard>.parquet`` files of a split-by-shard side table (metadata,
    published keypoints) whose shard no longer has rows after a re-conversion, and
    stale temporary files a killed conversion left there."""
    folder = UPath(folder)
    remove_stale_temp_files(folder)
    if folder.exists():
        for old in folder.iterdir():
            if old.name.endswith(PARQUET_SUFFIX) and old.name[: -len(PARQUET_SUFFIX)] not in keep:
                old.unlink()


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


class ShardTables(Mapping[str, "pd.DataFrame"]):
    """The stored shards of one per-shard asset, read lazily.

    Iterating gives the shards that have a table (in key order); ``tables[shard]`` reads
    one with the projected ``columns``; ``missing`` lists requested shards without one.
    """

    def __init__(self, asset: str, folder: UPath, keys: list[str], columns: list[str] | None = None):
        self.asset = asset
        self.folder = UPath(folder)
        self.columns = list(columns) if columns else None
        existing = self._existing_keys()
        keys = sorted(keys)  # a range arrives as a set; shards are zero-padded keys
        self.keys_with_data = [k for k in keys if k in existing]
        self.missing = [k for k in keys if k not in existing]
        self._empty: pa.Table | None = None

    def _existing_keys(self) -> set[str]:
        # One listing instead of probing 1,000 keys one by one.
        if not self.folder.exists():
            return set()
        return {
            p.name[: -len(PARQUET_SUFFIX)]
            for p in self.folder.iterdir()
            if p.name.endswith(PARQUET_SUFFIX) and not p.name.startswith(".")
        }

    def path(self, shard: str) -> UPath:
        return self.folder / f"{shard}{PARQUET_SUFFIX}"

    def read(self, shard: str, columns: list[str] | None = None) -> pd.DataFrame:
        """One shard's table. A requested shard that was never materialized (a backfill
        over all 1,000 partitions of a dataset that uses a few) reads as an empty table
        with the asset's columns: no upstream data is an empty shard, not an error."""
        columns = columns or self.columns
        if shard in self.keys_with_data:
            try:
                return read_parquet(self.path(shard), columns)
            except DamagedTableError as exc:  # say which file, and how it is mended
                raise DamagedTableError(
                    exc.path, f"{exc.reason}; materialize {self.asset} for shard {shard} again to recompute it"
                ) from exc
            except Exception as exc:
                raise ValueError(f"{self.path(shard)}: cannot read {self.asset} of shard {shard}: {exc}") from exc
        if shard in self.missing and self.keys_with_data:
            if self._empty is None:  # the schema of a stored shard, read once
                import pyarrow.parquet as pq

                with self.path(self.keys_with_data[0]).open("rb") as f:
                    self._empty = pq.read_schema(f).empty_table()
            return (self._empty.select(columns) if columns else self._empty).to_pandas()
        raise KeyError(f"{self.asset}: shard {shard} has no stored table (materialize {self.asset} first)")

    def __getitem__(self, shard: str) -> pd.DataFrame:
        return self.read(shard)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_with_data)

    def __len__(self) -> int:
        return len(self.keys_with_data)

    def concat(self, columns: list[str] | None = None, with_shard: bool = False) -> pd.DataFrame:
        """Every stored shard in one frame (``shard`` column added on request)."""
        import pandas as pd

        frames = []
        for shard in self.keys_with_data:
            df = self.read(shard, columns)
            frames.append(df.assign(shard=shard) if with_shard else df)
        if not frames:
            return pd.DataFrame(columns=(columns or self.columns or []) + (["shard"] if with_shard else []))
        return pd.concat(frames, ignore_index=True)

    def rows(self, image_ids, columns: list[str] | None = None) -> pd.DataFrame:
        """The rows of ``image_ids``, reading only the shards they live in and keeping only
        those rows of each shard as it is read (memory follows the ids, not the dataset)."""
        import pandas as pd
        import pyarrow as pa
        import pyarrow.compute as pc

        from danbooru_assets.core.shards import shard_key

        columns = columns or self.columns
        wanted = pd.Series(pd.unique(pd.Series(image_ids, dtype="int64")))
        frames = []
        for shard, ids in wanted.groupby(wanted.map(shard_key)):
            if shard in self.keys_with_data:
                table = read_arrow(self.path(shard), columns)
                keep = pc.is_in(table["image_id"], value_set=pa.array(ids.to_numpy()))
                frames.append(table.filter(keep).to_pandas())
        if not frames:
            return pd.DataFrame(columns=columns or ["image_id"])
        return pd.concat(frames, ignore_index=True)


@dataclass(frozen=True)
class TableLayout:
    """The one definition of where a table lives under a storage base (a folder or an
    fsspec URL): ``<base>/<asset>/<shard>.parquet`` per shard, ``<base>/<asset>.parquet``
    for a global asset, ``<base>/<name>/…`` for side tables. The Parquet IO manager,
    ``StorageResource``, the CLI, the labeling page and the exports all ask it.

    It is also the :class:`~danbooru_assets.core.stage.TableStore` of the per-shard
    stages: their previous output (a damaged one set aside) and their partial writes."""

    base: str

    def root(self) -> UPath:
        return UPath(self.base)

    def path(self, *parts: str) -> UPath:
        """A side table or folder under the base (an asset's own files, not its table)."""
        return self.root().joinpath(*parts)

    def folder(self, asset: str) -> UPath:
        """The folder of a per-shard asset's tables."""
        return self.path(asset)

    def table_path(self, asset: str, shard: str | None = None) -> UPath:
        """A per-shard asset's table of ``shard``, or a global asset's table."""
        if shard is None:
            return self.path(asset + PARQUET_SUFFIX)
        return self.path(asset, shard + PARQUET_SUFFIX)

    def shard_tables(self, asset: str, keys: list[str], columns: list[str] | None = None) -> ShardTables:
        return ShardTables(asset, self.folder(asset), keys, columns)

    def previous(self, table: str, shard: str) -> tuple[pd.DataFrame | None, SetAside | None]:
        return read_or_set_aside(self.table_path(table, shard))

    def write(self, table: str, shard: str, frame: pd.DataFrame) -> None:
        write_parquet(self.table_path(table, shard), frame)
