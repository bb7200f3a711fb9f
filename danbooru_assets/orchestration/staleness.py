"""Stale shards where a user looks first: a ``settings_current`` asset check on each
per-shard asset that reads a settings section.

Dagster marks a partition stale when a settings section it read has a new data version,
but shows it only on that partition's page; the asset's overview, graph node and catalog
row look fresh. The check counts, over every stored shard, the partitions whose latest
materialization read an older version of the sections the asset depends on, and names
what to launch. It runs with every materialization of the asset, and is evaluated again
whenever a settings change is recorded (``danbooru-assets settings set``, the
``settings_sensor``, ``danbooru-assets run``), so the warning appears at once.

It compares where in the event log each partition was last materialized with where the
sections' current versions were first observed: a few queries, no table opened.
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


def _current_since(instance: dg.DagsterInstance, section: str, digest: str) -> int | None:
    """The event-log position from which the section's current version (``digest``) was
    observed: the oldest of the newest observations that all carry it; None when never
    observed (a hand edit the settings sensor has not seen yet)."""
    since = None
    records = instance.fetch_observations(dg.AssetKey(section_asset_name(section)), limit=OBSERVATIONS_READ).records
    for record in records:  # newest first
        observation = record.event_log_entry.asset_observation
        if observation is None or observation.tags.get(DATA_VERSION_TAG) != digest:
            break
        since = record.storage_id
    return since


def stale_partitions(instance: dg.DagsterInstance, asset: str, settings: CurationSettings) -> tuple[list[str], int]:
    """The stored partitions of ``asset`` last materialized before the current version of
    a settings section it depends on was recorded (so they read an older one), and how
    many partitions are materialized. Two queries per section and one per asset."""
    sections, _ = WATCHED[asset]
    now = section_hashes(settings)
    since = [_current_since(instance, s, now[s]) for s in sections]
    latest = instance.get_latest_storage_id_by_partition(dg.AssetKey(asset), dg.DagsterEventType.ASSET_MATERIALIZATION)
    stale = sorted(p for p, sid in latest.items() if any(t is None or sid < t for t in since))
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
