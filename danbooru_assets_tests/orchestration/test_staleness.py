"""Staleness the UI can trust: after `danbooru-assets settings set`, with no code reload,
the webserver marks exactly the assets that read the changed section stale, every
partition of them; nothing else.

A real instance and webserver (``LocalDagster``, no daemon needed) over a tiny sample
that the main job has materialized; the same GraphQL the UI's asset graph reads.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from danbooru_assets.devtools.local_dagster import LocalDagster
from danbooru_assets.devtools.sample_data import generate_sample_dataset
from danbooru_assets.devtools.local_dagster import run_until_quiet
from danbooru_assets_tests.orchestration.test_ui_backfill import STALL_S, _env

# Starts a Dagster webserver: minutes, not seconds.
pytestmark = pytest.mark.slow

STALE_QUERY = """query($keys: [AssetKeyInput!]) { assetNodes(assetKeys: $keys) {
    assetKey { path } isPartitioned staleStatus staleCauses { key { path } }
} }"""
BY_PARTITION_QUERY = """query($keys: [AssetKeyInput!], $partitions: [String!]) { assetNodes(assetKeys: $keys) {
    assetKey { path } staleStatusByPartition(partitions: $partitions)
} }"""
WATCHED = ["clip_threshold", "clip_subset", "prompt_embeddings", "clip_scores", "pose_subset", "quality_model"]


def _status(dagster: LocalDagster, shards: list[str]) -> dict[str, str | list[str]]:
    """Unpartitioned assets: their status; partitioned ones: the statuses of ``shards``."""
    out: dict[str, str | list[str]] = {}
    partitioned = []
    for node in dagster.graphql(STALE_QUERY, {"keys": [{"path": [n]} for n in WATCHED]})["assetNodes"]:
        out[node["assetKey"]["path"][-1]] = node["staleStatus"]
        if node["isPartitioned"]:
            partitioned.append({"path": node["assetKey"]["path"]})
    for node in dagster.graphql(BY_PARTITION_QUERY, {"keys": partitioned, "partitions": shards})["assetNodes"]:
        out[node["assetKey"]["path"][-1]] = sorted(set(node["staleStatusByPartition"]))
    return out


def test_settings_set_marks_exactly_the_readers_stale_without_a_reload(tmp_path: Path) -> None:
    summary = generate_sample_dataset(tmp_path / "sample", n_images=30, n_shards=3, max_side=300)
    env = {**os.environ, **_env(tmp_path, summary.root)}
    work = tmp_path / "work"
    work.mkdir()
    main = run_until_quiet([sys.executable, "-m", "danbooru_assets.cli", "run"], STALL_S, cwd=work, env=env)
    assert main.returncode == 0, main.stdout[-3000:] + main.stderr[-3000:]

    with LocalDagster(tmp_path / "dagster_home", _env(tmp_path, summary.root), cwd=work, daemon=False) as dagster:
        before = _status(dagster, summary.shards)
        assert all(s in ("FRESH", ["FRESH"]) for s in before.values()), before

        done = run_until_quiet([sys.executable, "-m", "danbooru_assets.cli", "settings", "set", "clip.keep_fraction=0.35"],
                               STALL_S, cwd=work, env=env)
        assert done.returncode == 0 and "clip_threshold" in done.stdout, done.stdout + done.stderr
        after = _status(dagster, summary.shards)  # the same webserver: no code reload
        assert after["clip_threshold"] == "STALE"
        assert after["clip_subset"] == ["STALE"]  # every partition
        for name in ("prompt_embeddings", "clip_scores", "pose_subset", "quality_model"):
            assert after[name] in ("FRESH", ["FRESH"]), (name, after)
        # ... and where a user looks first: clip_subset's check counts every shard stale, the others' none.
        checks = {name: _check(dagster, name) for name in ("clip_subset", "pose_subset", "clip_scores")}
        assert checks["clip_subset"] == (False, len(summary.shards)), checks
        assert checks["pose_subset"] == checks["clip_scores"] == (True, 0), checks


CHECK_QUERY = """query($key: AssetKeyInput!) { assetCheckExecutions(assetKey: $key, checkName: "settings_current", limit: 1) {
    evaluation { success metadataEntries { label ... on IntMetadataEntry { intValue } } } } }"""


def _check(dagster: LocalDagster, asset: str) -> tuple[bool, int]:
    """The latest settings_current evaluation of ``asset``: (passed, stale shards)."""
    evaluation = dagster.graphql(CHECK_QUERY, {"key": {"path": [asset]}})["assetCheckExecutions"][0]["evaluation"]
    stale = next(e["intValue"] for e in evaluation["metadataEntries"] if e["label"] == "stale_shards")
    return evaluation["success"], stale
