"""Pictures a person reads: contact sheets and rendered plots, as PIL images
(:mod:`danbooru_assets.orchestration.ui_metadata` puts them on materializations)."""

from __future__ import annotations

import io
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def figure_to_image(fig, tight: bool = True) -> Image.Image:
    """Render a matplotlib figure to a PIL image and close it. ``tight``: crop to the
    drawn content (a second layout pass over every axis; a many-axes figure that sets
    its own margins passes False)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight" if tight else None)
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def contact_sheet(
    images: Sequence[Image.Image | None],
    captions: Sequence[str],
    columns: int = 5,
    cell: int = 160,
    title: str = "",
) -> Image.Image:
    """Tile images (letterboxed to ``cell`` px) with a caption under each.

    ``None`` entries (unreadable images) are drawn as a grey cell with their caption.
    """
    caption_h = 14
    title_h = 18 if title else 0
    rows = max(1, -(-len(images) // columns))
    sheet = Image.new(
        "RGB", (columns * cell, title_h + rows * (cell + caption_h)), (32, 32, 32)
    )
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    if title:
        draw.text((4, 2), title, fill=(255, 255, 255), font=font)
    for i, (img, caption) in enumerate(zip(images, captions)):
        x0 = (i % columns) * cell
        y0 = title_h + (i // columns) * (cell + caption_h)
        if img is None:
            draw.rectangle([x0 + 2, y0 + 2, x0 + cell - 3, y0 + cell - 3], fill=(90, 90, 90))
        else:
            thumb = img.convert("RGB")
            thumb.thumbnail((cell - 4, cell - 4))
            sheet.paste(thumb, (x0 + (cell - thumb.width) // 2, y0 + (cell - thumb.height) // 2))
        draw.text((x0 + 3, y0 + cell), caption[:28], fill=(230, 230, 230), font=font)
    return sheet
