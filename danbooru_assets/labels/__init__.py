"""Human labels for the active-learning loop: the SQLite store and the labeling page."""

from __future__ import annotations

from typing import Any

from danbooru_assets.labels.store import LABEL_CLASSES, UNLABELED, LabelStore, LabelStoreResource, normalize_label

_APP_NAMES = frozenset({"add_label_arguments", "load_queue", "make_app", "run_label"})


def __getattr__(name: str) -> Any:
    # the page's module loads lazily, so `python -m danbooru_assets.labels.app` runs cleanly
    if name in _APP_NAMES:
        from danbooru_assets.labels import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LABEL_CLASSES",
    "UNLABELED",
    "LabelStore",
    "LabelStoreResource",
    "add_label_arguments",
    "load_queue",
    "make_app",
    "normalize_label",
    "run_label",
]
