"""Where things live by default, from environment variables.

| variable | default | what |
| --- | --- | --- |
| ``DANBOORU_ROOT`` | the bundled sample data, ``data/sample`` | the dataset root |
| ``DANBOORU_STORAGE`` | ``data/storage`` | asset tables (a folder or an fsspec URL) |
| ``DANBOORU_SETTINGS`` | ``data/settings.yaml`` | durable curation settings |
| ``DANBOORU_LABELS`` | ``data/labels.sqlite`` | the human label store |
| ``DAGSTER_HOME`` | ``.dagster_home`` (set by the CLI) | Dagster's SQLite instance |

Relative defaults are under the working directory, the project folder in the README's
commands.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


# Where the sample dataset keeps its published keypoints (the seed's tarball format).
KEYPOINTS_TARBALL = "keypoints/keypoints.tar.gz"


def data_dir() -> Path:
    return Path.cwd() / "data"


def using_sample_data() -> bool:
    return not os.environ.get("DANBOORU_ROOT")


def dataset_root() -> Path:
    if not using_sample_data():
        return Path(os.environ["DANBOORU_ROOT"]).expanduser()
    return default_sample_root()


def default_sample_root() -> Path:
    """Bundled sample location: ``$DANBOORU_SAMPLE_ROOT`` or ``./data/sample``."""
    env = os.environ.get("DANBOORU_SAMPLE_ROOT")
    return Path(env) if env else data_dir() / "sample"


def storage_base() -> str:
    return os.environ.get("DANBOORU_STORAGE") or str(data_dir() / "storage")


def settings_path() -> Path:
    return Path(os.environ.get("DANBOORU_SETTINGS") or data_dir() / "settings.yaml")


def labels_path() -> Path:
    return Path(os.environ.get("DANBOORU_LABELS") or data_dir() / "labels.sqlite")


def ensure_dagster_home() -> Path:
    """Point ``DAGSTER_HOME`` at ``.dagster_home`` (git-ignored) unless set, with the
    project's ``dagster.yaml`` (SQLite storage, the ``gpu`` pool) copied in."""
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path.cwd() / ".dagster_home")))
    home.mkdir(parents=True, exist_ok=True)
    project_yaml = Path(__file__).resolve().parent.parent / "dagster.yaml"
    if not (home / "dagster.yaml").exists() and project_yaml.exists():
        shutil.copyfile(project_yaml, home / "dagster.yaml")
    return home


# The most pixels one decode may produce (~7,000 x 7,000): a 100M-pixel PNG took 11 s and
# 1.3 GB to decode, and each loader worker may hold one; PIL itself only warns at 89M and
# refuses at 179M. JPEGs count at the scale they are decoded at (libjpeg reduces by up to
# 8 per side), so a big JPEG is still read, at reduced scale (core.images.size_problem).
DEFAULT_MAX_PIXELS = 50_000_000
