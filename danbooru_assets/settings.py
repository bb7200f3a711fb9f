"""Durable curation settings: prompts, thresholds and filter rules, in one YAML file.

A run started later by a sensor or a backfill must use what the user last set, not a
default, so these live in a file (``$DANBOORU_SETTINGS``, default
``data/settings.yaml``) rather than only in launchpad run config. Run config can still
override a value for one run (the materialization says so).

The file has the seven :data:`SECTIONS` (prompts, CLIP threshold, image rules, metadata
prefilter, pose rules, duplicates, quality), each an observable source asset whose data version is the section's hash
(``assets/settings.py``); each asset depends on the sections it reads, so after an edit
the UI marks exactly the affected assets stale, with no code reload.

``danbooru-assets settings show`` prints the settings in force; ``settings set
clip.keep_fraction=0.3`` changes one value.

``settings set`` and loading the file share one validation path (:func:`validate_settings`,
the pydantic models' constraints): an unknown key or section (named with the closest valid
key), a duplicate key, malformed YAML or a value outside its range is a
:class:`SettingsError`, one line naming the file (or assignment) and the key; ``set`` then
leaves the file unchanged and a run fails with that line. No file, or one holding nothing
but comments, means the defaults (the latter with a warning).
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import logging
import typing
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from danbooru_assets.pose.coco import KEYPOINT_NAMES
from danbooru_assets.labels.classes import LABEL_CLASSES
from danbooru_assets.quality.kinds import CLASSIFIER_KINDS, ClassifierKind
from danbooru_assets.core.tables import write_bytes
from danbooru_assets.dataset.ratings import RATING_WORDS
from danbooru_assets.dedup import CLIP_SEARCH_MIN, PHASH_SEARCH_MAX

logger = logging.getLogger(__name__)

# Unknown keys are errors (a typo must never be saved and silently ignored), and so are
# NaN and infinities (a NaN threshold kept 0 images and the run still succeeded).
STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


def _takes_numbers(annotation: Any) -> bool:
    """Whether a field's type holds numbers (``float``, ``int | None``, ``list[float]``...);
    ``bool`` itself is a separate type here."""
    if annotation in (int, float):
        return True
    return any(_takes_numbers(arg) for arg in typing.get_args(annotation))


class _StrictNumbers(BaseModel):
    """Numbers are numbers: YAML reads ``true``/``yes``/``on``/``false`` as booleans, and
    pydantic's lax mode would take them as 1 and 0 (``clip.keep_fraction=true`` saved 1.0).
    Every section derives from this; strings that spell numbers are still read as numbers."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_as_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is None or not _takes_numbers(field.annotation) or bool in typing.get_args(field.annotation):
            return value
        items = value if isinstance(value, list) else [value]
        if any(isinstance(item, bool) for item in items):
            raise ValueError("Input should be a number, not a boolean")
        return value


class SettingsError(ValueError):
    """A settings file or ``settings set`` value that cannot be used; the message is one
    line naming the file (or assignment) and the key."""

    def __init__(self, message: str, key: str | None = None, detail: str | None = None):
        super().__init__(message)
        self.key = key
        # The problem without the file's name, for a caller that names the culprit itself.
        self.detail = detail or message


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _checked_names(names: list[str], allowed, what: str) -> list[str]:
    """``names`` if each is one of ``allowed`` and none repeats. Linear in the number of
    names (16,000 prompts are checked at once): one set, one count per name."""
    known = set(allowed)
    for name in names:
        if name not in known:
            hint = _did_you_mean(name, allowed) or f"; valid: {', '.join(allowed)}"
            raise ValueError(f"unknown {what} {name!r}{hint}")
    repeated = sorted(n for n, times in Counter(names).items() if times > 1)
    if repeated:
        raise ValueError(f"{what} listed twice: {', '.join(repeated)}")
    return names


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


