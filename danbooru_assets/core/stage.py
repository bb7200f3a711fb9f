"""One contract for the per-shard stages, and the one runner that drives them.

In the spirit of NeMo Curator's ``ProcessingStage``: a stage says what it needs per shard
(:meth:`ShardStage.candidates`), which of its previous rows still hold
(:meth:`ShardStage.still_valid`), how to load its model (:meth:`ShardStage.setup`, called
only when some shard has work), how to process a batch of new rows
(:meth:`ShardStage.process`) and how to assemble a shard's tables and counts
(:meth:`ShardStage.assemble`). :class:`StageRun` does the rest, once for every stage:
reading the previous output from a :class:`TableStore`, planning reuse
(:func:`~danbooru_assets.core.incremental.plan_reuse`), batching the new rows of every
shard of the range together (one model pass, full batches), and writing the tables of
the shards that succeeded when others failed (partial writes: a re-run reuses them).

Plain pandas, no Dagster: the per-shard assets are adapters that hand a stage and a store
to :class:`StageRun` and its ``assemble``/``keep`` to the orchestration's shard loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

from danbooru_assets.core.incremental import FILE_IDENTITY, plan_reuse

if TYPE_CHECKING:
    import pandas as pd

    from danbooru_assets.core.tables import SetAside

Progress = Callable[[int, int], None]


class TableStore(Protocol):
    """Where a stage's tables live (implemented by :class:`~danbooru_assets.core.tables.TableLayout`)."""

    def previous(self, table: str, shard: str) -> tuple[pd.DataFrame | None, SetAside | None]:
        """The stored table of ``shard`` (None: never stored, or damaged and set aside)."""

    def write(self, table: str, shard: str, frame: pd.DataFrame) -> None:
        """Store ``frame`` as the table of ``shard`` (atomically)."""


@dataclass
class ShardPlan:
    """One shard's work: ``todo`` (the candidate rows to process) and ``reused`` (one frame
    per stage table: its stored rows kept, or None), plus what ``candidates`` noted."""

    shard: str
    candidates: pd.DataFrame
    todo: pd.DataFrame
    reused: list[pd.DataFrame | None]
    notes: dict[str, Any] = field(default_factory=dict)


class ShardStage:
    """A per-shard stage. Subclasses set ``name`` and ``tables`` and implement the methods
    that raise ``NotImplementedError``; the others have defaults."""

    name: str = ""
    tables: tuple[str, ...] = ()
    """The tables it writes per shard, in the order ``assemble`` returns them."""
    reuse_key: tuple[str, ...] = FILE_IDENTITY
    batch_rows: int | None = None
    """New rows per ``process`` call, across shards; None: every new row of the range at once
    (the stage batches inside, e.g. a data loader)."""
    batch_across_shards: bool = True
    """False: one ``process`` call per shard (a failure stays with its shard)."""
    progress_label: str = "images"

    def candidates(self, shard: str) -> tuple[pd.DataFrame, dict[str, Any]]:
        """The rows of ``shard`` that want a result (with the ``reuse_key`` columns), and
        notes for ``assemble`` (counts known at planning)."""
        raise NotImplementedError

    def still_valid(self, table: str, previous: pd.DataFrame) -> pd.DataFrame:
        """The rows of a stored table that may be reused (e.g. from the same model)."""
        return previous

    def refresh_reused(self, plan: ShardPlan) -> ShardPlan:
        """Bring reused rows up to date (e.g. a column added since they were stored)."""
        return plan

    def setup(self) -> None:
        """Load the model. Called once, and only when some shard has rows to process."""

    def process(self, todo: pd.DataFrame, progress: Progress) -> pd.DataFrame:
        """Results for ``todo`` (rows of several shards, column ``shard``), one frame with
        a ``shard`` column; ``progress(done, len(todo))`` after each inner batch."""
        raise NotImplementedError

    def assemble(self, plan: ShardPlan, fresh: pd.DataFrame | None) -> tuple[tuple[pd.DataFrame, ...], dict[str, Any]]:
        """The shard's tables (new + reused rows) and counts; ``fresh``: its ``process``
        rows (None when it had none)."""
        raise NotImplementedError


