"""The record a global asset keeps of the settings it followed, and the check of it."""

import dagster as dg
import pandas as pd
import pytest

from danbooru_assets.orchestration.settings_guard import (
    SETTINGS_COLUMN,
    outdated_parts,
    require_current,
    with_settings_record,
)
from danbooru_assets.settings import CurationSettings, set_setting


def test_a_record_is_current_until_its_part_of_the_file_changes():
    settings = CurationSettings()
    table = with_settings_record(pd.DataFrame({"threshold": [0.3]}), settings, "clip_threshold", "dedup")
    assert outdated_parts(table, settings, "clip_threshold", "dedup") == []
    changed = set_setting(settings, "clip.keep_fraction", "0.5")
    assert outdated_parts(table, changed, "clip_threshold", "dedup") == ["clip_threshold"]
    # another section's change is not this record's business
    assert outdated_parts(table, set_setting(settings, "pose.margin", "0.1"), "clip_threshold", "dedup") == []


def test_no_record_is_outdated_and_an_empty_recorded_table_is_not():
    settings = CurationSettings()
    assert outdated_parts(pd.DataFrame({"threshold": [0.3]}), settings, "dedup") == ["dedup"]
    empty = with_settings_record(pd.DataFrame({"image_id": pd.Series(dtype="int64")}), settings, "dedup")
    assert SETTINGS_COLUMN in empty.columns and outdated_parts(empty, settings, "dedup") == []


def test_the_model_part_ignores_the_round_plan():
    settings = CurationSettings()
    table = with_settings_record(pd.DataFrame({"trained": [True]}), settings, "quality.classifier")
    assert outdated_parts(table, set_setting(settings, "quality.min_round_size", "5"), "quality.classifier") == []
    assert outdated_parts(table, set_setting(settings, "quality.classifier", "mlp"), "quality.classifier") == [
        "quality.classifier"
    ]


def test_require_current_fails_naming_what_to_launch():
    settings = CurationSettings()
    table = with_settings_record(pd.DataFrame({"kept": [True]}), settings, "dedup")
    require_current("pose_subset", "near_duplicates", table, settings, ("dedup",), launch="near_duplicates_job")
    with pytest.raises(dg.Failure, match="Launch near_duplicates_job") as failed:
        require_current("pose_subset", "near_duplicates", table, set_setting(settings, "dedup.threshold", "0.9"),
                        ("dedup",), launch="near_duplicates_job")
    assert "stay marked stale" in failed.value.description
