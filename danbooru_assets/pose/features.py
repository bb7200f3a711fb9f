"""Pose features and their robust statistics.

Everything here works on whole tables with numpy (no per-row Python), so featurising a
shard or the whole collection of keypoints takes well under a second per million rows.
Coordinates are image pixels, x right, y down; features are normalised by image size
(positions) or by torso length (lengths), so they compare across image sizes.
"""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np
import pandas as pd

from danbooru_assets.pose.coco import KEYPOINT_COLUMNS, KEYPOINT_INDEX, KEYPOINT_NAMES, NUM_KEYPOINTS
from danbooru_assets.pose.density import density_model

_K = KEYPOINT_INDEX

# (feature name, keypoint a, keypoint b): limb lengths, reported over torso length.
LIMBS: tuple[tuple[str, str, str], ...] = (
    ("upper_arm_l", "shoulder_left", "elbow_left"),
    ("upper_arm_r", "shoulder_right", "elbow_right"),
    ("forearm_l", "elbow_left", "wrist_left"),
    ("forearm_r", "elbow_right", "wrist_right"),
    ("thigh_l", "hip_left", "knee_left"),
    ("thigh_r", "hip_right", "knee_right"),
    ("shin_l", "knee_left", "ankle_left"),
    ("shin_r", "knee_right", "ankle_right"),
)
LIMB_FEATURES: tuple[str, ...] = tuple(name for name, _, _ in LIMBS)

# Per-keypoint feature columns: normalised position and confidence.
KEYPOINT_FEATURES: tuple[str, ...] = tuple(
    col for name in KEYPOINT_NAMES for col in (f"{name}_nx", f"{name}_ny", f"{name}_conf")
)
SUMMARY_FEATURES: tuple[str, ...] = (
    "hip_mid_x", "hip_mid_y", "shoulder_mid_x", "shoulder_mid_y",
    "torso_length", "torso_length_rel", "shoulder_width_torso", "hip_width_torso",
    *LIMB_FEATURES,
    "arm_lr_log_ratio", "leg_lr_log_ratio", "lr_shoulder_dx", "lr_hip_dx",
    "frac_outside_image", "n_valid", "mean_conf",
)
# Features whose distribution robust_statistics summarises.
ROBUST_FEATURES: tuple[str, ...] = tuple(f for f in SUMMARY_FEATURES if f != "n_valid")

_MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its sigma
_QUANTILES = (0.01, 0.05, 0.25, 0.75, 0.95, 0.99)
BOX_COLUMNS: tuple[str, ...] = ("box_x0", "box_y0", "box_x1", "box_y1")
# The columns holding x (or y) pixel positions: keypoints and the person box.
X_COLUMNS: tuple[str, ...] = (*(c for c in KEYPOINT_COLUMNS if c.endswith("_x")), "box_x0", "box_x1")
Y_COLUMNS: tuple[str, ...] = (*(c for c in KEYPOINT_COLUMNS if c.endswith("_y")), "box_y0", "box_y1")


def keypoint_array(df: pd.DataFrame) -> np.ndarray:
    """[N, 17, 3] float64 (x, y, conf) from the ``KEYPOINT_COLUMNS`` of a table."""
    values = df[list(KEYPOINT_COLUMNS)].to_numpy(dtype=np.float64)
    return values.reshape(len(df), NUM_KEYPOINTS, 3)


def keypoint_frame(
    image_ids: Sequence[int] | np.ndarray,
    keypoints: np.ndarray,
    boxes: np.ndarray | None = None,
    backend: str = "",
    backend_fingerprint: str = "",
    status: str | Sequence[str] = "ok",
) -> pd.DataFrame:
    """The ``pose_keypoints`` table from arrays: image_id, KEYPOINT_COLUMNS, box, backend.

    ``keypoints`` is [N,17,3] (x, y, conf); ``boxes`` [N,4] (x0, y0, x1, y1) or None.
    """
    keypoints = np.asarray(keypoints, dtype=np.float64)
    n = len(keypoints)
    frame = pd.DataFrame(keypoints.reshape(n, NUM_KEYPOINTS * 3), columns=list(KEYPOINT_COLUMNS))
    frame.insert(0, "image_id", np.asarray(image_ids, dtype=np.int64))
    box = np.full((n, 4), np.nan) if boxes is None else np.asarray(boxes, dtype=np.float64)
    for i, col in enumerate(BOX_COLUMNS):
        frame[col] = box[:, i]
    frame["backend"] = backend
    frame["backend_fingerprint"] = backend_fingerprint
    frame["status"] = status if isinstance(status, str) else list(status)
    return frame


