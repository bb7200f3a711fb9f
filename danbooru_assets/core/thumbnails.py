"""Thumbnails for contact sheets: decoded small, through the project's one decode."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from danbooru_assets.config import DEFAULT_MAX_PIXELS

if TYPE_CHECKING:
    from PIL import Image

# A sheet cell is 160 px; JPEGs decode in draft mode at the smallest scale above it.
THUMBNAIL_SIDE = 160


def load_thumbnails(
    paths: Sequence[Path | None], side: int = THUMBNAIL_SIDE, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> list["Image.Image | None"]:
    """One decoded image per path, or ``None`` where the path is ``None`` (not known) or
    the file cannot be decoded: a sheet shows what it can and draws the rest as grey cells."""
    from danbooru_assets.core.images import ImageDecodeError, open_image_rgb

    images: list[Image.Image | None] = []
    for path in paths:
        try:
            images.append(None if path is None else open_image_rgb(path, side, max_pixels)[0])
        except ImageDecodeError:
            images.append(None)
    return images
