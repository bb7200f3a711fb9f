"""Hand-built poses for the pose tests: the canonical figure placed in a W×H image,
limb segments rescaled, and a plausible population around it."""

from __future__ import annotations

import numpy as np
import pandas as pd

from danbooru_assets.pose.coco import KEYPOINT_INDEX
from danbooru_assets.pose.features import keypoint_frame, pose_features
from danbooru_assets.pose.rules import apply_pose_rules
from danbooru_assets.pose.synthetic import CANONICAL_POSE
from danbooru_assets.settings import PoseRules

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


def decide(kps: list[np.ndarray], stats: dict, rules: PoseRules | None = None) -> pd.DataFrame:
    df = frame_of(np.stack(kps))
    feats = pose_features(df, np.full(len(df), W), np.full(len(df), H))
    return apply_pose_rules(feats, rules or PoseRules(), stats)