class PoseRules(_StrictNumbers):
    """Geometric rules a pose must pass to enter ``pose_subset`` (all configurable).

    A pydantic model; run config nests it through a Dagster ``Config`` subclass
    (``orchestration.assets.pose``), so the same constraints hold for both.
    """

    model_config = STRICT

    min_confidence: float = Field(0.2, ge=0, le=1)
    """Required keypoints need at least this confidence (0 to 1)."""
    margin: float = Field(0.02, gt=-0.5, le=1)
    """Required keypoints may lie this far (fraction of width/height) outside the frame;
    negative values demand a distance from the border instead (above -0.5, or nothing fits)."""
    required_inside: list[str] = [
        "nose", "shoulder_left", "shoulder_right", "elbow_left", "elbow_right",
        "wrist_left", "wrist_right", "hip_left", "hip_right",
    ]
    """COCO keypoint names (``danbooru_assets.pose.coco.KEYPOINT_NAMES``)."""
    allow_hips_below_frame: bool = True
    """Upper-body portraits (the seed's y >= 512 hips): hips below the frame pass the
    inside, confidence and hip-density checks."""
    density_quantile: float = Field(0.95, gt=0, le=1)
    """Hip and shoulder midpoints must lie in the densest region holding this share."""
    check_midpoint_density: bool = True
    ratio_mad_k: float = Field(4.0, gt=0)
    """Limb and shoulder ratios must lie within median +- k * MAD (normal-consistent)."""
    min_torso_length: float = Field(0.05, ge=0, le=1)
    """Torso length as a fraction of the image height, below which the pose is unusable."""
    check_left_right: bool = True
    max_lr_length_ratio: float = Field(2.0, ge=1)
    """Left/right arm or leg length ratio must lie within [1/r, r] (r >= 1)."""
    lr_min_separation: float = Field(0.15, ge=0)
    """Shoulders and hips count as facing opposite ways only when both are separated
    horizontally by more than this (in torso lengths)."""

    @field_validator("required_inside")
    @classmethod
    def _known_keypoints(cls, names: list[str]) -> list[str]:
        return _checked_names(names, KEYPOINT_NAMES, "keypoint")


class ImageRules(_StrictNumbers):
    """Image-statistic rules of ``clip_subset`` (the seed's "too much black border with
    too little content" case, and images too small to train on)."""

    model_config = STRICT

    min_side: int = Field(256, ge=1, description="Drop images whose shorter side is below this (pixels).")
    max_dark_border_frac: float = Field(
        0.35,
        ge=0,
        le=2,  # the near-black row fraction plus the column fraction: at most 2
        description="Drop when near-black border rows+columns exceed this fraction ...",
    )
    min_content_area_frac: float = Field(
        0.3, ge=0, le=1, description="... and the content bounding box covers less than this fraction of the image."
    )


def _checked_prompts(prompts: list[str] | None) -> list[str] | None:
    """``None`` (the built-in defaults) or a non-empty list of distinct, non-blank prompts."""
    if prompts is None:
        return None
    if not prompts:
        raise ValueError("an empty list; use null for the built-in defaults")
    prompts = [p.strip() for p in prompts]
    if "" in prompts:
        raise ValueError("a blank prompt")
    return _checked_names(prompts, prompts, "prompt")


def _empty_section(value: Any) -> Any:
    """A section left empty (``clip:`` with everything under it commented out) holds the
    defaults, as a missing one does."""
    return {} if value is None else value


class ClipSettings(_StrictNumbers):
    model_config = STRICT

    positive_prompts: list[str] | None = Field(
        None, description="Prompts describing a wanted image (None: the built-in defaults)."
    )
    negative_prompts: list[str] | None = Field(
        None, description="Prompts describing what to reject (None: the built-in defaults)."
    )
    keep_fraction: float = Field(0.2, gt=0, le=1, description="Target fraction kept by clip_threshold.")
    fixed_threshold: float | None = Field(
        None,
        ge=0,
        le=1,  # portrait_score is a probability
        description="A fixed portrait-score threshold; overrides keep_fraction when set.",
    )
    image_rules: ImageRules = Field(default_factory=ImageRules)

    _prompts = field_validator("positive_prompts", "negative_prompts")(_checked_prompts)
    _image_rules = field_validator("image_rules", mode="before")(_empty_section)


