"""The pose stage's assets end to end on generated sample data, on the CPU."""

import pandas as pd
import pytest

from danbooru_assets.devtools.sample_data import read_ground_truth


@pytest.fixture(scope="module")
def posed(pipeline):
    pipeline.run_through("pose", keep_all=True)
    return pipeline


def _all(pipeline, asset):
    return pd.concat([pipeline.table(asset, s) for s in pipeline.shards], ignore_index=True)


def test_imported_keypoints_are_stored_x_right_y_down_in_original_pixels(posed):
    keypoints = _all(posed, "pose_keypoints")
    truth = read_ground_truth(posed.root).set_index("image_id")
    ok = keypoints.loc[keypoints["status"] == "ok"].set_index("image_id")
    assert len(ok) >= 10
    common = ok.index.intersection(truth.index[truth["has_published_keypoints"]])
    assert len(common) >= 10  # the comparison below runs on real rows
    # The tarball is (row, col) like bizarre-pose-estimator; the table is (x, y) = truth ± jitter.
    for name in ("nose", "hip_left", "ankle_right"):
        for axis in ("x", "y"):
            col = f"kp_{name}_{axis}"
            diff = (ok.loc[common, col] - truth.loc[common, col]).abs()
            assert diff.max() <= 5.0, (col, diff.max())
    assert (ok["backend"] == "keypoint_files").all()


def test_malformed_keypoint_files_are_reported_not_fatal(posed):
    result = posed.materialize(["published_keypoints"])
    meta = posed.metadata(result, "published_keypoints")
    assert meta["malformed"] == 2
    assert meta["axis_order"] == "yx"
    missing = _all(posed, "pose_keypoints")
    assert (missing["status"] == "no_keypoint_file").any()


def test_pose_keypoints_are_reused_incrementally(posed):
    shard = max(posed.shards, key=lambda s: len(posed.table("pose_keypoints", s)))
    result = posed.materialize(["pose_keypoints"], shard)
    meta = posed.metadata(result, "pose_keypoints")
    assert meta["images"] > 0  # a shard with images: reusing nothing of nothing proves nothing
    assert meta["estimated"] == 0 and meta["reused"] == meta["images"]


def test_statistics_and_subset_carry_plots_reasons_and_skeleton_sheets(posed):
    result = posed.materialize(["pose_statistics"])
    meta = posed.metadata(result, "pose_statistics")
    assert "data:image/png;base64," in meta["hip_midpoint_scatter"]
    shard = max(posed.shards, key=lambda s: len(posed.table("pose_keypoints", s)))
    result = posed.materialize(["pose_subset"], shard)
    meta = posed.metadata(result, "pose_subset")
    subset = posed.table("pose_subset", shard)
    assert len(subset) > 0 and subset["keep"].any() and not subset["keep"].all()
    assert meta["rows"] == len(subset) and meta["kept"] == int(subset["keep"].sum())
    assert set(subset.loc[subset["keep"], "drop_reasons"]) == {""}
    assert any(k.endswith("_examples") for k in meta)


def test_pose_rule_change_from_run_config(posed):
    shard = posed.shards[0]
    before = posed.table("pose_subset", shard)
    assert before["keep"].any()  # so "nothing passes" below is the new rules' doing
    # Every required keypoint 49% of the frame away from each border, a torso the image's height: nothing passes.
    strict = {"ops": {"pose_subset": {"config": {"rules": {"margin": -0.49, "min_torso_length": 1.0}}}}}
    result = posed.materialize(["pose_subset"], shard, strict)
    after = posed.table("pose_subset", shard)
    assert len(after) == len(before)
    assert not after["keep"].any()
    assert posed.metadata(result, "pose_subset")["settings_source"] == "run config"


