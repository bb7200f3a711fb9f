"""Decoding (draft mode, broken files) and the shard DataLoader (num_workers=0 here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from danbooru_assets.image_loader import (
    ImageDecodeError,
    LoaderBatch,
    ShardImageDataset,
    ThroughputLogger,
    collate_samples,
    default_num_workers,
    make_loader,
    open_image_rgb,
    split_preprocess,
    stats_array,
)
from danbooru_assets.image_stats import STATS_COLUMNS


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
                "missing": "file not found", "truncated": "image file is truncated"}[kind]
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

    from danbooru_assets.image_loader import ToUint8CHW

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
