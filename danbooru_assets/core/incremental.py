"""Incremental reuse for the inference stages: which stored rows still hold, which images
must be computed again.

A stored row is reused only when the image file is the same one (same id, size and
mtime, from ``shard_index``) and every table the stage writes holds it. A stage writing
two tables (``clip_embeddings`` and ``image_stats``) writes them one after the other; a
kill between the two leaves them different, and reusing what both hold puts them back in
step on the next run. A replaced image (same id, another file) is computed again.

Plain pandas, no Dagster: the stage runner (:mod:`danbooru_assets.core.stage`) uses it for
every per-shard stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # loaded where used: loading the code location imports no pandas
    import pandas as pd

# The identity of an image file as shard_index records it.
FILE_IDENTITY: tuple[str, ...] = ("image_id", "file_bytes", "mtime")


@dataclass
class ReusePlan:
    todo: pd.DataFrame
    """The candidate rows to compute."""
    reused: list[pd.DataFrame | None]
    """One frame per previous table (in the order given): its rows to keep (None where
    the previous table was None)."""


def plan_reuse(
    candidates: pd.DataFrame,
    previous: Sequence[pd.DataFrame | None],
    key: Sequence[str] = FILE_IDENTITY,
) -> ReusePlan:
    """Split ``candidates`` (rows with the ``key`` columns) into rows to compute and rows
    of the ``previous`` tables to keep.

    ``previous`` holds the stage's stored tables, already narrowed to rows that are still
    valid for other reasons (the same model); ``None`` (never stored) or a table without
    the ``key`` columns (stored by an older version) means nothing is reused. A candidate
    is reused only when every previous table has a row with its whole key; the rows kept
    of each table are those matching a reused key, so the tables hold the same images.
    """
    import pandas as pd

    key = list(key)
    if not previous or any(t is None or not set(key) <= set(t.columns) for t in previous):
        return ReusePlan(todo=candidates, reused=[None if t is None else t.iloc[0:0] for t in previous])
    held = candidates[key].drop_duplicates()
    for table in previous:
        held = held.merge(table[key].drop_duplicates(), on=key)
    held_keys = pd.MultiIndex.from_frame(held)

    def matching(frame: pd.DataFrame):
        return pd.MultiIndex.from_frame(frame[key]).isin(held_keys)

    return ReusePlan(
        todo=candidates.loc[~matching(candidates)],
        reused=[table.loc[matching(table)] for table in previous],
    )
