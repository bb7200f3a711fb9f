from pathlib import Path

import pandas as pd

from danbooru_assets.metadata import (
    METADATA_COLUMNS,
    ParseReport,
    convert_metadata_to_shards,
    iter_metadata_records,
    normalise_record,
)
from danbooru_assets_tests.conftest import API_RECORDS, DUMP_RECORDS


def test_api_form_is_normalised():
    row = normalise_record(API_RECORDS[0])
    assert row["image_id"] == 1001
    assert row["rating"] == "g"
    assert row["tags_general"] == "1girl solo"
    assert row["tags_character"] == "hatsune_miku"
    assert row["tags_copyright"] == "vocaloid"
    assert row["meta_width"] == 400 and row["meta_height"] == 300
    assert row["metadata_format"] == "api"


def test_dump_form_tags_are_split_by_category_and_numbers_parsed():
    row = normalise_record(DUMP_RECORDS[0])
    assert row["image_id"] == 4002 and row["score"] == 7 and row["meta_width"] == 64
    assert row["tags_general"] == "1girl"
    assert row["tags_artist"] == "artist_x"
    assert row["tags_copyright"] == "touhou"
    assert row["tags_character"] == "hakurei_reimu"
    assert row["rating"] == "s"
    assert row["metadata_format"] == "dump"


def test_unknown_rating_becomes_missing():
    assert normalise_record({"id": 5, "rating": "x"})["rating"] is None
    assert normalise_record({"id": 5, "rating": "explicit"})["rating"] == "e"


def test_bad_line_is_reported_with_file_and_line(mini_dataset: Path):
    report = ParseReport()
    rows = list(iter_metadata_records(mini_dataset / "metadata" / "posts000000000000.json", report))
    assert [r["image_id"] for r in rows] == [1001, 1002, 3002, 9001]
    assert len(report.problems) == 1
    assert str(report.problems[0]).startswith("posts000000000000.json:3: not JSON")


def test_conversion_splits_by_shard_and_removes_stale_shards(mini_dataset: Path, tmp_path: Path):
    out = tmp_path / "meta_shards"
    out.mkdir()
    (out / "0999.parquet").write_bytes(b"stale")
    files = sorted((mini_dataset / "metadata").iterdir())
    summary, report = convert_metadata_to_shards(files, out, chunk_rows=2)  # several chunks
    assert dict(zip(summary["shard"], summary["rows"])) == {"0001": 2, "0002": 4}
    assert sorted(p.name for p in out.iterdir()) == ["0001.parquet", "0002.parquet"]
    shard2 = pd.read_parquet(out / "0002.parquet")
    assert list(shard2.columns) == METADATA_COLUMNS
    assert shard2["image_id"].tolist() == [1002, 3002, 4002, 6002]
    assert report.records == 6 and len(report.problems) == 1
