"""Pose features, robust statistics and rules: known answers, one rule at a time."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from danbooru_assets.pose.coco import KEYPOINT_COLUMNS, KEYPOINT_INDEX
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

W, H = 400, 600  # non-square, so normalising by width vs height matters
K = KEYPOINT_INDEX
TORSO = 0.2 * H
SHOULDER_MID = np.array([0.5 * W, 0.35 * H])
ARM_CHAINS = {"left": [(5, 7), (7, 9)], "right": [(6, 8), (8, 10)]}
ALL_CHAINS = ((5, 7), (7, 9), (6, 8), (8, 10), (11, 13), (13, 15), (12, 14), (14, 16))


def scale_segment(pts: np.ndarray, parent: int, child: int, factor: float) -> np.ndarray:
    """Lengthen one limb segment, moving the child and what hangs below it."""
    pts = pts.copy()
    delta = (factor - 1.0) * (pts[child] - pts[parent])
    moved = [child] + [c for p, c in ALL_CHAINS if p == child]
    pts[moved] += delta
    return pts


def place(pts: np.ndarray, torso: float = TORSO, origin: np.ndarray = SHOULDER_MID, conf: float = 0.9) -> np.ndarray:
    """Torso units (shoulder midpoint at 0, hips at y=1) -> [17, 3] pixels + confidence."""
    xy = pts * torso + origin
    return np.concatenate([xy, np.full((17, 1), conf)], axis=1)


def population(n: int = 3000, seed: int = 0) -> np.ndarray:
    """Plausible poses around the canonical one: small placement jitter, 15% limb spread."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, 17, 3))
    for i in range(n):
        pts = CANONICAL_POSE.copy()
        for parent, child in ALL_CHAINS:
            pts = scale_segment(pts, parent, child, rng.normal(1.0, 0.15))
        pts += rng.normal(0, 0.01, size=pts.shape)
        origin = SHOULDER_MID + rng.normal(0, 0.01, size=2) * (W, H)
        out[i] = place(pts, torso=TORSO * rng.normal(1.0, 0.03), origin=origin, conf=rng.uniform(0.5, 1.0))
    return out


def frame_of(kps: np.ndarray) -> pd.DataFrame:
    return keypoint_frame(np.arange(len(kps)), kps)


@pytest.fixture(scope="module")
def stats() -> dict:
    pop = frame_of(population())
    return robust_statistics(pose_features(pop, np.full(len(pop), W), np.full(len(pop), H)))


def decide(kps: list[np.ndarray], stats: dict, rules: PoseRules | None = None) -> pd.DataFrame:
    df = frame_of(np.stack(kps))
    feats = pose_features(df, np.full(len(df), W), np.full(len(df), H))
    return apply_pose_rules(feats, rules or PoseRules(), stats)


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


def test_population_mostly_kept(stats):
    pop = population(400, seed=9)
    decisions = decide(list(pop), stats)
    assert 0.85 < decisions["keep"].mean() < 1.0  # density/ratio rules trim the tails only


def _variants() -> dict[str, tuple[np.ndarray, PoseRules]]:
    base = CANONICAL_POSE
    v: dict[str, tuple[np.ndarray, PoseRules]] = {}
    kp = place(base)
    kp[K["wrist_left"]] = np.nan
    v["missing_keypoint"] = (kp, PoseRules())
    kp = place(base)
    kp[K["nose"], 2] = 0.05
    v["low_confidence"] = (kp, PoseRules())
    kp = place(base)
    kp[K["nose"], 1] = -0.05 * H  # above the top edge, beyond the 2% margin
    v["outside_image"] = (kp, PoseRules())
    # scaling about the shoulder midpoint moves only the hips' midpoint (ratios are scale-free)
    v["hip_midpoint_outlier"] = (place(base * 1.6), PoseRules())
    hip = np.array([0.0, 1.0])
    v["shoulder_midpoint_outlier"] = (place((base - hip) * 1.6 + hip), PoseRules())
    v["torso_too_small"] = (place(base), PoseRules(min_torso_length=0.3))
    v["limb_ratio_outlier"] = (place(scale_segment(base, K["elbow_left"], K["wrist_left"], 3.0)), PoseRules())
    wide = base.copy()
    wide[K["shoulder_left"], 0], wide[K["shoulder_right"], 0] = 0.6, -0.6
    v["shoulder_ratio_outlier"] = (place(wide), PoseRules())
    uneven = base
    for parent, child in ARM_CHAINS["left"]:
        uneven = scale_segment(uneven, parent, child, 1.45)
    for parent, child in ARM_CHAINS["right"]:
        uneven = scale_segment(uneven, parent, child, 0.7)
    v["left_right_length"] = (place(uneven), PoseRules())
    crossed = base.copy()
    crossed[[K["hip_left"], K["hip_right"]]] = crossed[[K["hip_right"], K["hip_left"]]]
    v["left_right_crossed"] = (place(crossed), PoseRules())
    return v


def test_canonical_pose_passes_every_rule(stats):
    d = decide([place(CANONICAL_POSE)], stats)
    assert bool(d["keep"].iloc[0]) and d["drop_reasons"].iloc[0] == ""