class QualitySettings(_StrictNumbers):
    """The active-learning loop: label 1%, train, predict, label 5%, retrain, 25%, …"""

    model_config = STRICT

    round_fractions: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        [0.01, 0.05, 0.25],
        min_length=1,
        description="Cumulative share of pose_subset labeled by the end of each round (increasing, in (0, 1]).",
    )
    min_round_size: int = Field(
        20, ge=1, description="Round r asks for at least r × this many new labels (a classifier needs a few per "
        "class, and each round is larger than the one before); a pool too small for that is split in the same "
        "proportions.",
    )
    grid_page_size: int = Field(
        24, ge=1, le=200, description="Thumbnails per page in the labeling page's grid mode."
    )
    recheck_fraction: float = Field(
        0.02, ge=0, le=0.5, description="Share of the labeling page's images that are already-labeled images "
        "shown again on purpose, to measure each labeler's self-agreement (0 = never).",
    )
    verify_fraction: float = Field(
        0.0, ge=0, le=0.5, description="Share of each round (once a model exists) taken from the model's most "
        "confident predictions, a 'verify' queue confirmed at a glance in grid mode: fast labels that measure how "
        "often a confident prediction is wrong; the rest comes from the uncertainty queue (0 = off).",
    )
    # The kinds quality.make_pipeline builds.
    classifier: ClassifierKind = Field("logreg", description=f"One of {', '.join(CLASSIFIER_KINDS)} (scikit-learn).")
    retrain_min_new_labels: int = Field(
        20, ge=1, description="The retrain sensor requests a new quality_model after this many new labels."
    )
    keep_classes: list[str] = Field(
        ["good", "questionable"],
        min_length=1,
        description="Label classes curated_dataset keeps (the seed's best + sort-of-complex).",
    )

    @field_validator("round_fractions")
    @classmethod
    def _increasing(cls, fractions: list[float]) -> list[float]:
        if any(b <= a for a, b in zip(fractions, fractions[1:])):
            raise ValueError("must increase from round to round (cumulative shares)")
        return fractions

    @field_validator("keep_classes")
    @classmethod
    def _label_classes(cls, classes: list[str]) -> list[str]:
        return _checked_names(classes, LABEL_CLASSES, "label class")


# What the seed's CLIP prompts paid to find out and Danbooru's tags say for free: manga
# pages, several people, text, no person at all, sketches, super-deformed figures, and
# multiple views of one character (bad for a pose model).
DEFAULT_EXCLUDED_GENERAL_TAGS: list[str] = [
    "comic", "4koma", "2koma", "multiple_girls", "multiple_boys", "2girls", "3girls", "4girls", "5girls",
    "6+girls", "2boys", "3boys", "4boys", "5boys", "6+boys", "1boy 1girl", "multiple_others", "group_picture",
    "text_focus", "text-only_page", "no_humans", "scenery", "monochrome", "greyscale", "chibi",
    "multiple_views", "character_sheet",
]
PREFILTER_MODES = ("skip", "annotate", "off")
RATINGS = RATING_WORDS  # danbooru_assets.dataset.ratings: one vocabulary for every release


def _checked_tag_entries(entries: list[str]) -> list[str]:
    """Tag entries: a Danbooru tag name, or several separated by spaces (all must be
    present); lower-case, no blank or repeated entry."""
    cleaned = [" ".join(e.split()).lower() for e in entries]
    if "" in cleaned:
        raise ValueError("a blank tag entry")
    return _checked_names(cleaned, cleaned, "tag entry")


class TagSets(BaseModel):
    """Tag entries per Danbooru tag category. An entry is a tag (``comic``) or tags joined
    by spaces that must all be present (``1boy 1girl``)."""

    model_config = STRICT

    general: list[str] = []
    character: list[str] = []
    copyright: list[str] = []
    artist: list[str] = []
    meta: list[str] = []

    _entries = field_validator("general", "character", "copyright", "artist", "meta")(_checked_tag_entries)

    def is_empty(self) -> bool:
        return not any(getattr(self, c) for c in type(self).model_fields)


