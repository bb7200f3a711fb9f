from pathlib import Path

import dagster as dg
import pandas as pd
import pyarrow.parquet as pq
import pytest
from upath import UPath

from danbooru_assets.core.tables import ShardTables, read_parquet, write_parquet
from danbooru_assets.orchestration.io_manager import COLUMNS, ParquetIOManagerFactory
from danbooru_assets.orchestration.partitions import CHEAP_BACKFILL, range_tags
from danbooru_assets.orchestration.resources import StorageResource

parts = dg.StaticPartitionsDefinition(["0001", "0002", "0003"])


@dg.asset(partitions_def=parts, backfill_policy=CHEAP_BACKFILL)
def per_shard(context: dg.AssetExecutionContext):
    return {
        key: pd.DataFrame({"image_id": [int(key) * 1000 + int(key), int(key) * 2000 + int(key)], "shard": key})
        for key in context.partition_keys
    }


@dg.asset(partitions_def=parts, backfill_policy=CHEAP_BACKFILL, ins={"per_shard": dg.AssetIn(metadata={COLUMNS: ["image_id"]})})
def per_shard_copy(context: dg.AssetExecutionContext, per_shard: ShardTables):
    assert isinstance(per_shard, ShardTables) and list(per_shard) == sorted(context.partition_keys)
    return {key: per_shard[key].assign(n_columns=len(per_shard[key].columns)) for key in context.partition_keys}


@dg.asset
def all_shards(per_shard: ShardTables) -> pd.DataFrame:
    return per_shard.concat(with_shard=False)


def _resources(base: str) -> dict:
    storage = StorageResource(base_path=base)
    return {"io_manager": ParquetIOManagerFactory(storage=storage)}


@pytest.mark.parametrize("base", ["local", "memory://danbooru-test"])
def test_range_store_load_with_projection_and_unpartitioned_reads_existing_shards(base, tmp_path: Path):
    base = str(tmp_path / "store") if base == "local" else base
    resources = _resources(base)
    # One run stores a range: one file per shard; 0002 is never materialized.
    assert dg.materialize([per_shard], partition_key="0001", resources=resources).success
    assert dg.materialize([per_shard], partition_key="0003", resources=resources).success
    result = dg.materialize([per_shard, all_shards], selection=[all_shards], resources=resources)
    assert result.success
    combined = read_parquet(UPath(base) / "all_shards.parquet")
    assert sorted(combined["shard"].unique()) == ["0001", "0003"]
    assert len(combined) == 4
    # A range run over all three shards, and a consumer over the same range in the same run.
    result = dg.materialize([per_shard, per_shard_copy], tags=range_tags("0001", "0003"), resources=resources)
    assert result.success
    materialized = [e.partition for e in result.get_asset_materialization_events() if e.asset_key.path == ["per_shard"]]
    assert sorted(materialized) == ["0001", "0002", "0003"]
    copy = read_parquet(UPath(base) / "per_shard_copy" / "0002.parquet")
    assert copy["image_id"].tolist() == [2002, 4002] and copy["n_columns"].tolist() == [1, 1]  # projected


def test_a_range_step_must_return_one_table_per_shard(tmp_path: Path):
    @dg.asset(partitions_def=parts, backfill_policy=CHEAP_BACKFILL)
    def short(context: dg.AssetExecutionContext):
        return {"0001": pd.DataFrame({"a": [1]})}

    with pytest.raises(Exception, match="one table per shard"):
        dg.materialize([short], tags=range_tags("0001", "0002"), resources=_resources(str(tmp_path)))