@pytest.mark.parametrize("reason", REASONS)
def test_each_rule_alone(stats, reason):
    variants = _variants()
    assert set(variants) == set(REASONS)  # every rule has a constructed violation
    kp, rules = variants[reason]
    d = decide([kp], stats, rules)
    assert not d["keep"].iloc[0]
    assert d["drop_reasons"].iloc[0] == reason
    # and the same row passes when that rule is switched off or relaxed
    relaxed = {
        "missing_keypoint": dict(required_inside=["nose"]),
        "low_confidence": dict(min_confidence=0.0),
        "outside_image": dict(margin=0.1),
        "hip_midpoint_outlier": dict(check_midpoint_density=False),
        "shoulder_midpoint_outlier": dict(check_midpoint_density=False),
        "torso_too_small": dict(min_torso_length=0.05),
        "limb_ratio_outlier": dict(ratio_mad_k=100.0),
        "shoulder_ratio_outlier": dict(ratio_mad_k=100.0),
        "left_right_length": dict(max_lr_length_ratio=3.0),
        "left_right_crossed": dict(check_left_right=False),
    }[reason]
    again = decide([kp], stats, rules.model_copy(update=relaxed))
    assert bool(again["keep"].iloc[0]), again["drop_reasons"].iloc[0]


def test_every_reason_is_kept_when_several_fail(stats):
    kp = place(CANONICAL_POSE)
    crossed = CANONICAL_POSE.copy()
    crossed[[K["hip_left"], K["hip_right"]]] = crossed[[K["hip_right"], K["hip_left"]]]
    kp = place(crossed)
    kp[K["nose"], 2] = 0.01
    kp[K["wrist_right"]] = np.nan
    kp[K["elbow_left"], 1] = -0.1 * H
    d = decide([kp, place(CANONICAL_POSE)], stats)
    reasons = d["drop_reasons"].iloc[0].split("|")
    assert set(reasons) >= {"missing_keypoint", "low_confidence", "outside_image", "left_right_crossed"}
    assert reasons == [r for r in REASONS if r in reasons]  # stable order
    assert d["keep"].tolist() == [False, True]
    counts = reason_counts(d)
    assert counts["low_confidence"] == 1 and counts["torso_too_small"] == 0


def test_hips_below_frame_option(stats):
    # an upper-body portrait: shoulders low in the frame, hips below it
    kp = place(CANONICAL_POSE, origin=np.array([0.5 * W, 0.9 * H]))
    kp[K["hip_left"], 2] = kp[K["hip_right"], 2] = 0.05  # estimators are unsure off-frame
    rules = PoseRules(required_inside=["nose", "shoulder_left", "shoulder_right", "hip_left", "hip_right"])
    allowed = decide([kp], stats, rules)["drop_reasons"].iloc[0].split("|")
    strict = decide([kp], stats, rules.model_copy(update={"allow_hips_below_frame": False}))
    strict = strict["drop_reasons"].iloc[0].split("|")
    assert "outside_image" not in allowed and "low_confidence" not in allowed
    assert "hip_midpoint_outlier" not in allowed
    assert {"outside_image", "low_confidence", "hip_midpoint_outlier"} <= set(strict)


def test_rules_index_and_config():
    with pytest.raises(ValueError):
        apply_pose_rules(
            pose_features(frame_of(place(CANONICAL_POSE)[None]), [W], [H]),
            PoseRules(required_inside=["tail"]),
            {"features": {}, "density": {}},
        )
    rules = PoseRules.model_validate({"ratio_mad_k": 3, "required_inside": ["nose"]})
    assert rules.ratio_mad_k == 3.0 and rules.required_inside == ["nose"]
    assert PoseRules().required_inside is not PoseRules().required_inside


def test_synthetic_population_filter_and_examples():
    df = synthetic_poses(3000, seed=1, outlier_fraction=0.1)
    assert list(df.columns[:52]) == ["image_id", *KEYPOINT_COLUMNS]
    feats = pose_features(df.set_index(df.image_id + 10), df.width, df.height)
    assert (feats.index == df.image_id + 10).all()
    stats = robust_statistics(feats)
    d = apply_pose_rules(feats, PoseRules(), stats)
    assert (d.index == feats.index).all() and d["image_id"].tolist() == df["image_id"].tolist()
    assert 0.4 < d["keep"].mean() < 0.95
    assert (d["keep"] == (d["drop_reasons"] == "")).all()
    kept, dropped = select_examples(d, n=8)
    assert len(kept) == 8 and len(dropped) == 8
    assert d["keep"].iloc[kept].all() and not d["keep"].iloc[dropped].any()


def test_plots_render(stats):
    df = synthetic_poses(800, seed=2)
    feats = pose_features(df, df.width, df.height)
    st = robust_statistics(feats)
    for img in (
        hip_midpoint_scatter(feats, st, dbscan=True),
        hip_midpoint_scatter(feats, None, dbscan=False),
        feature_histograms(feats, st),
    ):
        assert isinstance(img, Image.Image) and img.width > 200 and img.height > 200
        # not a blank canvas
        assert len(np.unique(np.asarray(img.convert("L")))) > 5