class PrefilterSettings(_StrictNumbers):
    """``metadata_prefilter``: rules over the metadata alone, applied before any decode."""

    model_config = STRICT

    mode: Literal["skip", "annotate", "off"] = Field(
        "skip",
        description="skip: excluded images are never decoded and clip_subset drops them as prefiltered; "
        "annotate: every image is decoded and embedded, clip_subset still drops the excluded ones; "
        "off: the rules exclude nothing (their reasons are still listed, to judge them).",
    )
    exclude_tags: TagSets = Field(
        default_factory=lambda: TagSets(general=list(DEFAULT_EXCLUDED_GENERAL_TAGS)),
        description="Exclude an image carrying any of these entries (per category).",
    )
    require_tags: TagSets = Field(
        default_factory=TagSets,
        description="When any list is set: keep only images carrying at least one of the entries.",
    )
    ratings: list[str] = Field(
        list(RATINGS),
        min_length=1,
        description="Ratings kept: general, sensitive, questionable, explicit (the live API since 2022) and "
        "safe (Danbooru2017-2021's s: general and sensitive together). Rating letters are refused.",
    )
    min_score: int | None = Field(0, description="Exclude images scored below this (null: no score rule).")
    exclude_deleted: bool = Field(True, description="Exclude posts marked is_deleted.")
    exclude_banned: bool = Field(True, description="Exclude posts marked is_banned.")
    file_types: list[str] | None = Field(
        None, description="File extensions kept (jpg, png, webp, gif, bmp); null: every image type."
    )
    min_side: int = Field(256, ge=0, description="Exclude images whose shorter side is below this (pixels).")
    max_aspect_ratio: float | None = Field(
        3.0, ge=1, description="Exclude images whose long side exceeds this many times the short side (null: any)."
    )

    _tag_sets = field_validator("exclude_tags", "require_tags", mode="before")(_empty_section)

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `off` (`settings set prefilter.mode=off`) as false.
        return "off" if value is False else value

    @field_validator("ratings")
    @classmethod
    def _distinct_ratings(cls, ratings: list[str]) -> list[str]:
        from danbooru_assets.dataset.ratings import letter_message

        letters = [r.strip().lower() for r in ratings if isinstance(r, str) and r.strip().lower() in ("g", "s", "q", "e")]
        if letters:
            raise ValueError(letter_message(letters))
        return _checked_names(ratings, RATINGS, "rating")

    @field_validator("file_types")
    @classmethod
    def _image_types(cls, types: list[str] | None) -> list[str] | None:
        if types is None:
            return None
        from danbooru_assets.dataset.layout import IMAGE_EXTENSIONS

        if not types:
            raise ValueError("an empty list; use null for every image type")
        types = ["jpg" if t.strip().lower().lstrip(".") == "jpeg" else t.strip().lower().lstrip(".") for t in types]
        return _checked_names(types, sorted(IMAGE_EXTENSIONS - {"jpeg"}), "file type")


class DedupSettings(_StrictNumbers):
    """``near_duplicates``: which images count as one (see ``danbooru_assets.dedup``)."""

    model_config = STRICT

    threshold: float = Field(
        0.95,
        ge=CLIP_SEARCH_MIN,
        le=1,
        description="Cosine similarity of CLIP embeddings at or above which two images are near duplicates "
        f"(at least {CLIP_SEARCH_MIN}: candidate pairs are stored down to there, so a change regroups them "
        "without a new search).",
    )
    phash_max_distance: int = Field(
        6,
        ge=0,
        le=PHASH_SEARCH_MAX,
        description="Hamming distance of the 64-bit perceptual hashes at or below which two images are "
        f"copies (resized, re-encoded); at most {PHASH_SEARCH_MAX}, the distance candidate pairs are stored at.",
    )
    parent_child: bool = Field(
        True, description="Danbooru parent/child posts (variant sets) count as duplicates of each other."
    )


class CurationSettings(BaseModel):
    model_config = STRICT

    clip: ClipSettings = Field(default_factory=ClipSettings)
    pose: PoseRules = Field(default_factory=PoseRules, description="Geometric rules of pose_subset.")
    quality: QualitySettings = Field(default_factory=QualitySettings)
    prefilter: PrefilterSettings = Field(
        default_factory=PrefilterSettings, description="Metadata rules of metadata_prefilter."
    )

    _sections = field_validator("clip", "pose", "quality", mode="before")(_empty_section)
    _prefilter_section = field_validator("prefilter", mode="before")(_empty_section)
    dedup: DedupSettings = Field(default_factory=DedupSettings, description="Duplicate rules of near_duplicates.")
    _dedup_section = field_validator("dedup", mode="before")(_empty_section)


