"""Human labels for the active-learning loop: the SQLite store and the labeling page."""

from __future__ import annotations

from typing import Any

import importlib

from danbooru_assets.labels.resource import LabelStoreResource

# Submodules load on first use: the code location imports only the resource, and
# `python -m danbooru_assets.labels.app` runs cleanly.
_LAZY = {
    "LABEL_CLASSES": "store", "UNLABELED": "store", "LabelConflict": "store", "LabelStore": "store",
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
    "LabelStoreResource",
    "add_label_arguments",
    "load_queue",
    "make_app",
    "normalize_label",
    "run_label",
]
