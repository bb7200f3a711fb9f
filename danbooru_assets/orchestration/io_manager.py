"""Parquet storage for asset tables, on Dagster's ``UPathIOManager``, read and written
by shard ranges.

One file per asset per partition (``<base>/<asset>/<partition>.parquet``; unpartitioned:
``<base>/<asset>.parquet``); the base can be a local folder or any fsspec URL
(``s3://…``, ``gs://…``, ``memory://…``). Writes are atomic: the table goes to a
temporary sibling that is renamed into place, so a crash never leaves a half-written
Parquet file where a reader would find it (the writer is ``core.tables.write_parquet``).
Temporary files a killed write left behind are removed by the next write of the same
asset, once stale (``core.tables.remove_stale_temp_files``; local folders).

Ranges: a step covering several shards returns ``{shard: DataFrame}`` (one entry per
shard of its range) and receives every partitioned input as :class:`ShardTables`, a
lazy mapping that reads a shard only when asked, with the columns the input declares
(``dg.AssetIn(metadata={"columns": [...]})``). A global asset gets the same mapping over
every materialized shard, and ``rows(image_ids)`` reads only the shards those ids live in.
Outside a run, ``defs.load_asset_value(asset, partition_key="0042")`` returns that shard's
DataFrame, and a partition range the same lazy mapping.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import dagster as dg
from upath import UPath

from danbooru_assets.core.tables import (
    PARQUET_SUFFIX,
    TableLayout,
    read_parquet,
    remove_stale_temp_files,
    write_parquet,
)
from danbooru_assets.orchestration.resources import StorageResource

if TYPE_CHECKING:  # loaded where used: loading the code location imports it not
    import pandas as pd

# Input metadata key: the columns a consumer reads (Parquet column projection).
COLUMNS = "columns"


class ParquetIOManager(dg.UPathIOManager):
    """Stores pandas DataFrames as Parquet, one file per partition; a partitioned step
    stores ``{shard: DataFrame}`` and loads partitioned inputs as :class:`ShardTables`."""

    extension: str = PARQUET_SUFFIX

    def __init__(self, base_path: UPath):
        super().__init__(base_path=base_path)
        self.layout = TableLayout(str(base_path))

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

    def _asset_name(self, asset_key: dg.AssetKey) -> str:
        return "/".join(asset_key.path)

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
        asset = self._asset_name(context.asset_key)
        folder = self.layout.folder(asset)
        _log_removed(context, remove_stale_temp_files(folder))
        for key in keys:
            self.dump_to_path(context, obj[key], self.layout.table_path(asset, key))
        # A range's total is named as one; each shard's own row count is its partition's
        # metadata (ShardLoop.metadata), which a one-shard run gets from here too.
        rows = int(sum(len(df) for df in obj.values()))
        context.add_output_metadata(
            {
                ("range_row_count" if len(keys) > 1 else "dagster/row_count"): rows,
                "shards": len(keys),
                "path": dg.MetadataValue.path(str(folder if len(keys) > 1 else self.layout.table_path(asset, keys[0]))),
            }
        )

    def load_input(self, context: dg.InputContext) -> Any:
        if not context.has_asset_key or not context.has_asset_partitions:
            return super().load_input(context)
        tables = self.layout.shard_tables(
            self._asset_name(context.asset_key), list(context.asset_partition_keys), _declared_columns(context)
        )
        if not context.has_input_name and len(tables) + len(tables.missing) == 1:
            # Loaded from outside a run (``defs.load_asset_value(..., partition_key=...)``):
            # one partition is its DataFrame, as UPathIOManager gives it; several stay a mapping.
            key = list(context.asset_partition_keys)[0]
            if tables.missing:
                raise KeyError(f"{tables.asset}: shard {key} has no stored table (materialize {tables.asset} for it first)")
            return tables[key]
        if tables.missing and context.has_input_name:
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


class ParquetIOManagerFactory(dg.ConfigurableIOManagerFactory):
    """Parquet tables under ``storage.base_path``."""

    storage: StorageResource

    def create_io_manager(self, context) -> ParquetIOManager:
        return ParquetIOManager(base_path=UPath(self.storage.base_path))
