"""Manifest + WebDataset shards: round trip with the stdlib tarfile, determinism, safety."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from danbooru_assets.pose.coco import KEYPOINT_COLUMNS, KEYPOINT_NAMES, keypoint_columns
from danbooru_assets.export.curated import (build_manifest, keypoints_dict, read_webdataset_samples, write_manifest,
                                     write_webdataset_shards)
from danbooru_assets.pose.keypoint_files import read_keypoint_files


def _dataset(root: Path, ids: list[int]) -> pd.DataFrame:
    rows = []
    for i in ids:
        ext = "png" if i % 2 else "jpg"
        rel = f"original/{i % 1000:04d}/{i}.{ext}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 6), (i % 255, 0, 0)).save(root / rel)
        rows.append({"image_id": i, "rel_path": rel, "md5": f"md5-{i}", "tags": f"1girl solo tag{i}"})
    return pd.DataFrame(rows)


def _keypoints(ids: list[int]) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    kp = pd.DataFrame(rng.uniform(0, 100, size=(len(ids), len(KEYPOINT_COLUMNS))), columns=list(KEYPOINT_COLUMNS))
    kp.insert(0, "image_id", ids)
    kp.loc[0, list(keypoint_columns("nose"))] = np.nan  # an absent keypoint
    return kp


def test_manifest_human_label_wins_over_prediction() -> None:
    images = pd.DataFrame({"image_id": [3, 1, 2, 4], "rel_path": ["c", "a", "b", "d"], "md5": list("wxyz")})
    labels = pd.DataFrame({"image_id": [1, 3], "label": ["bad", "good"]})
    preds = pd.DataFrame({"image_id": [1, 2, 3], "p_good": [0.8, 0.1, 0.2], "p_questionable": [0.1, 0.7, 0.2],
                          "p_bad": [0.1, 0.2, 0.6], "predicted_class": ["good", "questionable", "bad"]})
    m = build_manifest(images, labels, preds)
    assert m.image_id.tolist() == [1, 2, 3, 4]
    assert m["class"].tolist()[:3] == ["bad", "questionable", "good"] and pd.isna(m["class"].iloc[3])
    assert m.source.tolist() == ["human", "predicted", "human", "unlabeled"]
    assert m.md5.tolist() == ["x", "y", "w", "z"]
    assert m.p_good.iloc[0] == pytest.approx(0.8)
    kept = build_manifest(images, labels, preds, classes=["good", "questionable"])
    assert kept.image_id.tolist() == [2, 3]
    with pytest.raises(ValueError):
        build_manifest(images, classes=["excellent"])


def test_shards_round_trip(tmp_path: Path) -> None:
    ids = [1005, 17, 2042, 3, 999, 64, 1234]
    images = _dataset(tmp_path / "root", ids)
    labels = pd.DataFrame({"image_id": ids[:3], "label": ["good", "bad", "questionable"]})
    manifest = build_manifest(images, labels)
    write_manifest(manifest, tmp_path / "out" / "manifest.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "out" / "manifest.parquet"), manifest,
                                  check_dtype=False)
    kp = _keypoints(sorted(ids)[:5])
    shards = write_webdataset_shards(manifest, tmp_path / "root", kp, tmp_path / "out" / "shards", samples_per_shard=3)
    assert [p.name for p in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]

    # read back with the stdlib only: members pair up per key, in image id order
    names = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            names.append(tar.getnames())
    assert [len(n) for n in names] == [6, 6, 2]
    flat = [n for group in names for n in group]
    keys = [n.split(".")[0] for n in flat]
    assert keys[0::2] == keys[1::2] == [str(i) for i in sorted(ids)]
    assert all(n.endswith(".json") for n in flat[1::2])
    assert flat[0] == "3.png" and flat[2] == "17.png" and flat[4] == "64.jpg"

    samples = read_webdataset_samples(shards)
    by_key = {s["__key__"]: s for s in samples}
    s17 = by_key["17"]
    assert Image.open(io.BytesIO(s17["png"])).size == (8, 6)
    assert s17["png"] == (tmp_path / "root" / images.set_index("image_id").loc[17, "rel_path"]).read_bytes()
    meta = s17["json"]
    assert meta["class"] == "bad" and meta["source"] == "human" and meta["md5"] == "md5-17"
    assert meta["tags"] == ["1girl", "solo", "tag17"]
    assert list(meta["keypoints"]) == list(KEYPOINT_NAMES)  # COCO order, seed's names
    row = kp.set_index("image_id").loc[17]
    assert meta["keypoints"]["wrist_left"] == [pytest.approx(row["kp_wrist_left_y"]),
                                               pytest.approx(row["kp_wrist_left_x"])]  # [y, x] like the seed
    assert by_key["3"]["json"]["keypoints"]["nose"] == [None, None]
    assert by_key["2042"]["json"]["keypoints"] is None  # no keypoints for this image
    assert by_key["2042"]["json"]["class"] == "questionable"
    assert by_key["1234"]["json"]["class"] is None and by_key["1234"]["json"]["source"] == "unlabeled"

    # the per-sample keypoint JSON reads back through the pose helper's importer
    kp_dir = tmp_path / "kp"
    kp_dir.mkdir()
    (kp_dir / "17.json").write_text(json.dumps(meta["keypoints"]))
    back, _ = read_keypoint_files(kp_dir, axis_order="yx")
    assert back.loc[0, "kp_wrist_left_x"] == pytest.approx(row["kp_wrist_left_x"])


def test_shards_are_deterministic_and_stale_shards_removed(tmp_path: Path) -> None:
    ids = list(range(10, 20))
    images = _dataset(tmp_path / "root", ids)
    manifest = build_manifest(images)
    out = tmp_path / "shards"
    first = [p.read_bytes() for p in write_webdataset_shards(manifest, tmp_path / "root", None, out, 4)]
    again = [p.read_bytes() for p in write_webdataset_shards(manifest.sample(frac=1, random_state=1),
                                                             tmp_path / "root", None, out, 4)]
    assert first == again  # input order and time do not change the bytes
    smaller = write_webdataset_shards(manifest.iloc[:4], tmp_path / "root", None, out, 4)
    assert sorted(p.name for p in out.iterdir()) == [p.name for p in smaller] == ["shard-000000.tar"]


def test_missing_files_and_path_escape(tmp_path: Path) -> None:
    images = _dataset(tmp_path / "root", [1, 2])
    (tmp_path / "secret.jpg").write_bytes(b"secret")
    escaping = pd.concat([images, pd.DataFrame({"image_id": [3], "rel_path": ["../secret.jpg"]})])
    with pytest.raises(ValueError, match="escapes"):
        write_webdataset_shards(build_manifest(escaping), tmp_path / "root", None, tmp_path / "o1")
    missing = pd.concat([images, pd.DataFrame({"image_id": [4], "rel_path": ["original/0004/4.jpg"]})])
    with pytest.raises(FileNotFoundError):
        write_webdataset_shards(build_manifest(missing), tmp_path / "root", None, tmp_path / "o2")
    assert not list((tmp_path / "o2").glob("*.tar"))  # nothing half-written
    shards = write_webdataset_shards(build_manifest(missing), tmp_path / "root", None, tmp_path / "o3",
                                     missing="skip")
    assert [s["__key__"] for s in read_webdataset_samples(shards)] == ["1", "2"]


def test_keypoints_dict_confidence_filter() -> None:
    row = np.tile([10.0, 20.0, 0.9], 17)
    row[2] = 0.1  # nose low confidence
    d = keypoints_dict(row, min_confidence=0.5)
    assert d["nose"] == [None, None] and d["eye_left"] == [20.0, 10.0]
    assert keypoints_dict(row)["nose"] == [20.0, 10.0]


def test_oriented_images_are_exported_upright_with_their_keypoints(tmp_path: Path) -> None:
    from danbooru_assets_tests.clip.test_loader import DISPLAYED_CORNERS, corner_colour, save_oriented_jpeg

    root = tmp_path / "root"
    (root / "original" / "0006").mkdir(parents=True)
    (root / "original" / "0001").mkdir(parents=True)
    save_oriented_jpeg(root / "original" / "0006" / "6.jpg", 6, (64, 40))
    save_oriented_jpeg(root / "original" / "0001" / "1.jpg", 1, (64, 40))
    images = pd.DataFrame({"image_id": [6, 1], "rel_path": ["original/0006/6.jpg", "original/0001/1.jpg"]})
    kp = _keypoints([6, 1])
    shards = write_webdataset_shards(build_manifest(images), root, kp, tmp_path / "out")
    by_key = {s["__key__"]: s for s in read_webdataset_samples(shards)}
    turned = by_key["6"]
    assert "jpg" not in turned and turned["json"]["orientation_applied"] == 6
    upright = Image.open(io.BytesIO(turned["png"]))  # any loader: no EXIF left to apply
    assert upright.size == (40, 64)
    red, green = DISPLAYED_CORNERS[6]
    assert corner_colour(upright, red, 4) == "red" and corner_colour(upright, green, 4) == "green"
    plain = by_key["1"]
    assert plain["json"]["orientation_applied"] == 1
    assert plain["jpg"] == (root / "original" / "0001" / "1.jpg").read_bytes()  # as stored


def test_link_out_of_the_root_is_not_exported(tmp_path: Path) -> None:
    import os

    images = _dataset(tmp_path / "root", [1])
    (tmp_path / "secret.jpg").write_bytes(b"secret")
    (tmp_path / "root" / "original" / "0002").mkdir()
    os.symlink(tmp_path / "secret.jpg", tmp_path / "root" / "original" / "0002" / "2.jpg")
    linked = pd.concat([images, pd.DataFrame({"image_id": [2], "rel_path": ["original/0002/2.jpg"]})])
    with pytest.raises(ValueError, match="escapes the dataset root"):
        write_webdataset_shards(build_manifest(linked), tmp_path / "root", None, tmp_path / "o")
