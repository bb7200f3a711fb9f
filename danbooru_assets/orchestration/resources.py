"""The code location's resources: thin Dagster faces over the library's objects.

Each resource holds configuration (shown in the UI, set from the environment through
``dg.EnvVar`` in :mod:`danbooru_assets.definitions`) and hands work to library code that
does not import Dagster. Importing this module stays light: torch, open_clip and the pose
backends load when a model is first used.
"""

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import dagster as dg
from pydantic import Field
from upath import UPath

from danbooru_assets import config
from danbooru_assets.clip.model import DEFAULT_MODEL, DEFAULT_PRETRAINED, DEMO_FIELDS, ClipModel, model_fields
from danbooru_assets.config import DEFAULT_MAX_PIXELS
from danbooru_assets.core.shards import SHARD_KEYS
from danbooru_assets.core.tables import ShardTables, TableLayout
from danbooru_assets.dataset.layout import DatasetLayout
from danbooru_assets.pose.backend_names import BACKENDS, KEYPOINT_FILES
from danbooru_assets.settings import CurationSettings, ReadSettings, SettingsError, read_settings

if TYPE_CHECKING:
    from danbooru_assets.labels.store import LabelStore
    from danbooru_assets.pose.backends import PoseEstimator


# -- storage, dataset, settings --

class StorageResource(dg.ConfigurableResource):
    """The base of the project's table storage: a local folder or an fsspec URL.

    Shared by the Parquet IO manager and by assets that keep side tables of their own
    (the per-shard metadata slices, their own previous output for incremental reuse),
    so both always point at the same place."""

    base_path: str

    def layout(self) -> TableLayout:
        """Where each table lives (:class:`~danbooru_assets.core.tables.TableLayout`)."""
        return TableLayout(self.base_path)

    def path(self, *parts: str) -> UPath:
        return self.layout().path(*parts)

    def asset_path(self, asset_name: str, partition: str | None = None) -> UPath:
        """Where the IO manager keeps an asset's table (for the CLI, the labeling page, benchmarks)."""
        return self.layout().table_path(asset_name, partition)

    def shard_tables(self, asset_name: str, columns: list[str] | None = None) -> ShardTables:
        """Every stored shard of a per-shard asset, for readers outside a run (CLI, exports)."""
        return self.layout().shard_tables(asset_name, SHARD_KEYS, columns)


class DanbooruDatasetResource(dg.ConfigurableResource):
    """Where the dataset lives (:class:`~danbooru_assets.dataset.layout.DatasetLayout`).
    ``root`` comes from ``$DANBOORU_ROOT`` (unset: the bundled sample data, generated on
    first use by ``danbooru-assets run``)."""

    root: str = Field(description="Dataset root folder (holds original/ or 512px/, and metadata/).")
    image_folder: str = Field(
        default="",
        description="Image folder under the root: 'original' or '512px' (Danbooru20xx's downscaled copy); "
        "empty: the one of them the root holds (it must then hold only one).",
    )
    max_pixels: int = Field(
        default=DEFAULT_MAX_PIXELS,
        gt=0,
        description="The most pixels one image decode may produce (JPEGs count at their reduced "
        "decode scale). shard_index gives larger images the status 'too_large'; they are never decoded.",
    )

    def layout(self) -> DatasetLayout:
        from danbooru_assets.dataset.layout import resolve_image_folder

        folder = resolve_image_folder(self.root, self.image_folder)
        return DatasetLayout(root=self.root, image_folder=folder, max_pixels=self.max_pixels)

    def image_path(self, rel_path: str) -> Path:
        """A dataset file's path (the assets that decode images call this)."""
        # rel_path already names its folder: no need to find the image folder per image
        return DatasetLayout(root=self.root, max_pixels=self.max_pixels).image_path(rel_path)


