"""Skeleton drawing: lands where the keypoints are, skips absent/low-confidence ones."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from danbooru_assets.pose.coco import KEYPOINT_INDEX, SKELETON, SKELETON_COLORS
from danbooru_assets.pose.draw import draw_skeleton, skeleton_sheet
from danbooru_assets.pose.synthetic import CANONICAL_POSE

K = KEYPOINT_INDEX


def _pose(w: int = 200, h: int = 300) -> np.ndarray:
    xy = CANONICAL_POSE * (0.2 * h) + (w / 2, 0.35 * h)
    return np.concatenate([xy, np.ones((17, 1))], axis=1)


def _changed(a: Image.Image, b: Image.Image) -> np.ndarray:
    return np.any(np.asarray(a) != np.asarray(b), axis=2)


def test_draws_on_a_copy_at_the_keypoints():
    img = Image.new("RGB", (200, 300), (0, 0, 0))
    kp = _pose()
    out = draw_skeleton(img, kp)
    assert out is not img and out.size == img.size
    assert not np.asarray(img).any()  # input untouched
    changed = _changed(img, out)
    for name in ("nose", "wrist_left", "ankle_right"):
        x, y = kp[K[name], :2].round().astype(int)
        assert changed[y, x], name
    # far from the figure nothing is drawn
    assert not changed[5, 5] and not changed[295, 5]
    # the shoulder line (5, 6) uses its COCO colour somewhere along its middle
    idx = SKELETON.index((5, 6))
    mid = ((kp[5, :2] + kp[6, :2]) / 2).round().astype(int)
    assert tuple(np.asarray(out)[mid[1], mid[0]]) == SKELETON_COLORS[idx]


def test_skips_nan_and_low_confidence_and_draws_box():
    img = Image.new("RGB", (200, 300))
    kp = _pose()
    kp[K["ankle_left"]] = np.nan
    kp[K["ankle_right"], 2] = 0.1
    out = draw_skeleton(img, kp, min_conf=0.5, box=(10, 10, 190, 290))
    changed = _changed(img, out)
    x, y = _pose()[K["ankle_right"], :2].round().astype(int)
    assert not changed[y, x]
    assert not changed[y - 10 : y + 10, x - 10 : x + 10].any()  # no limb end near it either
    assert changed[10, 100] and changed[150, 10]  # the box outline
    assert draw_skeleton(img, kp, min_conf=0.0).getpixel((int(x), int(y))) != (0, 0, 0)


def test_line_width_scales_with_image():
    def drawn_pixels(size: int) -> int:
        img = Image.new("RGB", (size, size))
        kp = _pose(size, size)
        return int(_changed(img, draw_skeleton(img, kp)).sum())

    small, big = drawn_pixels(128), drawn_pixels(1024)
    # 8x the size: lines 8x longer and 8x wider -> far more than 8x the pixels
    assert big > 30 * small


def test_rejects_wrong_shape_and_builds_sheet():
    with pytest.raises(ValueError):
        draw_skeleton(Image.new("RGB", (10, 10)), np.zeros((16, 3)))
    kps = np.stack([_pose(), _pose()])
    sheet = skeleton_sheet(
        [Image.new("RGB", (200, 300)), None], kps, ["kept 1", "dropped 2"],
        sizes=[(200, 300), (200, 300)], columns=2, cell=100, title="t",
    )
    assert sheet.size[0] == 200
    # both cells show a drawn skeleton (the second on a placeholder canvas)
    arr = np.asarray(sheet)
    assert arr[:, :100].max() == 255 and arr[:, 100:].max() == 255


def test_keypoints_of_the_full_frame_land_on_a_reduced_decode():
    full = (200, 300)
    kp = _pose(*full)
    half = Image.new("RGB", (100, 150))
    out = draw_skeleton(half, kp, frame_size=full, box=(10, 10, 190, 290))
    changed = _changed(half, out)
    for name in ("nose", "wrist_left", "ankle_right"):
        x, y = (kp[K[name], :2] / 2).round().astype(int)
        assert changed[y, x], name
    assert changed[5, 50] and changed[75, 5]  # the box, scaled by half too
    # the sheet takes each image's full size (``sizes``) as its keypoints' frame
    from danbooru_assets.core.visuals import contact_sheet

    sheet = skeleton_sheet([half], kp[None], ["x"], sizes=[full], columns=1, cell=150)
    expected = contact_sheet([draw_skeleton(half, kp, frame_size=full)], ["x"], columns=1, cell=150)
    assert np.array_equal(np.asarray(sheet), np.asarray(expected))
    unscaled = skeleton_sheet([half], kp[None], ["x"], columns=1, cell=150)
    assert not np.array_equal(np.asarray(sheet), np.asarray(unscaled))
