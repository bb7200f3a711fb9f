"""Sensors: new images or metadata start runs for what changed (as shard ranges); label
and settings changes are observed so the UI's staleness and the automation follow them."""

from __future__ import annotations

import hashlib
import json

import dagster as dg

from danbooru_assets.config import inference_shards_per_run, sensor_interval_s
from danbooru_assets.dataset.layout import DatasetLayout, DatasetRootError
from danbooru_assets.orchestration.assets.settings import section_observations
from danbooru_assets.orchestration.partitions import range_tags, shard_ranges
from danbooru_assets.orchestration.staleness import settings_check_evaluations
from danbooru_assets.orchestration.resources import (
    DanbooruDatasetResource,
    LabelStoreResource,
    SettingsResource,
    StorageResource,
)
from danbooru_assets.settings import section_hashes

METADATA_ASSET = dg.AssetKey("danbooru_metadata")


def converted_metadata_fingerprint(instance: dg.DagsterInstance) -> str | None:
    """The metadata fingerprint recorded by the latest ``danbooru_metadata`` materialization."""
    event = instance.get_latest_materialization_event(METADATA_ASSET)
    if event is None or event.asset_materialization is None:
        return None
    value = event.asset_materialization.metadata.get("metadata_fingerprint")
    return getattr(value, "value", None)


def index_matches_folder(layout: DatasetLayout, storage: StorageResource, shard: str) -> bool:
    """Whether the stored ``shard_index`` of ``shard`` lists exactly the folder's image files
    (ids, sizes, mtimes): one scandir and one small Parquet read, no image opened."""
    path = storage.asset_path("shard_index", shard)
    if not path.exists():
        return False
    from danbooru_assets.core.tables import read_parquet

    index = read_parquet(path, ["image_id", "file_bytes", "mtime"])
    files = layout.scan_shard(shard)
    named = files.image_id >= 0
    on_disk = sorted(zip(files.image_id[named].tolist(), files.file_bytes[named].tolist(), files.mtime[named].tolist()))
    stored = sorted(zip(index["image_id"].tolist(), index["file_bytes"].tolist(), index["mtime"].tolist()))
    return on_disk == stored


def build_new_data_sensor(
    shard_job, metadata_job, first_stage_job=None, required_global: list[str] = ()
) -> dg.SensorDefinition:
    """``shard_job`` runs for changed shards, as contiguous ranges; while any of the
    ``required_global`` assets (a threshold, a statistic) has never been materialized,
    ``first_stage_job`` runs instead, so a fresh deployment ingests without failing
    downstream."""
    jobs = [shard_job, metadata_job] + ([first_stage_job] if first_stage_job is not None else [])

    @dg.sensor(
        name="new_data_sensor",
        jobs=jobs,
        minimum_interval_seconds=sensor_interval_s(),
        # On from the start: a copied image is picked up without a visit to the UI (a tick
        # costs a listdir per shard folder; stop it in the UI to pause new-data runs).
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Fingerprints every shard folder (file count, newest mtime) and the metadata "
        "files. Changed metadata: one conversion run first, then every shard once it has landed. "
        "Changed shard folders: runs over contiguous ranges of them. A shard seen for the first "
        "time whose stored shard_index already lists its files is not requested.",
    )
    def new_data_sensor(
        context: dg.SensorEvaluationContext, dataset: DanbooruDatasetResource, storage: StorageResource
    ):
        cursor = json.loads(context.cursor) if context.cursor else {}
        shards_seen: dict = cursor.get("shards", {})
        try:
            layout = dataset.layout()
        except DatasetRootError as exc:  # both original/ and 512px/, none chosen: say so each tick
            return dg.SkipReason(str(exc))
        if not layout.root_path.is_dir():
            return dg.SkipReason(f"dataset root {layout.root_path} does not exist (set DANBOORU_ROOT)")

        metadata_fp = layout.metadata_fingerprint()
        reindex_all = False
        if metadata_fp != cursor.get("metadata_indexed"):
            converted = converted_metadata_fingerprint(context.instance)
            if converted != metadata_fp:
                # Shard indexes join the metadata slices, so they wait until the new
                # conversion has landed; re-index every shard then.
                if cursor.get("metadata_requested") == metadata_fp:
                    return dg.SkipReason("waiting for the metadata conversion run to finish")
                context.update_cursor(json.dumps({**cursor, "metadata_requested": metadata_fp}))
                return [dg.RunRequest(run_key=f"metadata-{metadata_fp}", job_name=metadata_job.name)]
            # A conversion made by this sensor re-indexes everything; one already there
            # when the sensor first ticks is checked shard by shard like the files.
            reindex_all = cursor.get("metadata_requested") == metadata_fp
            shards_seen = {}

        current = {
            shard: layout.shard_fingerprint(shard, shards_seen.get(shard))
            for shard in layout.shards_with_images()
        }
        changed = []
        for shard, fp in current.items():
            if shards_seen.get(shard) == fp:
                continue
            if shard not in shards_seen and not reindex_all and index_matches_folder(layout, storage, shard):
                continue  # first sight of an already-indexed shard: nothing new
            changed.append(shard)
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
        ranges = shard_ranges(changed, max_per_range=inference_shards_per_run())
        context.log.info(f"{len(changed)} changed shards in {len(ranges)} ranges ({job_name}): {ranges[:20]}")
        # The run key names what was seen (stable across processes): the same change is never requested twice.
        stamp = hashlib.sha256(
            "-".join(f"{s}:{current[s]['files']}.{current[s]['newest_mtime']}" for s in changed).encode()
        ).hexdigest()[:12]
        return [
            dg.RunRequest(
                run_key=f"{first}-{last}-{metadata_fp}-{stamp}",
                job_name=job_name,
                tags={**range_tags(first, last), "danbooru/trigger": "new_data"},
            )
            for first, last in ranges
        ]

    return new_data_sensor