class SettingsResource(dg.ConfigurableResource):
    """Reads the durable settings file at run time (so a sensor's run sees the latest)."""

    path: str = Field(description="The durable curation settings file (YAML).")

    def read(self) -> ReadSettings:
        """The settings and their source from one read of the file: a step calls it once
        and resolves each section it uses with :meth:`resolve`."""
        return self._failing_run(read_settings)

    def resolve(self, read: ReadSettings, section: Any, overrides: dict[str, Any] | None = None) -> tuple[Any, str]:
        """``section`` with a run's ``overrides`` (same bounds as the file) and its source;
        a bad override fails the run, never retried and never used."""
        return self._failing_run(lambda _path: read.resolve(section, overrides))

    def load(self) -> CurationSettings:
        """The settings alone (sensors, checks); a step that records its source uses :meth:`read`."""
        return self.read().settings

    def _failing_run(self, read: Callable[[str], Any]) -> Any:
        # A dg.Failure: the run's failure message is the one line naming the file and key.
        try:
            return read(self.path)
        except SettingsError as exc:
            metadata = {"settings_file": self.path, **({"key": exc.key} if exc.key else {})}
            raise dg.Failure(description=str(exc), metadata=metadata, allow_retries=False) from None


# -- CLIP model --

class ClipModelResource(dg.ConfigurableResource):
    """The open_clip model of the CLIP stage (:class:`~danbooru_assets.clip.model.ClipModel`,
    whose docstring says what each field means). Environment (read by :meth:`from_env`):
    ``DANBOORU_CLIP_MODEL``, ``DANBOORU_CLIP_PRETRAINED``."""

    model_name: str = Field(DEFAULT_MODEL, description="An open_clip architecture, or 'danbooru-demo-tiny'.")
    pretrained: str = Field(
        DEFAULT_PRETRAINED, description="A pretrained tag, a local checkpoint file, or '' for random weights."
    )
    device: str = Field("auto", description="'auto' (CUDA when present), 'cuda' or 'cpu'.")
    precision: str = Field("auto", description="'auto', 'fp32', 'fp16' or 'bf16'.")
    batch_size: int = 64
    num_workers: int = Field(-1, description="Image decoding processes; -1: min(4, cpus).")
    allow_random_weights: bool = Field(False, description="Demos and tests only: accept pretrained=''.")

    @classmethod
    def demo(cls) -> "ClipModelResource":
        """The tiny random-weights model for sample data and tests (no download)."""
        return cls(**DEMO_FIELDS)

    @classmethod
    def from_env(cls, sample_data: bool, **overrides: Any) -> "ClipModelResource":
        """The resource for a run: the environment wins; otherwise the demo on sample data,
        else the real model (:func:`~danbooru_assets.clip.model.model_fields`)."""
        return cls(**{**model_fields(*config.clip_model_env(), sample_data=sample_data), **overrides})

    def model(self) -> ClipModel:
        """The library object that loads and runs the model (loaded once per process)."""
        return ClipModel(
            model_name=self.model_name,
            pretrained=self.pretrained,
            device=self.device,
            precision=self.precision,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            allow_random_weights=self.allow_random_weights,
        )


# -- pose estimator --

