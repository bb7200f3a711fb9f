"""The dataset's 1,000 image-id shards (Danbooru20xx bucket folders, ``id % 1000``) and
how runs cover them: ranges of shards, never one run per shard.

A Dagster run is a new process that loads the code location, so its fixed cost is paid
per run, not per shard. Every per-shard asset therefore declares a ``BackfillPolicy``
and loops over ``context.partition_keys``:

- cheap assets (stored tables in, stored tables out) backfill in one run;
- inference assets (``clip_embeddings``/``image_stats``, ``pose_keypoints``) in runs of
  ``DANBOORU_INFERENCE_SHARDS_PER_RUN`` shards (default 50): each run loads its model
  once and streams its shards through it, and a long backfill still reports progress
  and resumes run by run.
"""

from __future__ import annotations

import warnings

import dagster as dg

from danbooru_assets.config import inference_shards_per_run
# NUM_SHARDS and shard_key are re-exported for importers that predate core.shards.
from danbooru_assets.core.shards import NUM_SHARDS, SHARD_KEYS, shard_key  # noqa: F401

# Run tags that make a run cover a contiguous range of partitions (what a single-run
# backfill, `dg launch --partition-range` and the CLI set).
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"

shard_partitions = dg.StaticPartitionsDefinition(SHARD_KEYS)


# BackfillPolicy is marked beta; the asset decorator warns on every use of it.
warnings.filterwarnings("ignore", message=r"Parameter `backfill_policy`", category=dg.BetaWarning)
# A stage job mixing cheap and inference assets (ingest, pose, shard_job) backfills in runs
# of the inference size when launched as a *job* backfill; asset backfills keep each
# asset's own policy. Dagster warns about that choice on every load.
warnings.filterwarnings("ignore", message=r"Asset job .* materializes assets with varying BackfillPolicies")
CHEAP_BACKFILL = dg.BackfillPolicy.single_run()
INFERENCE_BACKFILL = dg.BackfillPolicy.multi_run(max_partitions_per_run=inference_shards_per_run())


def shard_ranges(keys: list[str], max_per_range: int | None = None) -> list[tuple[str, str]]:
    """Contiguous ``(first, last)`` key ranges covering exactly ``keys`` (a run covers a
    range), each at most ``max_per_range`` shards long."""
    indices = sorted({SHARD_KEYS.index(k) for k in keys})
    ranges: list[tuple[int, int]] = []
    for i in indices:
        if ranges and ranges[-1][1] == i - 1 and (max_per_range is None or i - ranges[-1][0] < max_per_range):
            ranges[-1] = (ranges[-1][0], i)
        else:
            ranges.append((i, i))
    return [(SHARD_KEYS[a], SHARD_KEYS[b]) for a, b in ranges]


def range_tags(first: str, last: str) -> dict[str, str]:
    """Run tags for a run over shards ``first``..``last``."""
    return {RANGE_START_TAG: first, RANGE_END_TAG: last}


def partition_selection(keys: list[str]) -> str:
    """``keys`` in the partition-selection syntax of Dagster's launch dialog and backfill
    page: contiguous runs as ``[first...last]``, single keys as they are, comma-separated."""
    return ", ".join(f"[{a}...{b}]" if a != b else a for a, b in shard_ranges(keys))


def shard_selection(keys: list[str], asset: str = "clip_subset") -> list[str]:
    """What ``danbooru-assets shards`` prints: the shards that have images, and the exact
    selection that backfills exactly them from the UI or a shell."""
    ranges = shard_ranges(keys)
    lines = [
        f"{len(keys)} shards have images, in {len(ranges)} contiguous range{'s' if len(ranges) != 1 else ''}.",
        "",
        f"Dagster UI: {asset} → Materialize… → in the partition field replace the selection with:",
        f"  {partition_selection(keys)}",
        "",
        "Or from a shell, one run per range:",
    ]
    lines += [f"  dg launch --assets {asset} --partition-range {a}...{b}" for a, b in ranges]
    lines += ["", "Every stage for exactly these shards: danbooru-assets run"]
    return lines

# A transient fault (a CUDA hiccup, a network filesystem) gets one more try; stored rows
# make the retry cost only what was not finished.
INFERENCE_RETRY = dg.RetryPolicy(max_retries=1, delay=10)
