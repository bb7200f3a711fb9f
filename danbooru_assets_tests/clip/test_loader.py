"""Decoding (draft mode, broken files) and the shard DataLoader (num_workers=0 here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from danbooru_assets.clip.loader import (
    LoaderBatch,
    ShardImageDataset,
    collate_samples,
    default_num_workers,
    make_loader,
    split_preprocess,
    stats_array,
)
from danbooru_assets.core.progress import ThroughputLogger
from danbooru_assets.core.images import ImageDecodeError, open_image_rgb
from danbooru_assets.clip.image_stats import STATS_COLUMNS


def _save_jpeg(path: Path, w: int, h: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR).save(path, quality=85)
    return path


def _transform(img: Image.Image) -> torch.Tensor:
    """A small stand-in for the CLIP preprocess: fixed 32x32 float tensor."""
    arr = np.asarray(img.resize((32, 32)), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def test_draft_mode_reduces_decode_size(tmp_path: Path) -> None:
    path = _save_jpeg(tmp_path / "big.jpg", 2000, 1600)
    full, size_full = open_image_rgb(path, None)
    small, size_small = open_image_rgb(path, 224)
    assert size_full == size_small == (2000, 1600)
    assert full.size == (2000, 1600)
    # 1600 // 224 = 7 -> DCT scale 1/4: 500 x 400, never below the target.
    assert small.size == (500, 400)
    assert min(small.size) >= 224
    assert small.mode == full.mode == "RGB"


def test_draft_keeps_small_jpeg_and_png_sizes(tmp_path: Path) -> None:
    jpg = _save_jpeg(tmp_path / "small.jpg", 300, 250)
    assert open_image_rgb(jpg, 224)[0].size == (300, 250)
    png = tmp_path / "big.png"
    Image.new("RGB", (900, 700), (10, 200, 30)).save(png)
    img, size = open_image_rgb(png, 224)
    assert img.size == size == (900, 700)


def test_transparency_composited_over_white(tmp_path: Path) -> None:
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)
    rgba[10:30, 10:30] = (200, 20, 20, 255)
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    img, _ = open_image_rgb(path)
    arr = np.asarray(img)
    assert img.mode == "RGB"
    assert tuple(arr[0, 0]) == (255, 255, 255)
    assert tuple(arr[20, 20]) == (200, 20, 20)


def _broken_files(tmp_path: Path) -> dict[str, Path]:
    good = _save_jpeg(tmp_path / "good.jpg", 400, 300)
    zero = tmp_path / "zero.jpg"
    zero.write_bytes(b"")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image")
    return {"zero": zero, "truncated": truncated, "unknown": text, "missing": tmp_path / "nope.jpg"}


@pytest.mark.parametrize("kind", ["zero", "truncated", "unknown", "missing"])
def test_broken_files_raise_named_error(tmp_path: Path, kind: str) -> None:
    path = _broken_files(tmp_path)[kind]
    with pytest.raises(ImageDecodeError) as info:
        open_image_rgb(path, 224)
    assert str(path) in str(info.value)
    assert info.value.reason and str(path) not in info.value.reason
    expected = {"zero": "zero-byte file", "unknown": "unknown or unsupported image format",
                "missing": "file not found", "truncated": "truncated: image file is truncated"}[kind]
    assert info.value.reason.startswith(expected)


def test_stats_array_downscales() -> None:
    img = Image.new("RGB", (1000, 400), (1, 2, 3))
    arr = stats_array(img, 256)
    assert arr.shape == (100, 250, 3) and arr.dtype == np.uint8  # box reduction by 4
    assert (arr == (1, 2, 3)).all()
    assert stats_array(Image.new("RGB", (100, 50)), 256).shape == (50, 100, 3)


def test_loader_batches_span_files_and_report_failures(tmp_path: Path) -> None:
    paths = [_save_jpeg(tmp_path / f"{i}.jpg", 300 + 10 * i, 260, seed=i) for i in range(9)]
    broken = _broken_files(tmp_path)
    paths.insert(3, broken["truncated"])
    paths.append(broken["zero"])
    ids = [1000 + i for i in range(len(paths))]
    loader = make_loader(paths, ids, _transform, batch_size=4, num_workers=0, target_short_side=224)
    batches = list(loader)
    assert all(isinstance(b, LoaderBatch) for b in batches)
    assert [len(b.image_ids) + len(b.failures) for b in batches] == [4, 4, 3]
    seen = [i for b in batches for i in b.image_ids]
    failures = dict(f for b in batches for f in b.failures)
    assert set(failures) == {1003, 1010}
    assert all(v.startswith("unreadable: ") for v in failures.values())
    assert failures[1010] == "unreadable: zero-byte file"
    assert seen == [i for i in ids if i not in failures]  # input order kept
    for b in batches:
        assert b.pixels.shape == (len(b.image_ids), 3, 32, 32)
        for row in b.stats:
            assert set(STATS_COLUMNS) <= set(row)
            assert row["orig_height"] == 260
    assert batches[0].stats[0]["orig_width"] == 300


def test_batch_of_only_failures(tmp_path: Path) -> None:
    zero = tmp_path / "z.jpg"
    zero.write_bytes(b"")
    ds = ShardImageDataset([zero], [7], _transform)
    batch = collate_samples([ds[0]])
    assert batch.image_ids == [] and batch.pixels.numel() == 0
    assert batch.failures == [(7, "unreadable: zero-byte file")]


def test_dataset_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError):
        ShardImageDataset(["a.jpg"], [1, 2], _transform)


def test_default_num_workers() -> None:
    assert default_num_workers(0) == 0
    assert default_num_workers(3) == 3
    assert 1 <= default_num_workers(-1) <= 4


def test_throughput_logger_reports_rate_and_eta() -> None:
    now = [0.0]
    lines: list[str] = []
    progress = ThroughputLogger(lines.append, interval_s=10.0, clock=lambda: now[0])
    now[0] = 5.0
    progress(50, 200)  # before the interval: silent
    assert lines == []
    now[0] = 10.0
    progress(100, 200)
    assert lines == ["100/200 images (50%), 10.0 images/s, ETA 10 s"]
    now[0] = 11.0
    progress(200, 200)  # the final call always logs
    assert len(lines) == 2 and lines[1].startswith("200/200")


def test_split_preprocess_matches_full_transform(tmp_path: Path) -> None:
    from torchvision import transforms as T

    full = T.Compose([
        T.Resize(40, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(40),
        T.ToTensor(),
        T.Normalize((0.48, 0.46, 0.41), (0.27, 0.26, 0.28)),
    ])
    worker, normalize = split_preprocess(full)
    img, _ = open_image_rgb(_save_jpeg(tmp_path / "a.jpg", 120, 90))
    sent = worker(img)
    assert sent.dtype == torch.uint8 and sent.shape == (3, 40, 40)
    batch = normalize(torch.stack([sent, sent]))
    assert batch.dtype == torch.float32
    torch.testing.assert_close(batch[1], full(img), rtol=0, atol=1e-6)
    # Anything else is kept whole, with an identity batch step.
    same, identity = split_preprocess(_transform)
    assert same is _transform
    x = torch.ones(1, 3, 2, 2)
    assert identity(x) is x


def test_loader_sends_uint8_with_split_transform(tmp_path: Path) -> None:
    from torchvision import transforms as T

    full = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    worker, normalize = split_preprocess(full)
    paths = [_save_jpeg(tmp_path / f"{i}.jpg", 64, 48, seed=i) for i in range(3)]
    (batch,) = list(make_loader(paths, [1, 2, 3], worker, batch_size=8))
    assert batch.pixels.dtype == torch.uint8
    expected = torch.stack([full(open_image_rgb(p)[0]) for p in paths])
    torch.testing.assert_close(normalize(batch.pixels), expected, rtol=0, atol=1e-6)


def test_forkserver_workers(tmp_path: Path) -> None:
    """The opt-in clean start method: workers from a preloaded forkserver, same batches."""
    from torchvision import transforms as T

    from danbooru_assets.clip.loader import ToUint8CHW

    worker = T.Compose([T.Resize(32), T.CenterCrop(32), ToUint8CHW()])
    paths = [_save_jpeg(tmp_path / f"{i}.jpg", 80, 60, seed=i) for i in range(5)]
    (tmp_path / "zero.jpg").write_bytes(b"")
    paths.append(tmp_path / "zero.jpg")
    ids = list(range(6))
    ref = list(make_loader(paths, ids, worker, batch_size=2))
    got = list(make_loader(paths, ids, worker, batch_size=2, num_workers=2,
                           multiprocessing_context="forkserver", worker_timeout_s=120))
    assert [b.image_ids for b in got] == [b.image_ids for b in ref]
    assert [b.failures for b in got] == [b.failures for b in ref] and got[-1].failures
    for a, b in zip(got, ref):
        assert torch.equal(a.pixels, b.pixels)


# ---------------------------------------------------------------- orientation, bit depth, pixel limit

RED, GREEN, GREY = (230, 20, 20), (20, 230, 20), (128, 128, 128)
# Where the stored top-left (red) and top-right (green) corners are displayed, per EXIF
# orientation, from the EXIF 2.3 table (0th row / 0th column), not from any library.
DISPLAYED_CORNERS = {
    1: ("tl", "tr"), 2: ("tr", "tl"), 3: ("br", "bl"), 4: ("bl", "br"),
    5: ("tl", "bl"), 6: ("tr", "br"), 7: ("br", "tr"), 8: ("bl", "tl"),
}


def save_oriented_jpeg(path: Path, orientation: int, size: tuple[int, int] = (64, 40), block: int = 16) -> Path:
    """A stored ``size`` JPEG: grey, red block at the stored top-left, green at the stored
    top-right, with EXIF orientation ``orientation``."""
    w, h = size
    pixels = np.full((h, w, 3), GREY, dtype=np.uint8)
    pixels[:block, :block] = RED
    pixels[:block, w - block:] = GREEN
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, quality=95, exif=exif.tobytes())
    return path


def corner_colour(img: Image.Image, corner: str, inset: int) -> str:
    arr = np.asarray(img, dtype=np.float64)
    h, w = arr.shape[:2]
    y = inset if corner[0] == "t" else h - 1 - inset
    x = inset if corner[1] == "l" else w - 1 - inset
    r, g, b = arr[y, x]
    if r > 150 and g < 100:
        return "red"
    if g > 150 and r < 100:
        return "green"
    return "grey"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header says ``width x height`` followed by a few bytes of pixel data:
    its header reads, its pixels never decode."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("target", [None, 100])
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int, target: int | None) -> None:
    from danbooru_assets.core.images import read_image_header

    # 640x400 stored; with a 100 px target the JPEG is drafted at 1/4 (160x100) first.
    path = save_oriented_jpeg(tmp_path / f"o{orientation}.jpg", orientation, (640, 400), block=160)
    img, size = open_image_rgb(path, target)
    turned = orientation >= 5
    assert size == ((400, 640) if turned else (640, 400))
    stored_decode = (640, 400) if target is None else (160, 100)
    assert img.size == (stored_decode[::-1] if turned else stored_decode)
    red, green = DISPLAYED_CORNERS[orientation]
    inset = 8 if target is None else 2
    assert corner_colour(img, red, inset) == "red"
    assert corner_colour(img, green, inset) == "green"
    header = read_image_header(path)
    assert (header.width, header.height, header.orientation, header.format) == (*size, orientation, "JPEG")


def test_orientation_reaches_loader_sizes_and_stats(tmp_path: Path) -> None:
    path = save_oriented_jpeg(tmp_path / "6.jpg", 6, (320, 200), block=40)
    (batch,) = list(make_loader([path], [6], _transform, batch_size=2))
    assert (batch.stats[0]["orig_width"], batch.stats[0]["orig_height"]) == (200, 320)


def test_sixteen_bit_greyscale_keeps_its_range(tmp_path: Path) -> None:
    from danbooru_assets.core.images import to_rgb8

    # a full-range 16-bit gradient: 0..65535 left to right
    gradient = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (32, 1))
    path = tmp_path / "g16.png"
    Image.fromarray(gradient).save(path)
    assert Image.open(path).mode.startswith("I;16")
    img, _ = open_image_rgb(path)
    arr = np.asarray(img).astype(int)
    assert img.mode == "RGB" and (arr[..., 0] == arr[..., 1]).all()
    assert arr[0, 0, 0] == 0 and arr[0, -1, 0] == 255
    assert abs(arr.mean() - 127.5) < 2  # was ~254: everything above 255 clipped to white
    assert (np.diff(arr[0, :, 0]) >= 0).all()
    # scaled by bit depth, not stretched: a dark 16-bit image stays dark
    dark = tmp_path / "dark16.png"
    Image.fromarray((gradient // 16).astype(np.uint16)).save(dark)
    assert np.asarray(open_image_rgb(dark)[0]).max() == 15
    # the 32-bit "I" container some 16-bit sources open as: same rule
    as_i = to_rgb8(Image.fromarray(gradient.astype(np.int32)))
    assert np.array_equal(np.asarray(as_i)[..., 0], arr[..., 0])


def test_png_over_the_pixel_limit_is_never_decoded(tmp_path: Path, monkeypatch) -> None:
    from PIL import ImageFile

    path = tmp_path / "big.png"
    path.write_bytes(png_header_only(10000, 10000))  # 100M pixels: under PIL's ceiling
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("pixels were decoded"))
    with pytest.raises(ImageDecodeError) as info:
        open_image_rgb(path, 224)
    assert info.value.status == "too_large"
    assert info.value.reason == "10000x10000 = 100,000,000 pixels, over the limit of 50,000,000 (max_pixels)"
    assert str(path) in str(info.value)


def test_header_bomb_is_too_large_not_a_crash(tmp_path: Path) -> None:
    from danbooru_assets.core.images import read_image_header

    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(30000, 30000))  # PIL refuses to open 900M pixels at all
    for call in (lambda: read_image_header(path), lambda: open_image_rgb(path, 224, max_pixels=None)):
        with pytest.raises(ImageDecodeError) as info:
            call()
        assert info.value.status == "too_large" and "900000000" in info.value.reason.replace(",", "")
    sample = ShardImageDataset([path], [1], _transform)[0]
    assert sample.pixels is None and sample.status.startswith("too_large: ")


def test_big_jpeg_is_decoded_at_a_scale_within_the_limit(tmp_path: Path) -> None:
    path = _save_jpeg(tmp_path / "big.jpg", 800, 600)  # 480,000 pixels
    img, size = open_image_rgb(path, None, max_pixels=50_000)
    assert size == (800, 600) and img.size == (200, 150)  # 1/4 scale: 30,000 pixels
    img, _ = open_image_rgb(path, 400, max_pixels=50_000)
    assert img.size == (200, 150)  # the limit wins over the target
    with pytest.raises(ImageDecodeError) as info:
        open_image_rgb(path, 224, max_pixels=5_000)  # even 1/8 (100x75) is over
    assert info.value.status == "too_large" and "7,500 at 1/8 scale" in info.value.reason
    assert open_image_rgb(path, 224, max_pixels=None)[0].size == (400, 300)


def test_loader_reads_without_importing_torch() -> None:
    import subprocess
    import sys

    code = "import sys, danbooru_assets.clip.loader, danbooru_assets.dataset.shard_index; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _report_num_workers(queue) -> None:
    queue.put(default_num_workers(2))


def test_no_loader_processes_in_a_daemonic_process() -> None:
    # A Celery prefork worker's step runs in a daemonic process, which may not start
    # children: the loader then decodes in that process instead of failing.
    import multiprocessing

    queue = multiprocessing.get_context("fork").Queue()
    child = multiprocessing.get_context("fork").Process(target=_report_num_workers, args=(queue,), daemon=True)
    child.start()
    child.join(60)
    assert queue.get(timeout=5) == 0
    assert default_num_workers(2) == 2
