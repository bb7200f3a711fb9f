"""The dataset's 1,000 image-id shards: Danbooru20xx bucket folders, ``id % 1000``."""

from __future__ import annotations

import dagster as dg

NUM_SHARDS = 1000


def shard_key(image_id: int) -> str:
    """The partition key (and bucket folder name) of an image id: ``123042 -> "0042"``."""
    return f"{int(image_id) % NUM_SHARDS:04d}"


SHARD_KEYS: list[str] = [f"{i:04d}" for i in range(NUM_SHARDS)]

shard_partitions = dg.StaticPartitionsDefinition(SHARD_KEYS)