def test_model_backend_runs_batched_on_cpu_and_stores_original_pixels(posed):
    """keypoint_rcnn with random weights (no download): the real model path, end to end."""
    from danbooru_assets.orchestration.resources import PoseEstimatorResource

    subset_sizes = {s: int(posed.table("clip_subset", s)["kept"].sum()) for s in posed.shards}
    shard = min((s for s in posed.shards if subset_sizes[s]), key=subset_sizes.get)
    files_backend = posed.resources["pose_estimator"]
    posed.resources["pose_estimator"] = PoseEstimatorResource(
        backend="keypoint_rcnn", allow_random_weights=True, input_size=128, batch_size=4, device="cpu"
    )
    try:
        result = posed.materialize(["pose_keypoints"], shard)
        meta = posed.metadata(result, "pose_keypoints")
        # another backend fingerprint: nothing is reused, every kept image is estimated
        assert meta["backend"] == "keypoint_rcnn" and meta["estimated"] == subset_sizes[shard] and meta["reused"] == 0
        table = posed.table("pose_keypoints", shard)
        assert set(table["status"]) <= {"ok", "no_person", "unreadable"}
        ok = table.loc[table["status"] == "ok"]
        assert len(ok) > 0  # random weights still detect (low box threshold): the checks below see rows
        # boxes come back scaled to original pixels (decoded near 128 px, originals >= 256 px)
        assert (ok["box_x1"] <= ok["width"] + 1).all() and (ok["box_y1"] <= ok["height"] + 1).all()
        assert (ok[["box_x1", "box_y1"]].max(axis=1) > 128).any()
        result = posed.materialize(["pose_keypoints"], shard)
        assert posed.metadata(result, "pose_keypoints")["estimated"] == 0
    finally:
        posed.resources["pose_estimator"] = files_backend
        posed.materialize(["pose_keypoints"], shard)


def test_a_replaced_image_is_estimated_again_the_others_reused(posed):
    import io

    from PIL import Image

    shard = max(posed.shards, key=lambda s: int(posed.table("clip_subset", s)["kept"].sum()))
    keypoints = posed.table("pose_keypoints", shard)
    index = posed.table("shard_index", shard).set_index("image_id")
    image_id = int(keypoints["image_id"].iloc[0])
    path = posed.resources["dataset"].image_path(index.loc[image_id, "rel_path"])
    original = path.read_bytes()
    # The same picture saved again: same id, same size in pixels, another file.
    buf = io.BytesIO()
    Image.open(io.BytesIO(original)).convert("RGB").save(buf, format="JPEG", quality=40)
    assert len(buf.getvalue()) != len(original)
    stages = ["shard_index", "metadata_prefilter", "clip_embeddings", "image_stats", "clip_scores", "clip_subset",
              "pose_keypoints"]
    try:
        path.write_bytes(buf.getvalue())
        result = posed.materialize(stages, shard)
        meta = posed.metadata(result, "pose_keypoints")
        assert meta["estimated"] == 1 and meta["reused"] == meta["images"] - 1 == len(keypoints) - 1
        after = posed.table("pose_keypoints", shard).set_index("image_id")
        assert after.loc[image_id, "file_bytes"] == len(buf.getvalue())
        untouched = keypoints.loc[keypoints["image_id"] != image_id, "image_id"]
        assert len(untouched) > 0
        assert (after.loc[untouched, "file_bytes"].to_numpy() == keypoints.set_index("image_id").loc[untouched, "file_bytes"].to_numpy()).all()
    finally:
        path.write_bytes(original)
        posed.materialize(stages, shard)