def settings_hash(section: BaseModel | dict) -> str:
    data = section.model_dump(mode="json") if isinstance(section, BaseModel) else section
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def _dotted(loc: tuple) -> str:
    """``("quality", "round_fractions", 1)`` → ``quality.round_fractions[1]``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def setting_keys(model: type[BaseModel] = CurationSettings, prefix: str = "") -> list[str]:
    """Every valid dotted key: sections, subsections and values."""
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys += setting_keys(field.annotation, f"{prefix}{name}.")
    return keys


def _unknown_key(key: str) -> str:
    keys = setting_keys()
    parent, _, leaf = key.rpartition(".")
    siblings = [k for k in keys if k.rpartition(".")[0] == parent]
    # A typo among its siblings first, then the same name misplaced under another section.
    hint = _did_you_mean(key, siblings)
    if not hint:
        by_leaf = {k.rpartition(".")[2]: k for k in keys if k not in siblings}
        close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.8)
        hint = f" (did you mean {by_leaf[close[0]]}?)" if close else ""
    if hint:
        return "unknown key" + hint
    names = ", ".join(k.rpartition(".")[2] for k in siblings)
    return f"unknown key; valid {'keys under ' + parent if parent else 'sections'}: {names}"


def _problem(error: dict) -> tuple[str, str]:
    """``(dotted key, what is wrong)`` for one pydantic error."""
    key = _dotted(error["loc"])
    if error["type"] == "extra_forbidden":
        return key, _unknown_key(key)
    text = error["msg"].removeprefix("Value error, ")
    value = error.get("input")
    if not isinstance(value, dict):
        shown = repr(value)
        text += f" (got {shown if len(shown) <= 60 else shown[:57] + '...'})"
    return key, text


def validate_settings(data: dict, where: str) -> CurationSettings:
    """The one validation path of the file and of ``settings set``: a :class:`SettingsError`
    ``"<where>: <key>: <problem>"`` (every problem, on one line) for anything unusable."""
    try:
        return CurationSettings.model_validate(data)
    except ValidationError as exc:
        problems = [_problem(e) for e in exc.errors()]
        text = "; ".join(f"{key}: {what}" for key, what in problems)
        raise SettingsError(f"{where}: {text}", key=problems[0][0], detail=text) from None


def _duplicate_key(node, prefix: str = "", seen_nodes: set | None = None) -> tuple[str, int, int] | None:
    """The first key that a YAML mapping repeats (PyYAML keeps the last one silently):
    ``(dotted key, first line, second line)``."""
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:  # an alias: checked already
        return None
    seen_nodes.add(id(node))
    children = []
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            name = str(key_node.value)
            key = f"{prefix}.{name}" if prefix else name
            line = key_node.start_mark.line + 1
            if name in lines:
                return key, lines[name], line
            lines[name] = line
            children.append((value_node, key))
    elif isinstance(node, yaml.SequenceNode):
        children = [(item, f"{prefix}[{i}]") for i, item in enumerate(node.value)]
    for child, key in children:
        found = _duplicate_key(child, key, seen_nodes)
        if found:
            return found
    return None


def _yaml_problem(exc: yaml.YAMLError, text: str) -> str:
    """Where the YAML breaks, quoting the line (which names the key) where the broken
    construct starts."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "context_mark", None) or getattr(exc, "problem_mark", None)
    if mark is None:
        return f"not valid YAML: {problem}"
    lines = text.splitlines()
    quoted = f" ({lines[mark.line].strip()!r})" if mark.line < len(lines) else ""
    return f"not valid YAML at line {mark.line + 1}{quoted}: {problem}"


def settings_file(path: Path | str) -> Path:
    """The settings file at a local path, or at an fsspec URL (``s3://bucket/danbooru/settings.yaml``:
    next to the tables, so every machine of a deployment reads and writes the same file)."""
    from upath import UPath

    from danbooru_assets.config import is_url

    return UPath(str(path)) if is_url(str(path)) else Path(path)


