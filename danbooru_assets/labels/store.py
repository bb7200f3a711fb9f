"""Human quality labels in an embedded SQLite database.

Every action (a label, a relabel, an undo, an import) is appended as one row; nothing is
ever updated or deleted, so the full history is kept. Each row holds the image's label
*after* that action (NULL = unlabeled), which makes "the latest row per image wins" the
whole read rule and makes an undo an ordinary row that restores the previous state.

Durability: WAL journal + ``synchronous=FULL`` and one transaction per write call, so a
crash of the labeling page or of a run mid-write leaves either the whole write or none of
it; readers in other processes keep reading while a writer is busy (WAL).
"""

from __future__ import annotations

import contextlib
import csv
import math
import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Collection, Iterable, Iterator, Mapping

import numpy as np
import pandas as pd

from danbooru_assets.labels.classes import LABEL_CLASSES
from danbooru_assets.core.tables import atomic_path

UNLABELED = "unlabeled"

LATEST_COLUMNS = ["image_id", "label", "labeler", "labeled_at", "round"]
HISTORY_COLUMNS = ["id", "image_id", "label", "labeler", "labeled_at", "round", "source", "retracts"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS labels (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    image_id    INTEGER NOT NULL,
    label       TEXT CHECK (label IS NULL OR label IN ('good', 'questionable', 'bad')),
    labeler     TEXT NOT NULL,
    labeled_at  TEXT NOT NULL,
    round       INTEGER NOT NULL DEFAULT 0,
    source      TEXT NOT NULL DEFAULT 'page',
    retracts    INTEGER REFERENCES labels(id)
);
CREATE INDEX IF NOT EXISTS labels_image ON labels(image_id, id);
CREATE INDEX IF NOT EXISTS labels_labeler ON labels(labeler, id);
"""


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
    """Append-only label history in SQLite; see the module docstring for the rules."""

    def __init__(self, path: Path | str, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        with self._connect() as conn:
            conn.executescript(_SCHEMA)

    # A connection per call: cheap for SQLite and safe under the page's thread pool.
    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            yield conn
        finally:
            conn.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed on success, rolled back on any exception."""
        with self._connect() as conn:
            # IMMEDIATE takes the write lock up front so read-then-write (undo) is atomic.
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    # ---- writes -------------------------------------------------------------------
    @staticmethod
    def _insert(conn: sqlite3.Connection, row: Mapping[str, Any]) -> int:
        cur = conn.execute(
            "INSERT INTO labels (image_id, label, labeler, labeled_at, round, source, retracts)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                row["image_id"], row["label"], row["labeler"], row["labeled_at"],
                row["round"], row["source"], row.get("retracts"),
            ),
        )
        return int(cur.lastrowid)

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
            unless_changed_since: int | None = None, own_rows: Collection[int] = ()) -> int:
        """Append a label (or ``None``/"unlabeled" to clear it); return the new row id.

        With ``unless_changed_since`` (a row id, e.g. :meth:`max_id` when the caller showed
        the image), raise :class:`LabelConflict` instead of writing when the image has a
        newer row that is not one of ``own_rows``; the check and the write are one
        transaction, so a writer in another process cannot slip in between.
        """
        row = self._clean(image_id, label, labeler, round, source, labeled_at)
        with self.transaction() as conn:
            if unless_changed_since is not None:
                conn.row_factory = sqlite3.Row
                own = set(own_rows)
                for other in conn.execute(
                    "SELECT * FROM labels WHERE image_id = ? AND id > ? ORDER BY id DESC",
                    (row["image_id"], int(unless_changed_since)),
                ):
                    if other["id"] not in own:
                        raise LabelConflict(dict(other))
            return self._insert(conn, row)

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
            conn.row_factory = sqlite3.Row
            target = conn.execute(
                f"SELECT * FROM labels l WHERE labeler = ? AND {self._OPEN} ORDER BY id DESC LIMIT 1",
                (labeler,),
            ).fetchone()
            return None if target is None else self._retract(conn, target, labeler)

    def retract(self, row_id: int, labeler: str) -> dict[str, Any] | None:
        """Undo one given history row (as :meth:`undo` does); return it, or ``None`` when
        it does not exist, is itself an undo, or was already retracted."""
        labeler = str(labeler or "").strip()
        if not labeler:
            raise ValueError("labeler must be a non-empty name")
        with self.transaction() as conn:
            conn.row_factory = sqlite3.Row
            target = conn.execute(f"SELECT * FROM labels l WHERE id = ? AND {self._OPEN}", (int(row_id),)).fetchone()
            return None if target is None else self._retract(conn, target, labeler)

    def _retract(self, conn: sqlite3.Connection, target: sqlite3.Row, labeler: str) -> dict[str, Any]:
        # The state without the target = the label of the image's newest remaining
        # action (not an undo, not retracted, not the target itself); this is also
        # right when someone else relabeled the image after the target.
        remaining = conn.execute(
            f"SELECT label FROM labels l WHERE image_id = ? AND id != ? AND {self._OPEN} ORDER BY id DESC LIMIT 1",
            (target["image_id"], target["id"]),
        ).fetchone()
        restored = remaining["label"] if remaining is not None else None
        undo_id = self._insert(conn, {
            "image_id": target["image_id"], "label": restored, "labeler": labeler,
            "labeled_at": _now(), "round": target["round"], "source": "undo",
            "retracts": target["id"],
        })
        return dict(target, undo_id=undo_id)

    # ---- reads --------------------------------------------------------------------
    def _frame(self, sql: str, params: tuple = ()) -> pd.DataFrame:
        with self._connect() as conn:
            df = pd.read_sql_query(sql, conn, params=params)
        df["labeled_at"] = pd.to_datetime(df["labeled_at"], utc=True, format="ISO8601")
        df["image_id"] = df["image_id"].astype("int64")
        df["round"] = df["round"].astype("int64")
        return df

    def history(self, image_id: int | None = None) -> pd.DataFrame:
        """Every row ever written, oldest first (``label`` is None where unlabeled)."""
        where, params = ("WHERE image_id = ?", (_image_id(image_id),)) if image_id is not None else ("", ())
        df = self._frame(f"SELECT {', '.join(HISTORY_COLUMNS)} FROM labels {where} ORDER BY id", params)
        df["retracts"] = df["retracts"].astype("Int64")
        return df

    _LATEST_SQL = (
        "SELECT l.* FROM labels l JOIN (SELECT image_id, MAX(id) AS id FROM labels GROUP BY image_id) m"
        " ON l.id = m.id WHERE l.label IS NOT NULL"
    )

    def latest(self) -> pd.DataFrame:
        """The current label per image (latest row wins; retracted/unlabeled images omitted)."""
        return self._frame(
            f"SELECT {', '.join(LATEST_COLUMNS)} FROM ({self._LATEST_SQL}) ORDER BY image_id"
        )

    def labeled_ids(self) -> set[int]:
        """Ids of images that currently carry a label."""
        with self._connect() as conn:
            return {int(r[0]) for r in conn.execute(f"SELECT image_id FROM ({self._LATEST_SQL})")}

    def label_of(self, image_id: int) -> str | None:
        """The current label of one image, ``None`` if unlabeled or never seen."""
        with self._connect() as conn:
            row = conn.execute(
                "SELECT label FROM labels WHERE image_id = ? ORDER BY id DESC LIMIT 1",
                (_image_id(image_id),),
            ).fetchone()
        return None if row is None else row[0]

    def count_since(self, since: int | str | datetime | None = None, round: int | None = None) -> int:
        """Number of images whose current label was set after ``since``.

        ``since`` is a row id (e.g. a sensor cursor from :meth:`max_id`) or a timestamp;
        ``None`` counts all labeled images. ``round`` restricts to labels of that round.
        """
        clauses, params = [], []
        if isinstance(since, (int, np.integer)) and not isinstance(since, bool):
            clauses.append("id > ?")
            params.append(since)
        elif since is not None:
            clauses.append("labeled_at > ?")
            params.append(_timestamp(since))
        if round is not None:
            clauses.append("round = ?")
            params.append(int(round))
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        with self._connect() as conn:
            return int(conn.execute(f"SELECT COUNT(*) FROM ({self._LATEST_SQL}){where}", params).fetchone()[0])

    def rows_since(self, after_id: int = 0) -> list[tuple[int, int, str | None]]:
        """``(id, image_id, label)`` of history rows newer than ``after_id``, oldest first:
        lets a long-lived reader (the labeling page) follow the store incrementally."""
        with self._connect() as conn:
            rows = conn.execute("SELECT id, image_id, label FROM labels WHERE id > ? ORDER BY id",
                                (int(after_id),)).fetchall()
        return [(int(i), int(img), lab) for i, img, lab in rows]

    def max_id(self) -> int:
        """The id of the newest history row (0 for an empty store): a cheap cursor."""
        with self._connect() as conn:
            return int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM labels").fetchone()[0])

    def version(self) -> str:
        """A cheap data version that changes on every write (max row id + row count)."""
        with self._connect() as conn:
            max_id, count = conn.execute("SELECT COALESCE(MAX(id), 0), COUNT(*) FROM labels").fetchone()
        return f"{int(max_id)}-{int(count)}"

    def summary(self) -> dict[str, Any]:
        """Counts for UI metadata: labeled images per class and per round, history rows, labelers."""
        latest = self.latest()
        with self._connect() as conn:
            n_rows, n_undo = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(retracts IS NOT NULL), 0) FROM labels").fetchone()
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
