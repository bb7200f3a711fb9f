"""The geometric filter: one rule at a time, every reason kept, the density rule's status."""

from __future__ import annotations

import numpy as np
import pytest

from danbooru_assets.pose.coco import KEYPOINT_COLUMNS
from danbooru_assets.pose.features import pose_features, robust_statistics
from danbooru_assets.pose.plots import select_examples
from danbooru_assets.pose.rules import REASONS, apply_pose_rules, density_rule_status, reason_counts
from danbooru_assets.pose.synthetic import CANONICAL_POSE, synthetic_poses
from danbooru_assets.settings import PoseRules
from danbooru_assets_tests.pose.poses import ARM_CHAINS, H, K, W, decide, frame_of, place, population, scale_segment


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


def test_density_rule_status_says_what_became_of_the_rule(stats):
    assert density_rule_status(PoseRules(), stats) == "applied"
    assert density_rule_status(PoseRules(check_midpoint_density=False), stats).startswith("off")
    no_hips = {**stats, "density": {**stats["density"], "hip_mid": {"n": 0}}}
    status = density_rule_status(PoseRules(), no_hips)
    assert status.startswith("skipped") and "hip_midpoint_outlier" in status
    assert "shoulder_midpoint_outlier" not in status


def test_pose_subset_shard_adds_no_pose_and_duplicate_to_every_other_reason(stats):
    """Issue 19: the duplicate/no_pose rules live with REASONS, testable without Dagster."""
    import pandas as pd

    from danbooru_assets.pose.rules import DUPLICATE, NO_POSE, SUBSET_REASONS, pose_subset_shard

    good = place(CANONICAL_POSE)
    keypoints = frame_of(np.stack([good, good, good, good])).assign(width=W, height=H)
    keypoints["status"] = ["ok", "ok", "no_person", "no_person"]  # ids 0..3
    subset_rows = pd.DataFrame({"image_id": [0, 1, 2, 3], "rel_path": ["a", "b", "c", "d"]})
    table, decisions, counts = pose_subset_shard(keypoints, subset_rows, PoseRules(), stats, np.array([1, 3]))
    reasons = table.set_index("image_id")["drop_reasons"]
    assert table["keep"].tolist() == [True, False, False, False]
    assert reasons[1] == DUPLICATE and reasons[2] == NO_POSE and reasons[3] == f"{NO_POSE}|{DUPLICATE}"
    assert table["rel_path"].tolist() == ["a", "b", "c", "d"] and len(decisions) == 2
    assert counts["rows"] == 4 and counts["kept"] == 1
    assert counts[f"dropped_{NO_POSE}"] == 2 and counts[f"dropped_{DUPLICATE}"] == 2
    assert set(counts) == {"rows", "kept", *(f"dropped_{r}" for r in SUBSET_REASONS)}
