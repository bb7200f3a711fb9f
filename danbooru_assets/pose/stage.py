"""``pose_keypoints`` as a per-shard stage (:class:`~danbooru_assets.core.stage.ShardStage`):
keypoints for each image clip_subset keeps, from published keypoint files or a model.

Rows of the same image file (size, mtime) under the same backend fingerprint are reused.
With keypoint files, images without a file get the model of ``fallback`` when one is
configured (loaded only then); otherwise status ``no_keypoint_file``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

from danbooru_assets.core.stage import Progress, ShardPlan, ShardStage
from danbooru_assets.pose.backend_names import KEYPOINT_FILES

if TYPE_CHECKING:
    from pathlib import Path

    import pandas as pd

    from danbooru_assets.pose.backends import PoseEstimator

# pose_keypoints' status of an image the published keypoint files have no file for.
NO_KEYPOINT_FILE = "no_keypoint_file"


class PoseKeypointStage(ShardStage):
    name = "pose_keypoints"
    tables = ("pose_keypoints",)
    progress_label = "images (pose)"

    def __init__(
        self,
        subset: Mapping[str, pd.DataFrame],
        index: Mapping[str, pd.DataFrame],
        fingerprint: str,
        backend: str,
        estimator: Callable[[], PoseEstimator] | None,
        image_path: Callable[[str], Path],
        max_pixels: int | None,
        batch_size: int = 8,
        input_size: int = 800,
        published: Callable[[str], pd.DataFrame | None] | None = None,
        keypoint_frame: str = "image",
        image_folder: str = "original",
        warn: Callable[[str], Any] | None = None,
    ):
        """``published(shard)``: the imported keypoint files of a shard (keypoint_files
        backend); ``estimator()``: the model (the backend's, or the fallback's with
        keypoint files; None: no fallback), called only when an image needs it."""
        self.subset = subset
        self.index = index
        self.fingerprint = fingerprint
        self.backend = backend
        self.make_estimator = estimator
        self.image_path = image_path
        self.max_pixels = max_pixels
        self.input_size = input_size
        self.published = published
        self.keypoint_frame = keypoint_frame
        self.image_folder = image_folder
        self.warn = warn or (lambda message: None)
        self.uses_files = backend == KEYPOINT_FILES
        # A model backend batches across shards; files are read shard by shard.
        self.batch_rows = max(1, int(batch_size))
        self.batch_across_shards = not self.uses_files
        self.batch_size = max(1, int(batch_size))
        self._estimator: PoseEstimator | None = None

    def candidates(self, shard: str):
        subset = self.subset[shard]
        wanted = subset.loc[subset["kept"], ["image_id", "rel_path", "width", "height"]]
        # An id missing from the index now has no identity: it never matches, and is estimated.
        return wanted.merge(self.index[shard], on=["image_id", "rel_path"], how="left"), {}

    def still_valid(self, table: str, previous: pd.DataFrame) -> pd.DataFrame:
        return previous.loc[previous["backend_fingerprint"] == self.fingerprint]

    def refresh_reused(self, plan: ShardPlan) -> ShardPlan:
        reused = plan.reused[0]
        if reused is not None and len(reused):  # the image sizes of now (the same file; the metadata may change)
            key = list(self.reuse_key)
            sizes = plan.candidates[[*key, "width", "height"]].drop_duplicates(key)
            plan.reused[0] = reused.drop(columns=["width", "height"]).merge(sizes, on=key)
        return plan

    def estimator(self) -> PoseEstimator:
        if self._estimator is None:
            self._estimator = self.make_estimator()
        return self._estimator

    def setup(self) -> None:
        if not self.uses_files:  # keypoint files need no model; their fallback loads when a file is missing
            self.estimator()

    def process(self, todo: pd.DataFrame, progress: Progress) -> pd.DataFrame:
        import pandas as pd

        if not self.uses_files:
            out = self._from_model(todo)
            progress(len(todo), len(todo))
            return out.assign(shard=todo["shard"].to_numpy())
        shard = todo["shard"].iloc[0]  # one shard per call (batch_across_shards is False)
        out = self._from_files(shard, todo).assign(shard=shard)
        progress(len(todo), len(todo))
        return out

    def _from_files(self, shard: str, todo: pd.DataFrame) -> pd.DataFrame:
        import pandas as pd

        from danbooru_assets.pose.keypoint_files import keypoints_for_ids

        sizes = (todo["width"].to_numpy(dtype=float), todo["height"].to_numpy(dtype=float))
        fresh = keypoints_for_ids(self.published(shard), todo["image_id"].to_numpy(), self.fingerprint,
                                  self.keypoint_frame, sizes, self.image_folder)
        no_file = fresh["status"] == NO_KEYPOINT_FILE
        if not no_file.any() or self.make_estimator is None:
            return fresh
        missing = todo.loc[todo["image_id"].isin(fresh.loc[no_file, "image_id"])]
        estimated = pd.concat(
            [self._from_model(missing.iloc[s : s + self.batch_size]) for s in range(0, len(missing), self.batch_size)],
            ignore_index=True,
        )
        # Its rows name the model (`backend`) and are reused under the combined fingerprint.
        return pd.concat([fresh.loc[~no_file], estimated.assign(backend_fingerprint=self.fingerprint)],
                         ignore_index=True)

    def _from_model(self, batch: pd.DataFrame) -> pd.DataFrame:
        from danbooru_assets.core.images import ImageDecodeError, open_image_rgb
        from danbooru_assets.pose.backends import run_estimator
        from danbooru_assets.pose.features import rescale_keypoints

        images, scales = [], []
        for row in batch.itertuples():
            try:
                image, (w, h) = open_image_rgb(self.image_path(row.rel_path), self.input_size, self.max_pixels)
                images.append(image)
                scales.append((w / image.width, h / image.height))
            except ImageDecodeError as exc:
                self.warn(str(exc))
                images.append(None)
                scales.append((1.0, 1.0))
        frame = run_estimator(self.estimator(), batch["image_id"].tolist(), images)
        # Back to original-image pixels (the decode may have been reduced).
        return rescale_keypoints(frame, [s[0] for s in scales], [s[1] for s in scales])

    def assemble(self, plan: ShardPlan, fresh: pd.DataFrame | None):
        import numpy as np
        import pandas as pd

        from danbooru_assets.pose.coco import NUM_KEYPOINTS
        from danbooru_assets.pose.features import keypoint_frame

        todo, reused = plan.todo, plan.reused[0]
        if fresh is not None and len(fresh):
            fresh = fresh.merge(todo[["image_id", "file_bytes", "mtime", "width", "height"]], on="image_id")
        parts = [f for f in (reused, fresh) if f is not None and len(f)]
        if parts:
            table = pd.concat(parts, ignore_index=True)
        else:
            table = keypoint_frame(np.zeros(0, dtype=np.int64), np.zeros((0, NUM_KEYPOINTS, 3)), None,
                                   backend=self.backend, backend_fingerprint=self.fingerprint, status=[])
            table = table.assign(file_bytes=pd.Series(dtype="int64"), mtime=pd.Series(dtype="float64"),
                                 width=pd.Series(dtype="int64"), height=pd.Series(dtype="int64"))
        table = table.sort_values("image_id").reset_index(drop=True)
        counts = {"images": len(table), "estimated": len(todo), "reused": 0 if reused is None else len(reused)}
        if self.uses_files:
            # Kept images with no keypoint file (reused rows included): no pose, so pose_subset
            # drops them as no_pose until a file arrives or a fallback estimates them.
            counts["no_keypoint_file"] = int((table["status"] == NO_KEYPOINT_FILE).sum())
            counts["fallback_estimated"] = 0 if fresh is None or not len(fresh) else int(
                (fresh["backend"] != KEYPOINT_FILES).sum())
        counts.update({f"status_{k}": int(v) for k, v in table["status"].value_counts().items()})
        return (table,), counts
