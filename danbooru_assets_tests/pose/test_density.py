"""The midpoint density model: the region holding most points, NaN and empty models."""

from __future__ import annotations

import json

import numpy as np

from danbooru_assets.pose.density import density_model, inside_density


def test_density_region_holds_the_cluster_not_the_far_point():
    rng = np.random.default_rng(0)
    px = np.r_[rng.normal(0.5, 0.03, 2000), 1.4]
    py = np.r_[rng.normal(0.6, 0.03, 2000), 1.9]
    model = density_model(px, py)
    json.dumps(model)
    assert model["n"] == 2001
    inside = inside_density(np.array([0.5, 1.4, np.nan, 5.0]), np.array([0.6, 1.9, 0.5, 5.0]), model, 0.95)
    # the cluster centre is inside, the lone point and one beyond the grid are not; NaN passes
    assert inside.tolist() == [True, False, True, False]


def test_an_empty_model_rejects_nothing():
    model = density_model(np.array([np.nan]), np.array([np.nan]))
    assert model["n"] == 0 and all(v is None for v in model["levels"].values())
    assert inside_density(np.array([0.1, 9.0]), np.array([0.1, 9.0]), model, 0.95).all()
