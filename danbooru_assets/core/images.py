"""The one image decode of the project: every stage reads pixels and sizes through here.

:func:`open_image_rgb` is how every stage reads pixels (the CLIP loader, the image
statistics, the pose stage, contact sheets, exports), and :func:`read_image_header` how
the shard index reads sizes; both follow the same rules:

- **Orientation.** The EXIF orientation tag (JPEG, WebP, PNG ``eXIf``) is applied: pixels,
  sizes and so keypoints are in the *displayed* frame, the one a browser shows.
- **Bit depth.** 16-bit greyscale (``I;16*``, and ``I``) keeps each sample's high byte:
  the full 0-65535 range maps to 0-255 (as Pillow does for 16-bit RGB), never stretched to
  the image's own min-max, so a dark image stays dark. Transparency is composited over white.
- **Pixel limit.** An image is decoded only if the decode produces at most ``max_pixels``
  pixels (:func:`size_problem`): JPEGs are decoded in draft mode (DCT scaling by 1/2, 1/4 or
  1/8) at the smallest scale that keeps both sides >= the requested size, reduced further
  when needed to fit the limit, so a 1500 px file for a 224 px model decodes at ~375 px;
  other formats decode whole, so over the limit they are never decoded
  (:class:`ImageDecodeError` with status ``too_large``).
- **Truncated data** is ``unreadable`` with a reason starting ``truncated``, never a
  decoded image: Pillow's errors (``LOAD_TRUNCATED_IMAGES`` stays off), a JPEG whose size
  cannot hold the pixels its header declares (:func:`jpeg_data_shortfall`), and a JPEG cut
  short before its end marker, which libjpeg fills with grey in silence
  (:func:`jpeg_missing_rows`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from danbooru_assets.config import DEFAULT_MAX_PIXELS

# Our own limit (max_pixels, below PIL's warning threshold by default) decides what is
# decoded; PIL's warning at open would only repeat it, for every large header read.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# Transparent pixels are composited over white: Danbooru PNGs with transparency are
# characters on an empty canvas, and a black fill would read as a black border.
TRANSPARENT_FILL = (255, 255, 255)
# libjpeg decodes at 1/1, 1/2, 1/4 or 1/8 scale (PIL's draft mode).
JPEG_DRAFT_SCALES = (1, 2, 4, 8)
STATUS_UNREADABLE = "unreadable"
STATUS_TOO_LARGE = "too_large"

EXIF_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that turns stored pixels into displayed ones (the
# EXIF 2.3 table; the same as ImageOps.exif_transpose). 5-8 swap width and height.
ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
# The reason of every file whose data ends before its pixels do ("unreadable: truncated…").
TRUNCATED = "truncated"
# libjpeg gives the blocks a scan lacks (data cut short, then an end marker) all-zero
# coefficients, which decode to exactly this mid-grey; Pillow reports nothing.
JPEG_MISSING_FILL = 128


class ImageDecodeError(OSError):
    """A file that is not decoded; the message names the file and why.

    ``status`` is ``"too_large"`` for an image over the pixel limit, else ``"unreadable"``;
    ``reason`` never repeats the file name (statuses are grouped and counted)."""

    def __init__(self, path: Path | str, reason: str, status: str = STATUS_UNREADABLE):
        self.path = str(path)
        self.reason = reason
        self.status = status
        super().__init__(f"cannot decode image {self.path}: {reason}")


class ImageHeader(NamedTuple):
    """What an image's header says, sizes in the displayed (EXIF-oriented) frame."""

    width: int
    height: int
    format: str
    orientation: int


def pil_pixel_ceiling() -> int | None:
    """The size above which PIL refuses to open an image at all (None: no ceiling)."""
    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else 2 * int(limit)


