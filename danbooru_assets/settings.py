"""Durable curation settings: prompts, thresholds and filter rules, in one YAML file.

A run started later by a sensor or a backfill must use what the user last set, not a
default, so these live in a file (``$DANBOORU_SETTINGS``, default
``data/settings.yaml``) rather than only in launchpad run config. Run config can still
override a value for one run. Each asset's ``code_version`` is derived from the section
it uses, so after an edit (and a code-location reload) the UI marks exactly the assets
whose settings changed as stale.

``danbooru-assets settings show`` prints the settings in force; ``settings set
clip.keep_fraction=0.3`` changes one value.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import dagster as dg
import yaml
from pydantic import BaseModel, Field

from danbooru_assets.pose.geometry import PoseRules
from danbooru_assets.storage import atomic_write_text


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


@functools.lru_cache(maxsize=1)
def settings_at_definition_load() -> CurationSettings:
    """The settings file as it was when the code location loaded: what each asset's
    ``code_version`` derives from (a reload picks up an edit)."""
    from danbooru_assets import environment

    return load_settings(environment.settings_path())


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


class SettingsResource(dg.ConfigurableResource):
    """Reads the durable settings file at run time (so a sensor's run sees the latest)."""

    path: str

    def load(self) -> CurationSettings:
        return load_settings(self.path)
