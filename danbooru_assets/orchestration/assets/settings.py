"""The durable settings sections as observable source assets.

Each section of the settings file (prompts, CLIP threshold, image rules, pose rules,
quality) is an asset whose data version is the section's hash. Assets depend on the
sections they read, so when a section changes — observed by the ``settings_sensor``,
by ``danbooru-assets settings set`` or by the UI's "Observe" button — the UI marks exactly
the assets that read it (all their partitions) stale, with no code reload.
"""

from __future__ import annotations

import warnings

import dagster as dg

from danbooru_assets.orchestration.resources import SettingsResource
from danbooru_assets.settings import SECTIONS, CurationSettings, section_asset_name, section_hashes

GROUP = "settings"

SECTION_DESCRIPTIONS = {
    "prompts": "CLIP prompts (clip.positive_prompts / clip.negative_prompts); read by prompt_embeddings.",
    "clip_threshold": "clip.keep_fraction / clip.fixed_threshold; read by clip_threshold.",
    "image_rules": "clip.image_rules (size, dark border); read by clip_subset.",
    "pose_rules": "pose (geometric rules); read by pose_subset.",
    "quality": "quality (round plan, classifier, kept classes); read by the labeling-loop assets.",
    "prefilter": "prefilter (mode, tag/rating/score/deleted/size rules over the metadata); read by metadata_prefilter.",
    "dedup": "dedup (near-duplicate similarity threshold, parent/child posts); read by near_duplicates and pose_subset.",
}


def _section_asset(section: str) -> dg.SourceAsset:
    def observe(settings: SettingsResource) -> dg.DataVersion:
        return dg.DataVersion(section_hashes(settings.load())[section])

    observe.__name__ = section_asset_name(section)
    with warnings.catch_warnings():  # observable source assets are marked beta; this use is plain
        warnings.simplefilter("ignore", dg.BetaWarning)
        return dg.observable_source_asset(
            name=section_asset_name(section),
            group_name=GROUP,
            description=f"Settings section `{section}` of the settings file: {SECTION_DESCRIPTIONS[section]} "
            "Data version: the section's hash.",
        )(observe)


settings_assets = {section: _section_asset(section) for section in SECTIONS}


def settings_keys(*sections: str) -> list[dg.AssetKey]:
    """The asset keys of ``sections``, for an asset's ``deps``."""
    return [settings_assets[s].key for s in sections]


def section_observations(settings: CurationSettings, source: str) -> list[dg.AssetObservation]:
    """One observation per section, carrying its hash as the data version (what the
    settings sensor, ``settings set`` and ``danbooru-assets run`` record)."""
    return [
        dg.AssetObservation(
            asset_key=section_asset_name(name),
            metadata={"hash": digest, "observed_by": source},
            tags={"dagster/data_version": digest},
        )
        for name, digest in section_hashes(settings).items()
    ]
