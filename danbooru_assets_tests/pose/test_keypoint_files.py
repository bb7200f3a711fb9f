"""Keypoint JSON import/export: axis order, round trips, bad files, tarball streaming."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pandas as pd
import pytest

from danbooru_assets.pose.coco import KEYPOINT_COLUMNS, KEYPOINT_NAMES, keypoint_columns
from danbooru_assets.pose.synthetic import synthetic_poses
from danbooru_assets.pose.keypoint_files import (
    keypoints_for_ids,
    detect_axis_order,
    read_keypoint_files,
    source_fingerprint,
    write_keypoint_files,
)

# The seed's published example (bizarre-pose-estimator output, (row, col)).
SEED_EXAMPLE = {
    "nose": [176.8, 256.0], "eye_left": [150.4, 282.40000000000003], "eye_right": [168.0, 247.20000000000002],
    "ear_left": [150.4, 322.00000000000006], "ear_right": [181.20000000000002, 234.0],
    "shoulder_left": [238.4, 374.80000000000007], "shoulder_right": [264.8, 251.60000000000002],
    "elbow_left": [348.40000000000003, 361.6000000000001], "elbow_right": [361.6000000000001, 251.60000000000002],
    "wrist_left": [445.20000000000005, 427.6000000000001], "wrist_right": [388.00000000000006, 225.20000000000002],
    "hip_left": [533.2, 401.20000000000005], "hip_right": [414.40000000000003, 286.80000000000007],
    "knee_left": [352.80000000000007, 220.8], "knee_right": [405.6000000000001, 150.4],
    "ankle_left": [396.80000000000007, 128.4], "ankle_right": [392.40000000000003, 128.4],
}


def _table(n: int = 40, seed: int = 3) -> pd.DataFrame:
    """Upright synthetic poses as an import would produce them (conf 1.0 / NaN)."""
    df = synthetic_poses(n, seed=seed, outlier_fraction=0.0, missing_fraction=0.05)
    df = df[["image_id", *KEYPOINT_COLUMNS]].copy()
    df["image_id"] = df["image_id"] * 1000 + 42  # ids like 42, 1042, ... (bucket 0042)
    for name in KEYPOINT_NAMES:
        x, _, c = keypoint_columns(name)
        df[c] = np.where(np.isnan(df[x]), np.nan, 1.0)
    return df


def _write_raw(directory, files: dict[str, object]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, obj in files.items():
        (directory / name).write_text(obj if isinstance(obj, str) else json.dumps(obj))


def test_seed_example_reads_as_yx_with_head_at_top(tmp_path):
    _write_raw(tmp_path / "kp", {"123042.json": SEED_EXAMPLE})
    frame, report = read_keypoint_files(tmp_path / "kp", axis_order="auto")
    assert report.axis_order == "yx"
    assert report.files_seen == report.files_read == 1
    row = frame.iloc[0]
    assert row["image_id"] == 123042
    # (row, col) became (x, y): x is the file's second value
    assert row["kp_nose_x"] == 256.0 and row["kp_nose_y"] == 176.8
    assert row["kp_nose_conf"] == 1.0
    # y down: the nose lies above the hips and the shoulders above the knees
    assert row["kp_nose_y"] < (row["kp_hip_left_y"] + row["kp_hip_right_y"]) / 2
    assert (row["kp_shoulder_left_y"] + row["kp_shoulder_right_y"]) / 2 < (
        row["kp_knee_left_y"] + row["kp_knee_right_y"]
    ) / 2


@pytest.mark.parametrize("written_as", ["yx", "xy"])
def test_auto_axis_order_detects_either_and_reports_evidence(tmp_path, written_as):
    table = _table(60)
    write_keypoint_files(table, out_dir=tmp_path / "kp", axis_order=written_as)
    frame, report = read_keypoint_files(tmp_path / "kp", axis_order="auto")
    ev = report.axis_evidence
    assert report.axis_order == written_as == ev["decision"]
    right = ev[f"upright_fraction_if_{written_as}"]
    wrong = ev["upright_fraction_if_" + ("xy" if written_as == "yx" else "yx")]
    assert right > 0.9 and wrong < right
    assert ev["poses_evaluated"] == 60
    pd.testing.assert_frame_equal(frame, table.sort_values("image_id").reset_index(drop=True))


def test_explicit_axis_order_overrides_anatomy(tmp_path):
    table = _table(10)
    write_keypoint_files(table, out_dir=tmp_path / "kp", axis_order="xy")
    frame, report = read_keypoint_files(tmp_path / "kp", axis_order="yx")
    assert report.axis_order == "yx" and report.axis_evidence["reason"] == "set explicitly"
    # read the wrong way round: x and y swapped
    np.testing.assert_array_equal(frame["kp_nose_x"].to_numpy(), table["kp_nose_y"].to_numpy())


def test_detect_axis_order_without_evidence_falls_back_to_seed_default():
    decision, evidence = detect_axis_order(np.full((3, 17, 2), np.nan))
    assert decision == "yx" and evidence["poses_evaluated"] == 0
    with pytest.raises(ValueError):
        read_keypoint_files(".", axis_order="zx")


@pytest.mark.parametrize("target", ["dir", "tar.gz", "tar"])
def test_export_import_round_trip_is_exact(tmp_path, target):
    table = _table(50)
    # awkward floats must survive json exactly
    table.loc[0, "kp_nose_x"] = 0.1 + 0.2
    table.loc[1, "kp_nose_y"] = 1e-300
    table.loc[2, "kp_wrist_left_x"] = 123456.78901234567
    kwargs = {"out_dir": tmp_path / "out"} if target == "dir" else {"tarball": tmp_path / f"kp.{target}"}
    assert write_keypoint_files(table, **kwargs) == 50
    source = kwargs.get("out_dir") or kwargs["tarball"]
    frame, report = read_keypoint_files(source, axis_order="auto")
    assert report.malformed == [] and report.files_read == 50
    expected = table.sort_values("image_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(frame, expected, check_exact=True)
    assert frame["kp_nose_x"].iloc[0] == 0.1 + 0.2


def test_tarball_is_deterministic_sorted_and_atomic(tmp_path):
    table = _table(20).sample(frac=1.0, random_state=1)  # unsorted input
    a, b = tmp_path / "a.tar.gz", tmp_path / "b.tar.gz"
    write_keypoint_files(table, tarball=a)
    write_keypoint_files(table, tarball=b)
    assert a.read_bytes() == b.read_bytes()
    with tarfile.open(a) as tar:
        members = tar.getmembers()
    ids = [int(m.name[:-5]) for m in members]
    assert ids == sorted(ids) and all(m.mtime == 0 for m in members)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar.gz", "b.tar.gz"]  # no temp files left


def test_export_to_both_and_null_for_missing_or_low_confidence(tmp_path):
    table = _table(5)
    table.loc[:, "kp_nose_x"] = np.nan
    table.loc[:, "kp_nose_y"] = np.nan
    table.loc[:, "kp_nose_conf"] = np.nan
    table.loc[:, "kp_ear_left_conf"] = 0.1
    n = write_keypoint_files(table, out_dir=tmp_path / "d", tarball=tmp_path / "k.tar", min_confidence=0.5)
    assert n == 5
    first = json.loads((tmp_path / "d" / f"{int(table.image_id.min())}.json").read_text())
    assert list(first) == list(KEYPOINT_NAMES)
    assert first["nose"] == [None, None] and first["ear_left"] == [None, None]
    frame, _ = read_keypoint_files(tmp_path / "k.tar", axis_order="yx")
    assert frame["kp_nose_x"].isna().all() and frame["kp_nose_conf"].isna().all()
    present = frame["kp_eye_left_x"].notna()
    assert frame["kp_eye_left_conf"][present].eq(1.0).all() and frame["kp_eye_left_conf"][~present].isna().all()
    with pytest.raises(ValueError):
        write_keypoint_files(table)


def _bad_files() -> dict[str, object]:
    good = SEED_EXAMPLE
    missing_key = {k: v for k, v in good.items() if k != "ankle_right"}
    return {
        "100.json": good,
        "101.json": "{not json",
        "102.json": missing_key,
        "103.json": {**good, "tail": [1, 2]},
        "104.json": {**good, "nose": [1.0]},
        "105.json": {**good, "nose": ["a", 2]},
        "106.json": [1, 2, 3],
        "notanid.json": good,
        "readme.txt": "ignored, not a json file",
    }


def test_malformed_and_missing_files_are_reported_not_fatal(tmp_path):
    _write_raw(tmp_path / "kp", _bad_files())
    frame, report = read_keypoint_files(tmp_path / "kp", image_ids=None)
    assert frame["image_id"].tolist() == [100]
    assert report.files_seen == 8 and report.files_read == 1
    reasons = dict(report.malformed)
    assert set(reasons) == {"101.json", "102.json", "103.json", "104.json", "105.json", "106.json", "notanid.json"}
    assert "invalid JSON" in reasons["101.json"]
    assert "missing keys ankle_right" in reasons["102.json"]
    assert "unexpected keys tail" in reasons["103.json"]
    assert "not a pair" in reasons["104.json"]
    assert "non-numeric" in reasons["105.json"]
    assert "not an object" in reasons["106.json"]
    summary = report.to_dict()
    assert summary["n_malformed"] == 7
    json.dumps(summary)


def test_image_ids_filter_reports_missing_and_streams_tar_once(tmp_path):
    table = _table(30)
    tar_path = tmp_path / "kp.tar.gz"
    write_keypoint_files(table, tarball=tar_path)
    wanted = [int(table.image_id.iloc[3]), int(table.image_id.iloc[7]), 999_999_999]
    frame, report = read_keypoint_files(tar_path, image_ids=wanted)
    assert sorted(frame["image_id"].tolist()) == sorted(wanted[:2])
    assert report.missing_ids == [999_999_999]
    assert report.files_seen == 30 and report.files_read == 2
    # a directory gives the same answer
    write_keypoint_files(table, out_dir=tmp_path / "d")
    frame_dir, report_dir = read_keypoint_files(tmp_path / "d", image_ids=wanted)
    pd.testing.assert_frame_equal(frame, frame_dir)
    assert report_dir.missing_ids == [999_999_999]


def test_malformed_member_inside_tar(tmp_path):
    src = tmp_path / "src"
    _write_raw(src, _bad_files())
    tar_path = tmp_path / "bad.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(src, arcname="keypoints")  # nested folder inside the archive
    frame, report = read_keypoint_files(tar_path)
    assert frame["image_id"].tolist() == [100]
    assert len(report.malformed) == 7
    assert any(name.endswith("keypoints/101.json") for name, _ in report.malformed)


def test_duplicate_ids_keep_first(tmp_path):
    _write_raw(tmp_path / "kp" / "a", {"7.json": SEED_EXAMPLE})
    _write_raw(tmp_path / "kp" / "b", {"7.json": SEED_EXAMPLE})
    frame, report = read_keypoint_files(tmp_path / "kp")
    assert len(frame) == 1 and report.malformed[0][1].startswith("duplicate image id")


def test_folder_fingerprint_notices_a_file_edited_in_place(tmp_path):
    import os

    folder = tmp_path / "kp"
    _write_raw(folder, {"1.json": SEED_EXAMPLE, "2.json": SEED_EXAMPLE})
    (folder / "sub").mkdir()
    _write_raw(folder / "sub", {"3.json": SEED_EXAMPLE})
    folder_stat = os.stat(folder)
    before = source_fingerprint(folder)
    assert before["files"] == 3 and source_fingerprint(folder) == before  # nothing changed: same
    # Edit one file in place, same size: the folder's own mtime does not move, the file's does.
    edited = folder / "sub" / "3.json"
    st = edited.stat()
    edited.write_text(json.dumps({**SEED_EXAMPLE, "nose": [176.9, 256.0]}))
    assert edited.stat().st_size == st.st_size
    os.utime(edited, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # coarse clocks: make the tick visible
    os.utime(folder, ns=(folder_stat.st_atime_ns, folder_stat.st_mtime_ns))
    after = source_fingerprint(folder)
    assert after["files"] == 3 and after != before
    # A temporary file of an atomic write in progress is no keypoint file.
    (folder / ".4.json.tmp-0123abcd").write_text("{")
    assert source_fingerprint(folder) == after


def test_tarball_fingerprint_is_its_size_and_mtime(tmp_path):
    tarball = tmp_path / "kp.tar"
    write_keypoint_files(_table(3), tarball=tarball)
    fp = source_fingerprint(tarball)
    assert fp["size"] == tarball.stat().st_size and fp["mtime_ns"] == tarball.stat().st_mtime_ns
    with pytest.raises(FileNotFoundError):
        source_fingerprint(tmp_path / "missing")


def test_keypoints_for_ids_in_the_asked_order_with_a_status_for_ids_without_a_file():
    published = synthetic_poses(3, seed=0, outlier_fraction=0.0, missing_fraction=0.0)[["image_id", *KEYPOINT_COLUMNS]]
    rows = keypoints_for_ids(published, np.array([2, 9, 0]), '{"fp":1}')
    assert rows["image_id"].tolist() == [2, 9, 0]
    assert rows["status"].tolist() == ["ok", "no_keypoint_file", "ok"]
    assert rows.loc[0, "kp_nose_x"] == published.loc[2, "kp_nose_x"]
    assert rows.loc[1, list(KEYPOINT_COLUMNS)].isna().all()
    assert rows["backend"].eq("keypoint_files").all() and rows["backend_fingerprint"].eq('{"fp":1}').all()
    nothing = keypoints_for_ids(None, np.array([5]), "fp")  # no import for this shard
    assert nothing["status"].tolist() == ["no_keypoint_file"]



def _dot_centres(image, colour) -> tuple[float, float]:
    """Centroid (x, y) of the pixels near ``colour``."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.int32)
    near = (np.abs(pixels - np.array(colour)).sum(axis=2) < 60)
    ys, xs = np.nonzero(near)
    return float(xs.mean()), float(ys.mean())


