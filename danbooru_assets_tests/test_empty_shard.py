"""An empty shard folder goes through every per-shard stage without an error."""

import pytest

EMPTY = "0005"
KEEP_ALL = {"ops": {"clip_threshold": {"config": {"fixed_threshold": -1.0}}}}


@pytest.fixture(scope="module")
def with_empty_shard(pipeline):
    (pipeline.root / "original" / EMPTY).mkdir()
    pipeline.run_through("ingest")
    pipeline.materialize(["clip_threshold"], run_config=KEEP_ALL)
    for shard in pipeline.shards:
        pipeline.materialize(["clip_subset", "pose_keypoints"], shard)
    pipeline.materialize(["pose_statistics"])
    return pipeline


def test_every_per_shard_stage_accepts_an_empty_shard(with_empty_shard):
    p = with_empty_shard
    for stage in (
        ["shard_index", "clip_embeddings", "image_stats", "clip_scores"],
        ["clip_subset", "pose_keypoints"],
        ["pose_subset"],
    ):
        result = p.materialize(stage, EMPTY)
        assert result.success
    for shard in p.shards:
        p.materialize(["pose_subset"], shard)
    p.materialize(["quality_model"])
    p.materialize(["quality_predictions", "curated_dataset"], EMPTY)
    for asset in ("shard_index", "clip_scores", "clip_subset", "pose_keypoints", "pose_subset", "curated_dataset"):
        assert len(p.table(asset, EMPTY)) == 0, asset
    index_meta = p.metadata(p.materialize(["shard_index"], EMPTY), "shard_index")
    assert index_meta["files"] == 0 and index_meta["indexed"] == 0
