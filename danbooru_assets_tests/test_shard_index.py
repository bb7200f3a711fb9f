from pathlib import Path

from danbooru_assets.assets.index import SHARD_INDEX_CHECKS, check_ids_in_bucket
from danbooru_assets.dataset import DanbooruDatasetResource
from danbooru_assets.metadata import convert_metadata_to_shards
from danbooru_assets.shard_index import INDEX_COLUMNS, build_shard_index
import pandas as pd


def _index(root: Path, shard: str, tmp_path: Path):
    out = tmp_path / "meta"
    convert_metadata_to_shards(sorted((root / "metadata").iterdir()), out)
    path = out / f"{shard}.parquet"
    meta = pd.read_parquet(path) if path.exists() else None
    return build_shard_index(DanbooruDatasetResource(root=str(root)), shard, meta)


def test_statuses_sizes_and_counts(mini_dataset: Path, tmp_path: Path):
    index, report = _index(mini_dataset, "0002", tmp_path)
    assert list(index.columns) == INDEX_COLUMNS
    by_id = index.set_index("image_id")
    assert by_id.loc[1002, "status"] == "ok"
    # metadata says png, the file is jpg: the header is read instead of trusting it
    assert (by_id.loc[1002, "width"], by_id.loc[1002, "height"]) == (40, 30)
    assert by_id.loc[1002, "size_source"] == "header"
    assert by_id.loc[3002, "status"] == "zero_bytes"
    assert by_id.loc[4002, "status"] == "unknown_extension"
    assert by_id.loc[4002, "tags_character"] == "hakurei_reimu"  # dump-form metadata joined
    assert by_id.loc[5002, "status"] == "unreadable_header"
    # a truncated JPEG still has a readable header: indexing never decodes pixels
    assert by_id.loc[6002, "status"] == "ok" and by_id.loc[6002, "width"] == 160
    assert report.metadata_without_file == 0
    assert report.header_reads == 3  # 1002, 5002, 6002 (6002's metadata has no size)


def test_metadata_sizes_are_used_without_opening_and_orphans_counted(mini_dataset: Path, tmp_path: Path):
    index, report = _index(mini_dataset, "0001", tmp_path)
    by_id = index.set_index("image_id")
    assert (by_id.loc[1001, "width"], by_id.loc[1001, "height"]) == (400, 300)
    assert by_id.loc[1001, "size_source"] == "metadata"
    assert by_id.loc[2001, "status"] == "no_metadata" and by_id.loc[2001, "width"] == 24
    assert report.metadata_without_file == 1  # 9001: counted, not invented
    assert 9001 not in by_id.index
    assert report.bad_names == ["original/0001/notes.txt"]


def test_empty_or_missing_shard_gives_empty_index(mini_dataset: Path, tmp_path: Path):
    index, report = _index(mini_dataset, "0500", tmp_path)
    assert index.empty and list(index.columns) == INDEX_COLUMNS
    assert all(check(index).passed for check in SHARD_INDEX_CHECKS)


def test_checks_pass_on_a_good_index_and_catch_misplaced_ids(mini_dataset: Path, tmp_path: Path):
    index, _ = _index(mini_dataset, "0002", tmp_path)
    assert all(check(index).passed for check in SHARD_INDEX_CHECKS)
    bad = index.copy()
    bad.loc[0, "image_id"] = 1003
    assert not check_ids_in_bucket(bad).passed
    dup = pd.concat([index, index.head(1)], ignore_index=True)
    assert not SHARD_INDEX_CHECKS[1](dup).passed
