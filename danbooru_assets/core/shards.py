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


SHARD_LIST_FORM = "comma-separated four-digit shard keys from 0000 to 0999, e.g. 0042,0107"


def parse_shard_list(text: str) -> list[str]:
    """``"0042,0107"`` -> ``["0042", "0107"]`` (sorted, each once). A ``ValueError`` naming
    the bad entry and the valid form for anything else (``9999``, ``63``, ``../../etc``)."""
    keys: set[str] = set()
    known = set(SHARD_KEYS)
    for entry in text.split(","):
        key = entry.strip()
        if key not in known:
            hint = f" (did you mean {int(key):04d}?)" if key.isdigit() and int(key) < NUM_SHARDS else ""
            raise ValueError(f"{key!r} is not a shard{hint}; expected {SHARD_LIST_FORM}")
        keys.add(key)
    return sorted(keys)
