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
    # An exact copy has the same bytes and md5: the file hash names it (the stronger signal).
    # A child post with a small emblem drawn on is often a perceptual copy too (named so).
    for variant, kinds in (("exact_copy", {"file_hash"}), ("parent_child", {"parent_child", "phash"}),
                           ("resized", {"phash"})):
        pairs = _planted(pipe, variant)
        assert pairs, f"no {variant} pair reached clip_subset"
        for copy, source in pairs:
            gone = copy if copy in dropped.index else source
            other = source if gone == copy else copy
            assert dropped.loc[gone, "duplicate_of"] == other
            assert dropped.loc[gone, "kind"] in kinds
    # The demo model's similarities mean nothing: CLIP pairs link nothing by default.
    assert (dropped["kind"] != "clip").all()
    resized = dropped.loc[dropped["kind"] == "phash"]
    assert (resized["value"] <= 6).all() and resized["detail"].str.startswith("phash distance").all()


def test_materialization_counts_and_pose_subset_excludes_the_dropped(dedup_pipeline):
    pipe = dedup_pipeline
    result = pipe.materialize(["near_duplicates"])
    meta = pipe.metadata(result, "near_duplicates")
    table = pipe.table("near_duplicates")
    assert meta["dropped"] == int((~table["kept"]).sum()) >= 2
    assert meta["groups"] == int(table["kept"].sum())
    assert meta["dropped_file_hash"] >= 1 and meta["dropped_parent_child"] >= 1 and meta["dropped_phash"] >= 1
    assert meta["clip_links"] == NEAR_ON_DEMO and meta["threshold"] == 0.95 and meta["phash_max_distance"] == 6
    assert meta["images_without_hash"] == 0
    assert "clip_just_inside" in meta and "phash_just_inside" in meta

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
    assert meta["clip_links"] == "used" and meta["settings_source"] == "run config"
    # The inputs did not change: the stored candidate pairs are regrouped, no search.
    assert meta["search"].startswith("reused stored pairs")
    table = pipe.table("near_duplicates")
    near = table.loc[table["kind"] == "clip"]
    assert meta["dropped_clip"] == len(near) >= 1
    # Exact copies stay file-hash duplicates whatever CLIP pairs join their group.
    dropped = table.loc[~table["kept"]].set_index("image_id")
    for copy, source in _planted(pipe, "exact_copy"):
        gone = copy if copy in dropped.index else source
        assert dropped.loc[gone, "kind"] == "file_hash"
    pipe.materialize(["near_duplicates"])  # back to the settings' threshold for other tests


def test_copies_arriving_in_a_later_run_without_metadata_are_linked(dedup_pipeline):
    """A byte copy and a resized, re-encoded copy of a kept image land under new ids (no
    metadata line, as when a tree from elsewhere is merged in); one more run links both."""
    import io

    from PIL import Image

    from danbooru_assets.core.shards import shard_key

    pipe = dedup_pipeline
    shard = pipe.shards[0]
    index = pipe.table("shard_index", shard).set_index("image_id")
    kept = pipe.table("clip_subset", shard)
    stats = pipe.table("image_stats", shard).set_index("image_id")
    # Big enough that the 0.8x copy still passes clip.min_side (256).
    ids = [i for i in kept.loc[kept["kept"], "image_id"] if pd.notna(stats.loc[i, "phash"])
           and str(index.loc[i, "rel_path"]).endswith(".jpg")
           and min(stats.loc[i, "orig_width"], stats.loc[i, "orig_height"]) >= 330]
    source = int(ids[0])
    path = pipe.root / index.loc[source, "rel_path"]
    byte_copy, resized = 9_000_000 + int(shard), 9_001_000 + int(shard)
    assert shard_key(byte_copy) == shard_key(resized) == shard
    (path.parent / f"{byte_copy}.jpg").write_bytes(path.read_bytes())
    img = Image.open(path).convert("RGB")
    buf = io.BytesIO()
    img.resize((round(img.width * 0.8), round(img.height * 0.8)), Image.Resampling.LANCZOS).save(buf, "JPEG", quality=70)
    (path.parent / f"{resized}.jpg").write_bytes(buf.getvalue())

    pipe.materialize(["shard_index", "metadata_prefilter", "clip_embeddings", "image_stats", "clip_scores"],
                     shards=[shard])
    pipe.materialize(["clip_subset"], shards=[shard])
    meta = pipe.metadata(pipe.materialize(["near_duplicates"]), "near_duplicates")
    assert not meta["search"].startswith("reused")  # new images: a new search
    subset = pipe.table("clip_subset", shard).set_index("image_id")
    assert subset.loc[[byte_copy, resized], "kept"].all()
    table = pipe.table("near_duplicates").set_index("image_id")
    assert table.loc[byte_copy, "duplicate_of"] == source and table.loc[byte_copy, "kind"] == "file_hash"
    assert table.loc[resized, "duplicate_of"] == source and table.loc[resized, "kind"] == "phash"
    assert table.loc[resized, "value"] <= 6
    assert bool(table.loc[source, "kept"])


def test_rows_stored_before_the_hashes_get_them_on_the_next_run(dedup_pipeline):
    from danbooru_assets.core.tables import write_parquet

    pipe = dedup_pipeline
    shard = pipe.shards[1]
    before = pipe.table("image_stats", shard)
    path = pipe.storage.asset_path("image_stats", shard)
    write_parquet(path, before.drop(columns=["file_hash", "phash"]))  # as an older version stored it
    result = pipe.materialize(["clip_embeddings", "image_stats"], shards=[shard])
    meta = pipe.metadata(result, "image_stats")
    ok = before["status"] == "ok"
    assert meta["encoded"] == 0 and meta["hashes_backfilled"] == int(ok.sum()) and meta["without_file_hash"] == 0
    after = pipe.table("image_stats", shard)
    pd.testing.assert_frame_equal(after[["image_id", "file_hash", "phash"]], before[["image_id", "file_hash", "phash"]])