RETRAIN_SENSOR_INTERVAL_S = 120


def build_retrain_sensor(quality_model_job) -> dg.SensorDefinition:
    @dg.sensor(
        name="retrain_sensor",
        job=quality_model_job,
        minimum_interval_seconds=RETRAIN_SENSOR_INTERVAL_S,
        default_status=dg.DefaultSensorStatus.STOPPED,
        description="Observes the label store (the `labels` asset's data version, so curated_dataset "
        "and the queue follow by eager automation) and requests a new quality_model when enough "
        "new labels arrived since the last request (settings: quality.retrain_min_new_labels).",
    )
    def retrain_sensor(
        context: dg.SensorEvaluationContext, label_store: LabelStoreResource, settings: SettingsResource
    ):
        store = label_store.store()
        cursor = json.loads(context.cursor) if context.cursor else {}
        version = store.version()
        observations = []
        if version != cursor.get("observed_version"):
            from danbooru_assets.orchestration.assets.quality import labels_observation_metadata

            observations.append(
                dg.AssetObservation(asset_key="labels", tags={"dagster/data_version": version},
                                    metadata={"observed_by": "retrain_sensor", **labels_observation_metadata(store)})
            )
        new = store.count_since(int(cursor.get("trained_max_id", 0)))
        needed = settings.load().quality.retrain_min_new_labels
        cursor["observed_version"] = version
        run_requests = []
        if new >= needed:
            cursor["trained_max_id"] = store.max_id()
            run_requests.append(dg.RunRequest(run_key=f"retrain-{version}", tags={"danbooru/trigger": "new_labels"}))
        context.update_cursor(json.dumps(cursor))
        if not run_requests and not observations:
            return dg.SkipReason(f"{new} new labels since the last retrain; waiting for {needed}")
        return dg.SensorResult(run_requests=run_requests, asset_events=observations)

    return retrain_sensor


SETTINGS_SENSOR_INTERVAL_S = 30


class SettingsFileInvalid(dg.DagsterError):
    """The settings file cannot be used; the message names the file, the line or key and why.

    A ``DagsterError``: Dagster passes its own errors through a sensor's evaluation
    unwrapped, so this line is the failed tick's message, not a generic "Error occurred
    during the execution of evaluation_fn" with the cause further down."""


@dg.sensor(
    name="settings_sensor",
    minimum_interval_seconds=SETTINGS_SENSOR_INTERVAL_S,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Observes the settings file: a section whose hash changed gets a new data "
    "version, so the UI marks the assets that read it stale. Launches no run.",
)
def settings_sensor(context: dg.SensorEvaluationContext, settings: SettingsResource):
    seen = json.loads(context.cursor) if context.cursor else {}
    try:
        current = settings.load()
    except dg.Failure as exc:
        raise SettingsFileInvalid(exc.description or str(exc)) from None
    hashes = section_hashes(current)
    changed = {name for name, digest in hashes.items() if seen.get(name) != digest}
    context.update_cursor(json.dumps(hashes))
    if not changed:
        return dg.SkipReason("settings unchanged")
    events = [o for o in section_observations(current, "settings_sensor") if o.asset_key.path[-1][len("settings_"):] in changed]
    # The stale-shard checks too, so the warning shows on the assets at once.
    events += settings_check_evaluations(context.instance, current)
    return dg.SensorResult(asset_events=events)
