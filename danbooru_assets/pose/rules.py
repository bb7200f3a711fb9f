"""The geometric filter: every rule on every pose at once, every failed reason kept.

``apply_pose_rules`` works on whole feature tables with numpy (no per-row Python), so a
shard or the whole collection filters in well under a second per million rows.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from danbooru_assets.pose.coco import KEYPOINT_INDEX
from danbooru_assets.pose.density import inside_density
from danbooru_assets.pose.features import LIMB_FEATURES, ok_features
from danbooru_assets.settings import PoseRules

REASONS: tuple[str, ...] = (
    "missing_keypoint",       # a required keypoint is absent
    "low_confidence",         # a required keypoint is below min_confidence
    "outside_image",          # a required keypoint lies outside the image (+ margin)
    "hip_midpoint_outlier",   # hip midpoint outside the main density region
    "shoulder_midpoint_outlier",
    "torso_too_small",        # torso shorter than min_torso_length of the image height
    "limb_ratio_outlier",     # a limb/torso ratio outside median +- k*MAD
    "shoulder_ratio_outlier",  # shoulder width/torso outside median +- k*MAD
    "left_right_length",      # left vs right arm or leg length ratio too large
    "left_right_crossed",     # shoulders and hips face opposite ways (swapped sides)
)

# The density models pose_statistics learns, and the reason each one's rule reports.
DENSITY_MODELS = {"hip_mid": "hip_midpoint_outlier", "shoulder_mid": "shoulder_midpoint_outlier"}


def _outside_bounds(values: np.ndarray, summary: dict, k: float) -> np.ndarray:
    """True where a value lies outside median +- k*MAD; NaN values pass."""
    if not summary or summary.get("median") is None:
        return np.zeros(len(values), dtype=bool)
    med = summary["median"]
    # a degenerate (constant) population must not reject values equal to its median
    mad = max(summary["mad"], 1e-6 * max(1.0, abs(med)))
    with np.errstate(invalid="ignore"):
        return (values < med - k * mad) | (values > med + k * mad)


def apply_pose_rules(features: pd.DataFrame, rules: PoseRules, stats: dict) -> pd.DataFrame:
    """Evaluate every rule on every row; keep EVERY failed reason.

    Returns a frame with the features' index: ``image_id`` (when present), ``keep``
    (bool) and ``drop_reasons`` ("|"-joined names from ``REASONS`` in that order, ""
    when kept).
    """
    n = len(features)
    fail = np.zeros((n, len(REASONS)), dtype=bool)
    r = {name: i for i, name in enumerate(REASONS)}

    def col(name: str) -> np.ndarray:
        return features[name].to_numpy()  # float32 as stored; comparisons need no copy

    lo, hi = -rules.margin, 1.0 + rules.margin
    for name in rules.required_inside:
        if name not in KEYPOINT_INDEX:
            raise ValueError(f"unknown keypoint {name!r} in required_inside")
        nx, ny, cf = col(f"{name}_nx"), col(f"{name}_ny"), col(f"{name}_conf")
        present = np.isfinite(nx) & np.isfinite(ny)
        exempt = np.zeros(n, dtype=bool)
        if rules.allow_hips_below_frame and name in ("hip_left", "hip_right"):
            exempt = present & (ny > hi)
        fail[:, r["missing_keypoint"]] |= ~present
        with np.errstate(invalid="ignore"):
            fail[:, r["low_confidence"]] |= present & ~exempt & ~(cf >= rules.min_confidence)
            x_out = (nx < lo) | (nx > hi)
            y_out = (ny < lo) | ((ny > hi) & ~exempt)
        fail[:, r["outside_image"]] |= present & (x_out | y_out)

    if rules.check_midpoint_density:
        dens = stats.get("density", {})
        hx, hy = col("hip_mid_x"), col("hip_mid_y")
        # statistics without a density model (e.g. nothing to learn from yet) skip the rule
        no_model = {"n": 0}
        hip_in = inside_density(hx, hy, dens.get("hip_mid", no_model), rules.density_quantile)
        if rules.allow_hips_below_frame:
            with np.errstate(invalid="ignore"):
                hip_in |= hy > hi
        fail[:, r["hip_midpoint_outlier"]] = ~hip_in
        sx, sy = col("shoulder_mid_x"), col("shoulder_mid_y")
        fail[:, r["shoulder_midpoint_outlier"]] = ~inside_density(
            sx, sy, dens.get("shoulder_mid", no_model), rules.density_quantile
        )

    with np.errstate(invalid="ignore"):
        fail[:, r["torso_too_small"]] = col("torso_length_rel") < rules.min_torso_length
    fstats = stats.get("features", {})
    k = rules.ratio_mad_k
    limb_fail = np.zeros(n, dtype=bool)
    for name in LIMB_FEATURES:
        limb_fail |= _outside_bounds(col(name), fstats.get(name, {}), k)
    fail[:, r["limb_ratio_outlier"]] = limb_fail
    fail[:, r["shoulder_ratio_outlier"]] = _outside_bounds(
        col("shoulder_width_torso"), fstats.get("shoulder_width_torso", {}), k
    )

    if rules.check_left_right:
        bound = math.log(rules.max_lr_length_ratio)
        with np.errstate(invalid="ignore"):
            fail[:, r["left_right_length"]] = (np.abs(col("arm_lr_log_ratio")) > bound) | (
                np.abs(col("leg_lr_log_ratio")) > bound
            )
            s_dx, h_dx = col("lr_shoulder_dx"), col("lr_hip_dx")
            sep = rules.lr_min_separation
            fail[:, r["left_right_crossed"]] = (s_dx * h_dx < 0) & (np.abs(s_dx) > sep) & (np.abs(h_dx) > sep)

    # reasons as a bit mask, then one string per distinct mask: no per-row Python
    codes = fail.astype(np.int64) @ (np.int64(1) << np.arange(len(REASONS), dtype=np.int64))
    uniq, inverse = np.unique(codes, return_inverse=True)
    names = np.array(
        ["|".join(REASONS[i] for i in range(len(REASONS)) if (int(u) >> i) & 1) for u in uniq],
        dtype=object,
    )
    out = pd.DataFrame(
        {"keep": codes == 0, "drop_reasons": names[inverse.reshape(-1)]}, index=features.index
    )
    if "image_id" in features.columns:
        out.insert(0, "image_id", features["image_id"].to_numpy())
    return out


def reason_counts(decisions: pd.DataFrame) -> dict[str, int]:
    """How many rows failed each rule (a row with several reasons counts in each)."""
    counts = dict.fromkeys(REASONS, 0)
    # few distinct reason strings: count those, then split each once
    for joined, count in decisions["drop_reasons"].value_counts().items():
        for name in str(joined).split("|"):
            if name:
                counts[name] = counts.get(name, 0) + int(count)
    return counts


def density_rule_status(rules: PoseRules, stats: dict) -> str:
    """What became of the midpoint density rule: "applied", "off" (a setting), or
    "skipped: …" naming each density model pose_statistics could not learn (no pose had
    that midpoint). Skipping keeps the other rules' result; it is said, never silent."""
    if not rules.check_midpoint_density:
        return "off (pose.check_midpoint_density is false)"
    density = stats.get("density", {})
    missing = [name for name in DENSITY_MODELS if not density.get(name, {}).get("n")]
    if not missing:
        return "applied"
    return "skipped: " + "; ".join(
        f"{DENSITY_MODELS[name]} not checked, pose_statistics has no {name} density model "
        "(no pose with that midpoint)"
        for name in missing
    )


