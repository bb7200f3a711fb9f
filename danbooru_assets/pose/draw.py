"""Draw COCO-17 skeletons on images (contact sheets here, the labeling page later)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from danbooru_assets.coco import NUM_KEYPOINTS, SKELETON, SKELETON_COLORS
from danbooru_assets.visuals import contact_sheet


def _usable(keypoints: np.ndarray, min_conf: float) -> np.ndarray:
    x, y, c = keypoints[:, 0], keypoints[:, 1], keypoints[:, 2]
    # an imported keypoint has confidence 1.0; a NaN confidence with finite
    # coordinates (a source without scores) is drawn rather than hidden
    conf_ok = np.isnan(c) | (c >= min_conf)
    return np.isfinite(x) & np.isfinite(y) & conf_ok


def draw_skeleton(
    image: Image.Image,
    keypoints: np.ndarray,
    min_conf: float = 0.0,
    box: Sequence[float] | np.ndarray | None = None,
) -> Image.Image:
    """A copy of ``image`` (RGB) with the skeleton drawn; ``keypoints`` is [17, 3] (x, y, conf).

    Limbs use ``coco.SKELETON`` / ``SKELETON_COLORS``; keypoints below ``min_conf`` or
    NaN are skipped, and so are limbs touching them. Line width scales with the image.
    ``box`` (x0, y0, x1, y1), when given and finite, is outlined in white.
    """
    kp = np.asarray(keypoints, dtype=np.float64)
    if kp.shape != (NUM_KEYPOINTS, 3):
        raise ValueError(f"keypoints must be [{NUM_KEYPOINTS}, 3], got {kp.shape}")
    out = image.convert("RGB")  # convert always copies
    draw = ImageDraw.Draw(out)
    width = max(1, round(min(out.size) / 128))
    radius = max(1.5, width * 1.2)
    if box is not None:
        b = np.asarray(box, dtype=np.float64)
        if np.all(np.isfinite(b)):
            draw.rectangle([float(b[0]), float(b[1]), float(b[2]), float(b[3])], outline=(255, 255, 255), width=width)
    ok = _usable(kp, min_conf)
    for (a, b), color in zip(SKELETON, SKELETON_COLORS):
        if ok[a] and ok[b]:
            draw.line([(kp[a, 0], kp[a, 1]), (kp[b, 0], kp[b, 1])], fill=color, width=width)
    for i in np.flatnonzero(ok):
        x, y = kp[i, 0], kp[i, 1]
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=(255, 0, 0), outline=(255, 255, 255))
    return out


def skeleton_sheet(
    images: Sequence[Image.Image | None],
    keypoints: np.ndarray,
    captions: Sequence[str],
    boxes: np.ndarray | None = None,
    sizes: Sequence[tuple[int, int]] | None = None,
    min_conf: float = 0.0,
    columns: int = 5,
    cell: int = 160,
    title: str = "",
) -> Image.Image:
    """A contact sheet of images with skeletons drawn (``keypoints`` [N,17,3]).

    Where an image is None (not loaded or unreadable) and its (width, height) is in
    ``sizes``, the skeleton is drawn on a dark canvas of that size instead.
    """
    drawn: list[Image.Image | None] = []
    for i, img in enumerate(images):
        if img is None and sizes is not None:
            w, h = sizes[i]
            img = Image.new("RGB", (int(w), int(h)), (40, 40, 48))
        if img is None:
            drawn.append(None)
            continue
        box = None if boxes is None else boxes[i]
        drawn.append(draw_skeleton(img, keypoints[i], min_conf=min_conf, box=box))
    return contact_sheet(drawn, list(captions), columns=columns, cell=cell, title=title)
