"""Synthetic poses for benchmarks, tests and sample data: a canonical figure, varied."""

from __future__ import annotations

import numpy as np
import pandas as pd

from danbooru_assets.pose.coco import KEYPOINT_COLUMNS, NUM_KEYPOINTS
from danbooru_assets.pose.features import keypoint_frame

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