def test_write_is_atomic_old_file_survives_a_failed_write(tmp_path: Path, monkeypatch):
    target = UPath(tmp_path / "t" / "0001.parquet")
    write_parquet(target, pd.DataFrame({"a": [1, 2, 3]}))

    def broken_write(table, where, *args, **kwargs):
        Path(where).write_bytes(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", broken_write)
    with pytest.raises(OSError, match="disk full"):
        write_parquet(target, pd.DataFrame({"a": [9]}))
    monkeypatch.undo()
    assert read_parquet(target)["a"].tolist() == [1, 2, 3]
    assert sorted(p.name for p in Path(tmp_path / "t").iterdir()) == ["0001.parquet"]  # no temp left


def test_non_dataframe_output_is_a_clear_error(tmp_path: Path):
    @dg.asset
    def not_a_frame() -> dict:
        return {"a": 1}

    with pytest.raises(Exception, match="stores pandas DataFrames"):
        dg.materialize([not_a_frame], resources=_resources(str(tmp_path)))


@pytest.mark.parametrize("base", ["local", "memory://danbooru-rows"])
def test_rows_reads_only_the_wanted_rows_of_their_shards(base, tmp_path: Path):
    storage = StorageResource(base_path=str(tmp_path / "s") if base == "local" else base)
    for shard in ("0001", "0002"):
        k = int(shard)
        write_parquet(
            storage.asset_path("t", shard),
            pd.DataFrame({"image_id": [1000 + k, 2000 + k, 3000 + k], "v": [k, k * 10, k * 100]}),
        )
    tables = storage.shard_tables("t", ["image_id", "v"])
    assert list(tables) == ["0001", "0002"] and len(tables.missing) == 998
    rows = tables.rows([2001, 3002, 3002, 9009])  # 9009: no such shard file
    assert sorted(zip(rows["image_id"], rows["v"])) == [(2001, 10), (3002, 200)]
    assert tables.rows([]).empty
    empty = tables["0009"]  # never materialized: an empty shard with the asset's columns
    assert empty.empty and list(empty.columns) == ["image_id", "v"]
    with pytest.raises(KeyError, match="no stored table"):
        StorageResource(base_path=str(tmp_path / "nothing")).shard_tables("t")["0001"]


def test_next_materialization_removes_temp_files_a_killed_write_left(tmp_path: Path):
    import os
    import time

    from danbooru_assets.core.tables import STALE_TEMP_AGE_S, temp_sibling

    base = tmp_path / "store"
    resources = _resources(str(base))
    assert dg.materialize([per_shard, all_shards], partition_key="0001", selection=[per_shard], resources=resources).success
    assert dg.materialize([per_shard, all_shards], selection=[all_shards], resources=resources).success
    # What kill -9 in the middle of a write leaves: a half-written temporary sibling.
    stale_shard = temp_sibling(base / "per_shard" / "0002.parquet")
    stale_global = temp_sibling(base / "all_shards.parquet")
    live = temp_sibling(base / "per_shard" / "0003.parquet")  # a writer still at work
    long_ago = time.time() - STALE_TEMP_AGE_S - 60
    for path in (stale_shard, stale_global, live):
        path.write_bytes(b"PAR1 half a table")
    for path in (stale_shard, stale_global):
        os.utime(path, (long_ago, long_ago))
    # Readers never take a temporary file for a table.
    tables = StorageResource(base_path=str(base)).shard_tables("per_shard")
    assert list(tables) == ["0001"]

    assert dg.materialize([per_shard], partition_key="0001", resources=resources).success
    assert not stale_shard.exists() and live.exists()
    assert stale_global.exists()  # another asset's file: its own next write removes it
    assert dg.materialize([per_shard, all_shards], selection=[all_shards], resources=resources).success
    assert not stale_global.exists()
    assert read_parquet(UPath(base) / "all_shards.parquet")["image_id"].tolist() == [1001, 2001]


def test_load_asset_value_of_one_partition_is_its_dataframe(tmp_path: Path):
    """Issue 17: as UPathIOManager does, one partition loads as that shard's DataFrame,
    several as a mapping; a shard never materialized is a KeyError naming it."""
    resources = _resources(str(tmp_path / "store"))
    defs = dg.Definitions(assets=[per_shard], resources=resources)
    assert dg.materialize([per_shard], tags=range_tags("0001", "0002"), resources=resources).success
    one = defs.load_asset_value("per_shard", partition_key="0002")
    assert isinstance(one, pd.DataFrame) and one["image_id"].tolist() == [2002, 4002]
    with defs.get_asset_value_loader() as loader:
        several = loader.load_asset_value("per_shard", partition_key_range=dg.PartitionKeyRange("0001", "0002"))
    assert sorted(several) == ["0001", "0002"] and several["0001"]["image_id"].tolist() == [1001, 2001]
    with pytest.raises(KeyError, match="shard 0003 has no stored table"):
        defs.load_asset_value("per_shard", partition_key="0003")
