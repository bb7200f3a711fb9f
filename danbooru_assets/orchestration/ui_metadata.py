"""Pictures as Dagster metadata: the UI renders Markdown, including base64 PNG data URIs,
so a person sees contact sheets and plots right on the materialization page."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING

import dagster as dg

if TYPE_CHECKING:
    from PIL import Image


def image_markdown(image: "Image.Image", title: str = "") -> dg.MetadataValue:
    """A PNG embedded in Markdown metadata, shown inline in the Dagster UI."""
    from danbooru_assets.core.visuals import png_bytes

    b64 = base64.b64encode(png_bytes(image)).decode("ascii")
    heading = f"**{title}**\n\n" if title else ""
    return dg.MetadataValue.md(f"{heading}![{title}](data:image/png;base64,{b64})")
