"""near_duplicates and pose_subset's duplicate exclusion, on generated sample data whose
ground truth names every planted duplicate variant."""

import pandas as pd
import pytest

from danbooru_assets.devtools.sample_data import read_ground_truth
from danbooru_assets.orchestration.assets.dedup import NEAR_ON_DEMO
from danbooru_assets_tests.conftest import Pipeline


@pytest.fixture(scope="module")
def dedup_pipeline(tmp_path_factory) -> Pipeline:
    pipe = Pipeline(tmp_path_factory.mktemp("dedup"), n_images=150, n_shards=4)
    # Keep every scored image, so each planted pair reaches near_duplicates.
    pipe.settings_path.write_text("clip:\n  keep_fraction: 1.0\n")
    pipe.run_through("pose")
    return pipe


def _subset_ids(pipe) -> set[int]:
    kept = pd.concat([pipe.table("clip_subset", s) for s in pipe.shards])
    return set(kept.loc[kept["kept"], "image_id"])


def _planted(pipe, variant: str) -> list[tuple[int, int]]:
    gt = read_ground_truth(pipe.root)
    rows = gt.loc[gt["duplicate_kind"] == variant]
    subset = _subset_ids(pipe)
    return [(int(a), int(b)) for a, b in zip(rows["image_id"], rows["duplicate_of"]) if a in subset and b in subset]


def test_exact_and_parent_child_duplicates_from_the_ground_truth(dedup_pipeline):
    pipe = dedup_pipeline
    table = pipe.table("near_duplicates")
    dropped = table.loc[~table["kept"]].set_index("image_id")
    for variant, kind in (("exact_copy", "md5"), ("parent_child", "parent_child")):
        pairs = _planted(pipe, variant)
        assert pairs, f"no {variant} pair reached clip_subset"
        for copy, source in pairs:
            gone = copy if copy in dropped.index else source
            other = source if gone == copy else copy
            assert dropped.loc[gone, "duplicate_of"] == other
            assert dropped.loc[gone, "kind"] == kind
    # The demo model's similarities mean nothing: near pairs link nothing by default.
    assert (dropped["kind"] != "near").all()


def test_materialization_counts_and_pose_subset_excludes_the_dropped(dedup_pipeline):
    pipe = dedup_pipeline
    result = pipe.materialize(["near_duplicates"])
    meta = pipe.metadata(result, "near_duplicates")
    table = pipe.table("near_duplicates")
    assert meta["dropped"] == int((~table["kept"]).sum()) >= 2
    assert meta["groups"] == int(table["kept"].sum())
    assert meta["dropped_md5"] >= 1 and meta["dropped_parent_child"] >= 1
    assert meta["near_links"] == NEAR_ON_DEMO and meta["threshold"] == 0.95
    assert "just_above_threshold" in meta and "just_below_threshold" in meta

    pipe.materialize(["pose_subset"], shards=pipe.shards)
    subset = pd.concat([pipe.table("pose_subset", s) for s in pipe.shards])
    duplicates = set(table.loc[~table["kept"], "image_id"])
    rows = subset.loc[subset["image_id"].isin(duplicates)]
    assert len(rows) >= 1
    assert not rows["keep"].any()
    assert rows["drop_reasons"].str.split("|").map(lambda r: "duplicate" in r).all()
    others = subset.loc[~subset["image_id"].isin(duplicates)]
    assert not others["drop_reasons"].fillna("").str.contains("duplicate").any()


def test_threshold_from_run_config_links_near_pairs(dedup_pipeline):
    pipe = dedup_pipeline
    config = {"ops": {"near_duplicates": {"config": {"threshold": 0.9999, "near_with_demo_model": True}}}}
    meta = pipe.metadata(pipe.materialize(["near_duplicates"], run_config=config), "near_duplicates")
    assert meta["near_links"] == "used" and meta["settings_source"] == "run config"
    table = pipe.table("near_duplicates")
    near = table.loc[table["kind"] == "near"]
    assert meta["dropped_near"] == len(near) >= 1
    # Exact copies stay md5 duplicates whatever near pairs join their group.
    dropped = table.loc[~table["kept"]].set_index("image_id")
    for copy, source in _planted(pipe, "exact_copy"):
        gone = copy if copy in dropped.index else source
        assert dropped.loc[gone, "kind"] == "md5"
    pipe.materialize(["near_duplicates"])  # back to the settings' threshold for other tests
