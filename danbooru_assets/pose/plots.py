"""Pictures of the pose features for the UI (PIL images; matplotlib loads on first use)
and the choice of examples for the skeleton contact sheets."""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from danbooru_assets.pose.density import bin_centres, density_level, smoothed
from danbooru_assets.pose.features import LIMB_FEATURES
from danbooru_assets.pose.rules import REASONS


def _pyplot():
    """matplotlib's pyplot on the non-interactive backend (runs may have no display)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


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
    from danbooru_assets.core.visuals import figure_to_image

    plt = _pyplot()
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
        ax.scatter(px[sub][~noise], py[sub][~noise], s=2, c=labels[~noise], cmap="tab10")
        n_clusters = len(set(labels[~noise].tolist()))
        title += f"; DBSCAN: {n_clusters} clusters on {len(sub):,}"
    else:
        ax.scatter(px, py, s=2, alpha=0.4)
    ax.add_patch(plt.Rectangle((0, 0), 1, 1, fill=False, ec="black", lw=1.5, label="image frame"))
    if stats is not None and stats.get("density", {}).get("hip_mid", {}).get("n"):
        model = stats["density"]["hip_mid"]
        counts = np.asarray(model["counts"], dtype=np.float64)
        level = density_level(counts, model["n"], density_quantile)
        dens = smoothed(counts)
        cx, cy = bin_centres(model)
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
    from danbooru_assets.core.visuals import figure_to_image

    plt = _pyplot()
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
            ax.hist(v[shown], bins=bins, color="steelblue", histtype="stepfilled")  # one patch, not one per bar
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
    # Fixed margins: tight_layout measured every one of the ~20 axes and took longer than
    # the whole statistic (3-5 s a run); the titles and ticks are small and fit these.
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.05, top=1 - 0.35 / nrows, wspace=0.25, hspace=0.55)
    return figure_to_image(fig, tight=False)


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
