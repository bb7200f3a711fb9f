"""Human quality labels in a SQL database: a SQLite file (the default) or a server
database such as the Dagster instance's Postgres, through SQLAlchemy Core (one code path).

Every action (a label, a relabel, an undo, an import) is appended as one row; nothing is
ever updated or deleted, so the full history is kept. Each row holds the image's label
*after* that action (NULL = unlabeled), which makes "the latest row per image wins" the
whole read rule and makes an undo an ordinary row that restores the previous state.

Where: :class:`LabelStore` takes a path (a SQLite file) or a SQLAlchemy URL
(``sqlite:///path``, ``postgresql+psycopg2://user@host:5432/db``). With a server database a
labeling page on one machine and runs on others read and write the same labels.

Durability: one transaction per write call, so a crash of the labeling page or of a run
mid-write leaves either the whole write or none of it. Writers are serialized per store
(SQLite: ``BEGIN IMMEDIATE``; Postgres: a transaction-scoped advisory lock), so a
read-then-write (a checked label, an undo) is atomic, exactly one of simultaneous checked
labels of an image wins, and row ids are committed in increasing order (a reader following
:meth:`max_id` / :meth:`rows_since` never skips a row). SQLite runs in WAL with
``synchronous=FULL``: readers in other processes keep reading while a writer is busy.

Throughput: a row written by the labeling page also names its page ``session`` (one
browser tab), its ``mode`` (``single`` or ``grid``) and ``seconds_spent``, the labeler's
time on it (for a grid page, the page's time shared over its tiles). Databases written
before these columns existed are migrated in place when opened (columns added, NULL in
old rows).
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Collection, Iterable, Iterator, Mapping

import numpy as np
import pandas as pd
import sqlalchemy as sa

from danbooru_assets.labels.classes import LABEL_CLASSES
from danbooru_assets.core.tables import atomic_path

UNLABELED = "unlabeled"

LATEST_COLUMNS = ["image_id", "label", "labeler", "labeled_at", "round"]
HISTORY_COLUMNS = ["id", "image_id", "label", "labeler", "labeled_at", "round", "source", "retracts",
                   "session", "mode", "seconds_spent"]
# Columns added after the first release, added in place to older databases (types from LABELS).
_ADDED_COLUMNS = ("session", "mode", "seconds_spent")

# SQLite's AUTOINCREMENT needs the type to be exactly INTEGER (64-bit there anyway).
_ROW_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
LABELS = sa.Table(
    "labels", sa.MetaData(),
    sa.Column("id", _ROW_ID, primary_key=True, autoincrement=True),
    sa.Column("image_id", sa.BigInteger, nullable=False),
    sa.Column("label", sa.Text),
    sa.Column("labeler", sa.Text, nullable=False),
    # ISO-8601 UTC text (see _timestamp): text order is time order on every backend
    sa.Column("labeled_at", sa.Text, nullable=False),
    sa.Column("round", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("source", sa.Text, nullable=False, server_default=sa.text("'page'")),
    sa.Column("retracts", _ROW_ID, sa.ForeignKey("labels.id")),
    sa.Column("session", sa.Text),
    sa.Column("mode", sa.Text),
    sa.Column("seconds_spent", sa.Float),
    sa.CheckConstraint("label IS NULL OR label IN ({})".format(", ".join(f"'{c}'" for c in LABEL_CLASSES)),
                       name="labels_label_class"),
    sa.Index("labels_image", "image_id", "id"),
    sa.Index("labels_labeler", "labeler", "id"),
    sa.Index("labels_session", "session", "id"),
    sqlite_autoincrement=True,
)
_INSERT_COLUMNS = [c.name for c in LABELS.columns if c.name != "id"]
# Postgres advisory lock key that serializes the writers of a store ("labels" in ASCII).
_WRITE_LOCK_KEY = 0x6C6162656C73
_BACKENDS = ("sqlite", "postgresql")


def store_url(location: Path | str) -> sa.URL:
    """A store location as a SQLAlchemy URL: a URL as given, a plain path as a SQLite file."""
    text = str(location)
    if "://" not in text:
        return sa.URL.create("sqlite", database=str(Path(text).absolute()))
    url = sa.make_url(text)
    if url.get_backend_name() not in _BACKENDS:
        raise ValueError(f"label store {url.render_as_string()}: unsupported database "
                         f"{url.get_backend_name()!r}; use a SQLite file or {' / '.join(_BACKENDS)} URL")
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        raise ValueError("label store: an in-memory SQLite database would lose every label; give a file")
    return url


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # The driver must not open transactions itself: _sqlite_begin does (SQLAlchemy's pysqlite recipe).
    dbapi_connection.isolation_level = None
    for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON"):
        dbapi_connection.execute(f"PRAGMA {pragma}")


def _sqlite_begin(conn: sa.Connection) -> None:
    # IMMEDIATE takes the write lock up front so read-then-write (undo, a checked label) is
    # atomic; reads begin DEFERRED and so never wait for a writer (WAL).
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("label_write") else "BEGIN")


_ENGINES: dict[tuple[int, str, float], sa.Engine] = {}
_ENGINES_LOCK = threading.Lock()


def _engine(url: sa.URL, timeout: float) -> sa.Engine:
    """One engine per process, URL and timeout (a server database keeps a connection pool;
    the pid in the key keeps a forked process off its parent's connections)."""
    key = (os.getpid(), url.render_as_string(hide_password=False), timeout)
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            if url.get_backend_name() == "sqlite":
                # a connection per call, as cheap as a file open; nothing to pool
                engine = sa.create_engine(url, poolclass=sa.pool.NullPool, connect_args={"timeout": timeout})
                sa.event.listen(engine, "connect", _sqlite_connect)
                sa.event.listen(engine, "begin", _sqlite_begin)
            else:
                try:
                    # a server that does not answer fails in seconds (the page answers 503), not minutes
                    engine = sa.create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=8,
                                              connect_args={"connect_timeout": max(1, int(timeout))})
                except ImportError as exc:  # the driver comes with the `deploy` extra
                    raise ValueError(
                        f"label store {url.render_as_string()}: its database driver is not installed "
                        f"({exc}); pip install -e '.[deploy]' (psycopg2 for postgresql+psycopg2://)"
                    ) from exc
            _ENGINES[key] = engine
        return engine


