"""Every environment variable the project reads, with its default, read here and nowhere
else (:data:`ENVIRONMENT`). Modules ask the functions below; ``definitions.py`` wires a
resource field to ``dg.EnvVar(NAME)`` where :func:`is_set` (so the UI names the variable
and a run resolves it when it starts) and to the default here where not.

Relative defaults are under the working directory, the project folder in the README's
commands. The defaults are read when called, never at import.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from upath import UPath


@dataclass(frozen=True)
class EnvVariable:
    name: str
    default: str  # as the README states it
    meaning: str


ENVIRONMENT: dict[str, EnvVariable] = {
    v.name: v
    for v in (
        EnvVariable("DANBOORU_ROOT", "the bundled sample data (DANBOORU_SAMPLE_ROOT)", "the dataset root"),
        EnvVariable("DANBOORU_IMAGE_FOLDER", "the only one of original/ and 512px/ under the root", "the image folder to index: original or 512px (required when the root holds both)"),
        EnvVariable("DANBOORU_SAMPLE_ROOT", "data/sample", "where the bundled sample data is generated and read while DANBOORU_ROOT is unset"),
        EnvVariable("DANBOORU_STORAGE", "data/storage", "asset tables: a folder or any fsspec URL"),
        EnvVariable("DANBOORU_SETTINGS", "<storage>/settings.yaml when DANBOORU_STORAGE is a URL, else data/settings.yaml", "durable curation settings (a path or an fsspec URL)"),
        EnvVariable("DANBOORU_LABELS", "data/labels.sqlite", "the human label store: a SQLite file or a SQLAlchemy URL (postgresql+psycopg2://user@host:5432/db)"),
        EnvVariable("DANBOORU_CLIP_MODEL", "demo on sample data, ViT-B-32 on real data", "the CLIP architecture"),
        EnvVariable("DANBOORU_CLIP_PRETRAINED", "the model's hub tag", "CLIP weights: hub tag or local file ('' = random)"),
        EnvVariable("DANBOORU_POSE_BACKEND", "keypoint_files on sample data, else keypoint_rcnn", "the pose estimator"),
        EnvVariable("DANBOORU_KEYPOINTS", "the sample's tarball on sample data", "published keypoint files to import (sets the backend to keypoint_files)"),
        EnvVariable("DANBOORU_POSE_FALLBACK", "none", "with keypoint files: a model backend (keypoint_rcnn, bizarre_pose, mediapipe) run on the images that have no keypoint file"),
        EnvVariable("DANBOORU_KEYPOINT_FRAME", "512px (image for the sample's tarball)", "the frame of published keypoints: 512px (the 512px release's padded square, the seed's) or image (each indexed image's pixels)"),
        EnvVariable("DANBOORU_POSE_CHECKPOINT", "the backend's own weights", "pose model checkpoint"),
        EnvVariable("DANBOORU_BIZARRE_POSE_REPO", "none", "checkout of ShuhongChen/bizarre-pose-estimator (backend bizarre_pose)"),
        EnvVariable("DANBOORU_INFERENCE_SHARDS_PER_RUN", "50", "shards per run of a backfill of the inference assets"),
        EnvVariable("DANBOORU_SENSOR_INTERVAL_S", "30", "seconds between new_data_sensor checks (at least 5)"),
        EnvVariable("DANBOORU_EXECUTOR", "in_process", "how a run executes its steps: in_process (one process) or celery (steps spread over Celery workers, deploy/)"),
        EnvVariable("DANBOORU_CELERY_BROKER", "redis://127.0.0.1:6379/0", "the Celery broker the celery executor and its workers share"),
        EnvVariable("DANBOORU_CELERY_BACKEND", "the broker's URL", "the Celery result backend"),
        EnvVariable("DAGSTER_HOME", ".dagster_home (set by the CLI)", "Dagster's SQLite instance"),
        EnvVariable("DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS", "true (set by the CLI)", "one planned event per asset of a range run"),
    )
}

# Dagster's switch for recording a range run's plan as ONE "materialization planned" event
# per asset instead of one per shard (~20 ms each on SQLite: 20 s for 1,000 shards). The
# cost: shards of a failed range run are not marked "failed" on the asset page (the run
# and its backfill say which shards failed). The CLI sets it; the README recommends it.
PLANNED_EVENTS_ENV = "DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS"

DEFAULT_POSE_BACKEND = "keypoint_rcnn"
DEFAULT_INFERENCE_SHARDS_PER_RUN = 50
# A tick is one listdir per shard folder and a stat per metadata file (README: New data
# measures it); 30 s puts a new image in the pipeline within half a minute.
DEFAULT_SENSOR_INTERVAL_S = 30
MIN_SENSOR_INTERVAL_S = 5

# Where the sample dataset keeps its published keypoints (the seed's tarball format).
KEYPOINTS_TARBALL = "keypoints/keypoints.tar.gz"

# The most pixels one decode may produce (~7,000 x 7,000): a 100M-pixel PNG took 11 s and
# 1.3 GB to decode, and each loader worker may hold one; PIL itself only warns at 89M and
# refuses at 179M. JPEGs count at the scale they are decoded at (libjpeg reduces by up to
# 8 per side), so a big JPEG is still read, at reduced scale (core.images.size_problem).
DEFAULT_MAX_PIXELS = 50_000_000


def env(name: str) -> str:
    """The variable's value, ``""`` when unset (an empty value counts as unset)."""
    if name not in ENVIRONMENT:
        raise KeyError(f"{name} is not one of the project's environment variables (config.ENVIRONMENT)")
    return os.environ.get(name, "")


