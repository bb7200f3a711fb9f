from pathlib import Path

import dagster as dg
import pandas as pd
import pyarrow.parquet as pq
import pytest
from upath import UPath

from danbooru_assets.io_manager import ParquetIOManagerFactory, StorageResource, concat_partitions, read_parquet, write_parquet

parts = dg.StaticPartitionsDefinition(["0001", "0002", "0003"])


@dg.asset(partitions_def=parts)
def per_shard(context: dg.AssetExecutionContext) -> pd.DataFrame:
    k = int(context.partition_key)
    return pd.DataFrame({"image_id": [k * 1000 + k, k * 2000 + k], "shard": context.partition_key})


@dg.asset
def all_shards(per_shard: dict[str, pd.DataFrame]) -> pd.DataFrame:
    return concat_partitions(per_shard)


def _resources(base: str) -> dict:
    storage = StorageResource(base_path=base)
    return {"io_manager": ParquetIOManagerFactory(storage=storage)}


@pytest.mark.parametrize("base", ["local", "memory://danbooru-test"])
def test_partitions_round_trip_and_unpartitioned_loads_existing_partitions(base, tmp_path: Path):
    base = str(tmp_path / "store") if base == "local" else base
    resources = _resources(base)
    for key in ["0001", "0003"]:  # 0002 never materialized
        assert dg.materialize([per_shard], partition_key=key, resources=resources).success
    result = dg.materialize([per_shard, all_shards], selection=[all_shards], resources=resources)
    assert result.success
    combined = read_parquet(UPath(base) / "all_shards.parquet")
    assert sorted(combined["shard"].unique()) == ["0001", "0003"]
    assert len(combined) == 4
    one = read_parquet(UPath(base) / "per_shard" / "0003.parquet")
    assert one["image_id"].tolist() == [3003, 6003]


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
def test_read_rows_reads_only_the_wanted_rows_of_their_shards(base, tmp_path: Path):
    from danbooru_assets.io_manager import read_rows

    storage = StorageResource(base_path=str(tmp_path / "s") if base == "local" else base)
    for shard in ("0001", "0002"):
        k = int(shard)
        write_parquet(
            storage.asset_path("t", shard),
            pd.DataFrame({"image_id": [1000 + k, 2000 + k, 3000 + k], "v": [k, k * 10, k * 100]}),
        )
    rows = read_rows(storage, "t", [2001, 3002, 3002, 9009], ["image_id", "v"])  # 9009: no such shard file
    assert sorted(zip(rows["image_id"], rows["v"])) == [(2001, 10), (3002, 200)]
    assert read_rows(storage, "t", []).empty
