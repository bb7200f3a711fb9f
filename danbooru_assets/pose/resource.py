"""The pose estimator as a Dagster resource: which backend, which weights, which device."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg
from pydantic import Field

if TYPE_CHECKING:  # the backends (torch, PIL) load when an estimator is made
    from danbooru_assets.pose.backends import PoseEstimator

KEYPOINT_FILES = "keypoint_files"
BACKENDS: tuple[str, ...] = ("keypoint_rcnn", "bizarre_pose", "mediapipe", KEYPOINT_FILES)


class PoseEstimatorResource(dg.ConfigurableResource):
    """``backend``: ``keypoint_files`` (import published JSON keypoints, no model),
    ``keypoint_rcnn`` (torchvision), ``bizarre_pose`` (the seed's estimator, from a
    user-supplied checkout) or ``mediapipe`` (BlazePose, the ``mediapipe`` extra)."""

    backend: str = Field(KEYPOINT_FILES, description=f"One of {', '.join(BACKENDS)}.")
    keypoint_files: str = Field(
        "", description="keypoint_files: a folder or .tar/.tar.gz of <image id>.json files."
    )
    axis_order: str = Field("auto", description="keypoint_files: 'yx' (bizarre-pose output), 'xy' or 'auto'.")
    checkpoint: str = Field("", description="Local weights file (keypoint_rcnn); empty: the hub.")
    bizarre_pose_repo: str = Field("", description="bizarre_pose: path of the repository checkout.")
    device: str = Field("auto", description="'auto' (CUDA when present), 'cuda' or 'cpu'.")
    batch_size: int = 8
    input_size: int = Field(
        800, description="Short side the model sees (keypoint_rcnn's min_size; images are decoded near it)."
    )
    allow_random_weights: bool = Field(False, description="Tests only: random-initialised weights.")

    def uses_files(self) -> bool:
        return self.backend == KEYPOINT_FILES

    def check(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(
                f"unknown pose backend {self.backend!r}: set `pose_estimator.backend` "
                f"(or DANBOORU_POSE_BACKEND) to one of {', '.join(BACKENDS)}"
            )
        if self.uses_files() and not Path(self.keypoint_files).exists():
            raise FileNotFoundError(
                f"keypoint files {self.keypoint_files!r} not found: set `pose_estimator.keypoint_files` "
                "(or DANBOORU_KEYPOINTS) to a folder or tarball of <image id>.json files"
            )

    def estimator(self) -> PoseEstimator:
        from danbooru_assets.pose.backends import make_estimator

        self.check()
        return make_estimator(
            self.backend,
            checkpoint=self.checkpoint,
            device=self.device,
            allow_random_weights=self.allow_random_weights,
            bizarre_pose_repo=self.bizarre_pose_repo,
            batch_size=self.batch_size,
            **({"min_size": self.input_size} if self.backend == "keypoint_rcnn" else {}),
        )

    def fingerprint(self) -> str:
        """The backend's identity, stored with every keypoint row: rows are reused only
        under the same one. For keypoint files: every file's name, size and mtime (an edit
        in place is noticed) and the axis order asked for."""
        from danbooru_assets.pose.backends import fingerprint_string

        if self.uses_files():
            from danbooru_assets.pose.keypoint_files import source_fingerprint

            self.check()
            return fingerprint_string({**source_fingerprint(self.keypoint_files), "axis_order": self.axis_order})
        return fingerprint_string(self.estimator().fingerprint())
