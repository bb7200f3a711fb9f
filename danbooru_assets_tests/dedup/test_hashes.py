"""File and perceptual hashes, computed the way the CLIP pass computes them (the loader's
one decode), on images the test draws: copies must link, unrelated images must not."""

import io
import shutil

import numpy as np
import pytest
from PIL import Image, ImageDraw

from danbooru_assets.clip.loader import ShardImageDataset
from danbooru_assets.dedup.groups import PHASH_SEARCH_MAX
from danbooru_assets.dedup.hashes import dhash, file_hash, hamming, pack_bits, phash
from danbooru_assets.dedup.search import hamming_pairs
from danbooru_assets.settings import DedupSettings

PHASH_DEFAULT = DedupSettings().phash_max_distance


def _figure(seed: int, size=(480, 640), background=(255, 255, 255)) -> Image.Image:
    """A few coloured shapes (a "figure") somewhere on a flat background."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", size, background)
    d = ImageDraw.Draw(img)
    w, h = size
    for _ in range(int(rng.integers(3, 7))):
        x0, y0 = rng.uniform(0.1, 0.7) * w, rng.uniform(0.1, 0.7) * h
        x1, y1 = x0 + rng.uniform(0.1, 0.3) * w, y0 + rng.uniform(0.1, 0.3) * h
        colour = tuple(int(c) for c in rng.integers(0, 200, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)((x0, y0, x1, y1), fill=colour, outline=(0, 0, 0), width=3)
    return img


def _jpeg(img: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _decode_pass(paths):
    """The fingerprints as the CLIP loader's one decode makes them (224 px model input)."""
    ds = ShardImageDataset(paths, list(range(len(paths))), transform=lambda im: None, target_short_side=224)
    return [ds[i].stats for i in range(len(paths))]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hashes")
    out = {}
    rng = np.random.default_rng(0)
    for k in range(12):
        img = _figure(k)
        src = root / f"{k}.jpg"
        src.write_bytes(_jpeg(img))
        byte_copy = root / f"{k}_bytes.jpg"
        shutil.copyfile(src, byte_copy)
        f = rng.uniform(0.5, 0.9)
        resized = root / f"{k}_resized.jpg"
        resized.write_bytes(_jpeg(img.resize((round(480 * f), round(640 * f)), Image.Resampling.LANCZOS),
                                  int(rng.integers(60, 96))))
        reencoded = root / f"{k}_reencoded.png"
        Image.open(src).save(reencoded)  # another format, other bytes, same pixels
        out[k] = {"src": src, "bytes": byte_copy, "resized": resized, "reencoded": reencoded}
    return out


def test_byte_copies_share_the_file_hash_and_others_do_not(files):
    rows = _decode_pass([files[k][kind] for k in range(12) for kind in ("src", "bytes", "resized")])
    for k in range(12):
        src, copy, resized = rows[3 * k : 3 * k + 3]
        assert src["file_hash"] == copy["file_hash"] == file_hash(files[k]["src"])
        assert resized["file_hash"] != src["file_hash"]
    assert len({r["file_hash"] for r in rows[::3]}) == 12


def test_resized_and_reencoded_copies_are_within_the_default_distance(files):
    for k in range(12):
        src, resized, reencoded = _decode_pass([files[k]["src"], files[k]["resized"], files[k]["reencoded"]])
        assert hamming(src["phash"], resized["phash"]) <= PHASH_DEFAULT, k
        assert hamming(src["phash"], reencoded["phash"]) <= PHASH_DEFAULT, k


def test_unrelated_images_on_the_same_flat_background_stay_apart(tmp_path):
    paths = []
    for k in range(40):
        path = tmp_path / f"{k}.jpg"
        path.write_bytes(_jpeg(_figure(1000 + k, background=(250, 250, 250))))
        paths.append(path)
    codes = np.array([r["phash"] for r in _decode_pass(paths)], dtype=np.int64)
    distances = hamming(codes[:, None], codes[None, :])[np.triu_indices(40, 1)]
    # Not even at the loosest distance the settings allow.
    assert distances.min() > PHASH_SEARCH_MAX
    assert len(hamming_pairs(codes, PHASH_SEARCH_MAX)) == 0


def test_a_flat_image_has_no_perceptual_hash():
    flat = Image.new("RGB", (300, 200), (30, 120, 200))
    assert phash(flat) is None and dhash(flat) is None
    assert phash(_figure(1)) is not None


def test_pack_bits_is_the_int64_of_the_bits():
    bits = np.zeros(64, bool)
    bits[[0, 3, 63]] = True
    assert pack_bits(bits) == np.array([1 + 8 + 2**63], dtype=np.uint64).view(np.int64)[0]
    assert hamming(pack_bits(bits), 0) == 3
