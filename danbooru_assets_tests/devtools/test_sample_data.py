"""Tests for the deterministic Danbooru-shaped sample-data generator."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from danbooru_assets.core.shards import shard_key
from danbooru_assets.pose import coco
from danbooru_assets.devtools.sample_data import (
    DUMP_FILE,
    FIGURE_KINDS,
    GROUND_TRUTH_FILE,
    KEYPOINTS_TARBALL,
    KINDS,
    MARKER_NAME,
    PARTIAL_NAME,
    POSTS_FILE,
    PROBLEMS,
    SampleDatasetSummary,
    add_sample_data_arguments,
    default_sample_root,
    generate_sample_dataset,
    image_relpath,
    main,
    read_ground_truth,
    run_sample_data,
)

SMALL = dict(n_images=72, n_shards=8, seed=3, min_side=128, max_side=320)


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> tuple[Path, SampleDatasetSummary, pd.DataFrame]:
    root = tmp_path_factory.mktemp("sample")
    summary = generate_sample_dataset(root, **SMALL)
    return root, summary, read_ground_truth(root)


def _file_hashes(root: Path) -> dict[str, str]:
    # The marker records the root path itself, so it legitimately differs between folders.
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MARKER_NAME
    }


def _read_lines(path: Path) -> tuple[list[dict], list[int]]:
    good, bad = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            good.append(json.loads(line))
        except json.JSONDecodeError:
            bad.append(n)
    return good, bad


def _kp(row: pd.Series) -> np.ndarray:
    return np.array([[row[c] for c in coco.keypoint_columns(n)] for n in coco.KEYPOINT_NAMES])


# --------------------------------------------------------------------------- determinism


def test_same_params_give_byte_identical_files_serial_or_parallel(sample, tmp_path):
    root, _, _ = sample
    again = generate_sample_dataset(tmp_path / "again", workers=2, **SMALL)  # process pool path
    assert not again.reused
    first, second = _file_hashes(root), _file_hashes(tmp_path / "again")
    assert len(first) > SMALL["n_images"]
    assert first == second
    other = generate_sample_dataset(tmp_path / "other", **{**SMALL, "seed": 4})
    assert _file_hashes(tmp_path / "other") != first
    assert other.shards != again.shards


# --------------------------------------------------------------------------- layout


def test_layout_follows_danbooru_buckets(sample):
    root, summary, gt = sample
    files = sorted(p for p in (root / "original").rglob("*") if p.is_file())
    assert len(files) == summary.n_images_written == SMALL["n_images"]
    buckets = sorted(p.name for p in (root / "original").iterdir())
    assert buckets == summary.shards and len(buckets) == SMALL["n_shards"]
    for p in files:
        image_id = int(p.stem)
        assert 100_000 <= image_id <= 9_999_999
        assert p.parent.name == f"{image_id % 1000:04d}" == shard_key(image_id)
        assert str(p.relative_to(root)) == image_relpath(image_id, p.suffix[1:])
    on_disk = {str(p.relative_to(root)) for p in files}
    with_file = gt[gt.has_file]
    assert on_disk == {image_relpath(i, e) for i, e in zip(with_file.image_id, with_file.file_ext)}
    # metadata-only ids live in the same buckets, so a shard's metadata join sees them
    assert {shard_key(i) for i in summary.ids_metadata_only} <= set(summary.shards)
    exts = {p.suffix for p in files}
    assert {".jpg", ".png", ".gif", ".psd"} <= exts
    assert sum(p.suffix == ".jpg" for p in files) > len(files) / 2
    assert set(summary.kind_counts) == set(KINDS) and all(v > 0 for v in summary.kind_counts.values())
    single = summary.kind_counts["single_figure"] + summary.kind_counts["upper_body"]
    assert 0.25 <= single / summary.n_images_written <= 0.35
    sizes = gt[gt.has_file][["width", "height"]]
    assert sizes.min().min() >= SMALL["min_side"] and sizes.max().max() <= SMALL["max_side"]
    assert (sizes.width > sizes.height).any() and (sizes.width < sizes.height).any()


def test_image_sizes_match_ground_truth(sample):
    root, _, gt = sample
    ok = gt[gt.has_file & ~gt.problem.isin(["zero_bytes", "unknown_extension"])]
    for row in ok.itertuples():
        with Image.open(root / image_relpath(row.image_id, row.file_ext)) as im:
            assert im.size == (row.width, row.height)


# --------------------------------------------------------------------------- metadata


def test_both_metadata_formats_parse_except_one_truncated_line(sample):
    root, summary, gt = sample
    api, api_bad = _read_lines(root / "metadata" / POSTS_FILE)
    dump, dump_bad = _read_lines(root / "metadata" / DUMP_FILE)
    assert dump_bad == [] and api_bad == [summary.bad_metadata_line["line"]]
    assert api and dump
    assert summary.n_metadata_lines == {f"metadata/{POSTS_FILE}": len(api), f"metadata/{DUMP_FILE}": len(dump)}

    for rec in api:
        assert isinstance(rec["id"], int) and isinstance(rec["image_width"], int)
        assert rec["rating"] in {"g", "s", "q", "e"}
        parts = [rec[f"tag_string_{c}"] for c in ("general", "artist", "copyright", "character", "meta")]
        assert sorted(" ".join(parts).split()) == rec["tag_string"].split()
        assert rec["tag_count"] == len(rec["tag_string"].split())
    for rec in dump:
        assert isinstance(rec["id"], str) and isinstance(rec["score"], str) and isinstance(rec["image_width"], str)
        assert rec["rating"] in {"s", "q", "e"}
        assert rec["tags"] and all(t["category"] in {"0", "1", "3", "4", "5"} for t in rec["tags"])
        assert all(set(t) == {"id", "name", "category"} for t in rec["tags"])

    ids = [r["id"] for r in api] + [int(r["id"]) for r in dump]
    assert len(ids) == len(set(ids))
    assert set(ids) == set(gt[gt.has_metadata].image_id)
    assert set(summary.ids_without_metadata) == set(gt[~gt.has_metadata].image_id)
    assert gt.set_index("image_id").loc[summary.ids_without_metadata, "has_file"].all()
    assert not gt.set_index("image_id").loc[summary.ids_metadata_only, "has_file"].any()
    assert summary.ids_metadata_only and summary.bad_metadata_line["image_id"] in summary.ids_without_metadata


def test_metadata_matches_files_and_tags_follow_kind(sample):
    root, summary, gt = sample
    api, _ = _read_lines(root / "metadata" / POSTS_FILE)
    dump, _ = _read_lines(root / "metadata" / DUMP_FILE)
    tags = {r["id"]: set(r["tag_string"].split()) for r in api}
    tags.update({int(r["id"]): {t["name"] for t in r["tags"]} for r in dump})
    meta = {r["id"]: (r["md5"], int(r["file_size"]), int(r["image_width"]), r["file_ext"]) for r in api}
    meta.update({int(r["id"]): (r["md5"], int(r["file_size"]), int(r["image_width"]), r["file_ext"]) for r in dump})
    g = gt.set_index("image_id")
    for image_id, (md5, size, width, ext) in meta.items():
        row = g.loc[image_id]
        assert (width, ext) == (row.width, row.file_ext)
        if row.has_file:
            data = (root / image_relpath(image_id, ext)).read_bytes()
            # metadata describes the file as uploaded: corrupted local copies no longer match it
            intact = row.problem not in ("truncated", "zero_bytes")
            assert (hashlib.md5(data).hexdigest() == md5) == intact
            assert (len(data) == size) == intact
    expected = {"single_figure": "solo", "upper_body": "upper_body", "back_view": "from_behind",
                "multiple_figures": "group", "manga_page": "comic", "landscape": "scenery",
                "black_border": "letterboxed", "text_page": "text_focus", "doll_pattern": "doll"}
    for image_id, t in tags.items():
        assert expected[g.loc[image_id, "kind"]] in t
        if g.loc[image_id, "kind"] == "multiple_figures":
            assert "solo" not in t


# --------------------------------------------------------------------------- ground truth


def test_ground_truth_schema(sample):
    _, _, gt = sample
    assert set(coco.KEYPOINT_COLUMNS) <= set(gt.columns)
    assert gt.image_id.dtype == np.int64 and gt.image_id.is_unique and gt.image_id.is_monotonic_increasing
    assert set(gt.kind) <= set(KINDS)
    assert set(gt.problem.dropna()) == set(PROBLEMS)
    assert set(gt[gt.has_file].quality) <= {"good", "questionable", "bad"}
    assert gt[~gt.has_file].quality.isna().all()
    non_figure = gt[~gt.kind.isin(FIGURE_KINDS)]
    assert non_figure[list(coco.KEYPOINT_COLUMNS)].isna().all().all()


def test_figure_keypoints_are_consistent_with_the_drawing(sample):
    root, _, gt = sample
    singles = gt[(gt.kind == "single_figure") & gt.has_file]
    assert len(singles) >= 10
    for _, row in singles.iterrows():
        kp = _kp(row)
        assert (kp[:, 0] >= 0).all() and (kp[:, 0] < row.width).all()
        assert (kp[:, 1] >= 0).all() and (kp[:, 1] < row.height).all()
        if row.pose != "no_arms_big_feet":
            assert (kp[:, 2] == 1.0).all()
    for _, row in gt[(gt.kind == "upper_body") & gt.has_file].iterrows():
        kp = _kp(row)
        hip_y = kp[[11, 12], 1].mean()
        assert hip_y >= 0.9 * row.height  # half portraits: hips near or below the bottom edge
        assert (kp[[15, 16], 2] == 0).all()  # ankles are outside the picture
        assert 0 <= kp[0, 1] < 0.5 * row.height
    for _, row in gt[(gt.kind == "back_view") & gt.has_file].iterrows():
        kp = _kp(row)
        assert (kp[:3, 2] == 0).all()  # nose and eyes face away
        # seen from behind, the character's left is on the image's left
        assert kp[5, 0] < kp[6, 0]
    fronts = gt[(gt.kind == "single_figure") & gt.has_file & (gt.pose != "upside_down")]
    assert (fronts.kp_shoulder_left_x > fronts.kp_shoulder_right_x).all()  # facing us: left is on the right
    assert gt[(gt.kind == "multiple_figures") & gt.has_file].n_figures.between(2, 4).all()

    # The torso really is drawn where the keypoints say: its centre is not background.
    differs = 0
    readable = singles[~singles.problem.isin(["truncated", "zero_bytes"])]
    for _, row in readable.iterrows():
        kp = _kp(row)
        with Image.open(root / image_relpath(row.image_id, row.file_ext)) as im:
            im = im.convert("RGB")
            centre = kp[[5, 6, 11, 12], :2].mean(axis=0)
            a = np.array(im.getpixel((int(centre[0]), int(centre[1]))), float)
            b = np.array(im.getpixel((1, 1)), float)
        differs += np.abs(a - b).max() > 25
    assert differs >= 0.8 * len(readable)


def test_quality_label_follows_kind_and_drawing(sample, tmp_path):
    _, _, gt = sample
    files = gt[gt.has_file]
    singles = files[files.kind == "single_figure"]
    assert (singles.quality == "good").mean() > 0.5
    assert (files[~files.kind.isin(FIGURE_KINDS)].quality == "bad").all()
    upper = files[files.kind == "upper_body"]
    assert (upper.quality == "questionable").mean() > 0.4
    # a fixed function of the drawing, not of the kind alone: labels vary within a kind
    big = read_ground_truth(generate_sample_dataset(tmp_path / "q", n_images=300, min_side=64, max_side=96,
                                                     broken_files=False).root)
    by_kind = big[big.has_file].groupby("kind").quality.nunique()
    assert by_kind["single_figure"] >= 2 and by_kind["upper_body"] >= 2
    odd = big[big.pose.isin(["kicking", "upside_down", "no_arms_big_feet"]) & (big.kind == "single_figure")]
    clean = big[(big.pose == "standing") & (big.kind == "single_figure")]
    assert (odd.quality == "good").mean() < (clean.quality == "good").mean()


# --------------------------------------------------------------------------- published keypoints


def test_published_keypoints_are_y_x_and_match_ground_truth(sample):
    root, summary, gt = sample
    g = gt.set_index("image_id")
    valid, not_json, missing = {}, [], []
    with tarfile.open(root / KEYPOINTS_TARBALL) as tar:
        for m in tar.getmembers():
            assert "/" not in m.name and m.name.endswith(".json")
            image_id = int(m.name[:-5])
            raw = tar.extractfile(m).read()
            try:
                data = json.loads(raw)
            except json.JSONDecodeError:
                not_json.append(image_id)
                continue
            if list(data) != list(coco.KEYPOINT_NAMES):
                missing.append(image_id)
                continue
            valid[image_id] = data
    assert not_json == summary.malformed_keypoint_ids["not_json"] and len(not_json) == 1
    assert missing == summary.malformed_keypoint_ids["missing_keys"] and len(missing) == 1
    assert set(valid) == set(g.index[g.has_published_keypoints])
    assert len(valid) == summary.n_published_keypoints
    orphans = [i for i in valid if not g.loc[i, "has_file"]]
    assert orphans == summary.keypoint_ids_without_image and len(orphans) == 1

    expected = g[g.has_file & g.kind.isin(FIGURE_KINDS) & ~g.problem.isin(["truncated", "zero_bytes", "unknown_extension"])]
    assert set(expected.index) == set(valid) - set(orphans) | set(not_json) | set(missing)
    swapped_far = 0
    for image_id in set(valid) - set(orphans):
        kp = _kp(g.loc[image_id])
        pub = np.array([valid[image_id][n] for n in coco.KEYPOINT_NAMES])  # [y, x]
        assert np.abs(pub[:, 0] - kp[:, 1]).max() <= 5.0
        assert np.abs(pub[:, 1] - kp[:, 0]).max() <= 5.0
        assert not np.allclose(pub[:, ::-1], kp[:, :2])  # jittered, not copied
        swapped_far += np.abs(pub[:, 0] - kp[:, 0]).max() > 5.0
    assert swapped_far > 0.9 * (len(valid) - 1)  # the order really is (y, x)


# --------------------------------------------------------------------------- broken files


def test_broken_files_are_really_broken(sample):
    root, summary, gt = sample
    g = gt.set_index("image_id")
    path = lambda i: root / image_relpath(i, g.loc[i, "file_ext"])  # noqa: E731
    assert all(len(v) == 1 for v in summary.broken_ids.values())
    (trunc,), (zero,), (alpha,), (gif,), (junk,) = (summary.broken_ids[p] for p in PROBLEMS)
    with Image.open(path(trunc)) as im:
        assert im.format == "JPEG"  # the header still parses ...
        with pytest.raises(OSError):
            im.load()  # ... but the full decode fails
    assert path(zero).stat().st_size == 0
    with Image.open(path(alpha)) as im:
        assert im.mode == "RGBA" and np.asarray(im)[..., 3].min() == 0
    with Image.open(path(gif)) as im:
        assert im.format == "GIF" and im.mode == "P"
    assert path(junk).suffix == ".psd" and path(junk).stat().st_size > 0
    with pytest.raises(Image.UnidentifiedImageError):
        Image.open(path(junk))
    assert (g.loc[[trunc, zero, junk], "quality"] == "bad").all()


def test_no_broken_files_when_disabled(tmp_path):
    s = generate_sample_dataset(tmp_path, n_images=20, n_shards=4, min_side=64, max_side=96, broken_files=False)
    gt = read_ground_truth(tmp_path)
    assert gt.problem.isna().all() and all(v == [] for v in s.broken_ids.values())
    for row in gt[gt.has_file].itertuples():
        with Image.open(tmp_path / image_relpath(row.image_id, row.file_ext)) as im:
            im.load()
            assert im.mode in ("RGB", "L")


# --------------------------------------------------------------------------- marker / reuse


def test_marker_reuse_and_regeneration(tmp_path):
    params = dict(n_images=16, n_shards=4, min_side=64, max_side=96)
    first = generate_sample_dataset(tmp_path, **params)
    marker = json.loads((tmp_path / MARKER_NAME).read_text())
    assert marker["params"]["n_images"] == 16 and not (tmp_path / PARTIAL_NAME).exists()

    # Same params: the summary comes back from the marker and nothing is rewritten.
    victim = next((tmp_path / "original").rglob("*.jpg"))
    victim.unlink()
    again = generate_sample_dataset(tmp_path, **params)
    assert again.reused and not victim.exists()
    assert again.to_dict() == first.to_dict()

    # overwrite=True regenerates, restoring the file.
    redone = generate_sample_dataset(tmp_path, overwrite=True, **params)
    assert not redone.reused and victim.exists()

    # Other params replace the old set entirely: no stale files from the old ids.
    other = generate_sample_dataset(tmp_path, **{**params, "seed": 9})
    assert not other.reused
    files = {int(p.stem) for p in (tmp_path / "original").rglob("*") if p.is_file()}
    assert files == set(read_ground_truth(tmp_path).query("has_file").image_id)
    assert sorted(p.name for p in (tmp_path / "original").iterdir()) == other.shards


def test_half_written_dataset_is_regenerated_and_foreign_folder_refused(tmp_path):
    params = dict(n_images=16, n_shards=4, min_side=64, max_side=96)
    generate_sample_dataset(tmp_path / "a", **params)
    # Simulate a crash before the marker was written.
    (tmp_path / "a" / MARKER_NAME).unlink()
    (tmp_path / "a" / PARTIAL_NAME).write_text("{}")
    (tmp_path / "a" / GROUND_TRUTH_FILE).write_bytes(b"half")
    s = generate_sample_dataset(tmp_path / "a", **params)
    assert not s.reused and (tmp_path / "a" / MARKER_NAME).exists()
    assert len(read_ground_truth(tmp_path / "a")) > 0

    foreign = tmp_path / "real_danbooru"
    (foreign / "original" / "0001").mkdir(parents=True)
    (foreign / "original" / "0001" / "1001.jpg").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_sample_dataset(foreign, **params)
    assert (foreign / "original" / "0001" / "1001.jpg").read_bytes() == b"precious"


@pytest.mark.parametrize("bad", [dict(n_images=5, n_shards=8), dict(n_shards=0), dict(min_side=600, max_side=500)])
def test_invalid_params_raise(tmp_path, bad):
    with pytest.raises(ValueError):
        generate_sample_dataset(tmp_path, **bad)
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------- CLI


def test_cli_subcommand_and_main(tmp_path, capsys, monkeypatch):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_sample_data_arguments(sub.add_parser("sample-data"))
    args = parser.parse_args(["sample-data", str(tmp_path / "d"), "--images", "14", "--shards", "3",
                              "--min-side", "64", "--max-side", "80", "--seed", "2"])
    assert run_sample_data(args) == 0
    out = capsys.readouterr().out
    assert "14 image files in 3 shards" in out
    assert main([str(tmp_path / "d"), "--images", "14", "--shards", "3", "--min-side", "64",
                 "--max-side", "80", "--seed", "2"]) == 0
    assert "reused" in capsys.readouterr().out
    assert main([str(tmp_path / "e"), "--images", "2", "--shards", "3"]) == 2
    assert "n_images" in capsys.readouterr().err

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DANBOORU_SAMPLE_ROOT", raising=False)
    assert default_sample_root() == tmp_path / "data" / "sample"
    monkeypatch.setenv("DANBOORU_SAMPLE_ROOT", str(tmp_path / "elsewhere"))
    assert default_sample_root() == tmp_path / "elsewhere"
    assert main(["--images", "12", "--shards", "2", "--min-side", "64", "--max-side", "64", "--no-broken-files"]) == 0
    assert (tmp_path / "elsewhere" / MARKER_NAME).exists()
    gt = read_ground_truth(tmp_path / "elsewhere")
    assert (gt[gt.has_file].width == 64).all() and not math.isnan(gt.width.mean())


def test_duplicate_variants_have_their_ground_truth(sample):
    root, _, gt = sample
    variants = gt.loc[gt["duplicate_of"].notna()].set_index("image_id")
    # 72 images: round(0.02 * 72) = 1 of each variant, each a copy of a same-kind figure image.
    assert variants["duplicate_kind"].value_counts().to_dict() == {
        "exact_copy": 1, "parent_child": 1, "resized": 1, "colour": 1, "text": 1}
    sources = gt.set_index("image_id").loc[variants["duplicate_of"].astype("int64")]
    assert (sources["kind"].to_numpy() == variants["kind"].to_numpy()).all()
    lines = {}
    for path in (root / "metadata").glob("*.json"):
        for text in path.read_text().splitlines():
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                continue
            lines[int(record["id"])] = record
    for image_id, row in variants.iterrows():
        source = int(row["duplicate_of"])
        mine = next((root / "original" / shard_key(image_id)).glob(f"{image_id}.*")).read_bytes()
        theirs = next((root / "original" / shard_key(source)).glob(f"{source}.*")).read_bytes()
        if row["duplicate_kind"] == "exact_copy":  # the same bytes, so the same md5 in the metadata
            assert mine == theirs and lines[image_id]["md5"] == lines[source]["md5"]
        else:
            assert mine != theirs and lines[image_id]["md5"] != lines[source]["md5"]
        if row["duplicate_kind"] == "parent_child":
            assert int(lines[image_id]["parent_id"]) == source and lines[source]["has_children"] is True
        if row["duplicate_kind"] == "resized":
            assert (row["width"], row["height"]) == tuple(round(1.25 * s) for s in sources.loc[source, ["width", "height"]])
