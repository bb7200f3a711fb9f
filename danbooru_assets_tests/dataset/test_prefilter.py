"""The metadata prefilter's rules over shard-index rows, and against the sample generator's
ground truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from danbooru_assets.dataset.prefilter import (
    PrefilterOutOfDate,
    apply_prefilter,
    decode_candidates,
    tag_counts,
)
from danbooru_assets.settings import DEFAULT_EXCLUDED_GENERAL_TAGS, PrefilterSettings, TagSets


def _index(rows: list[dict]) -> pd.DataFrame:
    base = {
        "status": "ok", "ext": "jpg", "width": 800, "height": 1000, "rating": "general", "score": 5,
        "is_deleted": False, "is_banned": False, "tags_general": "1girl solo", "tags_character": "",
        "tags_copyright": "original", "tags_artist": "someone", "tags_meta": "",
    }
    frame = pd.DataFrame([{**base, **r} for r in rows])
    return frame.astype({"score": "Int64", "is_deleted": "boolean", "is_banned": "boolean"})


def _reasons(table: pd.DataFrame) -> dict[int, str]:
    return table.set_index("image_id")["reasons"].to_dict()


def test_every_rule_names_its_reason() -> None:
    index = _index([
        {"image_id": 1},
        {"image_id": 2, "tags_general": "comic monochrome greyscale 1girl"},
        {"image_id": 3, "tags_general": "1boy 1girl hetero"},  # an entry of two tags, both present
        {"image_id": 4, "tags_general": "1boy solo"},  # one of the two only: no rule
        {"image_id": 5, "rating": "explicit"},
        {"image_id": 6, "score": -2},
        {"image_id": 7, "is_deleted": True, "is_banned": True},
        {"image_id": 8, "ext": "gif"},
        {"image_id": 9, "width": 200, "height": 150},
        {"image_id": 10, "width": 300, "height": 1500},
        {"image_id": 11, "score": None, "rating": None, "is_deleted": None},  # nulls break no rule
        {"image_id": 12, "status": "zero_bytes", "tags_general": "comic"},  # not usable: no row at all
    ])
    rules = PrefilterSettings(ratings=["general", "sensitive", "questionable", "safe"], file_types=["jpg", "png"])
    table, counts = apply_prefilter(index, rules)
    assert _reasons(table) == {
        1: "", 2: "tag:comic|tag:monochrome|tag:greyscale", 3: "tag:1boy 1girl", 4: "", 5: "rating",
        6: "low_score", 7: "deleted|banned", 8: "file_type", 9: "too_small", 10: "aspect_ratio", 11: "",
    }
    assert counts["rows"] == 11 and counts["excluded"] == counts["never_decoded"] == 8
    assert counts["rule_tag"] == 2 and counts["rule_deleted"] == counts["rule_banned"] == 1
    assert table["decode"].tolist() == [r == "" for r in _reasons(table).values()]
    assert tag_counts(table["reasons"]) == {"comic": 1, "monochrome": 1, "greyscale": 1, "1boy 1girl": 1}


def test_modes_decide_what_the_reasons_do() -> None:
    index = _index([{"image_id": 1}, {"image_id": 2, "tags_general": "no_humans scenery"}])
    skip, _ = apply_prefilter(index, PrefilterSettings(mode="skip"))
    annotate, _ = apply_prefilter(index, PrefilterSettings(mode="annotate"))
    off, counts = apply_prefilter(index, PrefilterSettings(mode="off"))
    assert skip["excluded"].tolist() == [False, True] and skip["decode"].tolist() == [True, False]
    assert annotate["excluded"].tolist() == [False, True] and annotate["decode"].all()
    assert not off["excluded"].any() and off["decode"].all()
    assert off["reasons"].tolist() == skip["reasons"].tolist()  # off still lists what the rules would do
    assert counts["would_exclude"] == 1 and counts["excluded"] == 0


def test_images_without_metadata_are_judged_by_file_and_size_only() -> None:
    index = _index([
        {"image_id": 1, "status": "no_metadata", "tags_general": None, "rating": None, "score": None,
         "is_deleted": None, "is_banned": None},
        {"image_id": 2, "status": "no_metadata", "tags_general": None, "width": 100, "height": 100},
    ])
    rules = PrefilterSettings(require_tags=TagSets(general=["solo"]), min_score=10)
    table, counts = apply_prefilter(index, rules)
    assert _reasons(table) == {1: "", 2: "too_small"}
    assert counts["without_metadata"] == 2 and not table["has_metadata"].any()


def test_category_rules_match_their_column_and_a_combined_tag_string() -> None:
    # Metadata carrying only `tag_string` is stored in tags_general (dataset.metadata).
    index = _index([
        {"image_id": 1, "tags_character": "hatsune_miku"},
        {"image_id": 2, "tags_general": "1girl hatsune_miku vocaloid"},
        {"image_id": 3, "tags_meta": "animated"},
        {"image_id": 4, "tags_general": "animated"},  # a meta entry never hides in another category but general
    ])
    rules = PrefilterSettings(exclude_tags=TagSets(character=["hatsune_miku"], meta=["animated"]))
    assert _reasons(apply_prefilter(index, rules)[0]) == {
        1: "tag:hatsune_miku", 2: "tag:hatsune_miku", 3: "tag:animated", 4: "tag:animated",
    }
    required = PrefilterSettings(exclude_tags=TagSets(), require_tags=TagSets(copyright=["vocaloid"]))
    assert _reasons(apply_prefilter(index, required)[0]) == {
        1: "missing_required_tag", 2: "", 3: "missing_required_tag", 4: "missing_required_tag",
    }


def test_tag_entries_are_normalised_and_checked() -> None:
    assert TagSets(general=["  Comic ", "1BOY   1girl"]).general == ["comic", "1boy 1girl"]
    for bad in (["comic", "COMIC"], [" "]):
        with pytest.raises(ValueError):
            TagSets(general=bad)
    assert PrefilterSettings(file_types=["JPEG", ".png"]).file_types == ["jpg", "png"]
    # YAML reads a bare `off` as false: `settings set prefilter.mode=off` still means off.
    from danbooru_assets.settings import CurationSettings, set_setting

    assert set_setting(CurationSettings(), "prefilter.mode", "off").prefilter.mode == "off"


def test_decode_candidates_refuse_a_prefilter_older_than_the_index() -> None:
    index = _index([{"image_id": 1}, {"image_id": 2, "tags_general": "comic"}, {"image_id": 3, "status": "zero_bytes"}])
    table, _ = apply_prefilter(index, PrefilterSettings())
    decode, skipped = decode_candidates(index, table)
    assert decode.tolist() == [True, False, False] and skipped == 1
    newer = pd.concat([index, _index([{"image_id": 4}])], ignore_index=True)
    with pytest.raises(PrefilterOutOfDate, match="1 usable indexed image"):
        decode_candidates(newer, table, "0042")


# --------------------------------------------------------------------------- sample data


@pytest.fixture(scope="module")
def sample_prefilter(tmp_path_factory):
    """The default rules over every shard of a generated sample, through the real metadata
    conversion and shard index; with the generator's ground truth."""
    from danbooru_assets.dataset.layout import DatasetLayout
    from danbooru_assets.dataset.metadata import convert_metadata_to_shards
    from danbooru_assets.dataset.shard_index import build_shard_index
    from danbooru_assets.core.tables import read_arrow
    from danbooru_assets.devtools.sample_data import generate_sample_dataset, read_ground_truth

    base = tmp_path_factory.mktemp("prefilter-sample")
    summary = generate_sample_dataset(base / "sample", n_images=120, n_shards=4, max_side=300)
    layout = DatasetLayout(base / "sample")
    convert_metadata_to_shards(layout.metadata_files(), base / "meta")
    tables = []
    for shard in summary.shards:
        path = base / "meta" / f"{shard}.parquet"
        index, _ = build_shard_index(layout, shard, read_arrow(path) if path.exists() else None)
        tables.append(apply_prefilter(index, PrefilterSettings())[0])
    truth = read_ground_truth(base / "sample").set_index("image_id")
    return pd.concat(tables, ignore_index=True).set_index("image_id"), truth, summary


