"""The code location: assets, resources, jobs and sensors, configured from the environment.

``dagster dev`` (workspace.yaml) and ``danbooru-assets run`` both load ``defs`` from here.
"""

import os

import dagster as dg

from danbooru_assets import environment
from danbooru_assets.assets.clip import clip_embeddings_and_image_stats, clip_scores, clip_subset, clip_threshold
from danbooru_assets.assets.index import danbooru_metadata, shard_index
from danbooru_assets.assets.pose import pose_keypoints, pose_statistics, pose_subset, published_keypoints
from danbooru_assets.assets.quality import (
    curated_dataset,
    labeling_queue,
    labels,
    quality_model,
    quality_predictions,
)
from danbooru_assets.clip_model import ClipModelResource
from danbooru_assets.dataset import DanbooruDatasetResource
from danbooru_assets.io_manager import ParquetIOManagerFactory, StorageResource
from danbooru_assets.labels.store import LabelStoreResource
from danbooru_assets.pose.resource import KEYPOINT_FILES, PoseEstimatorResource
from danbooru_assets.sample_data import KEYPOINTS_TARBALL
from danbooru_assets.sensors import build_new_data_sensor, build_retrain_sensor
from danbooru_assets.settings import SettingsResource


def _per_shard_job(name: str, assets: list, description: str):
    # Partitioned by the shard partitions, inferred from the assets.
    return dg.define_asset_job(name, selection=assets, description=description)


# The main job runs in stages: a per-shard stage for every shard, then the global asset
# that needs all shards (a threshold or a statistic calibrated over the whole dataset).
prepare_job = dg.define_asset_job(
    "prepare_job",
    selection=[danbooru_metadata, published_keypoints],
    description="Convert the metadata dump (and published keypoint files) once, split by shard.",
)
ingest_job = _per_shard_job(
    "ingest_job",
    [shard_index, clip_embeddings_and_image_stats, clip_scores],
    "Index a shard, decode and encode its new images once, score them with the prompts.",
)
clip_threshold_job = dg.define_asset_job("clip_threshold_job", selection=[clip_threshold])
pose_job = _per_shard_job("pose_job", [clip_subset, pose_keypoints], "The CLIP subset and its keypoints.")
pose_statistics_job = dg.define_asset_job("pose_statistics_job", selection=[pose_statistics])
pose_subset_job = _per_shard_job("pose_subset_job", [pose_subset], "The geometric pose filter.")
quality_model_job = dg.define_asset_job("quality_model_job", selection=[quality_model])
quality_predictions_job = _per_shard_job(
    "quality_predictions_job", [quality_predictions], "Class probabilities from the current model."
)
labeling_queue_job = dg.define_asset_job("labeling_queue_job", selection=[labeling_queue])
curated_dataset_job = _per_shard_job("curated_dataset_job", [curated_dataset], "The final subset with classes.")

# Every per-shard asset: what the new-data sensor runs for a changed shard once the
# global assets exist (before that, only the ingest stage).
shard_job = _per_shard_job(
    "shard_job",
    [
        shard_index,
        clip_embeddings_and_image_stats,
        clip_scores,
        clip_subset,
        pose_keypoints,
        pose_subset,
        quality_predictions,
        curated_dataset,
    ],
    "Every per-shard asset of one shard, with the current global threshold and statistics.",
)

RUN_STAGES: list[tuple] = [
    (prepare_job, False),
    (ingest_job, True),
    (clip_threshold_job, False),
    (pose_job, True),
    (pose_statistics_job, False),
    (pose_subset_job, True),
    (quality_model_job, False),
    (quality_predictions_job, True),
    (labeling_queue_job, False),
    (curated_dataset_job, True),
]


def pose_estimator_from_env(dataset_root) -> PoseEstimatorResource:
    """Sample data: its published keypoint tarball. A real dataset: ``DANBOORU_KEYPOINTS``
    (published files) if set, else ``DANBOORU_POSE_BACKEND`` (default keypoint_rcnn)."""
    keypoints = os.environ.get("DANBOORU_KEYPOINTS")
    if environment.using_sample_data() and not keypoints and not os.environ.get("DANBOORU_POSE_BACKEND"):
        keypoints = str(dataset_root / KEYPOINTS_TARBALL)
    if keypoints:
        return PoseEstimatorResource(backend=KEYPOINT_FILES, keypoint_files=keypoints)
    return PoseEstimatorResource(
        backend=os.environ.get("DANBOORU_POSE_BACKEND", "keypoint_rcnn"),
        checkpoint=os.environ.get("DANBOORU_POSE_CHECKPOINT", ""),
        bizarre_pose_repo=os.environ.get("DANBOORU_BIZARRE_POSE_REPO", ""),
    )


dataset_root = environment.dataset_root()
storage = StorageResource(base_path=environment.storage_base())

defs = dg.Definitions(
    assets=[
        danbooru_metadata,
        shard_index,
        clip_embeddings_and_image_stats,
        clip_scores,
        clip_threshold,
        clip_subset,
        published_keypoints,
        pose_keypoints,
        pose_statistics,
        pose_subset,
        labels,
        quality_model,
        quality_predictions,
        labeling_queue,
        curated_dataset,
    ],
    jobs=[job for job, _ in RUN_STAGES] + [shard_job],
    sensors=[
        build_new_data_sensor(
            shard_job, prepare_job, ingest_job, required_global=["clip_threshold", "pose_statistics", "quality_model"]
        ),
        build_retrain_sensor(quality_model_job),
    ],
    resources={
        "dataset": DanbooruDatasetResource(root=str(dataset_root)),
        "storage": storage,
        "io_manager": ParquetIOManagerFactory(storage=storage),
        "settings": SettingsResource(path=str(environment.settings_path())),
        "clip_model": ClipModelResource.from_env(sample_data=environment.using_sample_data()),
        "pose_estimator": pose_estimator_from_env(dataset_root),
        "label_store": LabelStoreResource(path=str(environment.labels_path())),
    },
)