def read_settings_data(path: Path | str) -> dict | None:
    """The file's sections as parsed YAML, unvalidated; ``None`` when there is no file or
    it holds nothing (only comments). A :class:`SettingsError` for unreadable or
    malformed YAML, a duplicate key, or a document that is not a mapping of sections."""
    path = settings_file(path)
    if not path.exists():
        return None
    where = f"settings file {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{where} cannot be read: {exc}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        duplicate = _duplicate_key(node) if node is not None else None
        if duplicate:
            key, first, second = duplicate
            raise SettingsError(f"{where}: duplicate key {key} (lines {first} and {second})", key=key)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SettingsError(f"{where}: {_yaml_problem(exc, text)}") from None
    if data is None:
        return None
    if not isinstance(data, dict):
        raise SettingsError(
            f"{where}: expected a mapping of sections ({', '.join(CurationSettings.model_fields)}), "
            f"found a {type(data).__name__}"
        )
    return data


class ReadSettings(typing.NamedTuple):
    """The settings file read once (a step reads it once: one version throughout), and
    where its values came from (for materialization metadata)."""

    settings: CurationSettings
    source: str
    """``settings file``, or ``defaults (…)`` when there is no file or it holds nothing."""

    def resolve(self, section: BaseModel, overrides: dict[str, Any] | None = None) -> tuple[Any, str]:
        """``section`` (a part of :attr:`settings`) with a run's ``overrides``, validated
        with the section's own bounds (as the file is), and its source: ``run config``
        when any value was overridden. A bad value is a :class:`SettingsError`."""
        if not overrides:
            return section, self.source
        try:
            return type(section).model_validate({**section.model_dump(), **overrides}), "run config"
        except ValidationError as exc:
            raise SettingsError(f"run config: {exc}") from None


def read_settings(path: Path | str) -> ReadSettings:
    """The settings in the file, defaults for what it leaves out, and their source, from
    one read. A bad file is a :class:`SettingsError` naming the file and the key (never
    silently ignored); an empty file means the defaults, with a warning."""
    data = read_settings_data(path)
    if data is None:
        where = settings_file(path)
        if where.exists():
            logger.warning("settings file %s holds no settings: using the defaults", path)
            return ReadSettings(CurationSettings(), f"defaults ({where} holds no settings)")
        return ReadSettings(CurationSettings(), f"defaults (no file at {where})")
    return ReadSettings(validate_settings(data, f"settings file {path}"), "settings file")


def load_settings(path: Path | str) -> CurationSettings:
    """The settings in the file (:func:`read_settings`)."""
    return read_settings(path).settings


def settings_source(path: Path | str) -> str:
    """Where :func:`load_settings` takes the settings from (:func:`read_settings`)."""
    return read_settings(path).source


def save_settings(path: Path | str, settings: CurationSettings) -> None:
    text = "# danbooru_assets curation settings (see README: Settings)\n" + yaml.safe_dump(
        settings.model_dump(mode="json"), sort_keys=False, allow_unicode=True
    )
    # Temp file then rename locally; on an object store a temporary object moved over the
    # target (core.tables: the project's one atomic writer for paths and URLs).
    write_bytes(settings_file(path), text.encode("utf-8"))


def assign(data: dict, dotted_key: str, value: str) -> dict:
    """A copy of the unvalidated ``data`` with ``dotted_key`` set to ``value`` parsed as
    YAML (``clip.keep_fraction=0.3`` style); validate the result with
    :func:`validate_settings`."""
    parts = dotted_key.split(".")
    if not all(parts):
        raise SettingsError(f"{dotted_key!r} is not a key like clip.keep_fraction", key=dotted_key)
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SettingsError(f"{dotted_key}: not a YAML value ({problem})", key=dotted_key) from None
    data = copy.deepcopy(data)
    node = data
    for depth, part in enumerate(parts[:-1], start=1):
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            section = ".".join(parts[:depth])
            raise SettingsError(f"{section} is a value, not a section: set {section}=VALUE", key=section)
        node = node[part]
    node[parts[-1]] = parsed
    return data


def set_setting(settings: CurationSettings, dotted_key: str, value: str) -> CurationSettings:
    """``settings`` with ``dotted_key`` set to ``value`` (parsed as YAML), validated."""
    return validate_settings(assign(settings.model_dump(mode="json"), dotted_key, value), f"{dotted_key}={value}")


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
    "prefilter": lambda s: s.prefilter.model_dump(mode="json"),
    "dedup": lambda s: s.dedup.model_dump(mode="json"),
}