@pytest.mark.parametrize("size", [(900, 600), (640, 1024), (300, 200), (512, 512)])
def test_published_keypoints_move_from_the_512px_frame_to_the_indexed_image(tmp_path, size):
    """Points drawn at known places in an original (one dot per keypoint, each on its own
    canvas so no dot hides another); the 512px copy made by the release's recipe; each
    keypoint read off that copy (as the seed's estimator saw it), published [y, x]; stored in
    the original's frame when original/ is indexed, unchanged when 512px/ is."""
    from PIL import Image, ImageDraw

    from danbooru_assets.pose.coco import KEYPOINT_NAMES
    from danbooru_assets_tests.dataset.releases import to_512px

    w, h = size
    rng = np.random.default_rng(w * h)
    truth = np.stack([rng.uniform(0.1 * w, 0.9 * w, 17), rng.uniform(0.1 * h, 0.9 * h, 17)], axis=1)
    colours = [(int(c[0]), int(c[1]), int(c[2])) for c in rng.integers(40, 255, (17, 3))]
    radius = max(w, h) / 512 * 4  # a dot still a few pixels wide in the 512 copy
    published = {}
    for k, (x, y) in enumerate(truth):
        single = Image.new("RGB", (w, h), (0, 0, 0))
        ImageDraw.Draw(single).ellipse([x - radius, y - radius, x + radius, y + radius], fill=colours[k])
        px, py = _dot_centres(to_512px(single), colours[k])  # where the estimator saw it
        published[KEYPOINT_NAMES[k]] = [py, px]  # the seed's files: [y, x]
    folder = tmp_path / "kp"
    folder.mkdir()
    (folder / "7.json").write_text(json.dumps(published))
    table, _ = read_keypoint_files(folder, axis_order="yx")

    in_original = keypoints_for_ids(table, np.array([7]), "fp", "512px", (np.array([w]), np.array([h])), "original")
    got = in_original[[f"kp_{n}_{a}" for n in KEYPOINT_NAMES for a in "xy"]].to_numpy().reshape(17, 2)
    scale = max(w, h) / 512 if max(w, h) > 512 else 1.0
    assert np.abs(got - truth).max() <= 1.0 * scale + 0.6  # a 512-frame pixel, in the original's pixels

    in_512 = keypoints_for_ids(table, np.array([7]), "fp", "512px", (np.array([512]), np.array([512])), "512px")
    got = in_512[[f"kp_{n}_{a}" for n in KEYPOINT_NAMES for a in "xy"]].to_numpy().reshape(17, 2)
    seen = np.array([[published[n][1], published[n][0]] for n in KEYPOINT_NAMES])  # the 512px file's own pixels
    assert np.allclose(got, seen)

    as_image = keypoints_for_ids(table, np.array([7]), "fp", "image")  # no frame change at all
    got = as_image[[f"kp_{n}_{a}" for n in KEYPOINT_NAMES for a in "xy"]].to_numpy().reshape(17, 2)
    assert np.allclose(got, seen)


def test_unknown_size_gives_no_keypoints_rather_than_wrong_ones():
    from danbooru_assets.pose.keypoint_files import release_frame_to_image

    xy = np.full((2, 17, 2), 256.0)
    out = release_frame_to_image(xy, np.array([1024, 0]), np.array([512, 0]))
    assert np.allclose(out[0, :, 0], 512) and np.allclose(out[0, :, 1], 256)  # 2x, offset 128 in y
    assert np.isnan(out[1]).all()