def smallest_decode_pixels(width, height, jpeg):
    """Pixels of the smallest decode PIL offers: 1/8 scale per side for JPEG, else all.
    Works on numbers and numpy arrays alike."""
    most = JPEG_DRAFT_SCALES[-1]
    reduced = -(-width // most) * -(-height // most)  # sides rounded up, as libjpeg does
    if isinstance(jpeg, np.ndarray):
        return np.where(jpeg, reduced, width * height)
    return reduced if jpeg else width * height


def size_problem(width: int, height: int, jpeg: bool, max_pixels: int | None) -> str:
    """Why an image of this stored size is not decoded ("" when it is): even its smallest
    decode exceeds ``max_pixels`` (None: no limit of ours), or PIL refuses to open it."""
    width, height = int(width), int(height)
    total = width * height
    ceiling = pil_pixel_ceiling()
    if ceiling is not None and total > ceiling:
        return f"{width}x{height} = {total:,} pixels, over PIL's own limit of {ceiling:,}"
    smallest = int(smallest_decode_pixels(width, height, jpeg))
    if max_pixels is not None and smallest > max_pixels:
        at = f" ({smallest:,} at 1/8 scale)" if jpeg else ""
        return f"{width}x{height} = {total:,} pixels{at}, over the limit of {max_pixels:,} (max_pixels)"
    return ""


def _jpeg_draft_scale(width: int, height: int, target_short_side: int | None, max_pixels: int | None) -> int:
    """The DCT scale to decode a JPEG at: the largest that keeps both sides >= the target,
    or larger when needed to stay within ``max_pixels``; never more than the sides allow."""
    scale = 1
    if target_short_side:
        fits = min(width // int(target_short_side), height // int(target_short_side))
        scale = max([s for s in JPEG_DRAFT_SCALES if s <= fits], default=1)
    if max_pixels is not None:
        for s in JPEG_DRAFT_SCALES:
            if s >= scale and -(-width // s) * -(-height // s) <= max_pixels:
                scale = s
                break
    return max(s for s in JPEG_DRAFT_SCALES if s <= max(1, min(scale, width, height)))


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8) in the header PIL has read; 1 without one.

    Only EXIF present at open counts (JPEG and WebP always; PNG when ``eXIf`` precedes the
    pixels), so the header reader and the decoder always agree."""
    raw = img.info.get("exif")
    if not raw:
        return 1
    try:
        exif = Image.Exif()
        exif.load(raw)
        value = int(exif.get(EXIF_ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block does not make the pixels unreadable
        return 1
    return value if 1 <= value <= 8 else 1


def displayed_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """``(width, height)`` as displayed: swapped for the orientations that turn by 90 degrees."""
    return (size[1], size[0]) if orientation >= 5 else (size[0], size[1])


def to_rgb8(img: Image.Image) -> Image.Image:
    """``img`` in 8-bit RGB (itself when it already is, else a new image): 16-bit samples
    keep their high byte, and transparency is composited over white."""
    if img.mode in SIXTEEN_BIT_MODES:
        samples = np.asarray(img)
        if img.mode == "I":  # 32-bit container; PIL's 16-bit sources fill 0-65535
            samples = np.clip(samples, 0, 65535)
        img = Image.fromarray((samples.astype(np.uint32) >> 8).astype(np.uint8))
    if img.mode == "RGB":
        return img
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (
        img.mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, TRANSPARENT_FILL + (255,))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return img.convert("RGB")


def _reason(exc: BaseException, path: Path) -> str:
    # Statuses are grouped and counted, so the reason does not repeat the file name.
    text = str(exc).replace(str(path), "<file>").strip() or type(exc).__name__
    # Pillow's "image file is truncated (…)" (LOAD_TRUNCATED_IMAGES off, as here) and
    # friends: one reason for every cut-short file.
    return f"{TRUNCATED}: {text}" if "truncated" in text.lower() else text


def jpeg_data_shortfall(file_bytes: int, width: int, height: int) -> str:
    """Why ``file_bytes`` cannot hold a JPEG of ``width`` x ``height`` ("" when it can).

    Every 8x8 block of the first component costs at least one bit (the shortest Huffman
    code of its DC value), so fewer bytes than blocks / 8 is a header claiming pixels the
    file does not hold (a 12000x12000 header over a 536x395 image's data)."""
    least = -(-int(width) // 8) * -(-int(height) // 8) // 8
    if int(file_bytes) >= least:
        return ""
    return (f"{TRUNCATED}: {int(file_bytes):,} bytes cannot hold the {width}x{height} pixels the header declares "
            f"(at least {least:,} bytes)")


def jpeg_missing_rows(img: Image.Image, stored_height: int) -> int:
    """Rows at the bottom of a decoded JPEG that are libjpeg's fill for missing data (0
    when none): exact :data:`JPEG_MISSING_FILL` grey, in the shape a cut leaves.

    Blocks are coded MCU row by MCU row, left to right, so a scan cut short leaves the
    rest of its MCU row grey from the cut to the right edge, then every later MCU row
    grey: a grey band of whole MCU rows at the bottom with a grey step at the right end of
    the row above it. A picture whose own bottom rows are flat mid-grey (128, 128, 128)
    has no such step and is decoded. Not recognised: a cut that falls exactly at the start
    of an MCU row (its band has no step; the size check may still catch it), and a
    progressive JPEG cut in a later scan (it decodes blurred, not grey)."""
    if img.mode not in ("RGB", "L") or not img.height or not img.width:
        return 0
    layers = getattr(img, "layer", None) or []
    h_max = max((layer[1] for layer in layers), default=1) or 1
    v_max = max((layer[2] for layer in layers), default=1) or 1
    scale = max(1, round(stored_height / img.height))
    mcu_rows = max(1, -(-8 * v_max // scale))
    mcu_cols = max(1, -(-8 * h_max // scale))
    pixels = np.asarray(img)
    if img.height < mcu_rows or not (pixels[-mcu_rows:] == JPEG_MISSING_FILL).all():
        return 0
    flat = (pixels == JPEG_MISSING_FILL).reshape(img.height, -1).all(axis=1)
    grey_rows = int(img.height - np.flatnonzero(~flat)[-1] - 1) if (~flat).any() else img.height
    top = img.height - grey_rows
    if top == 0:  # nothing but the fill
        return grey_rows
    # Subsampled chroma is upsampled smoothly: the content's colour bleeds one pixel row
    # into the grey below and above it.
    bleed = 1 if v_max > 1 and mcu_rows > 1 else 0
    if top % mcu_rows > bleed:  # a cut's band starts where an MCU row does (they count from the top)
        return 0
    top -= top % mcu_rows
    above = pixels[max(0, top - mcu_rows + bleed): top, -mcu_cols:]
    return grey_rows if above.size and (above == JPEG_MISSING_FILL).all() else 0


def read_image_header(path: Path | str) -> ImageHeader:
    """Parse the header only (no pixels are decoded): the displayed size, format and EXIF
    orientation. A file whose header cannot be read raises :class:`ImageDecodeError`
    (status ``too_large`` when PIL refuses its size)."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            orientation = exif_orientation(img)
            width, height = displayed_size(img.size, orientation)
            return ImageHeader(width, height, img.format or "", orientation)
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(path, _reason(exc, path), STATUS_TOO_LARGE) from exc
    except FileNotFoundError as exc:
        raise ImageDecodeError(path, "file not found") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(path, "unknown or unsupported image format") from exc
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, struct.error... on bad files
        raise ImageDecodeError(path, _reason(exc, path)) from exc


def open_image_rgb(
    path: Path | str,
    target_short_side: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode ``path`` to an 8-bit RGB image in the displayed (EXIF-oriented) frame; return
    it with the full image's displayed ``(width, height)``.

    With ``target_short_side``, JPEGs are decoded in draft mode at the largest DCT scale
    reduction that keeps both sides >= the target, so the returned image may be smaller
    than the full size (never smaller than the target unless ``max_pixels`` demands it).
    An image whose decode would exceed ``max_pixels`` raises :class:`ImageDecodeError`
    with status ``too_large`` before any pixel is decoded. Zero-byte, truncated,
    unknown-format and otherwise broken files raise it with status ``unreadable``.
    """
    path = Path(path)
    try:
        file_bytes = path.stat().st_size
        if file_bytes == 0:
            raise ImageDecodeError(path, "zero-byte file")
        with Image.open(path) as img:
            orientation = exif_orientation(img)
            stored = img.size
            jpeg = img.format == "JPEG"
            problem = size_problem(stored[0], stored[1], jpeg, max_pixels)
            if problem:
                raise ImageDecodeError(path, problem, STATUS_TOO_LARGE)
            shortfall = jpeg_data_shortfall(file_bytes, *stored) if jpeg else ""
            if shortfall:
                raise ImageDecodeError(path, shortfall)
            if jpeg:
                scale = _jpeg_draft_scale(stored[0], stored[1], target_short_side, max_pixels)
                if scale > 1:
                    img.draft("RGB", (stored[0] // scale, stored[1] // scale))
            decoded = img.size[0] * img.size[1]
            if max_pixels is not None and decoded > max_pixels:  # a side too short to reduce by enough
                raise ImageDecodeError(
                    path, f"{img.size[0]}x{img.size[1]} = {decoded:,} pixels to decode, over the limit of "
                    f"{max_pixels:,} (max_pixels)", STATUS_TOO_LARGE,
                )
            img.load()
            missing = jpeg_missing_rows(img, stored[1]) if jpeg else 0
            if missing:
                raise ImageDecodeError(
                    path, f"{TRUNCATED}: the last {missing} of {img.height} decoded rows are the decoder's grey fill "
                    "for data the file lacks",
                )
            rgb = to_rgb8(img)
            if rgb is img:
                rgb = img.copy()  # detached from the file the context manager closes
        if orientation in ORIENTATION_TRANSPOSE:
            rgb = rgb.transpose(ORIENTATION_TRANSPOSE[orientation])
    except ImageDecodeError:
        raise
    except FileNotFoundError as exc:
        raise ImageDecodeError(path, "file not found") from exc
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(path, _reason(exc, path), STATUS_TOO_LARGE) from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(path, "unknown or unsupported image format") from exc
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, struct.error... on bad files
        raise ImageDecodeError(path, _reason(exc, path)) from exc
    return rgb, displayed_size(stored, orientation)
