"""Stale shards where a user looks first: a ``settings_current`` asset check on each
per-shard asset that reads a settings section.

Dagster marks a partition stale when a settings section it read has a new data version,
but shows it only on that partition's page; the asset's overview, graph node and catalog
row look fresh. The check counts, over every stored shard, the partitions whose latest
materialization read an older version of the sections the asset depends on, and names
what to launch. It runs with every materialization of the asset, and is evaluated again
whenever a settings change is recorded (``danbooru-assets settings set``, the
``settings_sensor``, ``danbooru-assets run``), so the warning appears at once.

It compares, for each partition, the sections' versions observed last before its latest
materialization with the file's now: a few queries, no table opened.
"""


import dagster as dg

from danbooru_assets.orchestration.resources import SettingsResource
from danbooru_assets.settings import CurationSettings, section_asset_name, section_hashes

CHECK_NAME = "settings_current"
DATA_VERSION_TAG = "dagster/data_version"
OBSERVATIONS_READ = 200  # the settings sensor records an observation only on a change
# Per-shard asset → (the settings sections it depends on, what brings its shards up to date).
WATCHED: dict[str, tuple[tuple[str, ...], str]] = {
    "metadata_prefilter": (("prefilter",), "reprefilter_job over the shards with data (`danbooru-assets shards`)"),
    "clip_scores": (("prompts",), "prompt_embeddings, then clip_scores over the shards with data"),
    "clip_subset": (
        ("image_rules", "clip_threshold"),
        "rethreshold_job over the shards with data (`danbooru-assets shards` prints the selection)",
    ),
    "pose_subset": (("pose_rules", "dedup"), "near_duplicates_job, then pose_subset_job over the shards with data"),
}


def _versions(instance: dg.DagsterInstance, section: str) -> tuple[list[int], list[str | None]]:
    """The section's observations, oldest first: event-log positions and data versions."""
    records = instance.fetch_observations(dg.AssetKey(section_asset_name(section)), limit=OBSERVATIONS_READ).records
    records = sorted(records, key=lambda r: r.storage_id)
    versions = []
    for record in records:
        observation = record.event_log_entry.asset_observation
        versions.append(observation.tags.get(DATA_VERSION_TAG) if observation is not None else None)
    return [r.storage_id for r in records], versions


def stale_partitions(instance: dg.DagsterInstance, asset: str, settings: CurationSettings) -> tuple[list[str], int]:
    """The stored partitions of ``asset`` whose latest materialization came after an
    observation of a section it depends on with another version than the file's now (so
    it read an older one; a setting changed and changed back is current again), and how
    many partitions are materialized. One query per section and one per asset."""
    from bisect import bisect_left

    sections, _ = WATCHED[asset]
    now = section_hashes(settings)
    history = {s: _versions(instance, s) for s in sections}
    latest = instance.get_latest_storage_id_by_partition(dg.AssetKey(asset), dg.DagsterEventType.ASSET_MATERIALIZATION)

    def read_then(section: str, storage_id: int) -> str | None:
        positions, versions = history[section]
        i = bisect_left(positions, storage_id)  # observations recorded before the materialization
        return versions[i - 1] if i else None

    stale = sorted(p for p, sid in latest.items() if any(read_then(s, sid) != now[s] for s in sections))
    return stale, len(latest)


def evaluation(instance: dg.DagsterInstance, asset: str, settings: CurationSettings) -> dg.AssetCheckEvaluation:
    stale, total = stale_partitions(instance, asset, settings)
    sections, launch = WATCHED[asset]
    return dg.AssetCheckEvaluation(
        asset_key=dg.AssetKey(asset),
        check_name=CHECK_NAME,
        passed=not stale,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "stale_shards": len(stale),
            "materialized_shards": total,
            "stale_examples": ", ".join(stale[:20]) + (" …" if len(stale) > 20 else ""),
            "sections": ", ".join(section_asset_name(s) for s in sections),
            "to_update": launch if stale else "nothing: every stored shard used the current settings",
        },
    )


def settings_check_evaluations(instance: dg.DagsterInstance, settings: CurationSettings) -> list[dg.AssetCheckEvaluation]:
    """Every ``settings_current`` check, evaluated now (recorded after a settings change)."""
    return [evaluation(instance, asset, settings) for asset in WATCHED]


def _check(asset: str) -> dg.AssetChecksDefinition:
    sections, _ = WATCHED[asset]

    def check(context: dg.AssetCheckExecutionContext, settings: SettingsResource) -> dg.AssetCheckResult:
        result = evaluation(context.instance, asset, settings.load())
        return dg.AssetCheckResult(
            passed=result.passed, severity=result.severity, metadata=result.metadata
        )

    check.__name__ = f"{asset}_{CHECK_NAME}"
    return dg.asset_check(
        asset=asset,
        name=CHECK_NAME,
        blocking=False,
        description=f"Every stored shard of {asset} was computed with the current settings "
        f"({', '.join(section_asset_name(s) for s in sections)}): warns with the count of stale shards and what to launch.",
    )(check)


settings_checks = [_check(asset) for asset in WATCHED]
