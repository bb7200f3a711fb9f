"""A per-shard asset never silently uses a global input older than the settings it
depends on (DESIGN.md, "Correct from every entry point").

A global asset that reads settings (``prompt_embeddings``, ``clip_threshold``,
``near_duplicates``, ``quality_model``) records in its table, in one column, the hash of
each settings part it read, as the settings file held it when it ran. A per-shard asset
reading that global compares the record with the file now. When they differ, the global
value is older than the settings, and the per-shard asset either recomputes it in-step
from stored tables (cheap: ``clip_threshold`` from stored scores, ``prompt_embeddings``
from a few prompts) or fails naming exactly what to launch (``near_duplicates``,
``quality_model``): a failed run records no materialization, so the shard stays stale.

A run-config override on the global (``rethreshold_job`` with ``keep_fraction: 0.3``) is
not older than the settings: the record holds the file's hash at that run, so the
override stands until the file changes.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Callable

import dagster as dg

from danbooru_assets.settings import SECTIONS, CurationSettings, settings_hash

if TYPE_CHECKING:
    import pandas as pd

# The column of a global asset's table that holds ``{part: hash}`` (JSON).
SETTINGS_COLUMN = "settings_hashes"

# The settings parts a global asset's value follows. Sections by name, and for
# quality_model only what changes the model (a new round plan does not).
PARTS: dict[str, Callable[[CurationSettings], Any]] = {
    **SECTIONS,
    "quality.classifier": lambda s: s.quality.classifier,
}


def part_hashes(settings: CurationSettings, parts: tuple[str, ...] | list[str]) -> dict[str, str]:
    return {part: settings_hash({"value": PARTS[part](settings)}) for part in parts}


def with_settings_record(table: "pd.DataFrame", settings: CurationSettings, *parts: str) -> "pd.DataFrame":
    """``table`` with the hashes of ``parts`` (as the file holds them now) in every row."""
    return table.assign(**{SETTINGS_COLUMN: json.dumps(part_hashes(settings, parts), sort_keys=True)})


def outdated_parts(table: "pd.DataFrame", settings: CurationSettings, *parts: str) -> list[str]:
    """The ``parts`` whose recorded hash differs from the settings file's now; every part
    when the table records none (written before the record existed). An empty table with
    the record's column (no duplicate groups at all) has nothing to be stale about."""
    if SETTINGS_COLUMN not in table.columns:
        return list(parts)
    if table.empty:
        return []
    recorded = json.loads(str(table[SETTINGS_COLUMN].iloc[0]) or "{}")
    now = part_hashes(settings, parts)
    return [p for p in parts if recorded.get(p) != now[p]]


def require_current(
    consumer: str, global_asset: str, table: "pd.DataFrame", settings: CurationSettings, parts: tuple[str, ...],
    launch: str,
) -> None:
    """Fail ``consumer``'s step, naming what to launch, when ``global_asset`` is older than
    the settings ``parts`` it follows. No retry: only materializing the global helps."""
    stale = outdated_parts(table, settings, *parts)
    if stale:
        raise dg.Failure(
            description=(
                f"{consumer}: the stored {global_asset} is older than the settings it follows "
                f"({', '.join(stale)} changed since it was materialized, or it recorded none), so "
                f"{consumer} would silently use the old value. Launch {launch}. Nothing was stored: "
                f"these shards of {consumer} stay marked stale."
            ),
            metadata={"outdated_settings": ", ".join(stale), "launch": launch},
            allow_retries=False,
        )
