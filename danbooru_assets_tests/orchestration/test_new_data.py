"""New data end to end: what the new-data sensor runs for a changed shard (``shard_job``)
deduplicates a new image against everything kept before pose_subset takes it."""

import json
import shutil

import pandas as pd
import pytest

from danbooru_assets import config
from danbooru_assets.definitions import SHARD_JOB_ASSETS, defs
from danbooru_assets_tests.conftest import Pipeline

SHARD_JOB = [key.to_user_string() for asset in SHARD_JOB_ASSETS for key in asset.keys]


@pytest.fixture(scope="module")
def processed(tmp_path_factory) -> Pipeline:
    pipe = Pipeline(tmp_path_factory.mktemp("new_data"), n_images=60, n_shards=3)
    pipe.settings_path.write_text("clip:\n  keep_fraction: 1.0\n")
    pipe.run_through("pose")
    pipe.materialize(["quality_model"])  # no labels yet: the global assets shard_job needs all exist
    return pipe


def _arrive_as_copy(pipe: Pipeline, source_id: int, shard: str) -> int:
    """A byte-identical copy of ``source_id``'s file lands in ``shard`` under a new id, with
    its own metadata line (same md5), the way a re-upload arrives in a new release."""
    meta_dir = pipe.root / "metadata"
    records = []
    for f in sorted(meta_dir.iterdir()):
        for line in f.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:  # the sample's planted bad lines
                continue
    source = next(r for r in records if int(r["id"]) == source_id)
    taken = {int(r["id"]) for r in records}
    new_id = next(i for i in range(source_id + 1000, 10**8, 1000) if i not in taken)
    folder = pipe.root / "original" / shard
    source_file = next(folder.glob(f"{source_id}.*"))
    shutil.copyfile(source_file, folder / f"{new_id}{source_file.suffix}")
    # A file of its own: the sample's last file ends in a truncated line on purpose.
    (meta_dir / "posts000000000001.json").write_text(json.dumps({**source, "id": new_id, "parent_id": None}) + "\n")
    return new_id


def test_a_copy_arriving_as_new_data_is_flagged_before_pose_subset(processed: Pipeline):
    pipe = processed
    assert SHARD_JOB.index("clip_subset") < SHARD_JOB.index("near_duplicates") < SHARD_JOB.index("pose_subset")
    kept = pipe.table("near_duplicates")
    kept_ids = set(kept.loc[kept["kept"], "image_id"])
    source_id, shard = next(
        (int(i), s) for s in pipe.shards
        for i in (lambda ix: ix.loc[ix["md5"].notna(), "image_id"])(pipe.table("shard_index", s)) if i in kept_ids
    )
    new_id = _arrive_as_copy(pipe, source_id, shard)

    # What the sensor requests: the metadata conversion, then shard_job over the changed shard.
    pipe.materialize(["danbooru_metadata"])
    pipe.materialize(SHARD_JOB, shards=[shard])

    table = pipe.table("near_duplicates").set_index("image_id")
    assert not table.loc[new_id, "kept"], "the copy was not flagged"
    # The same bytes: the file hash is the first signal that ties them (the md5 agrees too).
    assert table.loc[new_id, "kind"] == "file_hash" and table.loc[new_id, "duplicate_of"] == source_id
    assert table.loc[source_id, "kept"]
    pose = pipe.table("pose_subset", shard).set_index("image_id")
    assert not pose.loc[new_id, "keep"]
    assert "duplicate" in pose.loc[new_id, "drop_reasons"].split("|")


def test_new_data_sensor_is_on_by_default_every_30_s(monkeypatch):
    import dagster as dg

    monkeypatch.delenv("DANBOORU_SENSOR_INTERVAL_S", raising=False)
    sensor = defs.resolve_sensor_def("new_data_sensor")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert config.sensor_interval_s() == 30


def test_images_without_a_keypoint_file_are_counted_then_estimated_by_the_fallback(processed: Pipeline):
    """With published keypoint files, a new image that has none is counted and named on
    pose_keypoints' materialization; with a fallback backend configured, a model
    estimates exactly those images (rows say which backend) and the rest stay the files'."""
    from danbooru_assets.orchestration.resources import PoseEstimatorResource

    pipe = processed
    shard = next(s for s in pipe.shards if (pipe.table("pose_keypoints", s)["status"] == "no_keypoint_file").any())
    before = pipe.table("pose_keypoints", shard)
    missing = set(before.loc[before["status"] == "no_keypoint_file", "image_id"])
    meta = pipe.metadata(pipe.materialize(["pose_keypoints"], shards=[shard]), "pose_keypoints")
    assert meta["no_keypoint_file"] == len(missing) and meta["fallback_estimated"] == 0
    assert f"{len(missing)} kept images have no keypoint file" in meta["no_keypoint_file_note"]
    assert "DANBOORU_POSE_FALLBACK" in meta["no_keypoint_file_note"]

    files = pipe.resources["pose_estimator"]
    pipe.resources["pose_estimator"] = PoseEstimatorResource(
        keypoint_files=files.keypoint_files, keypoint_frame=files.keypoint_frame, fallback_backend="keypoint_rcnn",
        allow_random_weights=True,
        input_size=128, batch_size=4, device="cpu",
    )
    try:
        meta = pipe.metadata(pipe.materialize(["pose_keypoints"], shards=[shard]), "pose_keypoints")
    finally:
        pipe.resources["pose_estimator"] = files
    after = pipe.table("pose_keypoints", shard).set_index("image_id")
    assert meta["fallback_backend"] == "keypoint_rcnn" and "no_keypoint_file_note" not in meta
    assert meta["no_keypoint_file"] == 0 and meta["fallback_estimated"] == len(missing)
    assert set(after.index[after["backend"] == "keypoint_rcnn"]) == missing
    assert (after.loc[list(missing), "status"] != "no_keypoint_file").all()
    # The images that have a file keep the file's keypoints.
    has_file = before.loc[before["status"] == "ok"].set_index("image_id")
    assert (after.loc[has_file.index, "backend"] == "keypoint_files").all()
    assert (after.loc[has_file.index, "status"] == "ok").all()