def rescale_keypoints(
    frame: pd.DataFrame, sx: Sequence[float] | np.ndarray, sy: Sequence[float] | np.ndarray
) -> pd.DataFrame:
    """``frame`` (a ``keypoint_frame``) with positions found on a resized image brought
    back to original-image pixels: x columns (keypoints and box) times ``sx``, y columns
    times ``sy``, one factor per row. Confidences are unchanged; a new frame is returned."""
    sx = np.asarray(sx, dtype=np.float64).reshape(-1)
    sy = np.asarray(sy, dtype=np.float64).reshape(-1)
    if len(sx) != len(frame) or len(sy) != len(frame):
        raise ValueError(f"need one scale per row: {len(frame)} rows, {len(sx)} x and {len(sy)} y scales")
    out = frame.copy()
    for columns, scale in ((X_COLUMNS, sx), (Y_COLUMNS, sy)):
        out[list(columns)] = out[list(columns)].to_numpy(dtype=np.float64) * scale[:, None]
    return out


def _dist(x: np.ndarray, y: np.ndarray, a: int, b: int) -> np.ndarray:
    return np.hypot(x[:, a] - x[:, b], y[:, a] - y[:, b])


def pose_features(
    keypoints: pd.DataFrame,
    width: np.ndarray | pd.Series,
    height: np.ndarray | pd.Series,
) -> pd.DataFrame:
    """Per-pose geometric features (same row order and index as ``keypoints``).

    Columns: ``image_id`` (when present); width, height; per keypoint ``<name>_nx``,
    ``<name>_ny`` (x / width, y / height) and ``<name>_conf``; hip/shoulder midpoints
    (normalised); ``torso_length`` (px, shoulder midpoint to hip midpoint) and
    ``torso_length_rel`` (over the image height); shoulder/hip width and limb lengths
    over torso length; left/right log length ratios of arms and legs; ``lr_shoulder_dx``
    / ``lr_hip_dx`` (left minus right x over torso: the sign tells which way the figure
    faces); the share of present keypoints outside the image; ``n_valid``; ``mean_conf``.
    A keypoint is present when its x and y are finite; features needing an absent one
    are NaN. Feature values are float32.
    """
    kp = keypoint_array(keypoints)
    w = np.asarray(width, dtype=np.float64).reshape(-1)
    h = np.asarray(height, dtype=np.float64).reshape(-1)
    if len(w) != len(kp) or len(h) != len(kp):
        raise ValueError("width and height must have one value per keypoint row")
    fx, fy = np.isfinite(kp[:, :, 0]), np.isfinite(kp[:, :, 1])
    valid = fx & fy
    partial = fx != fy
    if partial.any():  # rare: one coordinate missing; the keypoint is absent as a whole
        kp = kp.copy()
        kp[partial, :2] = np.nan
    x, y, c = kp[:, :, 0], kp[:, :, 1], kp[:, :, 2]
    block = np.empty((len(kp), NUM_KEYPOINTS, 3), dtype=np.float32)
    np.divide(x, w[:, None], out=block[:, :, 0], casting="same_kind")
    np.divide(y, h[:, None], out=block[:, :, 1], casting="same_kind")
    block[:, :, 2] = c
    block[:, :, 2][~valid] = np.nan  # no confidence for an absent keypoint
    cols: dict[str, np.ndarray] = {"width": w, "height": h}

    sl, sr, hl, hr = _K["shoulder_left"], _K["shoulder_right"], _K["hip_left"], _K["hip_right"]
    hip_mx, hip_my = (x[:, hl] + x[:, hr]) / 2, (y[:, hl] + y[:, hr]) / 2
    sh_mx, sh_my = (x[:, sl] + x[:, sr]) / 2, (y[:, sl] + y[:, sr]) / 2
    torso = np.hypot(sh_mx - hip_mx, sh_my - hip_my)
    # a zero-length torso makes every ratio infinite; treat it as unknown
    torso_div = np.where(torso > 0, torso, np.nan)
    cols["hip_mid_x"], cols["hip_mid_y"] = hip_mx / w, hip_my / h
    cols["shoulder_mid_x"], cols["shoulder_mid_y"] = sh_mx / w, sh_my / h
    cols["torso_length"] = torso
    cols["torso_length_rel"] = torso / h
    cols["shoulder_width_torso"] = _dist(x, y, sl, sr) / torso_div
    cols["hip_width_torso"] = _dist(x, y, hl, hr) / torso_div
    lengths = {}
    for name, a, b in LIMBS:
        lengths[name] = _dist(x, y, _K[a], _K[b])
        cols[name] = lengths[name] / torso_div
    with np.errstate(divide="ignore", invalid="ignore"):
        arm_l = lengths["upper_arm_l"] + lengths["forearm_l"]
        arm_r = lengths["upper_arm_r"] + lengths["forearm_r"]
        leg_l = lengths["thigh_l"] + lengths["shin_l"]
        leg_r = lengths["thigh_r"] + lengths["shin_r"]
        arm = np.log(arm_l / arm_r)
        leg = np.log(leg_l / leg_r)
    cols["arm_lr_log_ratio"] = np.where(np.isfinite(arm), arm, np.nan)
    cols["leg_lr_log_ratio"] = np.where(np.isfinite(leg), leg, np.nan)
    cols["lr_shoulder_dx"] = (x[:, sl] - x[:, sr]) / torso_div
    cols["lr_hip_dx"] = (x[:, hl] - x[:, hr]) / torso_div
    outside = ((x < 0) | (x > w[:, None]) | (y < 0) | (y > h[:, None]))
    n_valid = valid.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        cols["frac_outside_image"] = np.where(n_valid > 0, outside.sum(axis=1) / n_valid, np.nan)
        conf_sum = np.nansum(block[:, :, 2], axis=1, dtype=np.float64)
        cols["mean_conf"] = np.where(n_valid > 0, conf_sum / n_valid, np.nan)
    cols["n_valid"] = n_valid

    summary = np.empty((len(kp), len(SUMMARY_FEATURES)), dtype=np.float32)
    for i, name in enumerate(SUMMARY_FEATURES):
        summary[:, i] = cols[name]
    # two homogeneous float32 blocks: cheap to build, cheap to slice
    features = pd.concat(
        [
            pd.DataFrame({"width": w, "height": h}, index=keypoints.index),
            pd.DataFrame(block.reshape(len(kp), len(KEYPOINT_FEATURES)), columns=list(KEYPOINT_FEATURES), index=keypoints.index, copy=False),
            pd.DataFrame(summary, columns=list(SUMMARY_FEATURES), index=keypoints.index, copy=False),
        ],
        axis=1,
    )
    if "image_id" in keypoints.columns:
        features.insert(0, "image_id", keypoints["image_id"].to_numpy())
    return features


