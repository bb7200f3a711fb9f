"""The code location's assets over one dataset folder, materialized in process.

Tests and benchmarks use it to run real materializations (real IO manager, real
Parquet, an ephemeral Dagster instance) against a dataset of their own, without the
environment-derived resources of ``definitions.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg


class Sandbox:
    def __init__(self, root: Path, base: Path, clip_model=None, pose_estimator=None, log_level: str = "WARNING"):
        from danbooru_assets.config import KEYPOINTS_TARBALL
        from danbooru_assets.definitions import defs
        from danbooru_assets.orchestration import resources
        from danbooru_assets.orchestration.io_manager import ParquetIOManagerFactory

        self.root = Path(root)
        self.log_level = log_level
        self.settings_path = Path(base) / "settings.yaml"
        self.storage = resources.StorageResource(base_path=str(Path(base) / "storage"))
        self.instance = dg.DagsterInstance.ephemeral()
        self.assets = list(defs.assets)
        self.resources: dict[str, Any] = {
            "dataset": resources.DanbooruDatasetResource(root=str(self.root)),
            "storage": self.storage,
            "io_manager": ParquetIOManagerFactory(storage=self.storage),
            "settings": resources.SettingsResource(path=str(self.settings_path)),
            "clip_model": clip_model or resources.ClipModelResource.demo(),
            "pose_estimator": pose_estimator
            # the sample tarball holds keypoints in each image's own pixels
            or resources.PoseEstimatorResource(keypoint_files=str(self.root / KEYPOINTS_TARBALL), keypoint_frame="image"),
            "label_store": resources.LabelStoreResource(path=str(Path(base) / "labels.sqlite")),
        }

    def materialize(
        self,
        selection: list[str],
        partition: str | None = None,
        run_config: dict | None = None,
        shards: list[str] | None = None,
        raise_on_error: bool = True,
    ):
        """One run of ``selection``: unpartitioned, for one ``partition``, or over the
        contiguous range of ``shards`` (as a backfill or the CLI runs it)."""
        from danbooru_assets.orchestration.partitions import range_tags, shard_ranges

        tags = {}
        if shards:
            ranges = shard_ranges(shards)
            if len(ranges) != 1:
                raise ValueError(f"shards {shards} are not one contiguous range")
            tags = range_tags(*ranges[0])
        run_config = {"loggers": {"console": {"config": {"log_level": self.log_level}}}, **(run_config or {})}
        return dg.materialize(
            self.assets,
            selection=selection,
            partition_key=partition,
            tags=tags,
            resources=self.resources,
            instance=self.instance,
            run_config=run_config,
            raise_on_error=raise_on_error,
        )

    @staticmethod
    def metadata(result, asset: str) -> dict:
        """The metadata of ``asset``'s materialization in ``result``, as plain values."""
        for event in result.get_asset_materialization_events():
            mat = event.step_materialization_data.materialization
            if mat.asset_key.to_user_string() == asset:
                return {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
        raise KeyError(f"{asset} was not materialized in this run")

    def table(self, asset: str, partition: str | None = None):
        from danbooru_assets.core.tables import read_parquet

        return read_parquet(self.storage.asset_path(asset, partition))
