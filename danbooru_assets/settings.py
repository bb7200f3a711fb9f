"""Durable curation settings: prompts, thresholds and filter rules, in one YAML file.

A run started later by a sensor or a backfill must use what the user last set, not a
default, so these live in a file (``$DANBOORU_SETTINGS``, default
``data/settings.yaml``) rather than only in launchpad run config. Run config can still
override a value for one run (the materialization says so).

The file has :data:`SECTIONS` (prompts, CLIP threshold, image rules, pose rules,
quality), each an observable source asset whose data version is the section's hash
(``assets/settings.py``); each asset depends on the sections it reads, so after an edit
the UI marks exactly the affected assets stale, with no code reload.

``danbooru-assets settings show`` prints the settings in force; ``settings set
clip.keep_fraction=0.3`` changes one value.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import dagster as dg
import yaml
from pydantic import BaseModel, Field

from danbooru_assets.storage import atomic_write_text

# "A single illustrated character in a clear full/upper body pose" — what the pose model
# needs — against the seed's list of what a 10x10 Danbooru sample grid is mostly made of.
DEFAULT_POSITIVE_PROMPTS: list[str] = [
    "an anime illustration of a single character standing in a clear full body pose",
    "an anime illustration of one character, upper body portrait, facing the viewer",
    "a full body drawing of one anime girl with arms and legs clearly visible",
]
DEFAULT_NEGATIVE_PROMPTS: list[str] = [
    "a manga page with several panels",
    "a monochrome pencil sketch",
    "an illustration of several people in a group",
    "a landscape or a photograph",
    "a calendar or a book cover",
    "a character seen from behind",
    "dolls and toys",
    "an image made mostly of text",
]


class PoseRules(dg.Config):
    """Geometric rules a pose must pass to enter ``pose_subset`` (all configurable).

    A pydantic model (Dagster ``Config``), so it nests in run config and settings.
    """

    min_confidence: float = 0.2
    """Required keypoints need at least this confidence."""
    margin: float = 0.02
    """Required keypoints may lie this far (fraction of width/height) outside the frame;
    negative values demand a distance from the border instead."""
    required_inside: list[str] = [
        "nose", "shoulder_left", "shoulder_right", "elbow_left", "elbow_right",
        "wrist_left", "wrist_right", "hip_left", "hip_right",
    ]
    allow_hips_below_frame: bool = True
    """Upper-body portraits (the seed's y >= 512 hips): hips below the frame pass the
    inside, confidence and hip-density checks."""
    density_quantile: float = 0.95
    """Hip and shoulder midpoints must lie in the densest region holding this share."""
    check_midpoint_density: bool = True
    ratio_mad_k: float = 4.0
    """Limb and shoulder ratios must lie within median +- k * MAD (normal-consistent)."""
    min_torso_length: float = 0.05
    """Torso length as a fraction of the image height, below which the pose is unusable."""
    check_left_right: bool = True
    max_lr_length_ratio: float = 2.0
    """Left/right arm or leg length ratio must lie within [1/r, r]."""
    lr_min_separation: float = 0.15
    """Shoulders and hips count as facing opposite ways only when both are separated
    horizontally by more than this (in torso lengths)."""




class ImageRules(BaseModel):
    """Image-statistic rules of ``clip_subset`` (the seed's "too much black border with
    too little content" case, and images too small to train on)."""

    min_side: int = Field(256, description="Drop images whose shorter side is below this (pixels).")
    max_dark_border_frac: float = Field(
        0.35, description="Drop when near-black border rows+columns exceed this fraction ..."
    )
    min_content_area_frac: float = Field(
        0.3, description="... and the content bounding box covers less than this fraction of the image."
    )


class ClipSettings(BaseModel):
    positive_prompts: list[str] | None = Field(
        None, description="Prompts describing a wanted image (None: the built-in defaults)."
    )
    negative_prompts: list[str] | None = Field(
        None, description="Prompts describing what to reject (None: the built-in defaults)."
    )
    keep_fraction: float = Field(0.2, gt=0, le=1, description="Target fraction kept by clip_threshold.")
    fixed_threshold: float | None = Field(
        None, description="A fixed portrait-score threshold; overrides keep_fraction when set."
    )
    image_rules: ImageRules = Field(default_factory=ImageRules)


class QualitySettings(BaseModel):
    """The active-learning loop: label 1%, train, predict, label 5%, retrain, 25%, …"""

    round_fractions: list[float] = Field(
        [0.01, 0.05, 0.25], description="Cumulative share of pose_subset labeled by the end of each round."
    )
    min_round_size: int = Field(
        20, description="A round asks for at least this many labels (a classifier needs a few per class)."
    )
    classifier: str = Field("logreg", description="'logreg' (default) or 'mlp' (scikit-learn).")
    retrain_min_new_labels: int = Field(
        20, description="The retrain sensor requests a new quality_model after this many new labels."
    )
    keep_classes: list[str] = Field(
        ["good", "questionable"], description="Classes curated_dataset keeps (the seed's best + sort-of-complex)."
    )


class CurationSettings(BaseModel):
    clip: ClipSettings = Field(default_factory=ClipSettings)
    pose: PoseRules = Field(default_factory=PoseRules, description="Geometric rules of pose_subset.")
    quality: QualitySettings = Field(default_factory=QualitySettings)


def settings_hash(section: BaseModel | dict) -> str:
    data = section.model_dump(mode="json") if isinstance(section, BaseModel) else section
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def load_settings(path: Path | str) -> CurationSettings:
    """The settings in the file, defaults for what it leaves out; a bad file is an error
    naming the file and the field (never silently ignored)."""
    path = Path(path)
    if not path.exists():
        return CurationSettings()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        return CurationSettings.model_validate(raw)
    except (yaml.YAMLError, ValueError) as exc:
        raise ValueError(f"settings file {path} is invalid: {exc}") from exc


def save_settings(path: Path | str, settings: CurationSettings) -> None:
    text = "# danbooru_assets curation settings (see README: Settings)\n" + yaml.safe_dump(
        settings.model_dump(mode="json"), sort_keys=False, allow_unicode=True
    )
    atomic_write_text(path, text)


def set_setting(settings: CurationSettings, dotted_key: str, value: str) -> CurationSettings:
    """``clip.keep_fraction=0.3``-style edit; the value is parsed as YAML."""
    data = settings.model_dump(mode="json")
    node = data
    *parents, leaf = dotted_key.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = yaml.safe_load(value)
    return CurationSettings.model_validate(data)


def prompt_lists(clip: ClipSettings) -> tuple[list[str], list[str]]:
    """The positive and negative prompts in force (the built-in defaults where unset)."""
    return (
        list(clip.positive_prompts or DEFAULT_POSITIVE_PROMPTS),
        list(clip.negative_prompts or DEFAULT_NEGATIVE_PROMPTS),
    )


def threshold_settings(clip: ClipSettings) -> dict:
    return {"keep_fraction": clip.keep_fraction, "fixed_threshold": clip.fixed_threshold}


# The sections of the file that assets depend on, each an observable source asset
# ``settings_<name>`` whose data version is the hash of what this function returns.
SECTIONS: dict[str, Callable[[CurationSettings], Any]] = {
    "prompts": lambda s: dict(zip(("positive", "negative"), prompt_lists(s.clip))),
    "clip_threshold": lambda s: threshold_settings(s.clip),
    "image_rules": lambda s: s.clip.image_rules.model_dump(mode="json"),
    "pose_rules": lambda s: s.pose.model_dump(mode="json"),
    "quality": lambda s: s.quality.model_dump(mode="json"),
}


def section_asset_name(section: str) -> str:
    return f"settings_{section}"


def section_hashes(settings: CurationSettings) -> dict[str, str]:
    """``{section: hash}`` for every section: the data versions of the settings assets."""
    return {name: settings_hash(part(settings)) for name, part in SECTIONS.items()}


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


class SettingsResource(dg.ConfigurableResource):
    """Reads the durable settings file at run time (so a sensor's run sees the latest)."""

    path: str

    def load(self) -> CurationSettings:
        return load_settings(self.path)