class StageRun:
    """Runs a :class:`ShardStage` over a range of shards: plan, one pass of ``process``
    over the new rows of every shard, then ``assemble(shard)`` per shard (the caller's
    shard loop calls it, so a failure stays with its shard) and ``keep`` to store the
    shards that succeeded when others failed."""

    def __init__(
        self,
        stage: ShardStage,
        shards: Sequence[str],
        store: TableStore,
        log: Callable[[str], Any] | None = None,
    ):
        self.stage = stage
        self.shards = sorted(shards)
        self.store = store
        self.log = log or (lambda message: None)
        self.plans: dict[str, ShardPlan] = {}
        self.errors: dict[str, Exception] = {}
        self.set_aside: list[SetAside] = []
        self.fresh: dict[str, pd.DataFrame] = {}
        self.processed = 0
        self.seconds_processing = 0.0
        self.set_up = False

    def plan(self) -> StageRun:
        for shard in self.shards:
            try:
                self.plans[shard] = self._plan_shard(shard)
            except Exception as exc:  # the shard fails in assemble, with the others' results intact
                self.errors[shard] = exc
        return self

    def _plan_shard(self, shard: str) -> ShardPlan:
        candidates, notes = self.stage.candidates(shard)
        previous = []
        for table in self.stage.tables:
            stored, damaged = self.store.previous(table, shard)
            if damaged is not None:  # computed afresh, named in the log and on the materialization
                self.log(str(damaged))
                self.set_aside.append(damaged)
            previous.append(None if stored is None else self.stage.still_valid(table, stored))
        reuse = plan_reuse(candidates, previous, self.stage.reuse_key)
        plan = ShardPlan(shard, candidates, reuse.todo, list(reuse.reused), notes)
        return self.stage.refresh_reused(plan)

    def compute(self) -> StageRun:
        """One pass of ``process`` over every planned shard's new rows, in batches of
        ``batch_rows`` across shards. A failed batch fails the shards it held."""
        import pandas as pd

        todo = [p.todo.assign(shard=s) for s, p in self.plans.items() if len(p.todo)]
        if not todo:
            return self
        todo_all = pd.concat(todo, ignore_index=True)
        total = len(todo_all)
        self.log(f"{self.stage.name}: {total:,} {self.stage.progress_label} to process in {len(todo)} shards")
        from danbooru_assets.core.progress import ThroughputLogger

        progress = ThroughputLogger(self.log, label=self.stage.progress_label)
        if self.stage.batch_across_shards:
            step = self.stage.batch_rows or total
            bounds = [(start, min(start + step, total)) for start in range(0, total, step)]
        else:
            sizes = todo_all.groupby("shard", sort=False).size().to_numpy()
            ends = sizes.cumsum()
            bounds = list(zip((ends - sizes).tolist(), ends.tolist()))
        started = time.perf_counter()
        results: dict[str, list[pd.DataFrame]] = {}
        for start, end in bounds:
            batch = todo_all.iloc[start:end]
            try:
                if not self.set_up:
                    self.stage.setup()
                    self.set_up = True
                out = self.stage.process(batch, lambda done, _n, s=start: progress(s + done, total))
            except Exception as exc:
                for shard in batch["shard"].unique():
                    self.errors.setdefault(shard, exc)
                continue
            for shard, rows in out.groupby("shard", sort=False).indices.items():
                results.setdefault(shard, []).append(out.iloc[rows].drop(columns="shard"))
        self.seconds_processing = time.perf_counter() - started
        self.fresh = {s: pd.concat(parts, ignore_index=True) for s, parts in results.items()}
        self.processed = sum(len(p.todo) for s, p in self.plans.items() if s not in self.errors)
        return self

    def assemble(self, shard: str) -> tuple[tuple[pd.DataFrame, ...], dict[str, Any]]:
        if shard in self.errors:
            raise self.errors[shard]
        return self.stage.assemble(self.plans[shard], self.fresh.get(shard))

    def keep(self, shard: str, tables: tuple[pd.DataFrame, ...]) -> None:
        """Store a shard that succeeded in a range where others failed."""
        for name, table in zip(self.stage.tables, tables):
            self.store.write(name, shard, table)

    def rate(self) -> float:
        """New rows processed per second (0.0 when none)."""
        return round(self.processed / self.seconds_processing, 1) if self.seconds_processing > 0 else 0.0
