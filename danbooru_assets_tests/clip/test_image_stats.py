"""Pixel statistics on images with known answers."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from danbooru_assets.clip.image_stats import FRAME_COLUMNS, STATS_COLUMNS, compute_image_stats, image_stats_frame


def _colourful(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth saturated colour gradients (no near-black or near-white pixels)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 60 + 150 * x / max(w - 1, 1)
    g = 60 + 150 * y / max(h - 1, 1)
    b = np.full_like(r, 120 + seed)
    return np.stack([r, g, b], axis=2).astype(np.uint8)


def _jpeg_roundtrip(rgb: np.ndarray, quality: int = 75) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def test_keys_and_types() -> None:
    stats = compute_image_stats(_colourful(64, 48))
    assert list(stats) == STATS_COLUMNS
    assert isinstance(stats["is_greyscale"], bool)
    for col in STATS_COLUMNS:
        if col != "is_greyscale":
            assert isinstance(stats[col], float)
            assert 0.0 <= stats[col] <= 1.0


def test_full_content_image_has_no_border() -> None:
    stats = compute_image_stats(_colourful(120, 80))
    assert stats["border_black_rows_frac"] == 0.0
    assert stats["border_white_cols_frac"] == 0.0
    assert stats["content_area_frac"] == pytest.approx(1.0)


@pytest.mark.parametrize("jpeg", [False, True])
def test_black_frame_gives_high_border_and_small_content(jpeg: bool) -> None:
    img = np.zeros((200, 200, 3), dtype=np.uint8)
    img[50:150, 50:150] = _colourful(100, 100)
    if jpeg:  # JPEG ringing must not break the border detection
        img = _jpeg_roundtrip(img)
    stats = compute_image_stats(img)
    assert stats["border_black_rows_frac"] == pytest.approx(0.5, abs=0.03)
    assert stats["border_black_cols_frac"] == pytest.approx(0.5, abs=0.03)
    assert stats["border_white_rows_frac"] == 0.0
    assert stats["content_area_frac"] == pytest.approx(0.25, abs=0.03)


def test_white_letterbox_counts_rows_only() -> None:
    img = np.full((100, 80, 3), 255, dtype=np.uint8)
    img[30:70] = _colourful(40, 80)
    stats = compute_image_stats(img)
    assert stats["border_white_rows_frac"] == pytest.approx(0.6)
    assert stats["border_white_cols_frac"] == 0.0
    assert stats["border_black_rows_frac"] == 0.0
    assert stats["content_area_frac"] == pytest.approx(0.4)


def test_all_black_image() -> None:
    stats = compute_image_stats(np.zeros((10, 20, 3), dtype=np.uint8))
    assert stats["border_black_rows_frac"] == 1.0
    assert stats["border_black_cols_frac"] == 1.0
    assert stats["content_area_frac"] == 0.0


def test_greyscale_flag_and_saturation() -> None:
    grey = np.repeat(np.linspace(30, 220, 64, dtype=np.uint8)[None, :, None], 48, axis=0)
    grey = np.repeat(grey, 3, axis=2)
    g = compute_image_stats(_jpeg_roundtrip(grey, quality=90))
    assert g["is_greyscale"] is True
    assert g["mean_saturation"] < 0.05

    red = np.zeros((32, 32, 3), dtype=np.uint8)
    red[..., 0] = 200
    r = compute_image_stats(red)
    assert r["is_greyscale"] is False
    assert r["mean_saturation"] == pytest.approx(1.0)
    assert compute_image_stats(_colourful(40, 40))["is_greyscale"] is False


def test_edge_density_checkerboard_above_flat() -> None:
    y, x = np.mgrid[0:128, 0:128]
    board = (((x // 8) + (y // 8)) % 2 * 200 + 30).astype(np.uint8)
    board = np.repeat(board[..., None], 3, axis=2)
    flat = np.full((128, 128, 3), 128, dtype=np.uint8)
    assert compute_image_stats(flat)["edge_density"] == 0.0
    assert compute_image_stats(board)["edge_density"] > 0.15


def test_edge_between_white_and_black_halves() -> None:
    # The full 0..255 luma range must not overflow the integer luma.
    img = np.full((10, 11, 3), 255, dtype=np.uint8)
    img[:, 5:] = 0
    stats = compute_image_stats(img)
    assert stats["edge_density"] == pytest.approx(1 / 10)
    assert stats["border_white_cols_frac"] == pytest.approx(5 / 11)
    assert stats["border_black_cols_frac"] == pytest.approx(6 / 11)
    assert stats["content_area_frac"] == 0.0


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        compute_image_stats(np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(ValueError):
        compute_image_stats(np.zeros((10, 10, 3), dtype=np.float32))
    with pytest.raises(ValueError):
        compute_image_stats(np.zeros((0, 10, 3), dtype=np.uint8))


def _decoded_stats(path) -> dict:
    """Statistics the way the CLIP stage computes them: the one decode, then a <= 256 px copy."""
    from danbooru_assets.clip.loader import stats_array
    from danbooru_assets.core.images import open_image_rgb

    return compute_image_stats(stats_array(open_image_rgb(path, 224)[0]))


@pytest.mark.parametrize("orientation", [1, 6])
def test_borders_are_measured_in_the_displayed_frame(tmp_path, orientation: int) -> None:
    # stored: black bands on top and bottom (a quarter of the rows each)
    rgb = _colourful(240, 320)
    rgb[:60] = 0
    rgb[-60:] = 0
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "letterbox.jpg"
    Image.fromarray(rgb).save(path, quality=95, exif=exif.tobytes())
    stats = _decoded_stats(path)
    rows, cols = stats["border_black_rows_frac"], stats["border_black_cols_frac"]
    if orientation == 6:  # displayed turned by 90 degrees: the bands are left and right
        rows, cols = cols, rows
    assert rows == pytest.approx(0.5, abs=0.02) and cols == 0.0


def test_sixteen_bit_gradient_is_not_white(tmp_path) -> None:
    gradient = np.tile(np.linspace(0, 65535, 512).round().astype(np.uint16), (128, 1))
    path = tmp_path / "g16.png"
    Image.fromarray(gradient).save(path)
    stats = _decoded_stats(path)
    assert stats["is_greyscale"] and stats["mean_saturation"] == 0.0
    assert stats["border_white_cols_frac"] < 0.15 and stats["border_black_cols_frac"] < 0.15
    assert stats["content_area_frac"] > 0.7


def test_stats_frame_keeps_nulls_for_unreadable_rows() -> None:
    ok = {"orig_width": 640, "orig_height": 480, **compute_image_stats(_colourful(32, 24))}
    frame = image_stats_frame([5, 6], ["ok", "unreadable: truncated"], [ok, None])
    assert list(frame.columns) == FRAME_COLUMNS
    assert frame["orig_width"].tolist()[0] == 640 and frame["orig_width"].isna().tolist() == [False, True]
    assert str(frame["is_greyscale"].dtype) == "boolean" and str(frame["edge_density"].dtype) == "Float32"
    assert frame.iloc[1][STATS_COLUMNS].isna().all()
    empty = image_stats_frame([], [], [])
    assert len(empty) == 0 and list(empty.columns) == FRAME_COLUMNS