class PoseEstimatorResource(dg.ConfigurableResource):
    """``backend``: ``keypoint_files`` (import published JSON keypoints, no model),
    ``keypoint_rcnn`` (torchvision), ``bizarre_pose`` (the seed's estimator, from a
    user-supplied checkout) or ``mediapipe`` (BlazePose, the ``mediapipe`` extra)."""

    backend: str = Field(KEYPOINT_FILES, description=f"One of {', '.join(BACKENDS)}.")
    keypoint_files: str = Field(
        "", description="keypoint_files: a folder or .tar/.tar.gz of <image id>.json files."
    )
    axis_order: str = Field("auto", description="keypoint_files: 'yx' (bizarre-pose output), 'xy' or 'auto'.")
    keypoint_frame: str = Field(
        "512px",
        description="keypoint_files: the frame the files are in. '512px': the 512px release's padded "
        "512x512 square (the seed's files), moved to each indexed image's size; 'image': each indexed "
        "image's own pixels.",
    )
    checkpoint: str = Field("", description="Local weights file (keypoint_rcnn); empty: the hub.")
    bizarre_pose_repo: str = Field("", description="bizarre_pose: path of the repository checkout.")
    device: str = Field("auto", description="'auto' (CUDA when present), 'cuda' or 'cpu'.")
    batch_size: int = 8
    input_size: int = Field(
        800, description="Short side the model sees (keypoint_rcnn's min_size; images are decoded near it)."
    )
    allow_random_weights: bool = Field(False, description="Tests only: random-initialised weights.")
    fallback_backend: str = Field(
        "",
        description="keypoint_files: a model backend (keypoint_rcnn, bizarre_pose, mediapipe; its checkpoint "
        "and repository as above) run on the images that have no keypoint file; empty: they keep status "
        "no_keypoint_file and pose_subset drops them as no_pose.",
    )

    def uses_files(self) -> bool:
        return self.backend == KEYPOINT_FILES

    def has_fallback(self) -> bool:
        return self.uses_files() and bool(self.fallback_backend)

    def check(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(
                f"unknown pose backend {self.backend!r}: set `pose_estimator.backend` "
                f"(or DANBOORU_POSE_BACKEND) to one of {', '.join(BACKENDS)}"
            )
        if self.fallback_backend and self.fallback_backend not in set(BACKENDS) - {KEYPOINT_FILES}:
            raise ValueError(
                f"unknown pose fallback backend {self.fallback_backend!r}: set `pose_estimator.fallback_backend` "
                f"(or DANBOORU_POSE_FALLBACK) to one of {', '.join(b for b in BACKENDS if b != KEYPOINT_FILES)}"
            )
        if self.uses_files() and self.keypoint_frame not in ("512px", "image"):
            raise ValueError(
                f"unknown keypoint frame {self.keypoint_frame!r}: set `pose_estimator.keypoint_frame` "
                "(or DANBOORU_KEYPOINT_FRAME) to 512px or image"
            )
        if self.uses_files() and not Path(self.keypoint_files).exists():
            raise FileNotFoundError(
                f"keypoint files {self.keypoint_files!r} not found: set `pose_estimator.keypoint_files` "
                "(or DANBOORU_KEYPOINTS) to a folder or tarball of <image id>.json files"
            )

    def estimator(self) -> "PoseEstimator":
        """The model of ``backend``, or with keypoint files the ``fallback_backend``'s."""
        from danbooru_assets.pose.backends import make_estimator

        return make_estimator(**self._estimator_args())

    def _estimator_args(self) -> dict[str, Any]:
        self.check()
        backend = self.fallback_backend if self.uses_files() else self.backend
        return dict(
            backend=backend,
            checkpoint=self.checkpoint,
            device=self.device,
            allow_random_weights=self.allow_random_weights,
            bizarre_pose_repo=self.bizarre_pose_repo,
            batch_size=self.batch_size,
            **({"min_size": self.input_size} if backend == "keypoint_rcnn" else {}),
        )

    def model_fingerprint(self) -> dict:
        """The model's fingerprint without loading it (``pose.backends.estimator_fingerprint``)."""
        from danbooru_assets.pose.backends import estimator_fingerprint

        args = self._estimator_args()
        for unused in ("device", "batch_size"):  # not part of a model's identity
            args.pop(unused)
        return estimator_fingerprint(**args)

    def fingerprint(self) -> str:
        """The backend's identity, stored with every keypoint row: rows are reused only
        under the same one. For keypoint files: every file's name, size and mtime (an edit
        in place is noticed) and the axis order asked for."""
        from danbooru_assets.pose.backends import fingerprint_string

        if self.uses_files():
            files = self.files_fingerprint()
            if not self.has_fallback():
                return files
            # Rows are reused only under the same fallback model too.
            return fingerprint_string({"files": files, "fallback": self.model_fingerprint()})
        return fingerprint_string(self.model_fingerprint())

    def files_fingerprint(self) -> str:
        """The keypoint files' identity alone (what published_keypoints imported)."""
        from danbooru_assets.pose.backends import fingerprint_string
        from danbooru_assets.pose.keypoint_files import source_fingerprint

        self.check()
        return fingerprint_string(
            {**source_fingerprint(self.keypoint_files), "axis_order": self.axis_order, "frame": self.keypoint_frame}
        )


# -- label store --


class LabelStoreResource(dg.ConfigurableResource):
    """The label database (``$DANBOORU_LABELS``, default ``data/labels.sqlite``)."""

    path: str = Field(description="The label store: a SQLite file or a SQLAlchemy URL (postgresql+psycopg2://user@host:5432/db).")

    def store(self) -> "LabelStore":
        from danbooru_assets.labels.store import LabelStore

        return LabelStore(self.path)
