"""The new-data sensor's per-shard fingerprint: an unchanged folder costs one stat (no
listing), and adding a file is seen."""

import os
from pathlib import Path

from danbooru_assets.dataset import layout as layout_module
from danbooru_assets.dataset.layout import DatasetLayout
from danbooru_assets_tests.conftest import jpeg_bytes


def test_unchanged_folder_is_not_listed_and_a_new_file_is_seen(mini_dataset: Path, monkeypatch):
    layout = DatasetLayout(mini_dataset)
    shard = layout.shards_with_images()[0]
    first = layout.shard_fingerprint(shard)
    listed = []
    real_listdir = os.listdir
    monkeypatch.setattr(layout_module.os, "listdir", lambda p: listed.append(p) or real_listdir(p))
    assert layout.shard_fingerprint(shard, first) == first
    assert listed == []  # one stat of the folder, no listing

    new = layout.image_dir(shard) / f"{9000 + int(shard)}.jpg"
    new.write_bytes(jpeg_bytes())
    os.utime(layout.image_dir(shard), ns=(first["dir_mtime"] + 1_000_000, first["dir_mtime"] + 1_000_000))
    second = layout.shard_fingerprint(shard, first)
    assert second["files"] == first["files"] + 1 and listed
