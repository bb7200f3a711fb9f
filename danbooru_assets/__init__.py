"""danbooru_assets: a Dagster code location that curates Danbooru-style datasets.

``from danbooru_assets import defs`` gives the ``Definitions`` (loaded on first access,
so that the CLI can set environment defaults before the resources are built).
"""

from __future__ import annotations


def __getattr__(name: str):
    if name == "defs":
        from danbooru_assets.definitions import defs

        return defs
    raise AttributeError(f"module 'danbooru_assets' has no attribute {name!r}")
