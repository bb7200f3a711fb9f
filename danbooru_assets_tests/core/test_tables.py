"""Atomic writes and the removal of what a killed write left behind."""

import os
import time
from pathlib import Path

import pytest

from danbooru_assets.core.tables import (
    STALE_TEMP_AGE_S,
    atomic_write_bytes,
    remove_stale_temps,
    temp_sibling,
    temp_target,
)


def _age(path: Path, seconds: float) -> Path:
    past = time.time() - seconds
    os.utime(path, (past, past))
    return path


def test_temp_names_say_their_target():
    tmp = temp_sibling(Path("/x/0001.parquet"))
    assert tmp.parent == Path("/x") and temp_target(tmp.name) == "0001.parquet"
    assert temp_target("0001.parquet") is None
    assert temp_target(".0001.parquet.tmp-nothex!") is None


def test_stale_temps_go_young_ones_and_other_files_stay(tmp_path: Path):
    stale = temp_sibling(tmp_path / "0001.parquet")
    stale.write_bytes(b"PAR1 half")
    _age(stale, STALE_TEMP_AGE_S + 60)
    young = temp_sibling(tmp_path / "0002.parquet")
    young.write_bytes(b"PAR1 being written")  # a live writer's: must stay
    other_kind = temp_sibling(tmp_path / "notes.json")
    other_kind.write_bytes(b"{")
    _age(other_kind, STALE_TEMP_AGE_S + 60)
    table = tmp_path / "0003.parquet"
    table.write_bytes(b"PAR1 whole")
    _age(table, STALE_TEMP_AGE_S + 60)

    removed = remove_stale_temps(tmp_path, target_suffix=".parquet")
    assert removed == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([young.name, other_kind.name, table.name])
    # target_name narrows to one file's temporaries (a folder shared by several tables)
    assert remove_stale_temps(tmp_path, target_name="other.json") == []
    assert remove_stale_temps(tmp_path, target_name="notes.json") == [other_kind]
    assert remove_stale_temps(tmp_path / "missing") == []


def test_failed_write_leaves_old_file_and_no_temp(tmp_path: Path, monkeypatch):
    target = tmp_path / "a.bin"
    atomic_write_bytes(target, b"old")

    def boom(self, data):  # half the bytes reach the disk, then the write fails
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new content")
    monkeypatch.undo()
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]


@pytest.mark.parametrize("base", ["local", "memory://danbooru-tables"])
def test_one_parquet_writer_for_folders_and_urls_and_pruning_of_gone_shards(base, tmp_path: Path):
    import pandas as pd
    from upath import UPath

    from danbooru_assets.core.tables import PARQUET_SUFFIX, ShardTables, prune_shard_files, read_parquet, write_parquet

    folder = UPath(tmp_path / "side" if base == "local" else f"{base}/{tmp_path.name}/side")
    for shard, ids in {"0001": [1001, 2001], "0002": [2], "0003": [3]}.items():
        write_parquet(folder / f"{shard}{PARQUET_SUFFIX}", pd.DataFrame({"image_id": ids, "v": [0.5] * len(ids)}))
    assert list(read_parquet(folder / "0001.parquet", ["image_id"])["image_id"]) == [1001, 2001]
    assert not [p.name for p in folder.iterdir() if temp_target(p.name)]  # no temporary sibling left
    prune_shard_files(folder, keep={"0001", "0003"})
    tables = ShardTables("side", folder, ["0001", "0002", "0003"], ["image_id"])
    assert list(tables) == ["0001", "0003"] and tables.missing == ["0002"]
    assert list(tables["0002"].columns) == ["image_id"] and len(tables["0002"]) == 0  # a gone shard reads empty
    assert sorted(tables.rows([2001, 3, 2])["image_id"]) == [3, 2001]


@pytest.mark.parametrize("damage", ["truncate", "empty", "text"])
def test_a_damaged_table_is_named_and_set_aside_never_deleted(tmp_path: Path, damage: str):
    import pandas as pd

    from danbooru_assets.core.tables import DamagedTableError, read_or_set_aside, read_parquet, write_parquet

    path = tmp_path / "clip_embeddings" / "0065.parquet"
    assert read_or_set_aside(path) == (None, None)  # none stored: nothing to reuse
    write_parquet(path, pd.DataFrame({"image_id": range(100)}))
    table, damaged = read_or_set_aside(path)
    assert damaged is None and len(table) == 100
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "empty": b"", "text": b"not parquet"}[damage])
    with pytest.raises(DamagedTableError, match=f"{path}: damaged, not a readable Parquet table"):
        read_parquet(path)
    table, damaged = read_or_set_aside(path)
    assert table is None and damaged.path == str(path) and not path.exists()
    assert Path(damaged.moved_to).parent == path.parent and Path(damaged.moved_to).name.startswith("0065.parquet.damaged-")
    assert str(path) in str(damaged) and "moved aside" in str(damaged)
    from danbooru_assets.core.tables import ShardTables

    assert list(ShardTables("clip_embeddings", path.parent, ["0065"])) == []  # the set-aside file is never read


def test_a_damaged_table_at_a_url_is_set_aside_too():
    import pandas as pd
    from upath import UPath

    from danbooru_assets.core.tables import read_or_set_aside, write_parquet

    path = UPath("memory://damaged-test/pose_keypoints/0067.parquet")
    write_parquet(path, pd.DataFrame({"image_id": [1]}))
    with path.open("wb") as f:
        f.write(b"")
    table, damaged = read_or_set_aside(path)
    assert table is None and not path.exists() and UPath(damaged.moved_to).exists()
