"""The label store as a Dagster resource (light: the store's module loads on first use)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import dagster as dg

if TYPE_CHECKING:
    from danbooru_assets.labels.store import LabelStore

LABEL_CLASSES: tuple[str, ...] = ("good", "questionable", "bad")


class LabelStoreResource(dg.ConfigurableResource):
    """The label database (``$DANBOORU_LABELS``, default ``data/labels.sqlite``)."""

    path: str

    def store(self) -> LabelStore:
        from danbooru_assets.labels.store import LabelStore

        return LabelStore(self.path)
