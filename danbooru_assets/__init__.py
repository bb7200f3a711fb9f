"""danbooru_assets: a Dagster code location that curates Danbooru-style datasets.

``from danbooru_assets import defs`` gives the ``Definitions``, loaded on first access
(so the CLI can set environment defaults first, and a data-loader worker that imports a
library module does not load the code location). ``dagster dev -m danbooru_assets``
finds ``defs`` through ``dir()``.
"""

from __future__ import annotations


def __getattr__(name: str):
    if name == "defs":
        from danbooru_assets.definitions import defs

        return defs
    raise AttributeError(f"module 'danbooru_assets' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "defs"])