def test_a_keypoint_file_edited_in_place_is_imported_again(posed, tmp_path):
    import json
    import os
    import tarfile

    from danbooru_assets.orchestration.resources import PoseEstimatorResource

    shard = max(posed.shards, key=lambda s: int((posed.table("pose_keypoints", s)["status"] == "ok").sum()))
    ok = posed.table("pose_keypoints", shard)
    image_id = int(ok.loc[ok["status"] == "ok", "image_id"].iloc[0])
    folder = tmp_path / "keypoints"
    with tarfile.open(posed.resources["pose_estimator"].keypoint_files) as tar:
        tar.extractall(folder, filter="data")
    edited = next(folder.rglob(f"{image_id}.json"))
    files_backend = posed.resources["pose_estimator"]
    posed.resources["pose_estimator"] = PoseEstimatorResource(keypoint_files=str(folder), axis_order="yx", keypoint_frame="image")
    try:
        posed.materialize(["published_keypoints"])
        posed.materialize(["pose_keypoints"], shard)
        nose_x = posed.table("pose_keypoints", shard).set_index("image_id").loc[image_id, "kp_nose_x"]
        # Edit the file in place: the nose moves 7 px to the right (the file is (row, col)).
        data = json.loads(edited.read_text())
        data["nose"] = [data["nose"][0], data["nose"][1] + 7.0]
        st = edited.stat()
        edited.write_text(json.dumps(data))
        os.utime(edited, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a tick coarse clocks see
        # pose_keypoints alone would store the old import under the new files' fingerprint: refused.
        with pytest.raises(Exception, match="changed since published_keypoints imported them"):
            posed.materialize(["pose_keypoints"], shard)
        posed.materialize(["published_keypoints"])
        result = posed.materialize(["pose_keypoints"], shard)
        assert posed.metadata(result, "pose_keypoints")["estimated"] > 0
        moved = posed.table("pose_keypoints", shard).set_index("image_id").loc[image_id, "kp_nose_x"]
        assert moved == pytest.approx(nose_x + 7.0)
    finally:
        posed.resources["pose_estimator"] = files_backend
        posed.materialize(["published_keypoints"])
        posed.materialize(["pose_keypoints"], shards=posed.shards)


def test_a_skipped_density_rule_is_said(posed):
    import json

    from danbooru_assets.core.tables import write_parquet

    shard = posed.shards[0]
    result = posed.materialize(["pose_subset"], shard)
    assert posed.metadata(result, "pose_subset")["density_rule"] == "applied"
    statistics = posed.table("pose_statistics")
    stats = json.loads(statistics["statistics_json"].iloc[0])
    stats["density"]["hip_mid"]["n"] = 0  # as if no pose had hips to learn the region from
    write_parquet(posed.storage.asset_path("pose_statistics"), statistics.assign(statistics_json=json.dumps(stats)))
    try:
        result = posed.materialize(["pose_subset"], shard)
        rule = posed.metadata(result, "pose_subset")["density_rule"]
        assert rule.startswith("skipped") and "hip_midpoint_outlier not checked" in rule
        assert "shoulder_midpoint_outlier" not in rule
    finally:
        posed.materialize(["pose_statistics"])
        posed.materialize(["pose_subset"], shard)


def test_one_shard_after_a_dedup_change_fails_naming_what_to_launch(posed):
    """pose_subset never silently uses a near_duplicates older than the dedup settings:
    the run fails naming the job, and the shard's table stays as it was."""
    from danbooru_assets.settings import CurationSettings, save_settings, set_setting

    shard = posed.shards[0]
    before = posed.table("pose_subset", shard)
    save_settings(posed.settings_path, set_setting(CurationSettings(), "dedup.threshold", "0.9"))
    try:
        with pytest.raises(Exception, match="near_duplicates_job") as failed:
            posed.materialize(["pose_subset"], shard)
        assert "dedup changed" in str(failed.value)
        assert posed.table("pose_subset", shard).equals(before)
        posed.materialize(["near_duplicates"])
        posed.materialize(["pose_subset"], shard)  # current now: it runs
    finally:
        posed.settings_path.unlink(missing_ok=True)
        posed.materialize(["near_duplicates"])
        posed.materialize(["pose_subset"], shard)


def test_a_zero_byte_pose_table_is_set_aside_and_recomputed(posed):
    """Issue 20 (5): a zero-byte pose_keypoints/<shard>.parquet failed every run."""
    shard = posed.shards[1]
    path = posed.storage.asset_path("pose_keypoints", shard)
    before = posed.table("pose_keypoints", shard)
    path.write_bytes(b"")
    result = posed.materialize(["pose_keypoints"], shard)
    meta = posed.metadata(result, "pose_keypoints")
    assert meta["damaged_tables_set_aside"] == 1 and str(path) in meta["damaged_tables"]
    assert meta["estimated"] == meta["images"] == len(before) and meta["reused"] == 0
    pd.testing.assert_frame_equal(posed.table("pose_keypoints", shard), before)
    moved = [p for p in path.parent.iterdir() if p.name.startswith(f"{path.name}.damaged-")]
    assert len(moved) == 1 and moved[0].stat().st_size == 0  # kept, never deleted
    moved[0].unlink()


def test_pose_keypoints_keeps_the_shards_that_succeeded_when_one_fails(posed):
    """Issue 19: keep_on_failure for pose_keypoints, through the asset (StageRun.keep)."""
    # Two neighbouring shards with keypoints: one run covers both (a range).
    shards = sorted(posed.shards)
    pairs = [(a, b) for a, b in zip(shards, shards[1:]) if int(b) == int(a) + 1]
    good, bad = max(pairs, key=lambda p: min(len(posed.table("pose_keypoints", s)) for s in p))
    assert len(posed.table("pose_keypoints", good)) > 0
    subset_path = posed.storage.asset_path("clip_subset", bad)
    kept_path = posed.storage.asset_path("pose_keypoints", good)
    saved, before = subset_path.read_bytes(), posed.table("pose_keypoints", good)
    try:
        subset_path.write_bytes(b"")  # one shard's input is damaged: that shard fails
        kept_path.unlink()
        with pytest.raises(Exception, match="1 of 2 shards failed"):
            posed.materialize(["pose_keypoints"], shards=sorted([good, bad]))
        assert kept_path.exists()  # the other shard's table was stored anyway
        assert posed.table("pose_keypoints", good).equals(before)
    finally:
        subset_path.write_bytes(saved)
        if not kept_path.exists():
            posed.materialize(["pose_keypoints"], good)