class WriteTransaction:
    """The connection of one write transaction (:meth:`LabelStore.transaction`); ``execute``
    also takes plain SQL text."""

    def __init__(self, connection: sa.Connection) -> None:
        self.connection = connection

    def execute(self, statement: Any, parameters: Any = None) -> sa.CursorResult:
        if isinstance(statement, str):
            statement = sa.text(statement)
        return self.connection.execute(statement, parameters)


class LabelConflict(Exception):
    """A checked write refused because someone else changed the image after the caller read it."""

    def __init__(self, row: dict[str, Any]) -> None:
        label = row["label"] if row["label"] is not None else UNLABELED
        super().__init__(f"image {row['image_id']} was set to {label!r} by {row['labeler']!r} "
                         f"at {row['labeled_at']} (history row {row['id']})")
        self.row = row  # the newest such history row


def normalize_label(label: Any) -> str | None:
    """Map a user/CSV label to a stored class or ``None`` (unlabeled); refuse anything else."""
    if label is None or (isinstance(label, float) and math.isnan(label)):
        return None
    text = str(label).strip().lower()
    if text in ("", UNLABELED, "none", "null"):
        return None
    if text not in LABEL_CLASSES:
        raise ValueError(f"unknown label {label!r}; expected one of {LABEL_CLASSES} or {UNLABELED!r}")
    return text


def _image_id(value: Any) -> int:
    """Parse an image id strictly: a non-negative integer (int, integral float or digits)."""
    if isinstance(value, bool):
        raise ValueError(f"image id must be an integer, got {value!r}")
    if isinstance(value, (int, np.integer)):
        number = int(value)
    elif isinstance(value, (float, np.floating)) and float(value).is_integer():
        number = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value.strip())
    else:
        raise ValueError(f"image id must be an integer, got {value!r}")
    if number < 0:
        raise ValueError(f"image id must be non-negative, got {number}")
    return number


