"""Pose geometry: features, robust statistics and the vectorised filter rules.

Everything here works on whole tables with numpy (no per-row Python), so filtering a
shard or the whole collection of keypoints takes well under a second per million rows.
Coordinates are image pixels, x right, y down; features are normalised by image size
(positions) or by torso length (lengths), so they compare across image sizes.
"""

from __future__ import annotations

import json
import math
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from PIL import Image


from danbooru_assets.pose.coco import KEYPOINT_COLUMNS, KEYPOINT_INDEX, KEYPOINT_NAMES, NUM_KEYPOINTS
from danbooru_assets.settings import PoseRules

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

# Density grid for the midpoint "main region" (normalised image coordinates); y reaches
# below the frame because upper-body portraits put the hips there.
_DENSITY_RANGE = ((-0.5, 1.5), (-0.5, 2.0))
_DENSITY_BINS = (64, 80)
_MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its sigma
_QUANTILES = (0.01, 0.05, 0.25, 0.75, 0.95, 0.99)


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
    for i, col in enumerate(("box_x0", "box_y0", "box_x1", "box_y1")):
        frame[col] = box[:, i]
    frame["backend"] = backend
    frame["backend_fingerprint"] = backend_fingerprint
    frame["status"] = status if isinstance(status, str) else list(status)
    return frame


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


def _smooth(counts: np.ndarray) -> np.ndarray:
    """Separable [1,4,6,4,1]/16 blur: a density estimate that does not hinge on bin edges."""
    k = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0
    out = counts.astype(np.float64)
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (2, 2)
        p = np.pad(out, pad)
        out = sum(k[i] * np.take(p, np.arange(i, i + out.shape[axis]), axis=axis) for i in range(5))
    return out


def _density_level(counts: np.ndarray, n_total: int, quantile: float) -> float:
    """Smoothed-density threshold whose super-level set holds ``quantile`` of all points."""
    dens = _smooth(counts)
    flat_d = dens.ravel()
    order = np.argsort(-flat_d, kind="stable")
    mass = np.cumsum(counts.ravel()[order]) / max(n_total, 1)
    idx = int(np.searchsorted(mass, quantile))
    idx = min(idx, len(order) - 1)
    level = float(flat_d[order][idx])
    if level <= 0:  # quantile not reachable inside the grid: every populated bin counts
        positive = flat_d[flat_d > 0]
        level = float(positive.min()) if positive.size else math.inf
    return level


def _density_model(px: np.ndarray, py: np.ndarray) -> dict:
    ok = np.isfinite(px) & np.isfinite(py)
    counts, _, _ = np.histogram2d(px[ok], py[ok], bins=_DENSITY_BINS, range=_DENSITY_RANGE)
    n = int(ok.sum())
    model = {
        "x_range": list(_DENSITY_RANGE[0]),
        "y_range": list(_DENSITY_RANGE[1]),
        "bins": list(_DENSITY_BINS),
        "n": n,
        "counts": counts.astype(np.int64).tolist(),  # [x bin][y bin]
    }
    model["levels"] = {
        str(q): (_density_level(counts, n, q) if n else None) for q in (0.5, 0.8, 0.9, 0.95, 0.99)
    }
    return model


