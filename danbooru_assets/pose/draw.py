"""Draw COCO-17 skeletons on images (contact sheets; the labeling page draws in the browser).

Keypoints are pixels of the displayed (EXIF-oriented) full-size image, the frame of every
stage; an image decoded at reduced size gets them scaled to it (``frame_size``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from danbooru_assets.pose.coco import NUM_KEYPOINTS, SKELETON, SKELETON_COLORS
from danbooru_assets.core.visuals import contact_sheet


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
    frame_size: tuple[int, int] | None = None,
) -> Image.Image:
    """A copy of ``image`` (RGB) with the skeleton drawn; ``keypoints`` is [17, 3] (x, y, conf).

    Limbs use ``coco.SKELETON`` / ``SKELETON_COLORS``; keypoints below ``min_conf`` or
    NaN are skipped, and so are limbs touching them. Line width scales with the image.
    ``box`` (x0, y0, x1, y1), when given and finite, is outlined in white.
    ``frame_size`` (width, height) is the image size the keypoints and box are pixels of
    (default: ``image``'s own); they are scaled from it to ``image``.
    """
    kp = np.array(keypoints, dtype=np.float64)  # a copy: scaled below
    if kp.shape != (NUM_KEYPOINTS, 3):
        raise ValueError(f"keypoints must be [{NUM_KEYPOINTS}, 3], got {kp.shape}")
    out = image.convert("RGB")  # convert always copies
    scale = np.ones(2)
    if frame_size is not None and tuple(frame_size) != out.size and min(frame_size) > 0:
        scale = np.array(out.size, dtype=np.float64) / np.array(frame_size, dtype=np.float64)
        kp[:, :2] *= scale
    draw = ImageDraw.Draw(out)
    width = max(1, round(min(out.size) / 128))
    radius = max(1.5, width * 1.2)
    if box is not None:
        b = np.asarray(box, dtype=np.float64) * np.tile(scale, 2)
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

    ``sizes`` holds each image's full displayed (width, height), the frame its keypoints
    are in: an image decoded smaller gets its skeleton scaled to it, and where an image is
    None (not loaded or unreadable) the skeleton is drawn on a dark canvas of that size.
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
        frame = None if sizes is None else sizes[i]
        drawn.append(draw_skeleton(img, keypoints[i], min_conf=min_conf, box=box, frame_size=frame))
    return contact_sheet(drawn, list(captions), columns=columns, cell=cell, title=title)
