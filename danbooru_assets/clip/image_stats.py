"""Cheap pixel statistics computed from the same decoded image as the CLIP embedding.

They catch the bad cases CLIP is blind to (the seed's "too much black borders with too
little content"): letterboxed scans, tiny figures on empty canvases, monochrome sketches.
Everything is vectorised numpy over a small (<= 256 px) copy of the image, so the
statistics add a fraction of a millisecond per image to the decode pass. The image is the
project's one decode (:func:`danbooru_assets.core.images.open_image_rgb`): 8-bit RGB in
the displayed frame, so "rows" are the rows a viewer sees (EXIF orientation applied) and a
16-bit greyscale image is measured at its true brightness.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from danbooru_assets.dedup.hashes import HASH_COLUMNS

if TYPE_CHECKING:
    import pandas as pd

STATS_COLUMNS: list[str] = [
    "border_black_rows_frac",
    "border_black_cols_frac",
    "border_white_rows_frac",
    "border_white_cols_frac",
    "content_area_frac",
    "mean_saturation",
    "is_greyscale",
    "edge_density",
]
# HASH_COLUMNS: the duplicate fingerprints of the same decode (file_hash, phash). Both
# null on a readable row: decoded before they existed (the next run of the stage adds them).
# The image_stats table: the decode's outcome, the displayed size, the statistics, the hashes.
FRAME_COLUMNS: list[str] = ["image_id", "status", "orig_width", "orig_height", *STATS_COLUMNS, *HASH_COLUMNS]

# A pixel is near-black when all channels are <= BLACK_MAX, near-white when all are >= WHITE_MIN.
# JPEG noise around pure black/white stays well inside these margins.
BLACK_MAX = 24
WHITE_MIN = 232
# A row/column is a border line when at least this share of its pixels is near-black (white);
# a few stray pixels (a signature, JPEG ringing) do not break a border.
BORDER_LINE_FRAC = 0.98
# A row/column holds content when more than this share of its pixels is neither near-black nor
# near-white; the content box spans the first to last such row and column.
CONTENT_LINE_FRAC = 0.02
# Greyscale: fewer than GREY_MAX_COLOURED_FRAC of pixels have a channel spread above GREY_CHROMA.
GREY_CHROMA = 24
GREY_MAX_COLOURED_FRAC = 0.01
# Edge pixel: |dx| + |dy| of the luma above this (0..255 scale).
EDGE_THRESHOLD = 48


def _edge_run(line_flags: np.ndarray) -> int:
    """Length of the run of True at the start of ``line_flags`` plus the run at its end."""
    n = line_flags.size
    if n == 0:
        return 0
    if line_flags.all():
        return n
    lead = int(np.argmin(line_flags))  # index of the first False
    trail = int(np.argmin(line_flags[::-1]))
    return lead + trail


def _content_span(line_flags: np.ndarray) -> int:
    """Number of lines from the first to the last True (0 if none)."""
    idx = np.flatnonzero(line_flags)
    return int(idx[-1] - idx[0] + 1) if idx.size else 0


def compute_image_stats(rgb: np.ndarray) -> dict[str, float | bool]:
    """Statistics of an ``uint8`` ``H x W x 3`` image, keyed by :data:`STATS_COLUMNS`.

    - ``border_{black,white}_{rows,cols}_frac``: share of rows (columns) in the uniform
      near-black (near-white) runs at the top+bottom (left+right) edges.
    - ``content_area_frac``: area of the bounding box of lines holding non-background
      (neither near-black nor near-white) pixels, over the image area.
    - ``mean_saturation``: mean HSV saturation in ``[0, 1]``; ``is_greyscale``: almost no
      coloured pixels; ``edge_density``: share of pixels with a strong luma gradient.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an uint8 HxWx3 array, got {rgb.dtype} {rgb.shape}")
    h, w = rgb.shape[:2]
    if h == 0 or w == 0:
        raise ValueError(f"empty image {rgb.shape}")
    # Channel views and pairwise max/min: much faster than reductions over the last axis.
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    cmax = np.maximum(np.maximum(r, g), b)
    cmin = np.minimum(np.minimum(r, g), b)
    black = cmax <= BLACK_MAX
    white = cmin >= WHITE_MIN

    black_rows = np.count_nonzero(black, axis=1) >= BORDER_LINE_FRAC * w
    black_cols = np.count_nonzero(black, axis=0) >= BORDER_LINE_FRAC * h
    white_rows = np.count_nonzero(white, axis=1) >= BORDER_LINE_FRAC * w
    white_cols = np.count_nonzero(white, axis=0) >= BORDER_LINE_FRAC * h

    content = ~(black | white)
    content_rows = np.count_nonzero(content, axis=1) > CONTENT_LINE_FRAC * w
    content_cols = np.count_nonzero(content, axis=0) > CONTENT_LINE_FRAC * h
    content_area = _content_span(content_rows) * _content_span(content_cols) / float(h * w)

    spread = cmax - cmin  # uint8 subtraction is safe: cmax >= cmin
    # HSV saturation spread / max; where max == 0 the spread is 0 too, so dividing by 1 is exact.
    saturation = spread.astype(np.float32) / np.maximum(cmax, 1).astype(np.float32)
    coloured_frac = np.count_nonzero(spread > GREY_CHROMA) / float(h * w)

    # Integer Rec. 601 luma (weights 77/150/29 over 256); gradients by forward differences,
    # cropped to a common (h-1, w-1) grid.
    # uint16 holds the weighted sum (<= 255 * 256); the 0..255 result is signed for the diffs.
    luma = ((r.astype(np.uint16) * 77 + g.astype(np.uint16) * 150 + b.astype(np.uint16) * 29) >> 8).astype(np.int16)
    if h > 1 and w > 1:
        dx = np.abs(np.diff(luma, axis=1))[:-1, :]
        dy = np.abs(np.diff(luma, axis=0))[:, :-1]
        edge_density = float(np.count_nonzero((dx + dy) > EDGE_THRESHOLD) / ((h - 1) * (w - 1)))
    else:
        edge_density = 0.0

    return {
        "border_black_rows_frac": _edge_run(black_rows) / h,
        "border_black_cols_frac": _edge_run(black_cols) / w,
        "border_white_rows_frac": _edge_run(white_rows) / h,
        "border_white_cols_frac": _edge_run(white_cols) / w,
        "content_area_frac": float(content_area),
        "mean_saturation": float(saturation.mean()),
        "is_greyscale": bool(coloured_frac < GREY_MAX_COLOURED_FRAC),
        "edge_density": edge_density,
    }


def image_stats_frame(
    ids: list[int], status: list[str], stats: list[dict[str, Any] | None]
) -> pd.DataFrame:
    """The per-image frame (:data:`FRAME_COLUMNS`) of ``ids`` with their decode ``status``
    and statistics (``None`` for an unreadable image: its row holds nulls; nullable dtypes
    keep the Parquet types)."""
    import pandas as pd

    columns: dict[str, Any] = {
        "image_id": pd.Series(ids, dtype="int64"),
        "status": pd.Series(status, dtype="object"),
    }
    for col in ("orig_width", "orig_height"):
        columns[col] = pd.array([s[col] if s else None for s in stats], dtype="Int64")
    for col in STATS_COLUMNS:
        values = [s[col] if s else None for s in stats]
        columns[col] = pd.array(values, dtype="boolean" if col == "is_greyscale" else "Float32")
    columns["file_hash"] = pd.array([s.get("file_hash") if s else None for s in stats], dtype="string")
    columns["phash"] = pd.array([s.get("phash") if s else None for s in stats], dtype="Int64")
    return pd.DataFrame(columns, columns=FRAME_COLUMNS)