def _inside_density(px: np.ndarray, py: np.ndarray, model: dict, quantile: float) -> np.ndarray:
    """True where a point lies in the density region; NaN points count as inside."""
    counts = np.asarray(model["counts"], dtype=np.float64)
    if model["n"] == 0:
        return np.ones(len(px), dtype=bool)
    level = _density_level(counts, model["n"], quantile)
    dens = _smooth(counts)
    (x0, x1), (y0, y1) = model["x_range"], model["y_range"]
    bx, by = model["bins"]
    with np.errstate(invalid="ignore"):
        ix = np.floor((px - x0) / (x1 - x0) * bx)
        iy = np.floor((py - y0) / (y1 - y0) * by)
    in_grid = (ix >= 0) & (ix < bx) & (iy >= 0) & (iy < by)
    d = np.zeros(len(px))
    d[in_grid] = dens[ix[in_grid].astype(np.int64), iy[in_grid].astype(np.int64)]
    finite = np.isfinite(px) & np.isfinite(py)
    return ~finite | (in_grid & (d >= level))


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
        "hip_mid": _density_model(features["hip_mid_x"].to_numpy(np.float64), features["hip_mid_y"].to_numpy(np.float64)),
        "shoulder_mid": _density_model(
            features["shoulder_mid_x"].to_numpy(np.float64), features["shoulder_mid_y"].to_numpy(np.float64)
        ),
    }
    json.dumps(stats)  # fail here, not in the IO manager, if something is not serialisable
    return stats


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
        hip_in = _inside_density(hx, hy, dens.get("hip_mid", no_model), rules.density_quantile)
        if rules.allow_hips_below_frame:
            with np.errstate(invalid="ignore"):
                hip_in |= hy > hi
        fail[:, r["hip_midpoint_outlier"]] = ~hip_in
        sx, sy = col("shoulder_mid_x"), col("shoulder_mid_y")
        fail[:, r["shoulder_midpoint_outlier"]] = ~_inside_density(
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


# An upright, camera-facing figure in torso units (shoulder midpoint at the origin,
# hip midpoint at (0, 1), y down); the person's left side is on the image right.
CANONICAL_POSE: np.ndarray = np.array(
    [
        (0.0, -0.45),    # nose
        (0.08, -0.55),   # eye_left
        (-0.08, -0.55),  # eye_right
        (0.16, -0.5),    # ear_left
        (-0.16, -0.5),   # ear_right
        (0.35, 0.0),     # shoulder_left
        (-0.35, 0.0),    # shoulder_right
        (0.45, 0.55),    # elbow_left
        (-0.45, 0.55),   # elbow_right
        (0.5, 1.0),      # wrist_left
        (-0.5, 1.0),     # wrist_right
        (0.2, 1.0),      # hip_left
        (-0.2, 1.0),     # hip_right
        (0.22, 1.85),    # knee_left
        (-0.22, 1.85),   # knee_right
        (0.22, 2.7),     # ankle_left
        (-0.22, 2.7),    # ankle_right
    ]
)
# (parent, child) joints whose segment length varies per limb in synthetic poses
_CHAINS = ((5, 7), (7, 9), (6, 8), (8, 10), (11, 13), (13, 15), (12, 14), (14, 16))


def synthetic_poses(
    n: int,
    seed: int = 0,
    width: int = 512,
    height: int = 512,
    outlier_fraction: float = 0.05,
    missing_fraction: float = 0.02,
    limb_sd: float = 0.12,
) -> pd.DataFrame:
    """``n`` plausible random poses (image_id, KEYPOINT_COLUMNS, width, height).

    Figures are ``CANONICAL_POSE`` placed at a random position and scale, with per-limb
    length variation (``limb_sd``) and keypoint jitter; ``outlier_fraction`` of rows get
    uniformly random keypoints and ``missing_fraction`` of keypoints are NaN. For
    benchmarks, tests and sample data; vectorised.
    """
    rng = np.random.default_rng(seed)
    pts = np.broadcast_to(CANONICAL_POSE, (n, NUM_KEYPOINTS, 2)).copy()
    for parent, child in _CHAINS:
        seg = CANONICAL_POSE[child] - CANONICAL_POSE[parent]
        scale = rng.normal(1.0, limb_sd, size=(n, 1))
        # move the child and everything below it in the chain by the change of this segment
        delta = (scale - 1.0) * seg
        below = [c for p, c in _CHAINS if p == child]
        pts[:, child] += delta
        for c in below:
            pts[:, c] += delta
    pts += rng.normal(0.0, 0.03, size=pts.shape)
    torso = rng.uniform(0.12, 0.3, size=(n, 1, 1)) * height
    centre = np.stack([rng.normal(0.5, 0.06, n) * width, rng.normal(0.35, 0.06, n) * height], axis=1)
    xy = pts * torso + centre[:, None, :]
    bad = rng.random(n) < outlier_fraction
    xy[bad] = rng.uniform(0, 1, size=(int(bad.sum()), NUM_KEYPOINTS, 2)) * (width, height)
    conf = rng.uniform(0.3, 1.0, size=(n, NUM_KEYPOINTS))
    missing = rng.random((n, NUM_KEYPOINTS)) < missing_fraction
    xy[missing] = np.nan
    conf[missing] = np.nan
    frame = keypoint_frame(np.arange(n, dtype=np.int64), np.concatenate([xy, conf[:, :, None]], axis=2))
    frame = frame[["image_id", *KEYPOINT_COLUMNS]].copy()
    frame["width"] = np.int64(width)
    frame["height"] = np.int64(height)
    return frame


def _subsample(n: int, limit: int, seed: int = 0) -> np.ndarray:
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def hip_midpoint_scatter(
    features: pd.DataFrame,
    stats: dict | None = None,
    dbscan: bool = True,
    max_points: int = 20000,
    density_quantile: float = 0.95,
) -> Image.Image:
    """The seed's hip-midpoint scatter, in image orientation (y down), with the frame.

    Optionally coloured by a DBSCAN clustering (on a subsample) and with the outline of
    the density region that holds ``density_quantile`` of the points.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from danbooru_assets.core.visuals import figure_to_image

    hx = features["hip_mid_x"].to_numpy(np.float64)
    hy = features["hip_mid_y"].to_numpy(np.float64)
    ok = np.flatnonzero(np.isfinite(hx) & np.isfinite(hy))
    pick = ok[_subsample(len(ok), max_points)]
    px, py = hx[pick], hy[pick]
    fig, ax = plt.subplots(figsize=(6, 6))
    title = f"hip midpoint (normalised), {len(ok):,} poses"
    if dbscan and len(px) >= 10:
        from sklearn.cluster import DBSCAN

        sub = _subsample(len(px), 5000, seed=1)
        labels = DBSCAN(eps=0.03, min_samples=10).fit_predict(np.column_stack([px[sub], py[sub]]))
        noise = labels < 0
        ax.scatter(px[sub][noise], py[sub][noise], s=2, c="lightgrey", label="DBSCAN noise")
        sc = ax.scatter(px[sub][~noise], py[sub][~noise], s=2, c=labels[~noise], cmap="tab10")
        n_clusters = len(set(labels[~noise].tolist()))
        title += f"; DBSCAN: {n_clusters} clusters on {len(sub):,}"
        del sc
    else:
        ax.scatter(px, py, s=2, alpha=0.4)
    ax.add_patch(plt.Rectangle((0, 0), 1, 1, fill=False, ec="black", lw=1.5, label="image frame"))
    if stats is not None and stats.get("density", {}).get("hip_mid", {}).get("n"):
        model = stats["density"]["hip_mid"]
        counts = np.asarray(model["counts"], dtype=np.float64)
        level = _density_level(counts, model["n"], density_quantile)
        dens = _smooth(counts)
        (x0, x1), (y0, y1) = model["x_range"], model["y_range"]
        bx, by = model["bins"]
        cx = x0 + (np.arange(bx) + 0.5) * (x1 - x0) / bx
        cy = y0 + (np.arange(by) + 0.5) * (y1 - y0) / by
        if np.isfinite(level):
            ax.contour(cx, cy, dens.T, levels=[level], colors="red", linewidths=1.2)
            ax.plot([], [], c="red", label=f"{density_quantile:.0%} density region")
    ax.set_xlim(-0.5, 1.5)
    ax.set_ylim(2.0, -0.5)  # y down, like the image
    ax.set_xlabel("x / width")
    ax.set_ylabel("y / height (down)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=7)
    return figure_to_image(fig)


def feature_histograms(features: pd.DataFrame, stats: dict, k: float = 4.0, bins: int = 60) -> Image.Image:
    """Histograms of the rule features with the median and median +- k*MAD marked."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from danbooru_assets.core.visuals import figure_to_image

    names = [
        "hip_mid_x", "hip_mid_y", "shoulder_mid_x", "shoulder_mid_y", "torso_length_rel",
        "shoulder_width_torso", *LIMB_FEATURES, "arm_lr_log_ratio", "leg_lr_log_ratio",
        "frac_outside_image", "mean_conf",
    ]
    names = [nm for nm in names if nm in features]
    ncols = 4
    nrows = -(-len(names) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.4 * nrows))
    for ax, name in zip(np.ravel(axes), names):
        v = features[name].to_numpy(np.float64)
        v = v[np.isfinite(v)]
        s = stats.get("features", {}).get(name, {})
        clipped = 0
        if v.size:
            # long outlier tails would squash the bulk into one bar: show the 1-99% span
            # (widened to include the rule bounds) and say how many values lie beyond
            lo_q, hi_q = np.quantile(v, (0.01, 0.99))
            if s.get("median") is not None:
                lo_q = min(lo_q, s["median"] - 1.2 * k * s["mad"])
                hi_q = max(hi_q, s["median"] + 1.2 * k * s["mad"])
            pad = 0.05 * (hi_q - lo_q)
            shown = (v >= lo_q - pad) & (v <= hi_q + pad)
            clipped = int(v.size - shown.sum())
            ax.hist(v[shown], bins=bins, color="steelblue")
        if s.get("median") is not None:
            ax.axvline(s["median"], color="black", lw=1)
            if name in LIMB_FEATURES or name == "shoulder_width_torso":
                for sign in (-1, 1):
                    ax.axvline(s["median"] + sign * k * s["mad"], color="red", lw=1, ls="--")
        extra = f", {clipped:,} beyond view" if clipped else ""
        ax.set_title(f"{name} (n={v.size:,}{extra})", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in np.ravel(axes)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"pose features: median (black), median ± {k:g}·MAD (red, rule bounds)", fontsize=9)
    fig.tight_layout()
    return figure_to_image(fig)


