"""LabelStore: history, latest-wins, undo, crash safety, concurrent reads, CSV round trip."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from danbooru_assets.labels.store import LATEST_COLUMNS, LabelConflict, LabelStore
from danbooru_assets.labels.classes import LABEL_CLASSES


@pytest.fixture()
def store(tmp_path: Path) -> LabelStore:
    return LabelStore(tmp_path / "labels.sqlite")


def test_latest_wins_and_history_is_kept(store: LabelStore) -> None:
    store.add(10, "good", "ann", 1)
    store.add(11, "bad", "ann", 1)
    store.add(10, "questionable", "bob", 2)
    latest = store.latest()
    assert list(latest.columns) == LATEST_COLUMNS
    assert dict(zip(latest.image_id, latest.label)) == {10: "questionable", 11: "bad"}
    assert latest.set_index("image_id").loc[10, "labeler"] == "bob"
    assert latest.set_index("image_id").loc[10, "round"] == 2
    assert str(latest["labeled_at"].dtype).startswith("datetime64")
    hist = store.history()
    assert len(hist) == 3 and list(hist.label) == ["good", "bad", "questionable"]
    assert list(store.history(10).label) == ["good", "questionable"]


def test_undo_retracts_in_reverse_order_and_restores_previous_label(store: LabelStore) -> None:
    store.add(1, "good", "ann", 1)
    store.add(2, "bad", "ann", 1)
    store.add(1, "bad", "ann", 1)  # relabel
    assert store.undo("ann")["image_id"] == 1
    assert store.label_of(1) == "good"  # back to the old label, not unlabeled
    assert store.undo("ann")["image_id"] == 2
    assert store.label_of(2) is None
    assert store.undo("ann")["label"] == "good"
    assert store.undo("ann") is None  # nothing left
    assert store.latest().empty
    hist = store.history()
    # undos are history rows too, each pointing at what it retracted
    assert len(hist) == 6
    assert list(hist.retracts.dropna().astype(int)) == [3, 2, 1]


def test_undo_only_touches_own_labels_and_keeps_later_relabels(store: LabelStore) -> None:
    store.add(5, "good", "ann", 1)
    store.add(5, "bad", "bob", 1)
    store.undo("ann")  # ann's label was already superseded by bob's
    assert store.label_of(5) == "bad"
    store.undo("bob")  # bob's retracted; ann's was retracted too → unlabeled
    assert store.label_of(5) is None
    assert store.undo("carl") is None


def test_checked_add_refuses_a_newer_foreign_row_and_keeps_history(store: LabelStore) -> None:
    seen = store.max_id()
    mine = store.add(7, "good", "ann", 1, unless_changed_since=seen)
    store.add(8, "bad", "bob", 1)  # another image: no conflict for 7
    store.add(7, "questionable", "ann", 1, unless_changed_since=seen, own_rows={mine})  # own row: fine
    theirs = store.add(7, "bad", "bob", 1)
    with pytest.raises(LabelConflict, match="'bad' by 'bob'") as info:
        store.add(7, "good", "ann", 1, unless_changed_since=seen, own_rows={mine})
    assert info.value.row["id"] == theirs and info.value.row["labeler"] == "bob"
    assert store.label_of(7) == "bad" and len(store.history(7)) == 3  # nothing written
    store.add(7, "good", "ann", 1, unless_changed_since=theirs)  # seen bob's: a deliberate overwrite
    assert store.history(7)["label"].tolist() == ["good", "questionable", "bad", "good"]


def test_retract_one_given_row(store: LabelStore) -> None:
    first = store.add(4, "good", "ann", 1)
    second = store.add(5, "bad", "ann", 1)
    retracted = store.retract(first, "ann")  # not the newest row of ann: undo is not "last by name"
    assert retracted["id"] == first and retracted["undo_id"] > second
    assert store.label_of(4) is None and store.label_of(5) == "bad"
    assert store.retract(first, "ann") is None  # already retracted
    assert store.retract(retracted["undo_id"], "ann") is None  # an undo row is not retracted
    assert store.retract(9999, "ann") is None
    with pytest.raises(ValueError):
        store.retract(second, " ")


def test_unlabeled_entry_retracts(store: LabelStore) -> None:
    store.add(3, "good", "ann", 1)
    store.add(3, "unlabeled", "ann", 1)
    assert store.latest().empty
    assert store.labeled_ids() == set()


@pytest.mark.parametrize("bad", [{"image_id": 1, "label": "great"}, {"image_id": "x1", "label": "good"},
                                 {"image_id": -4, "label": "good"}, {"image_id": 1, "label": "good", "labeler": ""}])
def test_invalid_input_refused(store: LabelStore, bad: dict) -> None:
    with pytest.raises(ValueError):
        store.add(bad["image_id"], bad["label"], bad.get("labeler", "ann"), 1)
    assert store.history().empty


def test_version_and_count_since(store: LabelStore) -> None:
    v0 = store.version()
    store.add(1, "good", "ann", 1)
    cursor = store.max_id()
    v1 = store.version()
    assert v1 != v0
    assert store.version() == v1  # stable without writes
    store.add(2, "bad", "ann", 2)
    store.add(3, "bad", "ann", 2)
    store.undo("ann")
    assert store.version() not in (v0, v1)
    assert store.count_since() == 2
    assert store.count_since(cursor) == 1  # image 2 only; image 3 was undone
    assert store.count_since(round=2) == 1
    assert store.count_since(pd.Timestamp("2000-01-01", tz="UTC")) == 2
    summary = store.summary()
    assert summary["n_labeled"] == 2 and summary["per_class"] == {"good": 1, "questionable": 0, "bad": 1}
    assert summary["per_round"] == {1: 1, 2: 1} and summary["undos"] == 1 and summary["history_rows"] == 4


def test_failed_batch_leaves_nothing(store: LabelStore) -> None:
    store.add(1, "good", "ann", 1)
    rows = [{"image_id": 2, "label": "bad"}, {"image_id": 3, "label": "good"}, {"image_id": 4, "label": "nope"}]
    with pytest.raises(ValueError):
        store.add_many(rows)
    # an exception raised inside an open transaction after some inserts rolls them back
    with pytest.raises(RuntimeError):
        with store.transaction() as conn:
            conn.execute("INSERT INTO labels (image_id, label, labeler, labeled_at) VALUES (7, 'good', 'x', 't')")
            raise RuntimeError("crash mid-write")
    assert list(store.history().image_id) == [1]


def _run(code: str, *args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_process_killed_mid_transaction_loses_nothing_committed(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    store = LabelStore(path)
    store.add(1, "good", "ann", 1)
    # a writer that inserts inside a transaction and dies (no commit, no cleanup)
    proc = _run("""
        import os, sys
        from danbooru_assets.labels.store import LabelStore
        s = LabelStore(sys.argv[1])
        with s.transaction() as conn:
            for i in range(100, 200):
                s._insert(conn, s._clean(i, "bad", "crash", 1))
            os._exit(9)
    """, str(path))
    proc.communicate(timeout=60)
    assert proc.returncode == 9
    reopened = LabelStore(path)
    assert list(reopened.history().image_id) == [1]
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    reopened.add(2, "bad", "ann", 1)  # the write lock was released by the dead process
    assert reopened.labeled_ids() == {1, 2}


def test_second_process_reads_while_one_writes(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    store = LabelStore(path)
    store.add(1, "good", "ann", 1)
    # the writer holds an open write transaction until we tell it to commit
    proc = _run("""
        import sys
        from danbooru_assets.labels.store import LabelStore
        s = LabelStore(sys.argv[1])
        with s.transaction() as conn:
            s._insert(conn, s._clean(2, "bad", "writer", 1))
            print("inside", flush=True)
            sys.stdin.readline()
        print("committed", flush=True)
    """, str(path))
    try:
        assert proc.stdout.readline().strip() == "inside"
        reader = LabelStore(path, timeout=2.0)
        # WAL: the read neither blocks nor sees the uncommitted row
        assert reader.labeled_ids() == {1}
        assert reader.latest().image_id.tolist() == [1]
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "committed"
        assert reader.labeled_ids() == {1, 2}
    finally:
        proc.kill()
        proc.communicate(timeout=30)


def test_csv_round_trip_keeps_history_and_undo_links(store: LabelStore, tmp_path: Path) -> None:
    store.add(1, "good", "ann", 1)
    store.add(2, "questionable", "ann", 1)
    store.add(1, "bad", "bob", 2)
    store.undo("bob")
    csv_path = tmp_path / "out" / "labels.csv"
    assert store.export_csv(csv_path) == 4
    assert not [p for p in csv_path.parent.iterdir() if p.name != "labels.csv"]  # no temp file left
    copy = LabelStore(tmp_path / "copy.sqlite")
    assert copy.import_csv(csv_path) == 4
    a, b = store.history(), copy.history()
    cols = ["image_id", "label", "labeler", "labeled_at", "round", "source"]
    pd.testing.assert_frame_equal(a[cols], b[cols])
    assert b.retracts.dropna().tolist() == [b.id.iloc[2]]
    pd.testing.assert_frame_equal(store.latest(), copy.latest())
    copy.undo("ann")  # undo still works after the round trip
    assert copy.label_of(2) is None


def test_import_minimal_csv_and_reject_bad_rows_atomically(store: LabelStore, tmp_path: Path) -> None:
    good = tmp_path / "in.csv"
    good.write_text("image_id,label\n5,good\n6,BAD\n7,\n")
    assert store.import_csv(good, labeler="seed", round=0) == 3
    latest = store.latest()
    assert dict(zip(latest.image_id, latest.label)) == {5: "good", 6: "bad"}
    assert set(latest.labeler) == {"seed"}
    bad = tmp_path / "bad.csv"
    bad.write_text("image_id,label\n8,good\n9,excellent\n")
    with pytest.raises(ValueError, match="row 3"):
        store.import_csv(bad)
    assert 8 not in store.labeled_ids()
    assert set(LABEL_CLASSES) == {"good", "questionable", "bad"}


# ---- throughput columns, migration, grid pages -----------------------------------------------

OLD_SCHEMA = """
CREATE TABLE labels (
    id INTEGER PRIMARY KEY AUTOINCREMENT, image_id INTEGER NOT NULL,
    label TEXT CHECK (label IS NULL OR label IN ('good', 'questionable', 'bad')),
    labeler TEXT NOT NULL, labeled_at TEXT NOT NULL, round INTEGER NOT NULL DEFAULT 0,
    source TEXT NOT NULL DEFAULT 'page', retracts INTEGER REFERENCES labels(id));
