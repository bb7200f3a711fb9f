"""LabelStore on Postgres (a SQLAlchemy URL): the store's rules hold there too, and two
processes on the same URL (a labeler on one machine, a run on another) share the labels.

Starts Debian's PostgreSQL 15 on 127.0.0.1 in a temporary folder (as a non-root user when
run as root: initdb refuses root) and stops it afterwards.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import pandas as pd
import pytest
import sqlalchemy as sa

from danbooru_assets import config
from danbooru_assets.labels.store import HISTORY_COLUMNS, LabelConflict, LabelStore

PG_BIN = Path("/usr/lib/postgresql/15/bin")
_databases = itertools.count()


def _run_as() -> list[str]:
    """The prefix that runs a server command as a non-root user (initdb refuses root)."""
    if os.geteuid() != 0:
        return []
    for user in ("postgres", "nobody"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            continue
        if shutil.which("runuser"):
            return ["runuser", "-u", user, "--"]
    pytest.skip("running as root without a 'postgres'/'nobody' user or runuser to start PostgreSQL as")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """A PostgreSQL server of its own in a temporary folder: ``url`` (append a database
    name), ``stop()`` and ``start()`` (a database outage, in the middle of a test)."""

    def __init__(self) -> None:
        if not (PG_BIN / "initdb").exists():
            pytest.skip(f"PostgreSQL binaries not found in {PG_BIN} (apt-get install postgresql)")
        self.run_as = _run_as()
        # /tmp, not pytest's tmp_path: that is private to root and the server user must write here
        self.base = Path(tempfile.mkdtemp(prefix="labels-pg-"))
        if self.run_as:
            shutil.chown(self.base, user=self.run_as[2])
        self.data, self.port = self.base / "data", _free_port()
        subprocess.run([*self.run_as, str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                        "--no-sync", "-E", "UTF8"], check=True, capture_output=True)
        self.url = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}"
        self.start()

    def start(self) -> None:
        subprocess.run([*self.run_as, str(PG_BIN / "pg_ctl"), "start", "-w", "-D", str(self.data), "-l",
                        str(self.base / "log"), "-o", f"-k {self.base} -h 127.0.0.1 -p {self.port} -c fsync=off"],
                       check=True, capture_output=True)

    def stop(self) -> None:
        subprocess.run([*self.run_as, str(PG_BIN / "pg_ctl"), "stop", "-w", "-D", str(self.data), "-m", "fast"],
                       check=False, capture_output=True, timeout=60)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A PostgreSQL server of its own; yields its base URL (append a database name)."""
    server = _Server()
    try:
        yield server.url
    finally:
        server.close()


