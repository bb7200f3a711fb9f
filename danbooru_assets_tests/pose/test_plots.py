"""The feature pictures and the choice of contact-sheet examples."""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from danbooru_assets.pose.features import pose_features, robust_statistics
from danbooru_assets.pose.plots import feature_histograms, hip_midpoint_scatter, select_examples
from danbooru_assets.pose.rules import REASONS
from danbooru_assets.pose.synthetic import synthetic_poses


def test_plots_render():
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


def test_select_examples_spread_dropped_rows_over_reasons():
    reasons = ["", "", "", "missing_keypoint", "missing_keypoint", "missing_keypoint", "missing_keypoint",
               "torso_too_small", "low_confidence|left_right_crossed"]
    decisions = pd.DataFrame({"keep": [r == "" for r in reasons], "drop_reasons": reasons})
    kept, dropped = select_examples(decisions, n=3)
    assert kept.tolist() == [0, 1, 2]
    assert len(dropped) == 3
    shown = {name for i in dropped for name in reasons[i].split("|")}
    # round-robin: the rare reasons show up next to the common one
    assert {"missing_keypoint", "torso_too_small"} <= shown and shown <= set(REASONS)