def section_asset_name(section: str) -> str:
    return f"settings_{section}"


def section_hashes(settings: CurationSettings) -> dict[str, str]:
    """``{section: hash}`` for every section: the data versions of the settings assets."""
    return {name: settings_hash(part(settings)) for name, part in SECTIONS.items()}


def _lookup(data: Any, dotted_key: str) -> Any:
    """The value at ``dotted_key`` in nested mappings, or :data:`_ABSENT`."""
    node = data
    for part in dotted_key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


_ABSENT = object()


def _round_trip_yaml():
    from ruamel.yaml import YAML

    rt = YAML(typ="rt")
    rt.preserve_quotes = True
    rt.indent(mapping=2, sequence=4, offset=2)
    rt.width = 4096  # a long prompt stays on one line, as PyYAML wrote it
    return rt


def _plain(value: Any) -> Any:
    """``value`` for the round-trip dumper: a string that PyYAML (YAML 1.1, what loads the
    file) would read as something else (``off``, ``yes``, ``1e3``) is double-quoted."""
    from ruamel.yaml.scalarstring import DoubleQuotedScalarString

    if isinstance(value, str):
        try:
            same = yaml.safe_load(value) == value
        except yaml.YAMLError:
            same = False
        return value if same else DoubleQuotedScalarString(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


SETTINGS_HEADER = "# danbooru_assets curation settings (see README: Settings)\n"


def write_assignments(path: Path | str, values: list[tuple[str, Any]], expected: CurationSettings) -> None:
    """Set each ``(dotted key, value)`` in the settings file and nothing else: comments,
    key order and every other line stay as they are (a round-trip YAML edit); a missing
    file starts from the header. ``expected``: the validated settings the edit must
    produce when the file is read back (:func:`load_settings`); otherwise nothing is
    written and a :class:`SettingsError` says so."""
    import io

    path = settings_file(path)
    rt = _round_trip_yaml()
    text = path.read_text(encoding="utf-8") if path.exists() else SETTINGS_HEADER
    doc = rt.load(text)
    if doc is None:  # only comments (or the header we start from): keep them above the keys
        doc = rt.load(text.rstrip("\n") + "\n__placeholder__: 0\n")
        del doc["__placeholder__"]
    for dotted_key, value in values:
        parts = dotted_key.split(".")
        node = doc
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        node[parts[-1]] = _plain(value)
    out = io.StringIO()
    rt.dump(doc, out)
    new_text = out.getvalue()
    if not new_text.lstrip().startswith("#") and not path.exists():
        new_text = SETTINGS_HEADER + new_text
    # The file is loaded by PyYAML; what it reads back must be what was validated.
    try:
        reread = validate_settings(yaml.safe_load(new_text) or {}, f"settings file {path}")
    except (yaml.YAMLError, SettingsError) as exc:
        raise SettingsError(f"{path}: the edited file would not load ({exc}); unchanged") from None
    if reread != expected:
        raise SettingsError(f"{path}: the edited file would not read back as set; unchanged")
    write_bytes(path, new_text.encode("utf-8"))


def describe_change(key: str, before: CurationSettings | None, after: CurationSettings) -> str:
    """``clip.keep_fraction: 0.2 -> 0.5`` (``(unchanged)`` when equal), values as JSON."""
    old = _lookup(before.model_dump(mode="json"), key) if before is not None else _ABSENT
    new = _lookup(after.model_dump(mode="json"), key)
    shown_new = json.dumps(new, ensure_ascii=False)
    if old is _ABSENT:
        return f"{key}: {shown_new}"
    if old == new:
        return f"{key}: {shown_new} (unchanged)"
    return f"{key}: {json.dumps(old, ensure_ascii=False)} -> {shown_new}"


def setting_value(settings: CurationSettings, data: dict, dotted_key: str) -> Any:
    """What ``settings set`` writes for ``dotted_key``: the validated value (``jpeg`` is
    written ``jpg``, tags lower-case), or what was given for a whole section."""
    value = _lookup(settings.model_dump(mode="json"), dotted_key)
    if isinstance(value, dict) and _lookup(data, dotted_key) is not _ABSENT:
        return _lookup(data, dotted_key)
    return value
