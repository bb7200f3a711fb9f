"""Keypoint tables, pose features and robust statistics: known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from danbooru_assets.pose.coco import KEYPOINT_COLUMNS
from danbooru_assets.pose.features import (
    X_COLUMNS,
    Y_COLUMNS,
    keypoint_array,
    keypoint_frame,
    pose_features,
    rescale_keypoints,
)
from danbooru_assets.pose.synthetic import CANONICAL_POSE
from danbooru_assets_tests.pose.poses import H, K, TORSO, W, frame_of, place, population


def test_keypoint_array_and_frame_layout():
    kps = np.arange(2 * 17 * 3, dtype=float).reshape(2, 17, 3)
    df = keypoint_frame([5, 6], kps, boxes=np.ones((2, 4)), backend="b", backend_fingerprint="{}")
    assert list(df.columns[:1 + len(KEYPOINT_COLUMNS)]) == ["image_id", *KEYPOINT_COLUMNS]
    assert {"box_x0", "box_y0", "box_x1", "box_y1", "backend", "backend_fingerprint", "status"} <= set(df.columns)
    np.testing.assert_array_equal(keypoint_array(df), kps)
    assert df.loc[1, "kp_eye_left_y"] == kps[1, 1, 1]


def test_features_known_answers_and_y_down_convention():
    kp = place(CANONICAL_POSE)
    kp[K["wrist_right"], :2] = (-20.0, 700.0)  # outside the left and bottom edges
    kp[K["ankle_left"], :2] = (W + 5.0, H + 5.0)
    kp[K["ear_right"]] = np.nan
    feats = pose_features(frame_of(kp[None]), [W], [H]).iloc[0]
    assert feats["hip_mid_x"] == pytest.approx(0.5)
    assert feats["hip_mid_y"] == pytest.approx((0.35 * H + TORSO) / H)
    assert feats["shoulder_mid_y"] == pytest.approx(0.35)
    # head at the top: y grows downward
    assert feats["nose_ny"] < feats["shoulder_mid_y"] < feats["hip_mid_y"] < feats["ankle_right_ny"]
    assert feats["nose_nx"] == pytest.approx(0.5) and feats["nose_ny"] == pytest.approx((0.35 * H - 0.45 * TORSO) / H)
    assert feats["torso_length"] == pytest.approx(TORSO, rel=1e-6)
    assert feats["torso_length_rel"] == pytest.approx(0.2)
    assert feats["shoulder_width_torso"] == pytest.approx(0.7)
    assert feats["hip_width_torso"] == pytest.approx(0.4)
    assert feats["upper_arm_l"] == pytest.approx(np.hypot(0.1, 0.55), rel=1e-6)
    assert feats["shin_r"] == pytest.approx(0.85, rel=1e-6)
    assert feats["arm_lr_log_ratio"] != 0.0  # right wrist was moved
    assert feats["leg_lr_log_ratio"] != 0.0
    assert feats["lr_shoulder_dx"] == pytest.approx(0.7) and feats["lr_hip_dx"] == pytest.approx(0.4)
    assert feats["n_valid"] == 16
    assert feats["frac_outside_image"] == pytest.approx(2 / 16)
    assert feats["mean_conf"] == pytest.approx(0.9)
    assert np.isnan(feats["ear_right_nx"]) and np.isnan(feats["ear_right_conf"])


def test_features_missing_keypoints_give_nan_not_errors():
    kp = place(CANONICAL_POSE)
    kp[K["hip_left"]] = np.nan
    kp[K["nose"], 1] = np.nan  # half a keypoint counts as absent
    df = frame_of(np.stack([kp, np.full((17, 3), np.nan)]))
    feats = pose_features(df, [W, W], [H, H])
    assert np.isnan(feats.loc[0, "hip_mid_x"]) and np.isnan(feats.loc[0, "thigh_l"])
    assert np.isnan(feats.loc[0, "nose_nx"])
    assert feats.loc[0, "n_valid"] == 15
    assert feats.loc[1, "n_valid"] == 0 and np.isnan(feats.loc[1, "mean_conf"])
    with pytest.raises(ValueError):
        pose_features(df, [W], [H])


def test_robust_statistics_are_json_and_match_numpy(stats):
    json.dumps(stats)
    pop = frame_of(population())
    feats = pose_features(pop, np.full(len(pop), W), np.full(len(pop), H))
    v = feats["upper_arm_l"].to_numpy(np.float64)
    s = stats["features"]["upper_arm_l"]
    assert s["median"] == pytest.approx(np.median(v), rel=1e-5)
    assert s["mad"] == pytest.approx(1.4826 * np.median(np.abs(v - np.median(v))), rel=1e-4)
    assert s["q05"] < s["median"] < s["q95"]
    assert stats["density"]["hip_mid"]["n"] == len(pop)
    assert stats["keypoint_present_share"]["nose"] == 1.0
    assert stats["keypoint_outside_share"]["nose"] == 0.0  # the population sits inside the frame
    levels = stats["density"]["hip_mid"]["levels"]
    assert levels["0.5"] >= levels["0.95"] >= levels["0.99"] > 0


def test_rescale_keypoints_brings_positions_back_to_original_pixels():
    kps = np.stack([place(CANONICAL_POSE), place(CANONICAL_POSE)])
    boxes = np.array([[10.0, 20.0, 110.0, 220.0], [1.0, 2.0, 3.0, 4.0]])
    frame = keypoint_frame([1, 2], kps, boxes)
    out = rescale_keypoints(frame, [2.0, 1.0], [3.0, 0.5])
    back = keypoint_array(out)
    np.testing.assert_allclose(back[0, :, 0], kps[0, :, 0] * 2.0)
    np.testing.assert_allclose(back[0, :, 1], kps[0, :, 1] * 3.0)
    np.testing.assert_allclose(back[1, :, 1], kps[1, :, 1] * 0.5)
    np.testing.assert_allclose(back[:, :, 2], kps[:, :, 2])  # confidence untouched
    assert out.loc[0, ["box_x0", "box_y0", "box_x1", "box_y1"]].tolist() == [20.0, 60.0, 220.0, 660.0]
    assert len(X_COLUMNS) == len(Y_COLUMNS) == 17 + 2
    np.testing.assert_array_equal(keypoint_array(frame), kps)  # the input is not changed
    with pytest.raises(ValueError, match="one scale per row"):
        rescale_keypoints(frame, [2.0], [3.0, 1.0])