def select_examples(decisions: pd.DataFrame, n: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Positions (iloc) of up to ``n`` kept and ``n`` dropped rows, for contact sheets.

    Dropped examples are spread over reasons so each failure kind shows up.
    """
    rng = np.random.default_rng(seed)
    keep = decisions["keep"].to_numpy()
    kept = np.flatnonzero(keep)
    kept = np.sort(rng.choice(kept, size=min(n, len(kept)), replace=False)) if len(kept) else kept
    dropped = np.flatnonzero(~keep)
    if len(dropped) > 5000:  # the reason pools below are plain Python; bound their size
        dropped = np.sort(rng.choice(dropped, size=5000, replace=False))
    picks: list[int] = []
    reasons = decisions["drop_reasons"].to_numpy()
    # round-robin over reasons: each reason contributes examples in turn
    pools = []
    for name in REASONS:
        pool = [int(i) for i in dropped if name in reasons[i].split("|")]
        if pool:
            rng.shuffle(pool)
            pools.append(pool)
    while len(picks) < min(n, len(dropped)) and any(pools):
        for pool in pools:
            while pool and pool[-1] in picks:
                pool.pop()
            if pool and len(picks) < n:
                picks.append(pool.pop())
    return kept, np.asarray(sorted(picks), dtype=np.int64)


__all__: Iterable[str] = (
    "LIMBS", "LIMB_FEATURES", "KEYPOINT_FEATURES", "SUMMARY_FEATURES", "ROBUST_FEATURES", "REASONS",
    "PoseRules", "keypoint_array", "keypoint_frame", "pose_features", "robust_statistics",
    "apply_pose_rules", "reason_counts", "CANONICAL_POSE", "synthetic_poses", "hip_midpoint_scatter", "feature_histograms", "select_examples",
)
