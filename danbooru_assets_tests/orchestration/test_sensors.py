import os
from pathlib import Path

import dagster as dg
import pytest

from danbooru_assets.orchestration.assets.index import danbooru_metadata, shard_index
from danbooru_assets.orchestration.io_manager import ParquetIOManagerFactory
from danbooru_assets.orchestration.partitions import RANGE_END_TAG, RANGE_START_TAG, range_tags
from danbooru_assets.orchestration.resources import DanbooruDatasetResource, StorageResource
from danbooru_assets.orchestration.sensors import build_new_data_sensor
from danbooru_assets_tests.conftest import jpeg_bytes

shard_job = dg.define_asset_job("shard_job", selection=[shard_index])
metadata_job = dg.define_asset_job("metadata_job", selection=[danbooru_metadata])
ingest_job = dg.define_asset_job("ingest_job", selection=[shard_index])
sensor = build_new_data_sensor(shard_job, metadata_job, ingest_job, required_global=["clip_threshold"])


def _definitions(dataset, storage) -> dg.Definitions:
    return dg.Definitions(
        assets=[danbooru_metadata, shard_index],
        jobs=[shard_job, metadata_job, ingest_job],
        sensors=[sensor],
        resources={"dataset": dataset, "storage": storage, "io_manager": ParquetIOManagerFactory(storage=storage)},
    )


def _tick(instance, dataset, cursor, storage=None):
    storage = storage or StorageResource(base_path="memory://sensor-test")
    ctx = dg.build_sensor_context(
        instance=instance,
        cursor=cursor,
        resources={"dataset": dataset, "storage": storage},
        definitions=_definitions(dataset, storage),
    )
    result = sensor.evaluate_tick(ctx)
    return result.run_requests or [], result.cursor, result.skip_message


def _ranges(requests) -> list[tuple[str, str]]:
    return [(r.tags[RANGE_START_TAG], r.tags[RANGE_END_TAG]) for r in requests]


def test_sensor_converts_metadata_first_then_requests_each_changed_shard(mini_dataset: Path, tmp_path: Path):
    instance = dg.DagsterInstance.ephemeral()
    dataset = DanbooruDatasetResource(root=str(mini_dataset))
    storage = StorageResource(base_path=str(tmp_path / "store"))

    requests, cursor, _ = _tick(instance, dataset, None)
    assert [r.job_name for r in requests] == ["metadata_job"]
    # Until the conversion lands, the sensor waits instead of indexing against old metadata.
    requests, cursor, skip = _tick(instance, dataset, cursor)
    assert requests == [] and "waiting" in skip

    dg.materialize(
        [danbooru_metadata],
        instance=instance,
        resources={"dataset": dataset, "storage": storage, "io_manager": ParquetIOManagerFactory(storage=storage)},
    )
    requests, cursor, _ = _tick(instance, dataset, cursor, storage)
    assert _ranges(requests) == [("0001", "0002")]  # one run for the contiguous range
    # No global threshold yet: only the first (ingest) stage can run for a shard.
    assert {r.job_name for r in requests} == {"ingest_job"}
    instance.report_runless_asset_event(dg.AssetMaterialization("clip_threshold"))

    requests, cursor, skip = _tick(instance, dataset, cursor, storage)
    assert requests == [] and "no change" in skip

    # New image lands in shard 0002 only: one run, for that shard.
    new_file = mini_dataset / "original" / "0002" / "8002.jpg"
    new_file.write_bytes(jpeg_bytes())
    # Move the folder's mtime forward explicitly: a coarse-mtime filesystem must not hide the change.
    later = new_file.parent.stat().st_mtime_ns + 10_000_000
    os.utime(new_file.parent, ns=(later, later))
    requests, cursor, _ = _tick(instance, dataset, cursor, storage)
    assert _ranges(requests) == [("0002", "0002")]
    assert requests[0].job_name == "shard_job"  # the global assets exist now: every stage
    # A brand-new shard folder is picked up too.
    (mini_dataset / "original" / "0777").mkdir()
    (mini_dataset / "original" / "0777" / "1777.jpg").write_bytes(jpeg_bytes())
    requests, cursor, _ = _tick(instance, dataset, cursor, storage)
    assert _ranges(requests) == [("0777", "0777")]


