"""Model-free fingerprints of an image, computed in the decode pass that already exists.

- :func:`file_hash`: BLAKE2b (128-bit digest, hex) of the file's bytes. Two files with the
  same hash are the same file, whatever the metadata says (a re-upload under a new id
  without a metadata line).
- :func:`phash` / :func:`dhash`: 64-bit perceptual hashes of the decoded pixels, robust to
  resizing and re-encoding. ``phash`` (the one stored) is the sign of each of the 8x8
  lowest 2-D DCT frequencies of a 32x32 greyscale thumbnail against their median, as in
  imagededup/imagehash; ``dhash`` (kept for the benchmark's comparison) the sign of the
  horizontal gradient on a 9x8 thumbnail. ``python -m danbooru_assets.bench dedup``
  measures both on generated images and their transformed copies; pHash keeps copies
  closer and unrelated images farther (figures in the README).

Hashes are stored as signed ``int64`` (the same 64 bits): Parquet and pandas have no
unsigned 64-bit type that every reader agrees on.

A near-uniform image (a blank page, a flat fill) has no perceptual hash: its DCT is noise,
and every blank page would hash alike and link to every other. :func:`phash` returns
``None`` for it (:data:`FLAT_STD`), and the dedup stage counts such images apart from
images that were never hashed.

No Dagster, no torch: numpy, scipy and Pillow.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

HASH_BITS = 64
PHASH_SIZE = 32  # thumbnail side of the DCT
PHASH_LOW = 8  # the low-frequency block kept: 8x8 = 64 bits
# Greyscale thumbnail standard deviation (0-255) below which an image is too flat to hash.
FLAT_STD = 2.0
_CHUNK = 1 << 20
_BIT_WEIGHTS = (np.uint64(1) << np.arange(HASH_BITS, dtype=np.uint64))


def file_hash(path: Path | str) -> str:
    """BLAKE2b-128 of the file's bytes, hex. The file was just read for the decode, so this
    read is served from the page cache: no second disk read."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _grey(img: Image.Image | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``img`` (PIL or uint8 HxWx3) as a float32 greyscale thumbnail of ``size`` (w, h)."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    # LANCZOS (PIL widens it when reducing): the least aliasing, so a resized copy's
    # thumbnail is the source's. bench dedup measured it against BOX (cell means) and
    # BILINEAR: resized copies within 6 bits 0.993 vs 0.973 and 0.990.
    return np.asarray(img.convert("L").resize(size, Image.Resampling.LANCZOS), dtype=np.float32)


def pack_bits(bits: np.ndarray) -> int:
    """64 booleans (row-major) -> a signed int64 (bit k = ``bits.flat[k]``)."""
    word = np.uint64(np.sum(_BIT_WEIGHTS[np.asarray(bits, bool).ravel()], dtype=np.uint64))
    return int(word.view(np.int64))


def phash(img: Image.Image | np.ndarray) -> int | None:
    """64-bit DCT perceptual hash as a signed int; None for a near-uniform image."""
    from scipy.fft import dctn

    grey = _grey(img, (PHASH_SIZE, PHASH_SIZE))
    if float(grey.std()) < FLAT_STD:
        return None
    low = dctn(grey, type=2, norm="ortho")[:PHASH_LOW, :PHASH_LOW]
    return pack_bits(low > np.median(low))


def dhash(img: Image.Image | np.ndarray) -> int | None:
    """64-bit difference hash as a signed int; None for a near-uniform image."""
    grey = _grey(img, (9, 8))
    if float(grey.std()) < FLAT_STD:
        return None
    return pack_bits(grey[:, 1:] > grey[:, :-1])


# The columns image_stats stores them in.
HASH_COLUMNS: list[str] = ["file_hash", "phash"]


def image_hashes(path: Path | str, small: Image.Image | np.ndarray) -> dict[str, str | int | None]:
    """Both fingerprints of one decoded image (``small``: the decode's <= 256 px copy)."""
    return {"file_hash": file_hash(path), "phash": phash(small)}


def hamming(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    """Bitwise Hamming distance of int64 codes (elementwise, broadcast)."""
    x = np.bitwise_xor(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))
    return np.bitwise_count(x.view(np.uint64)).astype(np.int64)