def is_set(name: str) -> bool:
    return bool(env(name))


def data_dir() -> Path:
    return Path.cwd() / "data"


def using_sample_data() -> bool:
    return not is_set("DANBOORU_ROOT")


def dataset_root() -> Path:
    if not using_sample_data():
        return Path(env("DANBOORU_ROOT")).expanduser()
    return default_sample_root()


def image_folder() -> str:
    """``$DANBOORU_IMAGE_FOLDER`` (``original`` or ``512px``); ``""``: found under the root
    (:func:`danbooru_assets.dataset.layout.resolve_image_folder`)."""
    return env("DANBOORU_IMAGE_FOLDER").strip()


def default_sample_root() -> Path:
    """Bundled sample location: ``$DANBOORU_SAMPLE_ROOT`` or ``./data/sample``."""
    return Path(env("DANBOORU_SAMPLE_ROOT") or data_dir() / "sample").expanduser()


def storage_base() -> str:
    return env("DANBOORU_STORAGE") or str(data_dir() / "storage")


def is_url(location: str) -> bool:
    """Whether ``location`` is an fsspec URL (``s3://…``, ``memory://…``) rather than a local path."""
    return "://" in location and not location.startswith("file://")


def settings_path() -> "Path | UPath":
    """``$DANBOORU_SETTINGS``; else next to the tables when they are at a URL (every machine
    of a deployment then reads the same file), else ``data/settings.yaml``."""
    from upath import UPath

    chosen = env("DANBOORU_SETTINGS")
    if not chosen and is_url(storage_base()):
        chosen = storage_base().rstrip("/") + "/settings.yaml"
    if chosen and is_url(chosen):
        return UPath(chosen)
    return Path(chosen or data_dir() / "settings.yaml")


def labels_path() -> "Path | str":
    """``$DANBOORU_LABELS``: a SQLAlchemy URL as given (a shared database), else a SQLite file."""
    chosen = env("DANBOORU_LABELS")
    if "://" in chosen:
        return chosen
    return Path(chosen or data_dir() / "labels.sqlite")


@dataclass(frozen=True)
class PoseEnvironment:
    """The pose estimator's settings from the environment: published keypoint files when
    ``keypoint_files`` is set (``DANBOORU_KEYPOINTS``, or the sample's tarball on sample
    data unless a backend is named), else ``backend`` with its checkpoint."""

    keypoint_files: str
    backend: str
    checkpoint: str
    bizarre_pose_repo: str
    fallback: str = ""  # with keypoint files: the model backend for images without a file
    keypoint_frame: str = "512px"


def pose_environment() -> PoseEnvironment:
    keypoints = env("DANBOORU_KEYPOINTS")
    if using_sample_data() and not keypoints and not is_set("DANBOORU_POSE_BACKEND"):
        keypoints = str(dataset_root() / KEYPOINTS_TARBALL)
    return PoseEnvironment(
        keypoint_files=keypoints,
        backend=env("DANBOORU_POSE_BACKEND") or DEFAULT_POSE_BACKEND,
        checkpoint=env("DANBOORU_POSE_CHECKPOINT"),
        bizarre_pose_repo=env("DANBOORU_BIZARRE_POSE_REPO"),
        fallback=env("DANBOORU_POSE_FALLBACK"),
        keypoint_frame=env("DANBOORU_KEYPOINT_FRAME") or _default_keypoint_frame(keypoints),
    )


