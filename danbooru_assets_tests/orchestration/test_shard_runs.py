"""A run covers a range of shards: every per-shard asset loops over it, an empty shard
inside the range passes through every stage, and a failing shard fails the range by
name while the other shards' inference work is kept."""

from pathlib import Path

import pytest

from danbooru_assets_tests.conftest import KEEP_ALL, Pipeline

INGEST = ["shard_index", "metadata_prefilter", "clip_embeddings", "image_stats", "clip_scores"]


@pytest.fixture(scope="module")
def ranged(tmp_path_factory) -> Pipeline:
    p = Pipeline(tmp_path_factory.mktemp("ranged"), n_images=48, n_shards=4)
    last = int(p.shards[-1])
    p.empty = f"{last + 1:04d}" if last < 999 else f"{int(p.shards[0]) - 1:04d}"
    (p.root / "original" / p.empty).mkdir()
    p.range = sorted([*p.shards, p.empty])
    p.materialize(["danbooru_metadata", "published_keypoints", "prompt_embeddings"])
    return p


def _materialized(result, asset: str) -> list[str]:
    return sorted(e.partition for e in result.get_asset_materialization_events() if e.asset_key.path == [asset])


def test_one_run_covers_the_range_and_an_empty_shard_passes_every_stage(ranged):
    p = ranged
    result = p.materialize(INGEST, shards=p.range)
    assert _materialized(result, "shard_index") == p.range == _materialized(result, "clip_embeddings")
    meta = p.metadata(result, "shard_index")
    assert meta["shard_range"] == f"{p.range[0]}..{p.range[-1]}"
    # the range's totals are named as such; each partition carries its own shard's figures
    assert meta["range_indexed"] == sum(len(p.table("shard_index", s)) for s in p.range) > 0
    assert meta["range_row_count"] == meta["range_indexed"] and meta["range_shards"] == len(p.range)
    assert f"| {p.empty} |" in meta["per_shard"]  # the per-shard table a person reads in the UI
    for event in result.get_asset_materialization_events():
        if event.asset_key.path == ["clip_embeddings"]:
            own = event.step_materialization_data.materialization.metadata
            rows = len(p.table("clip_embeddings", event.partition))
            assert own["dagster/row_count"].value == own["images"].value == rows, event.partition
    p.materialize(["clip_threshold"], run_config=KEEP_ALL)
    p.materialize(["clip_subset", "pose_keypoints"], shards=p.range)
    p.materialize(["pose_statistics", "near_duplicates"])
    p.materialize(["pose_subset"], shards=p.range)
    p.materialize(["quality_model"])
    result = p.materialize(["quality_predictions", "curated_dataset"], shards=p.range)
    assert _materialized(result, "curated_dataset") == p.range
    for asset in ("shard_index", "clip_scores", "clip_subset", "pose_keypoints", "pose_subset", "curated_dataset"):
        assert len(p.table(asset, p.empty)) == 0, asset
    assert len(p.table("clip_subset", p.shards[0])) > 0


def _step_failure(result) -> str:
    failure = next(e for e in result.all_events if e.is_step_failure)
    data = failure.step_failure_data
    return (data.user_failure_data.description if data.user_failure_data else "") or data.error.message


def test_a_failing_shard_fails_the_range_by_name_and_the_others_are_kept(ranged):
    p = ranged
    p.materialize(INGEST, shards=p.range)
    bad, good = p.shards[1], p.shards[2]
    index_file = Path(p.storage.asset_path("shard_index", bad).path)
    saved = index_file.read_bytes()
    for asset in ("clip_embeddings", "image_stats"):  # `good` must be encoded again in this run
        Path(p.storage.asset_path(asset, good).path).unlink()
    try:
        index_file.write_bytes(b"PAR1 not a parquet file")
        result = p.materialize(["clip_embeddings", "image_stats"], shards=p.range, raise_on_error=False)
        assert not result.success
        message = _step_failure(result)
        assert f"1 of {len(p.range)} shards failed" in message and f"- {bad}:" in message
        assert f"shard_index/{bad}.parquet" in message  # the file at fault, by name
        assert _materialized(result, "clip_embeddings") == []  # the run is the unit of failure
        # ... but the encoded shards were stored, so re-executing costs only the failed one.
        assert Path(p.storage.asset_path("clip_embeddings", good).path).exists()
    finally:
        index_file.write_bytes(saved)
    result = p.materialize(["clip_embeddings", "image_stats"], shards=p.range)
    meta = p.metadata(result, "clip_embeddings")
    assert meta["encoded"] == 0 and meta["reused"] == meta["images"] > 0
