"""Human labels for the active-learning loop (library, no Dagster): the class names
(``classes``), the label store (``store``: a SQLite file or a Postgres database) and the labeling page (``app``, its HTML,
script and style in ``page.*``). The Dagster resource over the store is
``orchestration.resources.LabelStoreResource``."""

from __future__ import annotations

from typing import Any

import importlib

# Submodules load on first use, so `python -m danbooru_assets.labels.app` runs cleanly
# and importing the class names does not load pandas.
_LAZY = {
    "LABEL_CLASSES": "classes", "UNLABELED": "store", "LabelConflict": "store", "LabelStore": "store",
    "normalize_label": "store",
    "add_label_arguments": "app", "load_queue": "app", "make_app": "app", "run_label": "app",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"danbooru_assets.labels.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LABEL_CLASSES",
    "UNLABELED",
    "LabelConflict",
    "LabelStore",
    "add_label_arguments",
    "load_queue",
    "make_app",
    "normalize_label",
    "run_label",
]
