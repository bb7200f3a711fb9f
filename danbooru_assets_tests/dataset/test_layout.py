"""The dataset resource: scanning a bucket folder, the one rule for links, the pixel limit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from danbooru_assets.dataset.layout import DatasetLayout, resolve_inside
from danbooru_assets.orchestration.resources import DanbooruDatasetResource
from danbooru_assets.config import DEFAULT_MAX_PIXELS


def _root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "original" / "0001").mkdir(parents=True)
    return root


def test_scan_shard_marks_links_and_orders_by_id(tmp_path: Path) -> None:
    root = _root(tmp_path)
    folder = root / "original" / "0001"
    (folder / "2001.jpg").write_bytes(b"x" * 5)
    (folder / "1001.png").write_bytes(b"y" * 3)
    (folder / "notes.txt").write_text("z")
    (folder / ".hidden.jpg").write_bytes(b"h")
    os.symlink(folder / "1001.png", folder / "3001.png")
    os.symlink(tmp_path / "missing.jpg", folder / "4001.jpg")  # dangling: listed as such, never silently skipped
    (folder / "5001.jpg").mkdir()  # a folder named like an image: the same
    files = DatasetLayout(root).scan_shard("0001")
    assert files.name == ["1001.png", "2001.jpg", "3001.png", "4001.jpg", "5001.jpg", "notes.txt"]
    assert files.image_id.tolist() == [1001, 2001, 3001, 4001, 5001, -1]
    assert files.is_link.tolist() == [False, False, True, True, False, False]
    assert files.file_bytes.tolist() == [3, 5, 3, 0, 0, 1]  # a link's size is its target's
    assert files.not_a_file == ["", "", "", "broken_link", "not_a_file", ""]
    empty = DatasetLayout(root).scan_shard("0999")
    assert len(empty) == 0 and empty.is_link.dtype == bool


def test_resolve_inside_follows_links(tmp_path: Path) -> None:
    root = _root(tmp_path)
    (tmp_path / "secret.jpg").write_bytes(b"s")
    (root / "a.jpg").write_bytes(b"a")
    os.symlink(tmp_path / "secret.jpg", root / "out.jpg")
    os.symlink(root / "a.jpg", root / "in.jpg")
    assert resolve_inside(root, "in.jpg") == (root / "a.jpg").resolve()
    for rel in ("out.jpg", "../secret.jpg"):
        with pytest.raises(ValueError, match="outside the dataset root"):
            resolve_inside(root, rel)
    dataset = DatasetLayout(root)
    assert dataset.outside_root_problem("in.jpg") == ""
    assert "secret.jpg" in dataset.outside_root_problem("out.jpg")


def test_max_pixels_is_resource_config_handed_to_the_layout(tmp_path: Path) -> None:
    assert DanbooruDatasetResource(root=str(tmp_path)).layout().max_pixels == DEFAULT_MAX_PIXELS
    layout = DanbooruDatasetResource(root=str(tmp_path), max_pixels=10, image_folder="512px").layout()
    assert layout == DatasetLayout(str(tmp_path), image_folder="512px", max_pixels=10)
    with pytest.raises(ValueError, match="greater than 0"):  # pydantic's ValidationError
        DanbooruDatasetResource(root=str(tmp_path), max_pixels=0)
    with pytest.raises(ValueError, match="max_pixels must be positive"):
        DatasetLayout(tmp_path, max_pixels=0)


def test_missing_root_names_the_variable(tmp_path: Path) -> None:
    from danbooru_assets.dataset.layout import DatasetRootError

    with pytest.raises(DatasetRootError, match="DANBOORU_ROOT"):
        DatasetLayout(tmp_path / "nowhere").check_root()
    assert DatasetLayout(tmp_path).check_root() == tmp_path
