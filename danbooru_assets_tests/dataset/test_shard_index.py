import json
import os
from pathlib import Path

import pandas as pd
import pytest

from danbooru_assets.orchestration.assets.index import SHARD_INDEX_CHECKS, check_ids_in_bucket, check_schema
from danbooru_assets.dataset.layout import DatasetLayout
from danbooru_assets.dataset.metadata import convert_metadata_to_shards
from danbooru_assets.dataset.shard_index import INDEX_COLUMNS, STATUSES, USABLE_STATUSES, build_shard_index
from danbooru_assets_tests.conftest import jpeg_bytes
from danbooru_assets_tests.clip.test_loader import png_header_only, save_oriented_jpeg


def _index(root: Path, shard: str, tmp_path: Path):
    out = tmp_path / "meta"
    convert_metadata_to_shards(sorted((root / "metadata").iterdir()), out)
    path = out / f"{shard}.parquet"
    meta = pd.read_parquet(path) if path.exists() else None
    return build_shard_index(DatasetLayout(root), shard, meta)


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


# ---------------------------------------------------------------- reliability: size, orientation, placement, links

def _tree(root: Path, shard: str, records: list[dict] | None = None) -> Path:
    folder = root / "original" / shard
    folder.mkdir(parents=True)
    (root / "metadata").mkdir()
    if records:
        (root / "metadata" / "posts.json").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return folder


def _index_tree(root: Path, shard: str, tmp_path: Path, **resource):
    metadata = None
    if any((root / "metadata").iterdir()):
        out = tmp_path / "meta"
        convert_metadata_to_shards(sorted((root / "metadata").iterdir()), out)
        if (out / f"{shard}.parquet").exists():
            metadata = pd.read_parquet(out / f"{shard}.parquet")
    return build_shard_index(DatasetLayout(root, **resource), shard, metadata)


def test_too_large_images_get_a_status_and_the_rest_is_indexed(tmp_path: Path):
    root = tmp_path / "root"
    folder = _tree(root, "0042", [
        {"id": 3042, "image_width": 10000, "image_height": 10000, "file_ext": "png"},  # metadata says too large
        {"id": 4042, "image_width": 16000, "image_height": 10000, "file_ext": "jpg"},  # a JPEG: fits at 1/8 scale
        {"id": 6042, "image_width": 20000, "image_height": 20000, "file_ext": "jpg"},  # over PIL's own ceiling
    ])
    (folder / "1042.png").write_bytes(png_header_only(30000, 30000))  # PIL refuses it; no metadata
    (folder / "2042.png").write_bytes(png_header_only(10000, 10000))  # over max_pixels; no metadata
    (folder / "3042.png").write_bytes(png_header_only(10, 10))
    (folder / "4042.jpg").write_bytes(jpeg_bytes((40, 30)))
    (folder / "5042.jpg").write_bytes(jpeg_bytes((40, 30)))
    (folder / "6042.jpg").write_bytes(jpeg_bytes((40, 30)))
    index, report = _index_tree(root, "0042", tmp_path)
    by_id = index.set_index("image_id")
    assert by_id.loc[1042, "status"] == "too_large" and "900000000 pixels" in by_id.loc[1042, "problem"]
    assert by_id.loc[2042, "status"] == "too_large"
    assert by_id.loc[2042, "problem"] == "10000x10000 = 100,000,000 pixels, over the limit of 50,000,000 (max_pixels)"
    assert by_id.loc[3042, "status"] == "too_large" and by_id.loc[3042, "size_source"] == "metadata"
    assert by_id.loc[4042, "status"] == "ok"
    assert by_id.loc[6042, "status"] == "too_large" and "over PIL's own limit" in by_id.loc[6042, "problem"]
    assert by_id.loc[5042, "status"] == "no_metadata" and by_id.loc[5042, "width"] == 40
    assert report.header_reads == 3  # 1042, 2042, 5042: metadata sizes are judged unread
    assert check_schema(index).passed
    # the limit is the dataset resource's: raised, the 100M-pixel header passes
    raised, _ = _index_tree(root, "0042", tmp_path / "again", max_pixels=200_000_000)
    assert raised.set_index("image_id").loc[2042, "status"] == "no_metadata"


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_header_sizes_are_displayed_sizes(tmp_path: Path, orientation: int):
    root = tmp_path / "root"
    folder = _tree(root, "0007")
    save_oriented_jpeg(folder / "7.jpg", orientation, (64, 40))
    index, _ = _index_tree(root, "0007", tmp_path)
    row = index.iloc[0]
    assert (row["width"], row["height"]) == ((40, 64) if orientation >= 5 else (64, 40))
    assert row["size_source"] == "header"


def test_file_in_the_wrong_bucket_is_never_read(tmp_path: Path):
    root = tmp_path / "root"
    folder = _tree(root, "0042", [{"id": 123, "image_width": 40, "image_height": 30, "file_ext": "jpg"}])
    (folder / "123.jpg").write_bytes(jpeg_bytes())
    (folder / "1042.jpg").write_bytes(jpeg_bytes())
    index, report = _index_tree(root, "0042", tmp_path)
    by_id = index.set_index("image_id")
    assert by_id.loc[123, "status"] == "wrong_shard" and "wrong_shard" not in USABLE_STATUSES
    assert by_id.loc[123, "problem"] == "id 123 belongs in bucket 0123, not 0042"
    assert by_id.loc[1042, "status"] == "no_metadata"
    assert report.header_reads == 1  # only 1042
    assert check_schema(index).passed