def _seconds(value: Any) -> float | None:
    """A time spent in seconds: finite and >= 0, else None (not measured)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) and value >= 0 else None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _timestamp(value: Any) -> str:
    """Normalise a timestamp to ISO-8601 UTC so text order equals time order."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return _now()
    ts = pd.Timestamp(value)
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    return ts.isoformat(timespec="microseconds")


class LabelStore:
    """Append-only label history in SQLite or Postgres; see the module docstring for the rules.

    ``location`` is a path (a SQLite file) or a SQLAlchemy URL; ``timeout`` is how long a
    writer waits for another writer's transaction before failing (seconds).
    """

    def __init__(self, location: Path | str, timeout: float = 30.0) -> None:
        self.url = store_url(location)
        self.timeout = float(timeout)
        self.path = Path(self.url.database) if self.url.get_backend_name() == "sqlite" else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.engine = _engine(self.url, self.timeout)
        if not self._schema_current():
            self._migrate()

    def __str__(self) -> str:
        return str(self.path) if self.path is not None else self.url.render_as_string(hide_password=True)

    def __repr__(self) -> str:
        return f"LabelStore({str(self)!r})"

    def _schema_current(self) -> bool:
        """Whether the table, every column and every index exist (reads only: opening a store
        never waits for a writer when nothing is to be migrated)."""
        with self._read() as conn:
            inspector = sa.inspect(conn)
            if not inspector.has_table(LABELS.name):
                return False
            columns = {c["name"] for c in inspector.get_columns(LABELS.name)}
            indexes = {i["name"] for i in inspector.get_indexes(LABELS.name)}
        return set(_INSERT_COLUMNS) <= columns and {i.name for i in LABELS.indexes} <= indexes

    def _migrate(self) -> None:
        """Create the table, or add what a store written by an older version lacks (in place,
        one transaction; under the write lock another process cannot migrate meanwhile)."""
        with self.transaction() as tx:
            conn = tx.connection
            LABELS.create(conn, checkfirst=True)
            have = {c["name"] for c in sa.inspect(conn).get_columns(LABELS.name)}
            for name in _ADDED_COLUMNS:
                if name not in have:
                    kind = LABELS.c[name].type.compile(dialect=conn.dialect)
                    conn.execute(sa.text(f"ALTER TABLE {LABELS.name} ADD COLUMN {name} {kind}"))
            for index in LABELS.indexes:
                index.create(conn, checkfirst=True)

    @contextlib.contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        with self.engine.connect() as conn:
            yield conn

    @contextlib.contextmanager
    def transaction(self) -> Iterator[WriteTransaction]:
        """One write transaction: committed on success, rolled back on any exception; writers
        of the store wait for each other (up to ``timeout``)."""
        with self.engine.connect() as conn:
            conn.execution_options(label_write=True)  # SQLite: BEGIN IMMEDIATE (_sqlite_begin)
            with conn.begin():
                if conn.dialect.name == "postgresql":
                    conn.execute(sa.text("SELECT set_config('lock_timeout', :ms, true)"),
                                 {"ms": f"{int(self.timeout * 1000)}ms"})
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _WRITE_LOCK_KEY})
                yield WriteTransaction(conn)

    # ---- writes -------------------------------------------------------------------
    @staticmethod
    def _insert(conn: WriteTransaction | sa.Connection, row: Mapping[str, Any]) -> int:
        values = {name: row.get(name) for name in _INSERT_COLUMNS}
        return int(conn.execute(LABELS.insert().values(**values)).inserted_primary_key[0])

    @staticmethod
    def _clean(image_id: Any, label: Any, labeler: Any, round: Any, source: Any = "page",
               labeled_at: Any = None) -> dict[str, Any]:
        labeler = str(labeler or "").strip()
        if not labeler:
            raise ValueError("labeler must be a non-empty name")
        return {
            "image_id": _image_id(image_id),
            "label": normalize_label(label),
            "labeler": labeler,
            "labeled_at": _timestamp(labeled_at),
            "round": int(round),
            "source": str(source or "page"),
        }

    def add(self, image_id: int, label: str | None, labeler: str, round: int = 0,
            source: str = "page", labeled_at: Any = None, *,
            unless_changed_since: int | None = None, own_rows: Collection[int] = (),
            session: str | None = None, mode: str | None = None, seconds_spent: float | None = None) -> int:
        """Append a label (or ``None``/"unlabeled" to clear it); return the new row id.

        With ``unless_changed_since`` (a row id, e.g. :meth:`max_id` when the caller showed
        the image), raise :class:`LabelConflict` instead of writing when the image has a
        newer row that is not one of ``own_rows``; the check and the write are one
        transaction, so a writer in another process cannot slip in between.
        """
        row = self._clean(image_id, label, labeler, round, source, labeled_at)
        row.update(session=session, mode=mode, seconds_spent=_seconds(seconds_spent))
        with self.transaction() as conn:
            if unless_changed_since is not None:
                other = self._newer_row(conn, row["image_id"], unless_changed_since, set(own_rows))
                if other is not None:
                    raise LabelConflict(other)
            return self._insert(conn, row)

    @staticmethod
    def _newer_row(conn: WriteTransaction, image_id: int, since: int, own: set[int]) -> dict[str, Any] | None:
        """The newest row of ``image_id`` after row ``since`` that is not one of ``own``, else None."""
        for other in conn.execute(sa.text("SELECT * FROM labels WHERE image_id = :image_id AND id > :since"
                                          " ORDER BY id DESC"), {"image_id": image_id, "since": int(since)}).mappings():
            if other["id"] not in own:
                return dict(other)
        return None

    def add_page(self, labels: Mapping[int, str], labeler: str, round: int = 0, *,
                 shown_since: Mapping[int, int | None], own_rows: Collection[int] = (),
                 session: str | None = None, mode: str = "grid", seconds_spent: float | None = None,
                 sources: Mapping[int, str] | None = None) -> tuple[dict[int, int], list[dict[str, Any]]]:
        """Store a grid page: one history row per image, in ONE transaction.

        Each image is checked as :meth:`add` checks it (``shown_since[image_id]`` is the
        row id the tab had seen; ``None`` = overwrite deliberately). Images changed since
        are not written and come back as conflicts (the newest such row each); the
        others are written. ``seconds_spent`` is the page's time, shared equally over
        the rows written. Returns ``({image_id: new row id}, [conflict rows])``.
        """
        rows = [self._clean(image_id, label, labeler, round, (sources or {}).get(int(image_id), "page"))
                for image_id, label in labels.items()]
        own = set(own_rows)
        written: dict[int, int] = {}
        conflicts: list[dict[str, Any]] = []
        with self.transaction() as conn:
            to_write = []
            for row in rows:
                since = shown_since.get(row["image_id"])
                other = None if since is None else self._newer_row(conn, row["image_id"], since, own)
                if other is not None:
                    conflicts.append(other)
                else:
                    to_write.append(row)
            share = _seconds(seconds_spent / len(to_write)) if to_write and seconds_spent is not None else None
            for row in to_write:
                row.update(session=session, mode=mode, seconds_spent=share)
                written[row["image_id"]] = self._insert(conn, row)
        return written, conflicts

    def add_many(self, rows: Iterable[Mapping[str, Any]], source: str = "batch") -> int:
        """Append many labels in ONE transaction: all rows are stored or none is."""
        cleaned = [
            self._clean(r["image_id"], r.get("label"), r.get("labeler", "batch"), r.get("round", 0),
                        r.get("source", source), r.get("labeled_at"))
            for r in rows
        ]
        with self.transaction() as conn:
            for row in cleaned:
                self._insert(conn, row)
        return len(cleaned)

    _OPEN = "retracts IS NULL AND NOT EXISTS (SELECT 1 FROM labels u WHERE u.retracts = l.id)"

    def undo(self, labeler: str) -> dict[str, Any] | None:
        """Retract ``labeler``'s most recent not-yet-retracted label; return the retracted row
        (plus ``undo_id``, the id of the undo row).

        The undo is itself a history row (``retracts`` = the retracted id) whose label is
        the image's state as if the retracted action never happened, so a relabel undoes
        to the old label and a first label undoes to unlabeled. ``None`` when nothing is left to undo.
        """
        with self.transaction() as conn:
            target = conn.execute(
                sa.text(f"SELECT * FROM labels l WHERE labeler = :labeler AND {self._OPEN} ORDER BY id DESC LIMIT 1"),
                {"labeler": labeler},
            ).mappings().fetchone()
            return None if target is None else self._retract(conn, target, labeler)

    def retract_many(self, row_ids: Iterable[int], labeler: str) -> list[dict[str, Any]]:
        """Undo several rows (a grid page) in ONE transaction; the retracted rows, as :meth:`retract`."""
        labeler = str(labeler or "").strip()
        if not labeler:
            raise ValueError("labeler must be a non-empty name")
        done = []
        with self.transaction() as conn:
            for row_id in row_ids:
                target = self._open_row(conn, row_id)
                if target is not None:
                    done.append(self._retract(conn, target, labeler))
        return done

    def retract(self, row_id: int, labeler: str) -> dict[str, Any] | None:
        """Undo one given history row (as :meth:`undo` does); return it, or ``None`` when
        it does not exist, is itself an undo, or was already retracted."""
        labeler = str(labeler or "").strip()
        if not labeler:
            raise ValueError("labeler must be a non-empty name")
        with self.transaction() as conn:
            target = self._open_row(conn, row_id)
            return None if target is None else self._retract(conn, target, labeler)

    def _open_row(self, conn: WriteTransaction, row_id: int) -> Mapping[str, Any] | None:
        return conn.execute(sa.text(f"SELECT * FROM labels l WHERE id = :id AND {self._OPEN}"),
                            {"id": int(row_id)}).mappings().fetchone()

    def _retract(self, conn: WriteTransaction, target: Mapping[str, Any], labeler: str) -> dict[str, Any]:
        # The state without the target = the label of the image's newest remaining
        # action (not an undo, not retracted, not the target itself); this is also
        # right when someone else relabeled the image after the target.
        remaining = conn.execute(
            sa.text(f"SELECT label FROM labels l WHERE image_id = :image_id AND id != :id AND {self._OPEN}"
                    " ORDER BY id DESC LIMIT 1"),
            {"image_id": target["image_id"], "id": target["id"]},
        ).fetchone()
        restored = remaining[0] if remaining is not None else None
        undo_id = self._insert(conn, {
            "image_id": target["image_id"], "label": restored, "labeler": labeler,
            "labeled_at": _now(), "round": target["round"], "source": "undo",
            "retracts": target["id"], "session": target["session"], "mode": target["mode"],
        })
        return dict(target, undo_id=undo_id)

    # ---- reads --------------------------------------------------------------------
    def _frame(self, sql: str, params: Mapping[str, Any] | None = None) -> pd.DataFrame:
        with self._read() as conn:
            df = pd.read_sql_query(sa.text(sql), conn, params=params)
        df["labeled_at"] = pd.to_datetime(df["labeled_at"], utc=True, format="ISO8601")
        df["image_id"] = df["image_id"].astype("int64")
        df["round"] = df["round"].astype("int64")
        return df

    def history(self, image_id: int | None = None) -> pd.DataFrame:
        """Every row ever written, oldest first (``label`` is None where unlabeled)."""
        where, params = ("WHERE image_id = :image_id", {"image_id": _image_id(image_id)}) if image_id is not None else ("", None)
        df = self._frame(f"SELECT {', '.join(HISTORY_COLUMNS)} FROM labels {where} ORDER BY id", params)
        df["retracts"] = df["retracts"].astype("Int64")
        df["seconds_spent"] = df["seconds_spent"].astype("float64")
        return df

    def throughput(self) -> pd.DataFrame:
        """Per page session (a browser tab): labeler, mode, labels kept (an undone label is
        taken off, as the page's own counter does; its time stays in: it was spent),
        seconds spent, labels per minute and seconds per label. Rows without a session
        (imports, older stores) are not counted."""
        with self._read() as conn:
            df = pd.read_sql_query(sa.text(
                "SELECT session, labeler, mode,"
                " SUM(CASE WHEN EXISTS (SELECT 1 FROM labels u WHERE u.retracts = l.id) THEN 0 ELSE 1 END) AS labels,"
                " SUM(seconds_spent) AS seconds, MIN(labeled_at) AS started_at, MAX(labeled_at) AS last_at"
                " FROM labels l WHERE session IS NOT NULL AND retracts IS NULL AND label IS NOT NULL"
                " GROUP BY session, labeler, mode ORDER BY started_at"), conn)
        for column in ("started_at", "last_at"):
            df[column] = pd.to_datetime(df[column], utc=True, format="ISO8601")
        df["labels"] = df["labels"].astype("int64")
        df["seconds"] = df["seconds"].astype("float64").fillna(0.0)
        per_label = df["seconds"] / df["labels"].where(df["labels"] > 0)
        df["seconds_per_label"] = per_label
        df["labels_per_minute"] = 60.0 / per_label.where(per_label > 0)
        return df

    _LATEST_SQL = (
        "SELECT l.* FROM labels l JOIN (SELECT image_id, MAX(id) AS id FROM labels GROUP BY image_id) m"
        " ON l.id = m.id WHERE l.label IS NOT NULL"
    )

    def latest(self) -> pd.DataFrame:
        """The current label per image (latest row wins; retracted/unlabeled images omitted)."""
        return self._frame(
            f"SELECT {', '.join(LATEST_COLUMNS)} FROM ({self._LATEST_SQL}) cur ORDER BY image_id"
        )

    def labeled_ids(self) -> set[int]:
        """Ids of images that currently carry a label."""
        with self._read() as conn:
            return {int(r[0]) for r in conn.execute(sa.text(f"SELECT image_id FROM ({self._LATEST_SQL}) cur"))}

    def label_of(self, image_id: int) -> str | None:
        """The current label of one image, ``None`` if unlabeled or never seen."""
        with self._read() as conn:
            row = conn.execute(
                sa.text("SELECT label FROM labels WHERE image_id = :image_id ORDER BY id DESC LIMIT 1"),
                {"image_id": _image_id(image_id)},
            ).fetchone()
        return None if row is None else row[0]

    def count_since(self, since: int | str | datetime | None = None, round: int | None = None) -> int:
        """Number of images whose current label was set after ``since``.

        ``since`` is a row id (e.g. a sensor cursor from :meth:`max_id`) or a timestamp;
        ``None`` counts all labeled images. ``round`` restricts to labels of that round.
        """
        clauses, params = [], {}
        if isinstance(since, (int, np.integer)) and not isinstance(since, bool):
            clauses.append("id > :since")
            params["since"] = int(since)
        elif since is not None:
            clauses.append("labeled_at > :since")
            params["since"] = _timestamp(since)
        if round is not None:
            clauses.append("round = :round")
            params["round"] = int(round)
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        with self._read() as conn:
            return int(conn.execute(sa.text(f"SELECT COUNT(*) FROM ({self._LATEST_SQL}) cur{where}"), params).scalar_one())

    def rows_since(self, after_id: int = 0) -> list[tuple[int, int, str | None]]:
        """``(id, image_id, label)`` of history rows newer than ``after_id``, oldest first:
        lets a long-lived reader (the labeling page) follow the store incrementally."""
        with self._read() as conn:
            rows = conn.execute(sa.text("SELECT id, image_id, label FROM labels WHERE id > :after ORDER BY id"),
                                {"after": int(after_id)}).fetchall()
        return [(int(i), int(img), lab) for i, img, lab in rows]

    def max_id(self) -> int:
        """The id of the newest history row (0 for an empty store): a cheap cursor."""
        with self._read() as conn:
            return int(conn.execute(sa.text("SELECT COALESCE(MAX(id), 0) FROM labels")).scalar_one())

    def version(self) -> str:
        """A cheap data version that changes on every write (max row id + row count): one
        query, answered from the primary key's index."""
        with self._read() as conn:
            max_id, count = conn.execute(sa.text("SELECT COALESCE(MAX(id), 0), COUNT(*) FROM labels")).one()
        return f"{int(max_id)}-{int(count)}"

    def throughput_summary(self) -> dict[str, Any]:
        """Throughput for UI metadata: totals per mode and the sessions (newest last)."""
        df = self.throughput()
        out: dict[str, Any] = {"sessions": int(len(df))}
        for mode, part in df.groupby(df["mode"].fillna("single")):
            seconds, n = float(part["seconds"].sum()), int(part["labels"].sum())
            out[f"{mode}_labels"] = n
            out[f"{mode}_labels_per_minute"] = round(60.0 * n / seconds, 1) if seconds > 0 else None
            out[f"{mode}_seconds_per_label"] = round(seconds / n, 2) if n else None
        out["table_md"] = "| session | labeler | mode | labels | labels/min | s/label |\n|---|---|---|---|---|---|\n" + "\n".join(
            f"| {str(r.session)[:8]} | {r.labeler} | {r.mode} | {r.labels} | "
            f"{'n/a' if pd.isna(r.labels_per_minute) else f'{r.labels_per_minute:.1f}'} | "
            f"{'n/a' if pd.isna(r.seconds_per_label) else f'{r.seconds_per_label:.2f}'} |"
            for r in df.tail(20).itertuples())
        return out

    def summary(self) -> dict[str, Any]:
        """Counts for UI metadata: labeled images per class and per round, history rows, labelers."""
        latest = self.latest()
        with self._read() as conn:
            n_rows, n_undo = conn.execute(sa.text("SELECT COUNT(*), COUNT(retracts) FROM labels")).one()
        return {
            "n_labeled": int(len(latest)),
            "per_class": {c: int((latest["label"] == c).sum()) for c in LABEL_CLASSES},
            "per_round": {int(r): int(n) for r, n in latest["round"].value_counts().sort_index().items()},
            "labelers": sorted(latest["labeler"].unique().tolist()),
            "history_rows": int(n_rows),
            "undos": int(n_undo),
            "version": self.version(),
        }

    # ---- CSV ----------------------------------------------------------------------
    def export_csv(self, path: Path | str) -> int:
        """Write the full history as CSV atomically; return the number of rows."""
        df = self.history()
        df["label"] = df["label"].fillna(UNLABELED)
        df["labeled_at"] = df["labeled_at"].map(lambda t: t.isoformat())
        with atomic_path(path) as tmp:
            df.to_csv(tmp, index=False, quoting=csv.QUOTE_MINIMAL)
        return len(df)

    def import_csv(self, path: Path | str, labeler: str = "import", round: int = 0) -> int:
        """Append the rows of a CSV (at least ``image_id,label``) in one transaction.

        Missing ``labeler``/``round``/``labeled_at`` columns take the given defaults / now.
        A history export (with ``id`` and ``retracts``) keeps its undo links, remapped to
        the new row ids. Any invalid row aborts the whole import; returns rows added.
        """
        df = pd.read_csv(path, dtype={"label": "string", "labeler": "string", "source": "string"},
                         keep_default_na=False, na_values=[""])
        missing = {"image_id", "label"} - set(df.columns)
        if missing:
            raise ValueError(f"{path}: CSV lacks required column(s) {sorted(missing)}")
        if "id" in df.columns:
            df = df.sort_values("id", kind="stable")
        rows = []
        for i, rec in enumerate(df.to_dict("records")):
            try:
                row = self._clean(
                    rec["image_id"], None if pd.isna(rec["label"]) else rec["label"],
                    rec.get("labeler") if not pd.isna(rec.get("labeler", pd.NA)) else labeler,
                    rec.get("round") if not pd.isna(rec.get("round", pd.NA)) else round,
                    rec.get("source") if not pd.isna(rec.get("source", pd.NA)) else "import",
                    rec.get("labeled_at") if not pd.isna(rec.get("labeled_at", pd.NA)) else None,
                )
            except ValueError as exc:
                raise ValueError(f"{path}: row {i + 2}: {exc}") from None
            old_id = rec.get("id")
            old_retracts = rec.get("retracts")
            rows.append((row, old_id, None if pd.isna(old_retracts) else int(old_retracts)))
        id_map: dict[int, int] = {}
        with self.transaction() as conn:
            for row, old_id, old_retracts in rows:
                if old_retracts is not None:
                    row["retracts"] = id_map.get(old_retracts)
                new_id = self._insert(conn, row)
                if old_id is not None and not pd.isna(old_id):
                    id_map[int(old_id)] = new_id
        return len(rows)