def _robust_summary(values: np.ndarray) -> dict:
    v = values[np.isfinite(values)]  # float32 stays float32: half the partition cost
    if v.size == 0:
        return {"n": 0, "median": None, "mad": None, **{f"q{int(q * 100):02d}": None for q in _QUANTILES}}
    qs = np.quantile(v, (0.5, *_QUANTILES))
    med = float(qs[0])
    mad = float(np.median(np.abs(v - v.dtype.type(med)))) * _MAD_TO_SIGMA
    out = {"n": int(v.size), "median": med, "mad": mad}
    out.update({f"q{int(q * 100):02d}": float(val) for q, val in zip(_QUANTILES, qs[1:])})
    return out


def robust_statistics(features: pd.DataFrame) -> dict:
    """JSON-serialisable statistics the rules use and a person reads.

    ``features``: per feature n, median, MAD (scaled to a normal sigma) and quantiles.
    ``keypoint_present_share`` / ``keypoint_outside_share``: per keypoint, the share of
    poses where it is present, and the share of present ones outside the image.
    ``density``: for ``hip_mid`` and ``shoulder_mid`` a 2-D histogram of normalised
    midpoints, from which ``apply_pose_rules`` derives the region holding any share of
    points, plus the density levels for a few shares.
    """
    stats: dict = {"version": 1, "n_rows": int(len(features)), "mad_scale": _MAD_TO_SIGMA}
    stats["features"] = {
        name: _robust_summary(features[name].to_numpy()) for name in ROBUST_FEATURES if name in features
    }
    # per keypoint: how often it is present, and how often a present one lies outside
    presence, outside = {}, {}
    for name in KEYPOINT_NAMES:
        if f"{name}_nx" not in features:
            continue
        nx, ny = features[f"{name}_nx"].to_numpy(), features[f"{name}_ny"].to_numpy()
        present = np.isfinite(nx) & np.isfinite(ny)
        n_present = int(present.sum())
        out = int(((nx < 0) | (nx > 1) | (ny < 0) | (ny > 1)).sum())  # NaN compares False
        presence[name] = n_present / max(len(features), 1)
        outside[name] = out / n_present if n_present else None
    stats["keypoint_present_share"] = presence
    stats["keypoint_outside_share"] = outside
    stats["density"] = {
        "hip_mid": density_model(features["hip_mid_x"].to_numpy(np.float64), features["hip_mid_y"].to_numpy(np.float64)),
        "shoulder_mid": density_model(
            features["shoulder_mid_x"].to_numpy(np.float64), features["shoulder_mid_y"].to_numpy(np.float64)
        ),
    }
    json.dumps(stats)  # fail here, not in the IO manager, if something is not serialisable
    return stats


def ok_features(keypoints: pd.DataFrame) -> pd.DataFrame:
    """The pose features of the rows of ``keypoints`` with a pose (status ``ok``), in
    original-image pixels (their ``width`` and ``height``)."""
    ok = keypoints.loc[keypoints["status"] == "ok"].reset_index(drop=True)
    return pose_features(ok, ok["width"].to_numpy(), ok["height"].to_numpy())
