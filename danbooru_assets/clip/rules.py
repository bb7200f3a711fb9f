"""The intermediate subset's rules (``clip_subset``): the CLIP threshold and the image
statistics' rules over one shard, every reason a row is dropped kept with it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from danbooru_assets.settings import ImageRules

if TYPE_CHECKING:
    import pandas as pd

# Drop reasons of clip_subset; a row keeps every reason that applies. ``prefiltered``: the
# metadata prefilter excludes it (in skip mode never decoded: only the size rule, from the
# index, is judged besides); ``not_encoded``: usable but clip_embeddings has no row for it
# yet (an image the prefilter admitted after the last inference run: the next one encodes it).
SUBSET_REASONS = (
    "prefiltered", "not_encoded", "unreadable", "below_threshold", "too_small", "dark_border_little_content",
)
# What clip_subset reads of image_stats.
STATS_INPUT_COLUMNS = [
    "image_id", "status", "orig_width", "orig_height",
    "border_black_rows_frac", "border_black_cols_frac", "content_area_frac",
]


def values_at(table: pd.DataFrame, column: str, ids, fill):
    """``table[column]`` at ``ids`` (``fill`` where an id is absent or the value null), as
    numpy: a sorted lookup instead of a pandas merge, which costs milliseconds on a small
    shard."""
    import numpy as np

    keys = table["image_id"].to_numpy()
    values = table[column].to_numpy(dtype=object if isinstance(fill, str) else float, na_value=fill)
    if len(keys) == 0:
        return np.full(len(ids), fill, dtype=values.dtype)
    order = np.argsort(keys, kind="stable")
    pos = np.clip(np.searchsorted(keys, ids, sorter=order), 0, len(keys) - 1)
    found = keys[order[pos]] == ids
    return np.where(found, values[order[pos]], fill)


def apply_clip_rules(
    index: pd.DataFrame,
    stats: pd.DataFrame,
    scores: pd.DataFrame,
    threshold: float,
    rules: ImageRules,
    prefilter: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Every usable row of the shard with ``kept``, its ``drop_reasons`` ("|"-joined) and
    ``prefilter_reasons`` (the metadata prefilter's, for a row it excludes), and how many
    rows each reason dropped. ``prefilter``: the shard's ``metadata_prefilter`` table
    (``image_id``, ``reasons``, ``excluded``); ``None``: no prefilter.

    ``width``/``height`` are the displayed size: the decode's (``image_stats``'
    ``orig_width``/``orig_height``, EXIF orientation applied) where it succeeded, else the
    index's (which, from the metadata, is the stored frame: a rotated JPEG's sides swapped).
    """
    import numpy as np

    from danbooru_assets.dataset.shard_index import USABLE_STATUSES

    rows = index.loc[index["status"].isin(USABLE_STATUSES), ["image_id", "rel_path", "width", "height"]]
    rows = rows.reset_index(drop=True)
    ids = rows["image_id"].to_numpy()
    stats_status = values_at(stats, "status", ids, "missing")
    decoded = stats_status == "ok"
    if prefilter is not None and len(prefilter):
        excluded = values_at(prefilter.assign(excluded=prefilter["excluded"].astype(float)), "excluded", ids, 0.0) > 0
        prefilter_reasons = np.where(excluded, values_at(prefilter, "reasons", ids, ""), "")
    else:
        excluded = np.zeros(len(ids), dtype=bool)
        prefilter_reasons = np.full(len(ids), "", dtype=object)
    # A row never decoded because the prefilter excludes it is judged by the prefilter
    # (and the index's size) only: no score or statistic exists to judge it by.
    undecoded_prefiltered = excluded & (stats_status == "missing")
    for side in ("width", "height"):
        shown = values_at(stats, f"orig_{side}", ids, np.nan)
        use = decoded & ~np.isnan(shown)
        rows[side] = np.where(use, shown, rows[side].to_numpy(dtype=float)).astype(np.int64)
    score = values_at(scores, "portrait_score", ids, np.nan)
    dark = values_at(stats, "border_black_rows_frac", ids, 0.0) + values_at(stats, "border_black_cols_frac", ids, 0.0)
    content = values_at(stats, "content_area_frac", ids, 1.0)
    failed = {
        "prefiltered": excluded,
        "not_encoded": (stats_status == "missing") & ~excluded,
        "unreadable": ~decoded & (stats_status != "missing"),
        "below_threshold": ~(score >= threshold) & ~undecoded_prefiltered,
        "too_small": np.minimum(rows["width"].to_numpy(), rows["height"].to_numpy()) < rules.min_side,
        "dark_border_little_content": (dark > rules.max_dark_border_frac) & (content < rules.min_content_area_frac),
    }
    reasons = np.full(len(rows), "", dtype=object)
    for name in SUBSET_REASONS:
        hit = failed[name]
        reasons[hit] = np.where(reasons[hit] == "", name, reasons[hit] + "|" + name)
    out = rows.assign(
        portrait_score=score.astype(np.float32),
        kept=reasons == "",
        drop_reasons=reasons,
        prefilter_reasons=prefilter_reasons.astype(object),
    )
    return out, {f"dropped_{name}": int(failed[name].sum()) for name in SUBSET_REASONS}
