"""Truncated image data is ``unreadable: truncated``, never a decoded image (core.images)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from danbooru_assets.core.images import ImageDecodeError, open_image_rgb


def picture(height: int = 395, width: int = 536) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    smooth = np.stack([x * 255 / width, y * 255 / height, (x + y) % 255], axis=-1)
    noisy = smooth + np.random.default_rng(0).normal(0, 20, (height, width, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def jpeg(pixels: np.ndarray, **options) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90, **options)
    return buf.getvalue()


def with_header_size(data: bytes, width: int, height: int) -> bytes:
    """The same JPEG data under a start-of-frame header that claims another size."""
    sof = data.find(b"\xff\xc0")
    patched = bytearray(data)
    patched[sof + 5: sof + 7] = height.to_bytes(2, "big")
    patched[sof + 7: sof + 9] = width.to_bytes(2, "big")
    return bytes(patched)


def decode_problem(path: Path, data: bytes, target: int | None) -> str:
    path.write_bytes(data)
    try:
        open_image_rgb(path, target)
    except ImageDecodeError as exc:
        return f"{exc.status}: {exc.reason}"
    return "ok"


@pytest.mark.parametrize("target", [None, 100])
@pytest.mark.parametrize("options", [{}, {"subsampling": 0}, {"optimize": True}])
def test_cut_short_jpegs_are_truncated_never_ok(tmp_path: Path, target, options):
    data = jpeg(picture(), **options)
    path = tmp_path / "1.jpg"
    assert decode_problem(path, data, target) == "ok"
    # Half the data, then an end marker: Pillow decodes it in silence, the rest grey.
    half = decode_problem(path, data[: len(data) // 2] + b"\xff\xd9", target)
    assert half.startswith("unreadable: truncated: the last ") and "grey fill" in half
    # A 536x395 image's data under a 12000x12000 header: fewer bytes than the header needs.
    big = decode_problem(path, with_header_size(data, 12000, 12000), target)
    assert big.startswith("unreadable: truncated: ") and "12000x12000" in big
    # Cut with no end marker: Pillow's own error, under the same reason.
    cut = decode_problem(path, data[: len(data) // 2], target)
    assert cut.startswith("unreadable: truncated: image file is truncated")


@pytest.mark.parametrize("rows", [40, 43, 48, 195])  # 43: the band starts on an MCU row
def test_a_picture_with_a_flat_grey_bottom_is_not_truncated(tmp_path: Path, rows: int):
    pixels = picture()
    pixels[-rows:] = 128  # exactly the decoder's fill colour, as a picture's own border
    for target in (None, 100):
        assert decode_problem(tmp_path / "1.jpg", jpeg(pixels), target) == "ok"


def test_other_formats_cut_short_are_truncated(tmp_path: Path):
    for fmt in ("PNG", "GIF", "BMP"):
        buf = io.BytesIO()
        Image.fromarray(picture(120, 160)).save(buf, format=fmt)
        data = buf.getvalue()
        problem = decode_problem(tmp_path / f"1.{fmt.lower()}", data[: len(data) // 2], None)
        assert problem.startswith("unreadable: truncated"), (fmt, problem)