INSERT INTO labels (image_id, label, labeler, labeled_at, round, source)
    VALUES (5, 'good', 'ann', '2024-01-01T00:00:00.000000+00:00', 1, 'page');
"""


def test_a_store_from_before_the_throughput_columns_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:
        conn.executescript(OLD_SCHEMA)
    store = LabelStore(path)
    assert store.label_of(5) == "good"
    hist = store.history()
    assert hist[["session", "mode"]].isna().all().all() and hist["seconds_spent"].isna().all()
    store.add(6, "bad", "ann", 1, session="s1", mode="single", seconds_spent=2.5)
    assert store.retract(1, "ann") is not None  # undo of an old row works across the migration
    LabelStore(path)  # opening again is a no-op
    with sqlite3.connect(path) as conn:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(labels)")]
    assert columns.count("seconds_spent") == 1 and store.label_of(5) is None
    tput = store.throughput()
    assert tput[["session", "labels", "seconds"]].values.tolist() == [["s1", 1, 2.5]]
    assert tput["labels_per_minute"].iloc[0] == pytest.approx(24.0)


def test_add_page_stores_every_tile_and_reports_conflicts_per_tile(store: LabelStore) -> None:
    store.add(3, "good", "bob", 1)
    seen = store.max_id()
    store.add(4, "bad", "carol", 1)  # after the page was shown
    written, conflicts = store.add_page({1: "good", 2: "bad", 3: "questionable", 4: "good"}, "ann", 1,
                                        shown_since={1: seen, 2: seen, 3: seen, 4: seen},
                                        session="tab", seconds_spent=6.0, sources={2: "recheck"})
    assert sorted(written) == [1, 2, 3] and [c["image_id"] for c in conflicts] == [4]
    assert conflicts[0]["labeler"] == "carol"
    hist = store.history().set_index("image_id")
    assert hist.loc[[1, 2], "seconds_spent"].tolist() == [2.0, 2.0]  # the page's time over 3 rows
    assert hist.loc[2, "source"] == "recheck" and store.label_of(4) == "bad"
    # overwrite (None) writes; a page undo retracts all its rows in one transaction
    written2, conflicts2 = store.add_page({4: "good"}, "ann", 1, shown_since={4: None}, session="tab")
    assert conflicts2 == [] and store.label_of(4) == "good"
    undone = store.retract_many(list(written.values()), "ann")
    assert len(undone) == 3 and store.label_of(1) is None and store.label_of(3) == "good"
    # the throughput counts the labels kept (3 of 4 were undone); their time stays in (it was spent)
    assert store.throughput()["labels"].tolist() == [1]
    summary = store.throughput_summary()
    assert summary["grid_labels"] == 1 and summary["grid_seconds_per_label"] == 6.0


def test_negative_or_infinite_seconds_are_not_stored(store: LabelStore) -> None:
    store.add(1, "good", "ann", session="s", seconds_spent=float("inf"))
    store.add(2, "good", "ann", session="s", seconds_spent=-3)
    assert store.history()["seconds_spent"].isna().all()
    assert store.throughput()["labels_per_minute"].isna().all()


def test_a_store_location_is_a_path_or_a_sqlalchemy_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from danbooru_assets import config

    monkeypatch.setenv("DANBOORU_LABELS", f"sqlite:///{tmp_path / 'sub' / 'l.sqlite'}")
    assert config.labels_path() == f"sqlite:///{tmp_path / 'sub' / 'l.sqlite'}"  # not mangled by pathlib
    by_url = LabelStore(config.labels_path())
    by_url.add(1, "good", "ann", 1)
    by_path = LabelStore(tmp_path / "sub" / "l.sqlite")  # the same file, named as a path
    assert by_path.label_of(1) == "good" and by_path.version() == by_url.version()
    monkeypatch.setenv("DANBOORU_LABELS", str(tmp_path / "plain.sqlite"))
    assert config.labels_path() == tmp_path / "plain.sqlite"
    for bad, message in (("mysql://host/db", "unsupported database"), ("sqlite://", "in-memory")):
        with pytest.raises(ValueError, match=message):
            LabelStore(bad)
