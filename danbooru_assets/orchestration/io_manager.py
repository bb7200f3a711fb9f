"""Parquet storage for asset tables, on Dagster's ``UPathIOManager``, read and written
by shard ranges.

One file per asset per partition (``<base>/<asset>/<partition>.parquet``; unpartitioned:
``<base>/<asset>.parquet``); the base can be a local folder or any fsspec URL
(``s3://…``, ``gs://…``, ``memory://…``). Writes are atomic: the table goes to a
temporary sibling that is renamed into place, so a crash never leaves a half-written
Parquet file where a reader would find it. Temporary files a killed write left behind
are removed by the next write of the same asset, once stale (``storage.remove_stale_temps``;
local folders).

Ranges: a step covering several shards returns ``{shard: DataFrame}`` (one entry per
shard of its range) and receives every partitioned input as :class:`ShardTables`, a
lazy mapping that reads a shard only when asked, with the columns the input declares
(``dg.AssetIn(metadata={"columns": [...]})``). A global asset gets the same mapping over
every materialized shard, and ``rows(image_ids)`` reads only the shards those ids live in.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import dagster as dg
from upath import UPath

from danbooru_assets.core.tables import atomic_path, dataframe_to_table, remove_stale_temps, temp_sibling

if TYPE_CHECKING:  # loaded where used: loading the code location imports neither
    import pandas as pd
    import pyarrow as pa

PARQUET_SUFFIX = ".parquet"
# Input metadata key: the columns a consumer reads (Parquet column projection).
COLUMNS = "columns"


def _is_local(path: UPath) -> bool:
    return getattr(path, "protocol", "") in ("", "file", "local")


def write_parquet(path: UPath, df: pd.DataFrame) -> None:
    """Write ``df`` to ``path`` atomically (temp sibling, then rename)."""
    write_arrow(path, dataframe_to_table(df))


def read_arrow(path: UPath, columns: list[str] | None = None) -> pa.Table:
    import pyarrow.parquet as pq

    # ParquetFile skips the dataset layer of read_table: ~4x less fixed cost per file,
    # which matters for 1,000 small shard files.
    path = UPath(path)
    if _is_local(path):
        return pq.ParquetFile(str(path.path)).read(columns=columns)
    with path.open("rb") as f:
        return pq.ParquetFile(f).read(columns=columns)


def read_parquet(path: UPath, columns: list[str] | None = None) -> pd.DataFrame:
    return read_arrow(path, columns).to_pandas()


def _atomic_write(path: UPath, write_local, data_for_remote) -> None:
    path = UPath(path)
    if _is_local(path):
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


def write_arrow(path: UPath, table: pa.Table) -> None:
    """Write an Arrow table to ``path`` atomically (temp sibling, then rename)."""
    import pyarrow.parquet as pq

    def encoded() -> bytes:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        return buf.getvalue()

    _atomic_write(path, lambda local: pq.write_table(table, local), encoded)


def remove_stale_temp_files(folder: UPath, target_suffix: str = PARQUET_SUFFIX, target_name: str | None = None) -> list[str]:
    """Remove what killed writes left in ``folder`` (see ``storage.remove_stale_temps``);
    local folders only: an object store's move is one request, and its temporary objects
    carry no reliable modification time across stores."""
    folder = UPath(folder)
    if not _is_local(folder):
        return []
    return [str(p) for p in remove_stale_temps(folder.path, target_suffix, target_name)]


def write_bytes(path: UPath, data: bytes) -> None:
    """Write ``data`` to ``path`` (local or fsspec URL) atomically."""

    def write_local(local: str) -> None:
        with open(local, "wb") as f:
            f.write(data)

    _atomic_write(path, write_local, lambda: data)


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
            except Exception as exc:  # a corrupt or truncated table: say which file
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

        from danbooru_assets.orchestration.partitions import shard_key

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


class ParquetIOManager(dg.UPathIOManager):
    """Stores pandas DataFrames as Parquet, one file per partition; a partitioned step
    stores ``{shard: DataFrame}`` and loads partitioned inputs as :class:`ShardTables`."""

    extension: str = PARQUET_SUFFIX

    def __init__(self, base_path: UPath):
        super().__init__(base_path=base_path)
        self.root = UPath(base_path)

    def dump_to_path(self, context: dg.OutputContext, obj: pd.DataFrame, path: UPath) -> None:
        import pandas as pd

        if not isinstance(obj, pd.DataFrame):
            raise TypeError(
                f"{context.asset_key.to_user_string()}: the Parquet IO manager stores pandas "
                f"DataFrames, got {type(obj).__name__}"
            )
        if not context.has_asset_partitions:  # a partitioned output cleans its folder once, in handle_output
            _log_removed(context, remove_stale_temp_files(path.parent, target_name=path.name))
        write_parquet(path, obj)

    def load_from_path(self, context: dg.InputContext, path: UPath) -> pd.DataFrame:
        return read_parquet(path, _declared_columns(context))

    def _asset_folder(self, asset_key: dg.AssetKey) -> UPath:
        return self.root.joinpath(*asset_key.path)

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if not context.has_asset_partitions:
            return super().handle_output(context, obj)
        import pandas as pd

        keys = list(context.asset_partition_keys)
        name = context.asset_key.to_user_string()
        if isinstance(obj, pd.DataFrame) and len(keys) == 1:
            obj = {keys[0]: obj}
        if not isinstance(obj, Mapping) or set(obj) != set(keys):
            got = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
            raise TypeError(f"{name}: a step over shards {keys[0]}..{keys[-1]} must return one table per shard, got {got}")
        folder = self._asset_folder(context.asset_key)
        _log_removed(context, remove_stale_temp_files(folder))
        for key in keys:
            self.dump_to_path(context, obj[key], folder / f"{key}{self.extension}")
        context.add_output_metadata(
            {
                "dagster/row_count": int(sum(len(df) for df in obj.values())),
                "shards": len(keys),
                "path": dg.MetadataValue.path(str(folder if len(keys) > 1 else folder / f"{keys[0]}{self.extension}")),
            }
        )

    def load_input(self, context: dg.InputContext) -> Any:
        if not context.has_asset_key or not context.has_asset_partitions:
            return super().load_input(context)
        tables = ShardTables(
            context.asset_key.to_user_string(),
            self._asset_folder(context.asset_key),
            list(context.asset_partition_keys),
            _declared_columns(context),
        )
        if tables.missing:
            context.log.info(
                f"{tables.asset}: {len(tables)} of {len(tables) + len(tables.missing)} requested shards have a "
                f"table; the {len(tables.missing)} never materialized read as empty"
            )
        return tables

    def get_metadata(self, context: dg.OutputContext, obj: Any) -> dict[str, Any]:
        return {"dagster/row_count": len(obj)} if hasattr(obj, "columns") else {}


def _log_removed(context: dg.OutputContext, removed: list[str]) -> None:
    if removed:
        context.log.warning(
            f"removed {len(removed)} stale temporary file(s) left by a killed write: " + ", ".join(removed[:5])
        )


def _declared_columns(context: dg.InputContext) -> list[str] | None:
    columns = (context.definition_metadata or {}).get(COLUMNS)
    return list(columns) if columns else None


class StorageResource(dg.ConfigurableResource):
    """The base of the project's table storage: a local folder or an fsspec URL.

    Shared by the Parquet IO manager and by assets that keep side tables of their own
    (the per-shard metadata slices, their own previous output for incremental reuse),
    so both always point at the same place."""

    base_path: str

    def path(self, *parts: str) -> UPath:
        return UPath(self.base_path).joinpath(*parts)

    def asset_path(self, asset_name: str, partition: str | None = None) -> UPath:
        """Where the IO manager keeps an asset's table (for the CLI, the labeling page, benchmarks)."""
        if partition is None:
            return self.path(asset_name + PARQUET_SUFFIX)
        return self.path(asset_name, partition + PARQUET_SUFFIX)

    def shard_tables(self, asset_name: str, columns: list[str] | None = None) -> ShardTables:
        """Every stored shard of a per-shard asset, for readers outside a run (CLI, exports)."""
        from danbooru_assets.orchestration.partitions import SHARD_KEYS

        return ShardTables(asset_name, self.path(asset_name), SHARD_KEYS, columns)


class ParquetIOManagerFactory(dg.ConfigurableIOManagerFactory):
    """Parquet tables under ``storage.base_path``."""

    storage: StorageResource

    def create_io_manager(self, context) -> ParquetIOManager:
        return ParquetIOManager(base_path=UPath(self.storage.base_path))


def prune_shard_files(folder: UPath, keep: set[str]) -> None:
    """Remove ``<shard>.parquet`` files of a split-by-shard side table (metadata,
    published keypoints) whose shard no longer has rows after a re-conversion, and
    stale temporary files a killed conversion left there."""
    folder = UPath(folder)
    remove_stale_temp_files(folder)
    if folder.exists():
        for old in folder.iterdir():
            if old.name.endswith(PARQUET_SUFFIX) and old.name[: -len(PARQUET_SUFFIX)] not in keep:
                old.unlink()
