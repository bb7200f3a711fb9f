"""The pose library: keypoint import/export, estimators, geometry rules and drawing.

Dagster assets (``pose_keypoints``, ``pose_statistics``, ``pose_subset``) are wired
elsewhere; this package is plain Python over tables and images.
"""

from danbooru_assets.pose.backends import (
    BACKENDS,
    BackendUnavailableError,
    BizarrePoseEstimator,
    KeypointRCNNEstimator,
    MediapipeEstimator,
    PoseEstimator,
    fingerprint_string,
    keypoint_files_fingerprint,
    make_estimator,
    run_estimator,
)
from danbooru_assets.pose.draw import draw_skeleton, skeleton_sheet
from danbooru_assets.pose.geometry import (
    CANONICAL_POSE,
    REASONS,
    PoseRules,
    apply_pose_rules,
    feature_histograms,
    hip_midpoint_scatter,
    keypoint_array,
    keypoint_frame,
    pose_features,
    reason_counts,
    robust_statistics,
    select_examples,
    synthetic_poses,
)
from danbooru_assets.pose.keypoint_files import (
    ImportReport,
    detect_axis_order,
    read_keypoint_files,
    write_keypoint_files,
)

__all__ = [
    "BACKENDS", "BackendUnavailableError", "BizarrePoseEstimator", "KeypointRCNNEstimator",
    "MediapipeEstimator", "PoseEstimator", "CANONICAL_POSE", "synthetic_poses", "fingerprint_string",
    "keypoint_files_fingerprint", "make_estimator", "run_estimator", "draw_skeleton",
    "skeleton_sheet", "REASONS", "PoseRules", "apply_pose_rules", "feature_histograms",
    "hip_midpoint_scatter", "keypoint_array", "keypoint_frame", "pose_features", "reason_counts",
    "robust_statistics", "select_examples", "ImportReport", "detect_axis_order",
    "read_keypoint_files", "write_keypoint_files",
]
