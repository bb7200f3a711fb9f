"""Synthetic poses: the table layout, reproducibility, the requested outliers and gaps."""

from __future__ import annotations

import numpy as np

from danbooru_assets.pose.coco import KEYPOINT_COLUMNS
from danbooru_assets.pose.features import keypoint_array
from danbooru_assets.pose.synthetic import synthetic_poses


def test_synthetic_poses_layout_seed_and_gaps():
    df = synthetic_poses(2000, seed=3, width=300, height=500, missing_fraction=0.1)
    assert list(df.columns) == ["image_id", *KEYPOINT_COLUMNS, "width", "height"]
    assert df["image_id"].tolist() == list(range(2000))
    assert (df["width"] == 300).all() and (df["height"] == 500).all()
    kps = keypoint_array(df)
    missing = np.isnan(kps[:, :, 0])
    assert 0.07 < missing.mean() < 0.13
    assert np.isnan(kps[:, :, 2][missing]).all()  # no confidence for an absent keypoint
    assert synthetic_poses(2000, seed=3, width=300, height=500, missing_fraction=0.1).equals(df)
    assert not synthetic_poses(2000, seed=4).equals(synthetic_poses(2000, seed=3))


def test_synthetic_poses_without_outliers_are_upright():
    kps = keypoint_array(synthetic_poses(500, seed=5, outlier_fraction=0.0, missing_fraction=0.0))
    nose_y, hip_y, ankle_y = kps[:, 0, 1], kps[:, 11, 1], kps[:, 15, 1]
    assert (nose_y < hip_y).all() and (hip_y < ankle_y).all()  # y grows downward