def _default_keypoint_frame(keypoints: str) -> str:
    """``image`` for a generated sample's own tarball (its keypoints are in each image's
    pixels), else ``512px`` (the seed's files: the 512px release's padded frame)."""
    path = Path(keypoints).expanduser()
    if keypoints and path.name == Path(KEYPOINTS_TARBALL).name and (path.parent.parent / "SAMPLE_DATASET.json").exists():
        return "image"
    return "512px"


def _whole_number(name: str, default: int, minimum: int) -> int:
    value = env(name)
    try:
        return max(minimum, int(value)) if value else default
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected a whole number") from None


def inference_shards_per_run() -> int:
    """Shards per run when the inference assets backfill (``clip_embeddings``, ``pose_keypoints``)."""
    return _whole_number("DANBOORU_INFERENCE_SHARDS_PER_RUN", DEFAULT_INFERENCE_SHARDS_PER_RUN, 1)


def sensor_interval_s() -> int:
    """Seconds between new-data checks."""
    return _whole_number("DANBOORU_SENSOR_INTERVAL_S", DEFAULT_SENSOR_INTERVAL_S, MIN_SENSOR_INTERVAL_S)


def ensure_dagster_home() -> Path:
    """Point ``DAGSTER_HOME`` at ``.dagster_home`` (git-ignored) unless set, with the
    project's ``dagster.yaml`` (SQLite storage, the ``gpu`` pool) copied in."""
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path.cwd() / ".dagster_home")))
    home.mkdir(parents=True, exist_ok=True)
    project_yaml = Path(__file__).resolve().parent.parent / "dagster.yaml"
    if not (home / "dagster.yaml").exists() and project_yaml.exists():
        shutil.copyfile(project_yaml, home / "dagster.yaml")
    return home


def working_directory_defaults() -> dict[str, str]:
    """The variables whose defaults are relative to the working directory, pinned to
    absolute paths (only those unset): a process started in another folder (``ui`` starts
    the webserver in ``DAGSTER_HOME``) then reads the same sample, tables, settings and labels."""
    pinned = {}
    if not is_set("DANBOORU_ROOT") and not is_set("DANBOORU_SAMPLE_ROOT"):
        pinned["DANBOORU_SAMPLE_ROOT"] = str(default_sample_root().resolve())
    if not is_set("DANBOORU_STORAGE"):
        pinned["DANBOORU_STORAGE"] = str(Path(storage_base()).resolve())
    if not is_set("DANBOORU_SETTINGS") and not is_url(storage_base()):
        pinned["DANBOORU_SETTINGS"] = str(Path(settings_path()).resolve())
    if not is_set("DANBOORU_LABELS"):
        pinned["DANBOORU_LABELS"] = str(Path(labels_path()).resolve())
    return pinned


def set_planned_events_default() -> None:
    """One planned event per asset and range run, unless the user chose otherwise."""
    os.environ.setdefault(PLANNED_EVENTS_ENV, "true")


EXECUTORS = ("in_process", "celery")
DEFAULT_CELERY_BROKER = "redis://127.0.0.1:6379/0"


def executor_kind() -> str:
    """``DANBOORU_EXECUTOR``: ``in_process`` (default: a run's steps in its own process) or
    ``celery`` (each step a Celery task on the workers of its queue; see deploy/)."""
    kind = env("DANBOORU_EXECUTOR") or "in_process"
    if kind not in EXECUTORS:
        raise ValueError(f"DANBOORU_EXECUTOR={kind!r}: expected one of {', '.join(EXECUTORS)}")
    return kind


def celery_broker() -> str:
    return env("DANBOORU_CELERY_BROKER") or DEFAULT_CELERY_BROKER


def celery_backend() -> str:
    return env("DANBOORU_CELERY_BACKEND") or celery_broker()


def clip_model_env() -> tuple[str, str | None]:
    """``DANBOORU_CLIP_MODEL`` (``""`` when unset) and ``DANBOORU_CLIP_PRETRAINED`` (``None``
    when unset; ``""`` means random weights): the CLIP model's environment, turned into the
    model's fields by :func:`danbooru_assets.clip.model.model_fields`."""
    return os.environ.get("DANBOORU_CLIP_MODEL", ""), os.environ.get("DANBOORU_CLIP_PRETRAINED")
