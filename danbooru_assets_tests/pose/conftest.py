from __future__ import annotations

import numpy as np
import pytest

from danbooru_assets.pose.features import pose_features, robust_statistics
from danbooru_assets_tests.pose.poses import H, W, frame_of, population


@pytest.fixture(scope="module")
def stats() -> dict:
    """Robust statistics of a plausible population (what pose_statistics would store)."""
    pop = frame_of(population())
    return robust_statistics(pose_features(pop, np.full(len(pop), W), np.full(len(pop), H)))
