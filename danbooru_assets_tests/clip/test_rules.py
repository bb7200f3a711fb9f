"""clip_subset's rules over one shard: every reason kept, displayed sizes, validated overrides."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from danbooru_assets.clip.image_stats import image_stats_frame
from danbooru_assets.clip.rules import SUBSET_REASONS, apply_clip_rules, values_at
from danbooru_assets.settings import CurationSettings, ReadSettings, SettingsError
from danbooru_assets.settings import ImageRules


def _stats(image_id: int, width: int, height: int, dark: float = 0.0, content: float = 1.0) -> dict:
    return {
        "orig_width": width, "orig_height": height,
        "border_black_rows_frac": dark, "border_black_cols_frac": 0.0,
        "border_white_rows_frac": 0.0, "border_white_cols_frac": 0.0,
        "content_area_frac": content, "mean_saturation": 0.5, "is_greyscale": False, "edge_density": 0.1,
    }


def _shard():
    # 1: fine; 2: a rotated JPEG (the index, from metadata, has the stored 1000x200 frame;
    # the decode shows it 200x1000); 3: letterboxed with little content; 4: low score;
    # 5: unreadable; 6: too small; 7: indexed but never decoded (no stats row).
    index = pd.DataFrame({
        "image_id": [1, 2, 3, 4, 5, 6, 7, 8],
        "rel_path": [f"original/000{i}/{i}.jpg" for i in range(1, 9)],
        "width": [800, 1000, 800, 800, 800, 100, 900, 800],
        "height": [600, 200, 600, 600, 600, 120, 700, 600],
        "status": ["ok"] * 7 + ["missing_file"],
    })
    stats = image_stats_frame(
        [1, 2, 3, 4, 5, 6],
        ["ok", "ok", "ok", "ok", "unreadable: truncated", "ok"],
        [_stats(1, 800, 600), _stats(2, 200, 1000), _stats(3, 800, 600, dark=0.6, content=0.1),
         _stats(4, 800, 600), None, _stats(6, 100, 120)],
    )
    scores = pd.DataFrame({"image_id": [1, 2, 3, 4, 6], "portrait_score": [0.9, 0.8, 0.9, 0.1, 0.9]})
    return index, stats, scores


def test_every_reason_is_kept_and_counted() -> None:
    index, stats, scores = _shard()
    out, dropped = apply_clip_rules(index, stats, scores, 0.5, ImageRules(min_side=150))
    reasons = out.set_index("image_id")["drop_reasons"].to_dict()
    assert reasons == {
        1: "", 2: "", 3: "dark_border_little_content", 4: "below_threshold",
        5: "unreadable|below_threshold", 6: "too_small", 7: "not_encoded|below_threshold",
    }
    assert 8 not in reasons  # not usable: never a subset row
    assert out.loc[out["kept"], "image_id"].tolist() == [1, 2]
    assert dropped == {f"dropped_{n}": c for n, c in zip(SUBSET_REASONS, [0, 1, 1, 3, 1, 1], strict=True)}
    assert out["portrait_score"].dtype == np.float32 and np.isnan(out.set_index("image_id").loc[5, "portrait_score"])


def test_sizes_are_the_displayed_ones_where_the_decode_succeeded() -> None:
    index, stats, scores = _shard()
    out, _ = apply_clip_rules(index, stats, scores, 0.5, ImageRules(min_side=150))
    sizes = out.set_index("image_id")[["width", "height"]]
    assert sizes.loc[2].tolist() == [200, 1000]  # the decode's displayed frame, not the index's
    assert sizes.loc[5].tolist() == [800, 600] and sizes.loc[7].tolist() == [900, 700]  # index fallback
    assert sizes["width"].dtype == np.int64
    # The rules see the displayed size too: min_side 300 drops the rotated image (short side 200).
    out, _ = apply_clip_rules(index, stats, scores, 0.5, ImageRules(min_side=300))
    assert "too_small" in out.set_index("image_id").loc[2, "drop_reasons"]


def test_overrides_are_validated_like_the_settings_file() -> None:
    read = ReadSettings(CurationSettings(), "settings file")
    rules = ImageRules(min_side=256)
    assert read.resolve(rules, {"min_side": 512}) == (ImageRules(min_side=512), "run config")
    assert read.resolve(rules, {}) == (rules, "settings file")
    for bad in ({"min_side": -5}, {"min_content_area_frac": 1.5}, {"max_dark_border_frac": -0.1}):
        with pytest.raises(SettingsError, match="run config"):
            read.resolve(rules, bad)


def test_values_at_fills_absent_ids_and_nulls() -> None:
    table = pd.DataFrame({"image_id": [30, 10, 20], "v": pd.array([3, None, 2], dtype="Int64")})
    got = values_at(table, "v", np.array([10, 20, 40, 30]), np.nan)
    np.testing.assert_array_equal(got, [np.nan, 2.0, np.nan, 3.0])
    assert values_at(table.iloc[0:0], "v", np.array([1, 2]), -1.0).tolist() == [-1.0, -1.0]
