"""Sensors: new images or metadata in the dataset folder start runs for what changed."""


import json

import dagster as dg

from danbooru_assets.dataset import DanbooruDatasetResource
from danbooru_assets.labels.store import LabelStoreResource
from danbooru_assets.settings import SettingsResource

NEW_DATA_SENSOR_INTERVAL_S = 300
METADATA_ASSET = dg.AssetKey("danbooru_metadata")


def converted_metadata_fingerprint(instance: dg.DagsterInstance) -> str | None:
    """The metadata fingerprint recorded by the latest ``danbooru_metadata`` materialization."""
    event = instance.get_latest_materialization_event(METADATA_ASSET)
    if event is None or event.asset_materialization is None:
        return None
    value = event.asset_materialization.metadata.get("metadata_fingerprint")
    return getattr(value, "value", None)


def build_new_data_sensor(
    shard_job, metadata_job, first_stage_job=None, required_global: list[str] = ()
) -> dg.SensorDefinition:
    """``shard_job`` runs for each changed shard; while any of the ``required_global``
    assets (a threshold, a statistic) has never been materialized, ``first_stage_job``
    runs instead, so a fresh deployment ingests without failing downstream."""
    jobs = [shard_job, metadata_job] + ([first_stage_job] if first_stage_job is not None else [])

    @dg.sensor(
        name="new_data_sensor",
        jobs=jobs,
        minimum_interval_seconds=NEW_DATA_SENSOR_INTERVAL_S,
        default_status=dg.DefaultSensorStatus.STOPPED,
        description="Fingerprints every shard folder (file count, newest mtime) and the metadata "
        "files. Changed metadata: one conversion run first, then every shard once it has landed. "
        "Changed shard folders: one run per changed shard. The cursor holds the fingerprints.",
    )
    def new_data_sensor(context: dg.SensorEvaluationContext, dataset: DanbooruDatasetResource):
        cursor = json.loads(context.cursor) if context.cursor else {}
        shards_seen: dict = cursor.get("shards", {})
        if not dataset.root_path.is_dir():
            return dg.SkipReason(f"dataset root {dataset.root_path} does not exist (set DANBOORU_ROOT)")

        metadata_fp = dataset.metadata_fingerprint()
        if metadata_fp != cursor.get("metadata_indexed"):
            # Shard indexes join the metadata slices, so they wait until the new
            # conversion has landed; re-index every shard then.
            if converted_metadata_fingerprint(context.instance) != metadata_fp:
                if cursor.get("metadata_requested") == metadata_fp:
                    return dg.SkipReason("waiting for the metadata conversion run to finish")
                context.update_cursor(json.dumps({**cursor, "metadata_requested": metadata_fp}))
                return [dg.RunRequest(run_key=f"metadata-{metadata_fp}", job_name=metadata_job.name)]
            shards_seen = {}

        current = {
            shard: dataset.shard_fingerprint(shard, shards_seen.get(shard))
            for shard in dataset.shards_with_images()
        }
        changed = [shard for shard, fp in current.items() if shards_seen.get(shard) != fp]
        context.update_cursor(
            json.dumps({"shards": current, "metadata_indexed": metadata_fp, "metadata_requested": metadata_fp})
        )
        if not changed:
            return dg.SkipReason(f"no change in {len(current)} shards")
        job_name = shard_job.name
        if first_stage_job is not None and any(
            context.instance.get_latest_materialization_event(dg.AssetKey(key)) is None for key in required_global
        ):
            job_name = first_stage_job.name
        context.log.info(f"{len(changed)} changed shards ({job_name}): {changed[:20]}")
        return [
            dg.RunRequest(
                run_key=f"{shard}-{current[shard]['files']}-{current[shard]['newest_mtime']}-{metadata_fp}",
                job_name=job_name,
                partition_key=shard,
                tags={"danbooru/trigger": "new_data"},
            )
            for shard in changed
        ]

    return new_data_sensor


RETRAIN_SENSOR_INTERVAL_S = 120


def build_retrain_sensor(quality_model_job) -> dg.SensorDefinition:
    @dg.sensor(
        name="retrain_sensor",
        job=quality_model_job,
        minimum_interval_seconds=RETRAIN_SENSOR_INTERVAL_S,
        default_status=dg.DefaultSensorStatus.STOPPED,
        description="Requests a new quality_model when enough new labels arrived since the last "
        "request (settings: quality.retrain_min_new_labels). Predictions, the next queue and the "
        "curated dataset follow by eager automation.",
    )
    def retrain_sensor(
        context: dg.SensorEvaluationContext, label_store: LabelStoreResource, settings: SettingsResource
    ):
        store = label_store.store()
        since = int(context.cursor) if context.cursor else 0
        new = store.count_since(since)
        needed = settings.load().quality.retrain_min_new_labels
        if new < needed:
            return dg.SkipReason(f"{new} new labels since the last retrain; waiting for {needed}")
        context.update_cursor(str(store.max_id()))
        return dg.RunRequest(run_key=f"retrain-{store.version()}", tags={"danbooru/trigger": "new_labels"})

    return retrain_sensor
