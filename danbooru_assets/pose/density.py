"""The midpoint density model: where most hip (or shoulder) midpoints lie.

A 2-D histogram of normalised midpoints, smoothed, and the density level whose
super-level set holds a given share of the points. ``features.robust_statistics`` builds
the models, ``rules.apply_pose_rules`` tests points against them, ``plots`` draws their
outline.
"""

from __future__ import annotations

import math

import numpy as np

# Density grid for the midpoint "main region" (normalised image coordinates); y reaches
# below the frame because upper-body portraits put the hips there.
DENSITY_RANGE = ((-0.5, 1.5), (-0.5, 2.0))
DENSITY_BINS = (64, 80)


def smoothed(counts: np.ndarray) -> np.ndarray:
    """Separable [1,4,6,4,1]/16 blur: a density estimate that does not hinge on bin edges."""
    k = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0
    out = counts.astype(np.float64)
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (2, 2)
        p = np.pad(out, pad)
        out = sum(k[i] * np.take(p, np.arange(i, i + out.shape[axis]), axis=axis) for i in range(5))
    return out


def density_level(counts: np.ndarray, n_total: int, quantile: float) -> float:
    """Smoothed-density threshold whose super-level set holds ``quantile`` of all points."""
    dens = smoothed(counts)
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


def density_model(px: np.ndarray, py: np.ndarray) -> dict:
    """The JSON-serialisable model of points (px, py): grid, counts, levels for a few shares."""
    ok = np.isfinite(px) & np.isfinite(py)
    counts, _, _ = np.histogram2d(px[ok], py[ok], bins=DENSITY_BINS, range=DENSITY_RANGE)
    n = int(ok.sum())
    model = {
        "x_range": list(DENSITY_RANGE[0]),
        "y_range": list(DENSITY_RANGE[1]),
        "bins": list(DENSITY_BINS),
        "n": n,
        "counts": counts.astype(np.int64).tolist(),  # [x bin][y bin]
    }
    model["levels"] = {
        str(q): (density_level(counts, n, q) if n else None) for q in (0.5, 0.8, 0.9, 0.95, 0.99)
    }
    return model


def bin_centres(model: dict) -> tuple[np.ndarray, np.ndarray]:
    """The x and y centres of the model's grid cells (for drawing its contour)."""
    (x0, x1), (y0, y1) = model["x_range"], model["y_range"]
    bx, by = model["bins"]
    return x0 + (np.arange(bx) + 0.5) * (x1 - x0) / bx, y0 + (np.arange(by) + 0.5) * (y1 - y0) / by


def inside_density(px: np.ndarray, py: np.ndarray, model: dict, quantile: float) -> np.ndarray:
    """True where a point lies in the density region; NaN points count as inside."""
    counts = np.asarray(model["counts"], dtype=np.float64)
    if model["n"] == 0:
        return np.ones(len(px), dtype=bool)
    level = density_level(counts, model["n"], quantile)
    dens = smoothed(counts)
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