def _expected_reasons(row) -> set[str]:
    """What the default rules must say about one image, from the ground truth alone."""
    if not row.has_metadata:
        return set()
    tags = set(row.tags.split())
    reasons = {f"tag:{e}" for e in DEFAULT_EXCLUDED_GENERAL_TAGS if set(e.split()) <= tags}
    if row.score < 0:
        reasons.add("low_score")
    if row.is_deleted:
        reasons.add("deleted")
    if row.is_banned:
        reasons.add("banned")
    return reasons


def test_sample_decisions_follow_the_ground_truth(sample_prefilter) -> None:
    table, truth, summary = sample_prefilter
    unreadable = {i for ids in summary.broken_ids.values() for i in ids} - set(summary.broken_ids["palette_gif"]) \
        - set(summary.broken_ids["alpha_channel"])
    usable = truth.loc[truth["has_file"] & ~truth.index.isin(unreadable)]
    # Every usable image has a row, and its reasons are exactly what its metadata implies.
    assert set(table.index) >= set(usable.index) - unreadable
    for image_id, row in usable.iterrows():
        got = set(filter(None, table.loc[image_id, "reasons"].split("|")))
        assert got == _expected_reasons(row), image_id
    assert table["excluded"].equals(table["reasons"] != "")
    excluded_kinds = truth.loc[table.index[table["excluded"]], "kind"]
    # The generator's kinds that the seed threw away are all excluded, for free.
    for kind, tag in (("manga_page", "comic"), ("landscape", "no_humans"), ("text_page", "text_focus")):
        with_meta = usable.loc[(usable["kind"] == kind) & usable["has_metadata"]]
        assert len(with_meta) and table.loc[with_meta.index, "reasons"].str.contains(f"tag:{tag}").all()
    assert (excluded_kinds == "single_figure").mean() < 0.5


def test_planted_cases_and_images_without_metadata(sample_prefilter) -> None:
    table, truth, summary = sample_prefilter
    planted = truth.dropna(subset=["prefilter_case"])
    assert set(planted["prefilter_case"]) == {"low_score", "deleted", "banned", "chibi"}
    reason = {"low_score": "low_score", "deleted": "deleted", "banned": "banned", "chibi": "tag:chibi"}
    for image_id, row in planted.iterrows():
        assert reason[row.prefilter_case] in table.loc[image_id, "reasons"].split("|")
        assert not table.loc[image_id, "decode"]
    without = [i for i in summary.ids_without_metadata if i in table.index]
    assert without and not table.loc[without, "has_metadata"].any()
    assert (table.loc[without, "reasons"] == "").all()  # the sample's sizes break no rule
