"""The code location: assets, resources, jobs and sensors, wired together. Nothing else
lives here: resources are configured from :mod:`danbooru_assets.config` (``dg.EnvVar`` for
a variable that is set, so the UI shows it and a run resolves it when it starts).

``dagster dev`` (workspace.yaml), ``dagster dev -m danbooru_assets``, ``dg dev`` and
``danbooru-assets run`` all load ``defs`` from here.

Loading it is light (dagster, pydantic and the project's own modules: no torch,
open_clip, pandas, scikit-learn or matplotlib; those load inside the functions that use
them), because every run the daemon launches is a new process that loads it. Runs use
the in-process executor by default: a run covers a range of shards, its steps run one after
another in that process, and no step pays for a subprocess and a second import.
``DANBOORU_EXECUTOR=celery`` spreads the steps over Celery workers instead (deploy/).
"""

from __future__ import annotations

import dagster as dg

from danbooru_assets import config
from danbooru_assets.orchestration.assets.clip import (
    clip_embeddings_and_image_stats,
    clip_scores,
    clip_subset,
    clip_threshold,
    prompt_embeddings,
)
from danbooru_assets.orchestration.assets.dedup import near_duplicates
from danbooru_assets.orchestration.assets.index import danbooru_metadata, shard_index
from danbooru_assets.orchestration.assets.prefilter import metadata_prefilter
from danbooru_assets.orchestration.assets.pose import pose_keypoints, pose_statistics, pose_subset, published_keypoints
from danbooru_assets.orchestration.assets.quality import (
    curated_dataset,
    labeling_queue,
    labels,
    quality_model,
    quality_predictions,
)
from danbooru_assets.orchestration.assets.settings import settings_assets
from danbooru_assets.orchestration.executors import build_executor
from danbooru_assets.orchestration.io_manager import ParquetIOManagerFactory
from danbooru_assets.orchestration.resources import (
    ClipModelResource,
    DanbooruDatasetResource,
    LabelStoreResource,
    PoseEstimatorResource,
    SettingsResource,
    StorageResource,
)
from danbooru_assets.orchestration.staleness import settings_checks
from danbooru_assets.orchestration.why import why_image
from danbooru_assets.orchestration.sensors import build_new_data_sensor, build_retrain_sensor, settings_sensor
from danbooru_assets.pose.backend_names import KEYPOINT_FILES


# The main job runs in stages: a per-shard stage over every shard's range, then the
# global asset that needs all shards (a threshold or a statistic calibrated over the
# whole dataset). A per-shard job is partitioned by the shard partitions of its assets.
# The assets of each job, for the CLI's skip check (orchestration.stage_fingerprints).
JOB_ASSETS: dict[str, list] = {}


def stage_job(name: str, assets: list, description: str = ""):
    JOB_ASSETS[name] = list(assets)
    return dg.define_asset_job(name, selection=assets, description=description)


prepare_job = stage_job(
    "prepare_job",
    [danbooru_metadata, published_keypoints, prompt_embeddings],
    "Convert the metadata dump (and published keypoint files) once, split by shard; encode the prompts.",
)
ingest_job = stage_job(
    "ingest_job",
    [shard_index, metadata_prefilter, clip_embeddings_and_image_stats, clip_scores],
    "Index shards, prefilter them by metadata, decode and encode their new admitted images once, score them "
    "with the prompts.",
)
clip_threshold_job = stage_job("clip_threshold_job", [clip_threshold])
pose_job = stage_job("pose_job", [clip_subset, pose_keypoints], "The CLIP subset and its keypoints.")
pose_statistics_job = stage_job("pose_statistics_job", [pose_statistics])
near_duplicates_job = stage_job(
    "near_duplicates_job", [near_duplicates], "Duplicate groups over the CLIP subset of every shard."
)
pose_subset_job = stage_job("pose_subset_job", [pose_subset], "The geometric pose filter.")
quality_model_job = stage_job("quality_model_job", [quality_model])
quality_predictions_job = stage_job(
    "quality_predictions_job", [quality_predictions], "Class probabilities from the current model."
)
labeling_queue_job = stage_job("labeling_queue_job", [labeling_queue])
curated_dataset_job = stage_job("curated_dataset_job", [curated_dataset], "The final subset with classes.")

# After a threshold change: the threshold and the subset of every shard (or of a range, or
# one shard) in ONE run, launched from the job's page. Selecting both assets on the asset
# graph launches a backfill instead, which runs them in two waves, one backfill-daemon
# iteration (30 s) apart, because one is unpartitioned and the other is not.
rethreshold_job = stage_job(
    "rethreshold_job",
    [clip_threshold, clip_subset],
    "A new threshold applied: clip_threshold and clip_subset in one run over the chosen shards. No image is read.",
)

# After a prefilter rule change: the prefilter and the subset over the chosen shards, in one
# run; no image is read. Newly admitted images wait (clip_subset: not_encoded) for the next
# ingest run, which encodes only them and reuses every stored embedding.
reprefilter_job = stage_job(
    "reprefilter_job",
    [metadata_prefilter, clip_subset],
    "A prefilter rule changed: metadata_prefilter and clip_subset in one run over the chosen shards. No image is read.",
)