# The reasons pose_subset adds to the geometric ones: no pose to judge, and a copy of an
# image another row keeps (near_duplicates says which, how, and how similar).
NO_POSE = "no_pose"
DUPLICATE = "duplicate"
SUBSET_REASONS: tuple[str, ...] = (*REASONS, NO_POSE, DUPLICATE)


def pose_subset_shard(
    keypoints: pd.DataFrame, subset_rows: pd.DataFrame, rules: PoseRules, stats: dict, duplicates: np.ndarray
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, int]]:
    """One shard of pose_subset: every kept clip_subset image with its keypoints judged by
    the geometric rules, ``no_pose`` without a pose, ``duplicate`` when near_duplicates
    drops it (every reason kept). Returns the table, the decisions of the posed rows (for
    example sheets) and the counts (``rows``, ``kept``, ``dropped_<reason>``)."""
    decisions = apply_pose_rules(ok_features(keypoints), rules, stats)
    copies = np.isin(decisions["image_id"].to_numpy(), duplicates)
    if copies.any():  # appended to the rule reasons, so every reason is kept
        decisions.loc[copies, "drop_reasons"] = [
            f"{r}|{DUPLICATE}" if r else DUPLICATE for r in decisions.loc[copies, "drop_reasons"]
        ]
        decisions.loc[copies, "keep"] = False
    not_ok = keypoints.loc[keypoints["status"] != "ok", ["image_id"]].assign(keep=False, drop_reasons=NO_POSE)
    # A copy without a pose is still named a copy (every reason is kept; a keypoint file may come later).
    not_ok.loc[not_ok["image_id"].isin(duplicates), "drop_reasons"] = f"{NO_POSE}|{DUPLICATE}"
    subset = (
        pd.concat([decisions[["image_id", "keep", "drop_reasons"]], not_ok], ignore_index=True)
        .merge(subset_rows, on="image_id", how="left")
        .sort_values("image_id")
        .reset_index(drop=True)
    )
    reasons = reason_counts(decisions)
    reasons[NO_POSE] = len(not_ok)
    reasons[DUPLICATE] = reasons.get(DUPLICATE, 0) + int(not_ok["image_id"].isin(duplicates).sum())
    counts = {"rows": len(subset), "kept": int(subset["keep"].sum())}
    counts.update({f"dropped_{name}": int(reasons.get(name, 0)) for name in SUBSET_REASONS})
    return subset, decisions, counts