def test_sensor_skips_with_reason_when_root_is_missing(tmp_path: Path):
    dataset = DanbooruDatasetResource(root=str(tmp_path / "nowhere"))
    requests, _, skip = _tick(dg.DagsterInstance.ephemeral(), dataset, None)
    assert requests == [] and "DANBOORU_ROOT" in skip


def test_first_tick_on_a_processed_dataset_requests_only_what_changed(mini_dataset: Path, tmp_path: Path):
    """A sensor turned on over a dataset that `danbooru-assets run` already processed
    compares each shard folder with its stored shard_index: only real changes run."""
    instance = dg.DagsterInstance.ephemeral()
    dataset = DanbooruDatasetResource(root=str(mini_dataset))
    storage = StorageResource(base_path=str(tmp_path / "store"))
    resources = {"dataset": dataset, "storage": storage, "io_manager": ParquetIOManagerFactory(storage=storage)}
    dg.materialize([danbooru_metadata], instance=instance, resources=resources)
    dg.materialize([danbooru_metadata, shard_index], selection=[shard_index], instance=instance,
                   resources=resources, tags=range_tags("0001", "0002"))
    instance.report_runless_asset_event(dg.AssetMaterialization("clip_threshold"))

    requests, cursor, skip = _tick(instance, dataset, None, storage)
    assert requests == [] and "no change in 2 shards" in skip

    # A file replaced in 0001 while the sensor was off, seen on a fresh cursor:
    (mini_dataset / "original" / "0001" / "1001.jpg").write_bytes(jpeg_bytes((48, 32)))
    requests, _, _ = _tick(instance, dataset, None, storage)
    assert _ranges(requests) == [("0001", "0001")] and requests[0].job_name == "shard_job"


def test_settings_sensor_tick_names_the_broken_file_and_line(tmp_path):
    from danbooru_assets.orchestration.resources import SettingsResource
    from danbooru_assets.orchestration.sensors import settings_sensor

    path = tmp_path / "settings.yaml"
    path.write_text("clip:\n  keep_fraction: [1\n")
    context = dg.build_sensor_context(resources={"settings": SettingsResource(path=str(path))})
    with pytest.raises(dg.DagsterError) as exc:  # Dagster reports its own errors as the tick's message
        settings_sensor.evaluate_tick(context)
    assert str(exc.value).startswith(f"settings file {path}: not valid YAML at line 2 ('keep_fraction: [1')")
    path.write_text("clip:\n  keep_fraction: 0.3\n")
    # A tick that observes reads the instance (the sections' last data versions): give it one.
    with dg.DagsterInstance.ephemeral() as instance:
        context = dg.build_sensor_context(instance=instance, resources={"settings": SettingsResource(path=str(path))})
        observed = {e.asset_key.to_user_string() for e in settings_sensor.evaluate_tick(context).asset_events}
        # Every section is observed on the first tick (its data version: the section's hash).
        assert {k for k in observed if k.startswith("settings_")} == {
            f"settings_{s}" for s in ("prompts", "clip_threshold", "image_rules", "prefilter", "pose_rules", "dedup",
                                      "quality")}


@pytest.mark.slow
def test_settings_sensor_tick_message_under_the_daemon(tmp_path):
    """The same, the way users see it: a real daemon's failed tick, read from the webserver."""
    import time

    from danbooru_assets.devtools.local_dagster import LocalDagster

    settings = tmp_path / "settings.yaml"
    settings.write_text("clip:\n  keep_fraction: [1\n")
    env = {"DANBOORU_SETTINGS": str(settings), "DANBOORU_ROOT": str(tmp_path / "none"),
           "DANBOORU_STORAGE": str(tmp_path / "storage"), "DANBOORU_LABELS": str(tmp_path / "labels.sqlite")}
    with LocalDagster(tmp_path / "home", env=env, cwd=Path.cwd()) as dagster:
        deadline = time.monotonic() + 300  # the sensor runs by default, every 30 s; this only bounds a hang
        while not (failed := [t for t in dagster.sensor_ticks("settings_sensor") if t["status"] == "FAILURE"]):
            assert time.monotonic() < deadline, f"no failed tick\n{dagster.log_tails()}"
            time.sleep(2)
        assert failed[0]["error"]["message"].startswith(
            f"danbooru_assets.orchestration.sensors.SettingsFileInvalid: settings file {settings}: not valid YAML at line 2"
        )