def test_links_out_of_the_root_are_never_read(tmp_path: Path):
    root = tmp_path / "root"
    folder = _tree(root, "0001")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(jpeg_bytes())
    (root / "other").mkdir()
    (root / "other" / "inside.jpg").write_bytes(jpeg_bytes((24, 12)))
    os.symlink(outside / "secret.jpg", folder / "1001.jpg")
    os.symlink(root / "other" / "inside.jpg", folder / "2001.jpg")  # a link inside the root is fine
    (folder / "3001.jpg").write_bytes(jpeg_bytes())
    index, report = _index_tree(root, "0001", tmp_path)
    by_id = index.set_index("image_id")
    assert by_id.loc[1001, "status"] == "outside_root" and "outside the dataset root" in by_id.loc[1001, "problem"]
    assert by_id.loc[1001, "width"] == 0
    assert by_id.loc[2001, "status"] == "no_metadata" and by_id.loc[2001, "width"] == 24
    assert by_id.loc[3001, "status"] == "no_metadata"
    assert report.header_reads == 2


def test_bucket_folder_linked_out_of_the_root(tmp_path: Path):
    root = tmp_path / "root"
    (root / "original").mkdir(parents=True)
    (root / "metadata").mkdir()
    elsewhere = tmp_path / "elsewhere" / "0005"
    elsewhere.mkdir(parents=True)
    (elsewhere / "5.jpg").write_bytes(jpeg_bytes())
    os.symlink(elsewhere, root / "original" / "0005")
    index, report = _index_tree(root, "0005", tmp_path)
    assert index["status"].tolist() == ["outside_root"] and report.header_reads == 0
    assert index["problem"].iloc[0].startswith("the bucket folder original/0005 resolves to")


def test_every_status_is_documented_in_order_of_precedence():
    assert set(STATUSES) == {"ok", "no_metadata", "unreadable_header", "too_large", "unknown_extension",
                             "zero_bytes", "wrong_shard", "outside_root", "duplicate_file", "link_loop",
                             "broken_link", "not_a_file"}
    assert set(USABLE_STATUSES) == {"ok", "no_metadata"}


# ---------------------------------------------------------------- reliability round 2: odd entries, duplicate ids

def test_link_loops_folders_and_dangling_links_get_a_status_each(tmp_path: Path):
    root = tmp_path / "root"
    folder = _tree(root, "0063")
    (folder / "1063.jpg").write_bytes(jpeg_bytes())
    os.symlink(folder / "2063.jpg", folder / "2063.jpg")  # a link to itself: a loop
    os.symlink(folder / "3063.png", folder / "4063.png")  # and a loop of two
    os.symlink(folder / "4063.png", folder / "3063.png")
    (folder / "90014063.jpg").mkdir()  # a folder named like an image
    os.symlink(tmp_path / "gone.jpg", folder / "5063.jpg")  # a link to nothing
    index, report = _index_tree(root, "0063", tmp_path)
    by_id = index.set_index("image_id")
    assert by_id.loc[1063, "status"] == "no_metadata"
    assert by_id.loc[2063, "status"] == "link_loop" and "loop" in by_id.loc[2063, "problem"]
    assert by_id.loc[3063, "status"] == by_id.loc[4063, "status"] == "link_loop"
    assert by_id.loc[90014063, "status"] == "not_a_file" and "folder" in by_id.loc[90014063, "problem"]
    assert by_id.loc[5063, "status"] == "broken_link"
    assert report.files == 6 and report.header_reads == 1
    assert all(check(index).passed for check in SHARD_INDEX_CHECKS)


def test_one_file_per_id_is_read_by_the_documented_rule(tmp_path: Path):
    from danbooru_assets.orchestration.assets.index import check_unique_ids

    root = tmp_path / "root"
    folder = _tree(root, "0063", [
        {"id": 90036063, "image_width": 40, "image_height": 30, "file_ext": "png"},
        {"id": 1063, "image_width": 40, "image_height": 30, "file_ext": "jpg"},
    ])
    # metadata says png: the png is read, whatever else lies there
    (folder / "90036063.jpg").write_bytes(jpeg_bytes())
    (folder / "90036063.png").write_bytes(png_header_only(40, 30))
    (folder / "090036063.jpg").write_bytes(jpeg_bytes())
    # no metadata: the plain spelling first, then jpg before png
    (folder / "2063.png").write_bytes(png_header_only(40, 30))
    (folder / "2063.jpg").write_bytes(jpeg_bytes())
    (folder / "02063.jpg").write_bytes(jpeg_bytes())
    # an unreadable file is never the one read
    (folder / "1063.jpg").write_bytes(b"")
    (folder / "1063.webp").write_bytes(png_header_only(40, 30))
    index, _ = _index_tree(root, "0063", tmp_path)
    read = index.loc[index["status"].isin(USABLE_STATUSES)]
    assert not read["image_id"].duplicated().any()
    assert sorted(read["rel_path"]) == ["original/0063/1063.webp", "original/0063/2063.jpg",
                                        "original/0063/90036063.png"]
    dups = index.loc[index["status"] == "duplicate_file"].set_index("rel_path")["problem"]
    assert dups["original/0063/90036063.jpg"].endswith("original/0063/90036063.png is read")
    assert dups["original/0063/090036063.jpg"].endswith("original/0063/90036063.png is read")
    assert dups["original/0063/2063.png"].endswith("original/0063/2063.jpg is read")
    assert dups["original/0063/02063.jpg"].endswith("original/0063/2063.jpg is read")
    assert len(dups) == 4
    result = check_unique_ids(index)
    assert not result.passed and result.severity.value == "WARN"
    assert "one file each is read" in result.description