@pytest.fixture()
def url(postgres: str) -> str:
    """A fresh database on the module's server."""
    name = f"labels_{next(_databases)}"
    port = postgres.rsplit(":", 1)[1]
    subprocess.run([str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", port, "-U", "postgres", name],
                   check=True, capture_output=True)
    return f"{postgres}/{name}"


def _python(code: str, *args: str) -> subprocess.Popen:
    """Another process (standing in for another machine) running ``code``."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_label_relabel_undo_history_and_throughput_on_postgres(url: str) -> None:
    store = LabelStore(url)
    assert store.path is None and str(store) == url
    v0 = store.version()
    first = store.add(10, "good", "ann", 1, session="s1", mode="single", seconds_spent=3.0)
    store.add(11, "bad", "ann", 1, session="s1", mode="single", seconds_spent=1.0)
    store.add(10, "questionable", "bob", 2)
    assert store.label_of(10) == "questionable"
    assert dict(zip(store.latest().image_id, store.latest().label)) == {10: "questionable", 11: "bad"}
    undone = store.undo("bob")
    assert undone is not None and undone["image_id"] == 10 and store.label_of(10) == "good"  # back to ann's
    history = store.history()
    assert list(history.columns) == HISTORY_COLUMNS
    assert history.image_id.tolist() == [10, 11, 10, 10] and history.source.tolist()[-1] == "undo"
    assert history.retracts.dropna().tolist() == [history.id.iloc[2]]
    assert history.labeled_at.dt.tz is not None and history.labeled_at.is_monotonic_increasing
    assert store.retract(first, "ann") is not None and store.label_of(10) is None
    assert store.labeled_ids() == {11}
    written, conflicts = store.add_page({20: "good", 21: "bad"}, "ann", 1, shown_since={20: None, 21: None},
                                        session="s2", mode="grid", seconds_spent=4.0)
    assert set(written) == {20, 21} and conflicts == []
    tput = store.throughput().set_index("session")
    # "first" was undone: one label kept, both labels' time spent
    assert tput.loc["s1", "labels"] == 1 and tput.loc["s1", "seconds"] == pytest.approx(4.0)
    assert tput.loc["s2", "mode"] == "grid" and tput.loc["s2", "seconds_per_label"] == pytest.approx(2.0)
    assert store.history().seconds_spent.dropna().tolist() == [3.0, 1.0, 2.0, 2.0]
    summary = store.summary()
    assert summary["n_labeled"] == 3 and summary["undos"] == 2 and summary["history_rows"] == 7
    assert [row[1] for row in store.rows_since(store.max_id() - 2)] == [20, 21]
    assert store.count_since(first) == 3 and store.count_since(round=2) == 0
    v1 = store.version()
    assert v1 != v0 and store.version() == v1  # stable without writes
    with pytest.raises(ValueError):
        store.add_many([{"image_id": 30, "label": "good"}, {"image_id": 31, "label": "nope"}])
    with pytest.raises(RuntimeError):  # a failed write transaction leaves nothing
        with store.transaction() as conn:
            store._insert(conn, store._clean(32, "good", "x", 1))
            raise RuntimeError("crash mid-write")
    assert store.version() == v1 and 32 not in store.labeled_ids()


def test_a_sqlite_store_moves_to_postgres_by_csv(url: str, tmp_path: Path) -> None:
    sqlite = LabelStore(tmp_path / "labels.sqlite")
    sqlite.add(1, "good", "ann", 1)
    sqlite.add(1, "bad", "bob", 2)
    sqlite.undo("bob")
    assert sqlite.export_csv(tmp_path / "labels.csv") == 3
    pg = LabelStore(url)
    assert pg.import_csv(tmp_path / "labels.csv") == 3
    cols = ["image_id", "label", "labeler", "labeled_at", "round", "source"]
    pd.testing.assert_frame_equal(sqlite.history()[cols], pg.history()[cols])
    pd.testing.assert_frame_equal(sqlite.latest(), pg.latest())
    assert pg.history().retracts.notna().sum() == 1  # the undo link survived, remapped


def test_an_old_table_is_migrated_in_place(url: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(
            "CREATE TABLE labels (id BIGSERIAL PRIMARY KEY, image_id BIGINT NOT NULL, label TEXT,"
            " labeler TEXT NOT NULL, labeled_at TEXT NOT NULL, round INTEGER NOT NULL DEFAULT 0,"
            " source TEXT NOT NULL DEFAULT 'page', retracts BIGINT REFERENCES labels(id))"))
        conn.execute(sa.text("INSERT INTO labels (image_id, label, labeler, labeled_at)"
                             " VALUES (5, 'good', 'ann', '2024-01-01T00:00:00.000000+00:00')"))
    engine.dispose()
    store = LabelStore(url)
    assert store.label_of(5) == "good" and store.history()[["session", "mode"]].isna().all().all()
    store.add(6, "bad", "ann", 1, session="s", mode="single", seconds_spent=1.5)
    assert store.throughput().seconds.tolist() == [1.5]
    LabelStore(url)  # opening again is a no-op


def test_simultaneous_checked_labels_from_two_processes_exactly_one_wins(url: str) -> None:
    store = LabelStore(url)
    store.add(7, "good", "ann", 1)
    seen = store.max_id()  # both labelers were shown image 7 at this state
    writer = """
        import sys
        from danbooru_assets.labels.store import LabelConflict, LabelStore
        store = LabelStore(sys.argv[1])
        try:
            print("won", store.add(7, sys.argv[2], sys.argv[3], 1, unless_changed_since=int(sys.argv[4])), flush=True)
        except LabelConflict as exc:
            print("conflict", exc.row["labeler"], flush=True)
    """
    engine = sa.create_engine(url)
    # Hold the store's write lock so both writers queue up behind it, then let them race.
    with store.transaction():
        procs = [_python(writer, url, label, name, str(seen)) for label, name in (("bad", "bob"), ("questionable", "cy"))]
        deadline = time.monotonic() + 60
        with engine.connect() as conn:
            while conn.execute(sa.text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
                               ).scalar_one() < 2:
                assert time.monotonic() < deadline, [p.stderr.read() for p in procs if p.poll() is not None]
                assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
                time.sleep(0.05)
    engine.dispose()
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    verdicts = sorted(out.split()[0] for out, _ in outputs)
    assert verdicts == ["conflict", "won"], outputs
    winner = next(out.split() for out, _ in outputs if out.startswith("won"))
    loser = next(out.split() for out, _ in outputs if out.startswith("conflict"))
    history = store.history(7)
    assert len(history) == 2 and history.id.iloc[-1] == int(winner[1])
    assert loser[1] == history.labeler.iloc[-1]  # the conflict names the winner's row
    with pytest.raises(LabelConflict):  # and the same check refuses in-process too
        store.add(7, "good", "dee", 1, unless_changed_since=seen)


def test_a_labeler_and_a_run_on_two_machines_see_the_same_labels(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DANBOORU_LABELS", url)
    assert config.labels_path() == url  # the URL passes through untouched
    from danbooru_assets.orchestration.resources import LabelStoreResource

    labeler = LabelStore(config.labels_path())
    labeler.add(1, "good", "ann", 1)
    labeler.add(2, "bad", "ann", 1)
    run_side = """
        import json, sys
        from danbooru_assets.orchestration.resources import LabelStoreResource
        store = LabelStoreResource(path=sys.argv[1]).store()
        latest = store.latest()
        print(json.dumps({"labels": dict(zip(map(str, latest.image_id), latest.label)), "version": store.version()}))
        store.add(3, "questionable", "run", 1, source="batch")  # a run writes too
    """
    before = labeler.version()
    proc = _python(run_side, url)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen == {"labels": {"1": "good", "2": "bad"}, "version": before}
    assert labeler.version() != before  # the run's write changed the version both sides read
    assert labeler.label_of(3) == "questionable"
    resource_store = LabelStoreResource(path=url).store()
    assert resource_store.version() == labeler.version()
    pd.testing.assert_frame_equal(resource_store.latest(), labeler.latest())


def test_label_command_takes_a_store_url(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from danbooru_assets.labels.app import LabelingServer, add_label_arguments, run_label

    root = tmp_path / "dataset"
    (root / "original").mkdir(parents=True)
    pd.DataFrame({"image_id": [1], "rel_path": ["original/1.png"]}).to_parquet(tmp_path / "queue.parquet")
    monkeypatch.setattr(LabelingServer, "serve_forever", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    args = add_label_arguments(argparse.ArgumentParser()).parse_args(
        ["--queue", str(tmp_path / "queue.parquet"), "--root", str(root), "--store", url, "--port", "0"])
    assert run_label(args) == 0
    assert f"labels go to {url}" in capsys.readouterr().out
    bad = add_label_arguments(argparse.ArgumentParser()).parse_args(
        ["--queue", str(tmp_path / "queue.parquet"), "--root", str(root), "--store", "mysql://h/db", "--port", "0"])
    assert run_label(bad) == 2 and "unsupported database" in capsys.readouterr().err


def test_labeling_page_answers_503_while_postgres_is_down_and_stores_the_label_after(tmp_path: Path) -> None:
    """Issue 20: every POST got RemoteDisconnected while the Postgres store was down."""
    import urllib.error
    import urllib.request

    from danbooru_assets.labels.app import make_app
    from danbooru_assets_tests.labels.test_app import _queue

    server = _Server()  # its own: this test stops it
    page_server = None
    try:
        subprocess.run([str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(server.port), "-U", "postgres",
                        "labels"], check=True, capture_output=True)
        store = LabelStore(f"{server.url}/labels", timeout=5)
        root = tmp_path / "dataset"
        page_server = make_app(store, root, _queue(root), round=1, labeler="ann").start()

        def post(path: str, body: dict) -> tuple[int, dict, Any]:
            req = urllib.request.Request(page_server.url + path.lstrip("/"), method="POST",
                                         data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    return resp.status, json.loads(resp.read()), resp.headers
            except urllib.error.HTTPError as err:
                return err.code, json.loads(err.read()), err.headers

        status, state, _ = post("/api/session", {})
        assert status == 200
        session, shown = state["session"], state["item"]["image_id"]
        server.stop()
        for _ in range(3):  # every request answered, none dropped
            status, payload, headers = post("/api/label", {"session": session, "image_id": shown, "label": "good"})
            assert status == 503 and headers["Retry-After"] == "5" and "label store is unavailable" in payload["error"]
            assert "postgres@" not in payload["error"]
        assert post("/api/session", {})[0] == 503
        server.start()
        status, state, _ = post("/api/label", {"session": session, "image_id": shown, "label": "good"})
        assert status == 200 and state["throughput"]["session_labels"] == 1
        assert store.label_of(shown) == "good" and len(store.history()) == 1
    finally:
        if page_server is not None:
            page_server.stop()
        server.close()