# What the new-data sensor runs for a range of changed shards once the global assets exist
# (before that, only the ingest stage): every per-shard asset, and near_duplicates between
# clip_subset and pose_subset, so a new image is deduplicated against everything kept
# (every shard) before pose_subset and the labeling queue can take it.
SHARD_JOB_ASSETS = [
    shard_index,
    metadata_prefilter,
    clip_embeddings_and_image_stats,
    clip_scores,
    clip_subset,
    pose_keypoints,
    near_duplicates,
    pose_subset,
    quality_predictions,
    curated_dataset,
]
shard_job = stage_job(
    "shard_job",
    SHARD_JOB_ASSETS,
    "Every per-shard asset of a range of shards, with the current global threshold and statistics, and "
    "near_duplicates over every shard's kept images (new images are deduplicated before pose_subset).",
)

# Stages whose assets read only their own shard's images and tables (and unchanged global
# ones): after a change confined to some shards, `danbooru-assets run` runs only those.
PER_SHARD_STAGES = {"ingest_job"}
# Stages that read no image (the metadata files, published keypoints, the prompts): a new
# image does not re-run them.
IMAGE_FREE_STAGES = {"prepare_job"}

# `danbooru-assets run` runs these in order, each as one run over the shards' range(s).
RUN_STAGES = [
    prepare_job,
    ingest_job,
    clip_threshold_job,
    pose_job,
    pose_statistics_job,
    near_duplicates_job,
    pose_subset_job,
    quality_model_job,
    quality_predictions_job,
    labeling_queue_job,
    curated_dataset_job,
]


def env_or(name: str, default: str) -> str:
    """``dg.EnvVar(name)`` where the variable is set (the UI names it; a run resolves it
    when it starts), else ``default`` (from :mod:`danbooru_assets.config`)."""
    return dg.EnvVar(name) if config.is_set(name) else default


def pose_estimator_resource() -> PoseEstimatorResource:
    """Published keypoint files when there are some to import (``DANBOORU_KEYPOINTS``, or
    the sample's tarball), else the model backend (``config.pose_environment``)."""
    pose = config.pose_environment()
    if pose.keypoint_files:
        return PoseEstimatorResource(
            backend=KEYPOINT_FILES,
            keypoint_files=env_or("DANBOORU_KEYPOINTS", pose.keypoint_files),
            # Images without a keypoint file: estimated by this backend when one is named.
            fallback_backend=env_or("DANBOORU_POSE_FALLBACK", pose.fallback),
            checkpoint=env_or("DANBOORU_POSE_CHECKPOINT", pose.checkpoint),
            bizarre_pose_repo=env_or("DANBOORU_BIZARRE_POSE_REPO", pose.bizarre_pose_repo),
            keypoint_frame=env_or("DANBOORU_KEYPOINT_FRAME", pose.keypoint_frame),
        )
    return PoseEstimatorResource(
        backend=env_or("DANBOORU_POSE_BACKEND", pose.backend),
        checkpoint=env_or("DANBOORU_POSE_CHECKPOINT", pose.checkpoint),
        bizarre_pose_repo=env_or("DANBOORU_BIZARRE_POSE_REPO", pose.bizarre_pose_repo),
    )


storage = StorageResource(base_path=env_or("DANBOORU_STORAGE", config.storage_base()))

defs = dg.Definitions(
    assets=[
        *settings_assets.values(),
        danbooru_metadata,
        shard_index,
        metadata_prefilter,
        clip_embeddings_and_image_stats,
        prompt_embeddings,
        clip_scores,
        clip_threshold,
        clip_subset,
        published_keypoints,
        pose_keypoints,
        pose_statistics,
        near_duplicates,
        pose_subset,
        labels,
        quality_model,
        quality_predictions,
        labeling_queue,
        curated_dataset,
    ],
    asset_checks=settings_checks,
    jobs=[*RUN_STAGES, shard_job, rethreshold_job, reprefilter_job, why_image],
    sensors=[
        build_new_data_sensor(
            shard_job, prepare_job, ingest_job, required_global=["clip_threshold", "pose_statistics", "near_duplicates", "quality_model"]
        ),
        build_retrain_sensor(quality_model_job),
        settings_sensor,
    ],
    executor=build_executor(),
    resources={
        "dataset": DanbooruDatasetResource(
            root=env_or("DANBOORU_ROOT", str(config.dataset_root())),
            image_folder=env_or("DANBOORU_IMAGE_FOLDER", config.image_folder()),
        ),
        "storage": storage,
        "io_manager": ParquetIOManagerFactory(storage=storage),
        "settings": SettingsResource(path=env_or("DANBOORU_SETTINGS", str(config.settings_path()))),
        "clip_model": ClipModelResource.from_env(sample_data=config.using_sample_data()),
        "pose_estimator": pose_estimator_resource(),
        "label_store": LabelStoreResource(path=env_or("DANBOORU_LABELS", str(config.labels_path()))),
    },
)
