"""The dataset's 1,000 image-id shards: Danbooru20xx bucket folders, ``id % 1000``,
named by four digits (``123042 -> "0042"``). The folder an image lives in, the partition
key of its rows and the file its rows are stored in all come from here.
"""

from __future__ import annotations

from typing import Any

NUM_SHARDS = 1000

SHARD_KEYS: list[str] = [f"{i:04d}" for i in range(NUM_SHARDS)]


def shard_key(image_id: int) -> str:
    """The shard (bucket folder, partition key) of an image id: ``123042 -> "0042"``."""
    return SHARD_KEYS[int(image_id) % NUM_SHARDS]


def shard_numbers(image_ids: Any) -> Any:
    """The shard numbers (0..999) of many ids at once: a numpy array or pandas Series of
    ids in, the same kind out. ``SHARD_KEYS[n]`` names shard ``n``."""
    return image_ids % NUM_SHARDS
