"""One step, many shards: the loop every per-shard asset runs over its range.

A run covers a range of shards (see ``partitions``). The unit of failure is the run:
every shard of the range is attempted even when one fails; then the step fails naming
each failed shard and why, so the run, its backfill and the UI say which shards to look
at. Nothing done is lost: inference steps write the tables of the shards that
succeeded (``keep_on_failure``), and because they reuse stored rows, re-executing the
failed run (the UI's "Re-execute", or a backfill's retry) costs only the failed shards.
"""

from __future__ import annotations

import logging
import time
import traceback
from typing import Any, Callable, Generic, TypeVar

import dagster as dg

T = TypeVar("T")
PROGRESS_PREFIX = "progress:"
# Progress also goes to this Python logger: the CLI draws its progress bar from it; under
# the daemon it has no handler and the lines live in the run's event log only.
progress_logger = logging.getLogger("danbooru_assets.progress")
PROGRESS_EVERY_S = 5.0
SHARD_TABLE_ROWS = 50


class ShardLoop(Generic[T]):
    """Runs ``compute(shard) -> (value, counts)`` for every shard of the step's range,
    logs progress (shards done, images/s, ETA) and sums the per-shard counts."""

    def __init__(self, context: dg.AssetExecutionContext, stage: str, images_key: str = "images"):
        self.context = context
        self.stage = stage
        self.images_key = images_key
        self.shards: list[str] = sorted(context.partition_keys)
        self.per_shard: dict[str, dict[str, Any]] = {}
        self.row_counts: dict[str, int] = {}  # rows of each shard's table, when the value is one
        self.totals: dict[str, float] = {}
        self.failures: dict[str, str] = {}
        self.seconds = 0.0

    def run(
        self,
        compute: Callable[[str], tuple[T, dict[str, Any]]],
        keep_on_failure: Callable[[str, T], None] | None = None,
    ) -> dict[str, T]:
        started = last_report = time.perf_counter()
        values: dict[str, T] = {}
        images = 0
        for done, shard in enumerate(self.shards, start=1):
            try:
                value, counts = compute(shard)
            except Exception as exc:  # the range goes on; the step fails at the end
                reason = f"{type(exc).__name__}: {exc}"
                self.failures[shard] = reason
                self.context.log.error(f"shard {shard} failed: {reason}\n{traceback.format_exc()}")
            else:
                values[shard] = value
                self.per_shard[shard] = counts
                table = value[0] if isinstance(value, tuple) and value else value  # a stage's tables: the first
                if hasattr(table, "columns"):
                    self.row_counts[shard] = len(table)
                for key, number in counts.items():
                    if isinstance(number, (int, float)) and not isinstance(number, bool):
                        self.totals[key] = self.totals.get(key, 0) + number
                images += int(counts.get(self.images_key, 0) or 0)
            now = time.perf_counter()
            line = self.progress_line(done, images, now - started)
            progress_logger.info(
                line,
                extra={"stage": self.stage, "done": done, "total": len(self.shards), "images": images,
                       "seconds": now - started},
            )
            if now - last_report >= PROGRESS_EVERY_S or done == len(self.shards):
                last_report = now
                self.context.log.info(line)
        self.seconds = time.perf_counter() - started
        if self.failures:
            if keep_on_failure is not None:
                for shard, value in values.items():
                    keep_on_failure(shard, value)
            listed = "\n".join(f"- {s}: {why}" for s, why in list(self.failures.items())[:50])
            raise dg.Failure(
                description=f"{self.stage}: {len(self.failures)} of {len(self.shards)} shards failed "
                f"(the other {len(values)} were computed"
                + (" and stored; re-executing reuses them" if keep_on_failure else "")
                + f"):\n{listed}",
                metadata={"failed_shards": dg.MetadataValue.json(self.failures)},
            )
        return values

    def progress_line(self, done: int, images: int, seconds: float) -> str:
        total = len(self.shards)
        rate = images / seconds if seconds > 0 else 0.0
        eta = seconds / done * (total - done) if done else 0.0
        return (
            f"{PROGRESS_PREFIX} {self.stage} {done}/{total} shards, {images:,} {self.images_key}, "
            f"{rate:,.0f} {self.images_key}/s, ETA {eta:.0f}s"
        )

    def metadata(
        self,
        keys: list[str] | None = None,
        ratios: dict[str, tuple[str, str]] | None = None,
        asset_key: str | None = None,
        row_count_key: str | None = None,
    ) -> dict[str, Any]:
        """The step's metadata, and each partition's own figures.

        Each shard's materialization gets that shard's counts of ``keys``, its ``ratios``
        (``{name: (numerator, denominator)}``) and ``dagster/row_count`` (its table's rows,
        or its count ``row_count_key``): a few numbers per shard, since every byte is
        written once per shard (DESIGN.md). The returned metadata, shared by every shard
        of the run, names the range's totals as such (``range_rows``…) when the run
        covers several shards, with the range and a table per shard; ``asset_key`` for a
        multi-asset step."""
        keys = keys or [k for k in self.totals]
        ratios = ratios or {}
        ranged = len(self.shards) > 1
        prefix = "range_" if ranged else ""
        meta: dict[str, Any] = {prefix + k: _number(self.totals.get(k, 0)) for k in keys}
        meta.update({prefix + name: _number(self.ratio(n, d)) for name, (n, d) in ratios.items()})
        meta["shard_range"] = f"{self.shards[0]}..{self.shards[-1]}" if self.shards else ""
        meta["step_seconds"] = round(self.seconds, 3)
        if ranged:
            meta["range_shards"] = len(self.shards)
            shown = [s for s in self.shards if s in self.per_shard][:SHARD_TABLE_ROWS]
            header = "| shard | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys)
            lines = [
                f"| {s} | " + " | ".join(str(_number(self.per_shard[s].get(k, ""))) for k in keys) + " |"
                for s in shown
            ]
            more = len(self.per_shard) - len(shown)
            meta["per_shard"] = dg.MetadataValue.md(
                "\n".join([header, *lines]) + (f"\n\n… and {more} more shards" if more > 0 else "")
            )
        for shard, counts in self.per_shard.items():
            own: dict[str, Any] = {k: _number(counts.get(k, 0)) for k in keys}
            for name, (n, d) in ratios.items():
                own[name] = _number(counts.get(n, 0) / counts[d]) if counts.get(d) else 0.0
            rows = self.row_counts.get(shard) if row_count_key is None else counts.get(row_count_key)
            if rows is not None:
                own["dagster/row_count"] = int(rows)
            self.context.add_asset_metadata(own, asset_key=asset_key, partition_key=shard)
        return meta

    def ratio(self, numerator: str, denominator: str) -> float:
        """``totals[numerator] / totals[denominator]`` (a mean or a fraction), 0.0 over nothing."""
        over = self.totals.get(denominator, 0)
        return self.totals.get(numerator, 0) / over if over else 0.0


def _number(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    return value


def set_aside_metadata(set_aside: list) -> dict[str, Any]:
    """The damaged stored tables a step moved aside and recomputed (``core.tables.SetAside``),
    for its materialization; nothing when there were none."""
    if not set_aside:
        return {}
    return {
        "damaged_tables_set_aside": len(set_aside),
        "damaged_tables": dg.MetadataValue.md(
            "\n".join(f"- `{d.path}` → `{d.moved_to}`: {d.reason}" for d in set_aside[:50])
        ),
    }
