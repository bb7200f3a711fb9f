"""The labeling page: JSON API validation, path safety, Host/Origin checks, tabs as sessions,
the CLI entry, and real browser runs."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from danbooru_assets.pose.coco import KEYPOINT_COLUMNS
from danbooru_assets.labels.app import LabelingServer, add_label_arguments, make_app, page_html, run_label, split_host
from danbooru_assets.labels.store import LabelStore

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
IDS = [101, 202, 303, 404, 505]


def _queue(root: Path) -> pd.DataFrame:
    rows = []
    rng = np.random.default_rng(0)
    for rank, image_id in enumerate(IDS):
        rel = f"original/{image_id % 1000:04d}/{image_id}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (200, 300), (40 * rank, 90, 160)).save(root / rel)
        row: dict[str, Any] = {"image_id": image_id, "rel_path": rel, "portrait_score": 0.3 + 0.1 * rank,
                               "predicted_class": "good", "p_good": 0.5, "p_questionable": 0.3, "p_bad": 0.2,
                               "queue_rank": rank}
        # an upright stick figure in the middle of the 200×300 image
        for i, value in enumerate(rng.uniform(40, 160, size=len(KEYPOINT_COLUMNS))):
            row[KEYPOINT_COLUMNS[i]] = value if i % 3 != 2 else 0.9
        rows.append(row)
    return pd.DataFrame(rows)


@pytest.fixture()
def app(tmp_path: Path) -> Iterator[LabelingServer]:
    root = tmp_path / "dataset"
    queue = _queue(root)
    (tmp_path / "secret.png").write_bytes(b"not yours")
    # a queue row whose path tries to leave the dataset root, and one whose file is a symlink out
    queue = pd.concat([queue, pd.DataFrame([
        {"image_id": 666, "rel_path": "../secret.png", "queue_rank": 98},
        {"image_id": 777, "rel_path": "original/0777/777.png", "queue_rank": 99},
    ])], ignore_index=True)
    (root / "original/0777").mkdir(parents=True)
    (root / "original/0777/777.png").symlink_to(tmp_path / "secret.png")
    store = LabelStore(tmp_path / "labels.sqlite")
    server = make_app(store, root, queue, round=2, labeler="tester").start()
    try:
        yield server
    finally:
        server.stop()


def _call(server: LabelingServer, path: str, body: Any = None, raw: bytes | None = None,
          ctype: str = "application/json", session: str | None = None) -> tuple[int, Any]:
    if session is not None and isinstance(body, dict):
        body = {"session": session, **body}
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(server.url.rstrip("/") + path, data=data, method="POST" if data is not None else "GET")
    if data is not None:
        req.add_header("Content-Type", ctype)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            payload = resp.read()
            return resp.status, json.loads(payload) if resp.headers["Content-Type"] == "application/json" else payload
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _open(server: LabelingServer) -> tuple[str, dict[str, Any]]:
    """A page load: a new session and its first state."""
    status, state = _call(server, "/api/session", {})
    assert status == 200, state
    return state["session"], state


def _raw(server: LabelingServer, head: str, body: bytes = b"") -> tuple[int, dict[str, Any]]:
    """Send one hand-written HTTP request (forged headers that urllib would not send); the
    connection is closed by the server after its answer (no half-close: uvicorn takes a
    client's EOF as the end of the connection, as most servers do)."""
    if " HTTP/1.1\n" in head and "connection:" not in head.lower():
        head += "Connection: close\n"
    with socket.create_connection(server.server_address[:2], timeout=10) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    header, _, payload = response.partition(b"\r\n\r\n")
    status = int(header.split()[1])
    return status, json.loads(payload) if b"application/json" in header else {"bytes": payload}


def test_api_labels_skips_undoes(app: LabelingServer) -> None:
    store = app.page.store
    session, state = _open(app)
    assert state["item"]["image_id"] == 101 and state["total"] == 7 and state["round"] == 2
    assert state["item"]["keypoints"] is not None and len(state["item"]["keypoints"]) == 17
    status, state = _call(app, f"/api/state?session={session}")
    assert status == 200 and state["item"]["image_id"] == 101  # the tab keeps its image
    status, state = _call(app, "/api/label", {"image_id": 101, "label": "good"}, session=session)
    assert status == 200 and state["item"]["image_id"] == 202 and state["labeled"] == 1
    status, state = _call(app, "/api/skip", {"image_id": 202}, session=session)
    assert state["item"]["image_id"] == 303 and state["skipped"] == 1
    status, state = _call(app, "/api/undo", {}, session=session)
    assert status == 200 and state["retracted"]["image_id"] == 101 and state["item"]["image_id"] == 101
    assert store.latest().empty and store.history()["round"].tolist() == [2, 2]
    status, payload = _call(app, "/api/undo", {}, session=session)
    assert status == 409 and "nothing to undo" in payload["error"]
    status, img = _call(app, "/images/303")
    assert status == 200 and img[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("path,body,status,message", [
    ("/api/label", {"image_id": 999, "label": "good"}, 404, "unknown image id"),
    ("/api/label", {"image_id": "101; drop", "label": "good"}, 400, "image_id"),
    ("/api/label", {"image_id": True, "label": "good"}, 400, "image_id"),
    ("/api/label", {"image_id": 101, "label": "excellent"}, 400, "unknown class"),
    ("/api/label", {"image_id": 101}, 400, "unknown class"),
    ("/api/label", [1, 2], 400, "JSON object"),
    ("/api/skip", {"image_id": 5}, 404, "unknown image id"),
    ("/api/label", {"image_id": 101, "label": "good", "overwrite": "yes"}, 400, "overwrite must be"),
    ("/api/nope", {}, 404, "no such action"),
    ("/api/label", {"session": None, "image_id": 101, "label": "good"}, 400, "missing session"),
    ("/api/label", {"session": "made-up", "image_id": 101, "label": "good"}, 404, "unknown session"),
    ("/api/undo", {"session": ["x"]}, 404, "unknown session"),
])
def test_api_refuses_bad_input(app: LabelingServer, path: str, body: Any, status: int, message: str) -> None:
    session, _ = _open(app)
    if isinstance(body, dict) and "session" not in body:
        body = {"session": session, **body}
    code, payload = _call(app, path, body)
    assert code == status and message in payload["error"], payload
    assert app.page.store.history().empty


def test_api_refuses_non_json_and_escaping_paths(app: LabelingServer) -> None:
    assert _call(app, "/api/label", raw=b"{not json", ctype="application/json")[0] == 400
    assert _call(app, "/api/state")[0] == 400  # no session
    # a form post (what a foreign web page can send without a preflight) is refused
    assert _call(app, "/api/label", raw=b"image_id=101&label=good", ctype="application/x-www-form-urlencoded")[0] == 415
    for path, code in [("/images/666", 403), ("/images/777", 403), ("/images/..%2F..%2Fetc%2Fpasswd", 400),
                       ("/images/../../secret.png", 400), ("/images/12345", 404), ("/etc/passwd", 404)]:
        status, payload = _call(app, path)
        assert status == code, (path, payload)
        assert "error" in payload
    assert app.page.store.history().empty


def test_run_label_validates_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = add_label_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--queue", str(tmp_path / "missing.parquet"), "--root", str(tmp_path)])
    assert args.host == "127.0.0.1"
    assert run_label(args) == 2
    assert "labeling_queue" in capsys.readouterr().err


def test_label_command_reads_the_queue_from_url_storage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from danbooru_assets.core.tables import write_parquet

    root = tmp_path / "dataset"
    # the queue where the IO manager keeps it when DANBOORU_STORAGE is an fsspec URL
    write_parquet("memory://label-cli/storage/labeling_queue.parquet", _queue(root))
    monkeypatch.setenv("DANBOORU_STORAGE", "memory://label-cli/storage")
    monkeypatch.setenv("DANBOORU_SETTINGS", str(tmp_path / "settings.yaml"))
    monkeypatch.setattr(LabelingServer, "serve_forever", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    parser = add_label_arguments(argparse.ArgumentParser())
    store = f"sqlite:///{tmp_path / 'url' / 'l.sqlite'}"  # a SQLAlchemy URL for the store, too
    assert run_label(parser.parse_args(["--root", str(root), "--store", store, "--port", "0"])) == 0
    out = capsys.readouterr().out
    assert f"{len(IDS)} images in the queue" in out and f"labels go to {tmp_path / 'url' / 'l.sqlite'}" in out
    assert (tmp_path / "url" / "l.sqlite").exists()
    monkeypatch.setenv("DANBOORU_STORAGE", "memory://label-cli/empty")
    assert run_label(parser.parse_args(["--root", str(root), "--store", store, "--port", "0"])) == 2
    assert "memory://label-cli/empty/labeling_queue.parquet does not exist" in capsys.readouterr().err


def test_label_command_serves_until_interrupted(tmp_path: Path) -> None:
    root = tmp_path / "dataset"
    _queue(root).to_parquet(tmp_path / "queue.parquet")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "danbooru_assets.labels.app", "--queue", str(tmp_path / "queue.parquet"),
         "--root", str(root), "--store", str(tmp_path / "l.sqlite"), "--port", "0", "--labeler", "cli"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        url = lines[1].split()[1]
        assert url.startswith("http://127.0.0.1:")
        assert proc.stderr is not None and not proc.stderr.closed
        req = urllib.request.Request(url + "api/session", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            state = json.loads(resp.read())
        assert state["labeler"] == "cli" and state["total"] == len(IDS) and state["item"]["image_id"] == IDS[0]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
        assert "WARNING" not in proc.stderr.read()  # loopback: nothing to warn about
    finally:
        proc.kill()
        proc.communicate(timeout=20)


CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run")


@contextlib.contextmanager
def _chromium(*extra_args: str):
    """Debian's headless Chromium driven by Playwright; skips where either is missing."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"chromium not installed at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, *extra_args])
        try:
            yield browser
        finally:
            browser.close()


def test_page_in_real_browser(app: LabelingServer) -> None:
    store = app.page.store
    with _chromium() as browser:
        # bypass_csp: the page forbids eval, which Playwright's wait_for_function polling uses
        page = browser.new_page(viewport={"width": 1000, "height": 700}, bypass_csp=True)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(app.url)

        def current() -> str:
            page.wait_for_function("window.labeling && window.labeling.pending === 0 && document.body.dataset.imageId !== undefined")
            return page.evaluate("document.body.dataset.imageId")

        def skeleton_pixels() -> int:
            page.wait_for_function("document.getElementById('img').complete && document.getElementById('img').naturalWidth > 0")
            return page.evaluate("""() => { const c = document.getElementById('overlay');
                if (c.style.display === 'none' || !c.width) return 0;
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n; }""")

        assert current() == "101"
        assert page.text_content("#progress").startswith("0 / 7 labeled")
        assert page.text_content("#pred") == "good"
        assert skeleton_pixels() > 200  # drawn on load
        page.keyboard.press("k")
        assert page.evaluate("document.body.dataset.skeleton") == "off" and skeleton_pixels() == 0
        page.keyboard.press("k")
        assert skeleton_pixels() > 200

        page.keyboard.press("1")
        assert current() == "202"
        page.keyboard.press("3")
        assert current() == "303"
        page.keyboard.press("s")  # skip 303
        assert current() == "404"
        page.keyboard.press("2")
        assert current() == "505"
        page.keyboard.press("z")  # undo the "questionable" on 404: it comes back
        assert current() == "404"
        assert "undid questionable on 404" in page.text_content("#last")
        page.keyboard.press("2")
        page.keyboard.press("1")  # typed fast: queued, labels 505 after 404 is done
        assert current() == "666"
        assert page.text_content("#progress").startswith("4 / 7 labeled · 1 skipped")
        assert errors == []
    latest = store.latest().set_index("image_id")["label"].to_dict()
    assert latest == {101: "good", 202: "bad", 404: "questionable", 505: "good"}
    hist = store.history()
    assert len(hist) == 6 and set(hist.labeler) == {"tester"} and set(hist["round"]) == {2}
    assert hist.source.tolist().count("undo") == 1


# ---- Host / Origin checks (DNS rebinding, cross-site requests) ----------------------------

def test_forged_host_or_origin_is_refused(app: LabelingServer) -> None:
    port = app.port
    store = app.page.store
    own = f"127.0.0.1:{port}"
    status, payload = _raw(app, f"POST /api/session HTTP/1.1\nHost: {own}\nContent-Type: application/json\n"
                                f"Content-Length: 2\nOrigin: http://{own}\n", b"{}")
    assert status == 200, payload
    session = payload["session"]
    label = json.dumps({"session": session, "image_id": 101, "label": "bad"}).encode()

    def post_label(host: str, origin: str | None) -> tuple[int, dict[str, Any]]:
        origin_line = f"Origin: {origin}\n" if origin is not None else ""
        return _raw(app, f"POST /api/label HTTP/1.1\nHost: {host}\nContent-Type: application/json\n"
                         f"Content-Length: {len(label)}\n{origin_line}", label)

    # What a DNS-rebinding page sends: its own name in Host (evil.example resolved to us).
    for host in [f"evil.example:{port}", "evil.example", f"127.0.0.1:{port + 1}", f"localhost.evil.example:{port}",
                 f"127.0.0.1:{port}@evil.example", ""]:
        status, payload = _raw(app, f"GET /images/101 HTTP/1.1\nHost: {host}\n")
        assert status == 403 and "Host" in payload["error"] and "bytes" not in payload, (host, payload)
        status, payload = post_label(host, f"http://{host}")
        assert status == 403 and "Host" in payload["error"], (host, payload)
    status, payload = _raw(app, "GET / HTTP/1.0\n")  # no Host at all
    assert status == 403 and "Host" in payload["error"]
    # The right Host but another site's page (or a sandboxed one: "null") as Origin.
    for origin in [f"http://evil.example:{port}", "null", f"https://{own}", f"http://127.0.0.1:{port + 1}",
                   f"http://{own}/path"]:
        status, payload = post_label(own, origin)
        assert status == 403 and "Origin" in payload["error"], (origin, payload)
        status, payload = _raw(app, f"GET /images/101 HTTP/1.1\nHost: {own}\nOrigin: {origin}\n")
        assert status == 403 and "Origin" in payload["error"], (origin, payload)
    assert store.history().empty
    # The page's own origin, under each loopback name, is served.
    for host in [own, f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}"]:
        status, payload = _raw(app, f"GET /images/101 HTTP/1.1\nHost: {host}\n")
        assert status == 200 and payload["bytes"][:8] == b"\x89PNG\r\n\x1a\n", host
    assert post_label(f"localhost:{port}", f"http://localhost:{port}")[0] == 200
    assert post_label(own, None)[0] == 200  # no Origin at all (curl, scripts): allowed
    assert store.history()["label"].tolist() == ["bad", "bad"]


@pytest.mark.parametrize("value,host,port", [
    ("127.0.0.1:8765", "127.0.0.1", 8765), ("LocalHost:80", "localhost", 80), ("example.org", "example.org", 80),
    ("[::1]:9", "::1", 9), ("[0:0::1]:9", "::1", 9), ("[::1", None, None), ("a:b", None, None),
    (":80", None, None), ("a:-1", None, None), ("a:8080:1", None, None),
])
def test_split_host(value: str, host: str | None, port: int | None) -> None:
    assert split_host(value) == (None if host is None else (host, port))


def test_wildcard_bind_accepts_ip_literals_not_names(tmp_path: Path) -> None:
    root = tmp_path / "dataset"
    server = make_app(LabelStore(tmp_path / "l.sqlite"), root, _queue(root), round=1, labeler="me", host="0.0.0.0")
    try:
        port = server.port
        assert server.accepts_host(f"192.168.1.7:{port}") and server.accepts_host(f"localhost:{port}")
        assert server.accepts_host(f"{socket.gethostname()}:{port}")
        assert server.url == f"http://127.0.0.1:{port}/"  # a URL a browser opens
        assert not server.accepts_host(f"evil.example:{port}") and not server.accepts_host(f"192.168.1.7:{port + 1}")
    finally:
        server.server_close()


def test_ipv6_loopback_bind(tmp_path: Path) -> None:
    root = tmp_path / "dataset"
    try:
        server = make_app(LabelStore(tmp_path / "l.sqlite"), root, _queue(root), round=1, labeler="me", host="::1")
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    server.start()
    try:
        assert server.url == f"http://[::1]:{server.port}/"
        assert _raw(server, f"GET /images/101 HTTP/1.1\nHost: [::1]:{server.port}\n")[0] == 200
        assert _raw(server, f"GET /images/101 HTTP/1.1\nHost: localhost:{server.port}\n")[0] == 200
        assert _raw(server, f"GET /images/101 HTTP/1.1\nHost: evil.example:{server.port}\n")[0] == 403
    finally:
        server.stop()


@pytest.mark.parametrize("length,status,message", [
    # h11 (under uvicorn) refuses a malformed Content-Length before the page sees it
    ("-1", 400, "Invalid HTTP request"), ("-70000", 400, "Invalid HTTP request"),
    ("abc", 400, "Invalid HTTP request"), ("+2", 400, "Invalid HTTP request"),
    ("1e3", 400, "Invalid HTTP request"), ("\u00b2", 400, "Invalid HTTP request"),
    ("99999999", 413, "Content Too Large"),
])
def test_bad_content_length(app: LabelingServer, length: str, status: int, message: str) -> None:
    code, payload = _raw_bytes(app, f"POST /api/session HTTP/1.1\nHost: 127.0.0.1:{app.port}\n"
                                    f"Content-Type: application/json\nContent-Length: {length}\n".encode("latin-1"), b"{}")
    assert code == status and message in payload, payload
    assert not app.page.sessions


def _raw_bytes(server: LabelingServer, head: bytes, body: bytes = b"") -> tuple[int, str]:
    """One request of raw bytes (what no well-behaved client sends); status and body text."""
    head = head.replace(b"\n", b"\r\n") + b"Connection: close\r\n\r\n"
    with socket.create_connection(server.server_address[:2], timeout=30) as sock:
        sock.sendall(head + body)
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    header, _, payload = response.partition(b"\r\n\r\n")
    return int(header.split()[1]), payload.decode("utf-8", "replace")


@pytest.mark.parametrize("request_line,body,status,message", [
    (b"GET /images/\xb2 HTTP/1.1", b"", 400, "Invalid HTTP request"),  # a raw non-ASCII byte in the path
    (b"GET /images/%C2%B2 HTTP/1.1", b"", 400, "image_id must be a non-negative integer"),  # "²"
    (b"GET /thumbs/%D9%A3 HTTP/1.1", b"", 400, "image_id must be"),  # Arabic-Indic 3
    (b"POST /api/label HTTP/1.1", b'{"image_id": "\xc2\xb2", "label": "good", "session": "S"}', 400, "image_id must be"),
    (b"POST /api/label HTTP/1.1", b'{"image_id": "00000000000000000000000101", "label": "good", "session": "S"}',
     400, "image_id must be"),
    (b"POST /api/label HTTP/1.1", b"[" * 60000, 400, "nested too deeply"),
    (b"POST /api/label HTTP/1.1", b'{"session": "S", "image_id": ' + b"[" * 900 + b"]" * 900 + b"}", 400, "image_id"),
    (b"POST /api/label HTTP/1.1", b"{" + b" " * 70000 + b"}", 413, ""),
    (b"POST /api/label HTTP/1.1", b'{"session": "S", "image_id": 101, "label": "\xff"}', 400, "not valid JSON"),
])
def test_every_bad_request_gets_a_status(app: LabelingServer, request_line: bytes, body: bytes, status: int,
                                         message: str) -> None:
    session, _ = _open(app)
    body = body.replace(b'"S"', json.dumps(session).encode())
    head = request_line + b"\nHost: 127.0.0.1:" + str(app.port).encode() + b"\n"
    if body:
        head += b"Content-Type: application/json\nContent-Length: " + str(len(body)).encode() + b"\n"
    code, payload = _raw_bytes(app, head, body)
    assert code == status and message in payload, payload
    assert app.page.store.history().empty
    assert _call(app, f"/api/state?session={session}")[0] == 200  # the server is fine afterwards


def test_a_chunked_body_over_the_limit_is_refused(app: LabelingServer) -> None:
    big = b"{" + b" " * 70000 + b"}"
    head = (b"POST /api/session HTTP/1.1\nHost: 127.0.0.1:" + str(app.port).encode() +
            b"\nContent-Type: application/json\nTransfer-Encoding: chunked\n")
    code, _ = _raw_bytes(app, head, b"%x\r\n" % len(big) + big + b"\r\n0\r\n\r\n")
    assert code == 413 and not app.page.sessions


def test_an_unavailable_store_answers_503_and_the_label_goes_through_later(app: LabelingServer,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlalchemy as sa

    store = app.page.store
    session, state = _open(app)
    real_add = store.add

    def down(*args: Any, **kwargs: Any) -> int:
        raise sa.exc.OperationalError("INSERT INTO labels …", {}, ConnectionRefusedError("server closed the connection"))

    monkeypatch.setattr(store, "add", down)
    req = urllib.request.Request(app.url + "api/label", method="POST", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"session": session, "image_id": 101, "label": "good"}).encode())
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 503 and err.value.headers["Retry-After"] == "5"
    payload = json.loads(err.value.read())
    assert "label store is unavailable" in payload["error"] and "nothing was saved" in payload["error"]
    assert "INSERT" not in payload["error"]  # no SQL (or a URL with its password) in the answer
    assert store.history().empty
    monkeypatch.setattr(store, "add", real_add)
    status, state = _call(app, "/api/label", {"image_id": 101, "label": "good"}, session=session)
    assert status == 200 and state["item"]["image_id"] == 202 and state["throughput"]["session_labels"] == 1
    assert store.label_of(101) == "good"


def test_200_concurrent_labelers_no_resets_every_acknowledged_label_stored(tmp_path: Path) -> None:
    """A burst of 200 labelers at once on 127.0.0.1 (the stdlib server's listen backlog of 5
    reset 75 of them): every connection is answered, and every label answered 200 is stored."""
    import http.client

    n_labelers, per_labeler = 200, 3
    # enough images that no tab runs out while the others hold one each
    ids = list(range(10_000, 10_000 + n_labelers * (per_labeler + 1) + 50))
    queue = pd.DataFrame({"image_id": ids, "rel_path": [f"original/{i % 1000:04d}/{i}.png" for i in ids],
                          "queue_rank": range(len(ids))})
    store = LabelStore(tmp_path / "labels.sqlite")
    server = make_app(store, tmp_path, queue, round=1, labeler="crowd").start()
    barrier = threading.Barrier(n_labelers)
    acked: list[tuple[int, str]] = []
    failures: list[str] = []
    statuses: list[int] = []
    lock = threading.Lock()

    def labeler(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
        try:
            barrier.wait(timeout=120)
            conn.request("POST", "/api/session", body=b"{}", headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            state = json.loads(resp.read())
            with lock:
                statuses.append(resp.status)
            for j in range(per_labeler):
                if state.get("item") is None:
                    break
                label = ("good", "questionable", "bad")[(k + j) % 3]
                image_id = state["item"]["image_id"]
                body = json.dumps({"session": state["session"], "image_id": image_id, "label": label}).encode()
                conn.request("POST", "/api/label", body=body, headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                payload = json.loads(resp.read())
                with lock:
                    statuses.append(resp.status)
                    if resp.status == 200:
                        acked.append((image_id, label))
                if resp.status != 200:
                    break
                state = payload
        except (ConnectionError, http.client.HTTPException, OSError) as exc:  # resets, RemoteDisconnected
            with lock:
                failures.append(f"labeler {k}: {type(exc).__name__}: {exc}")
        finally:
            conn.close()

    threads = [threading.Thread(target=labeler, args=(k,)) for k in range(n_labelers)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
    finally:
        server.stop()
    assert failures == [], failures[:5]
    assert len(statuses) == n_labelers * (1 + per_labeler) and set(statuses) == {200}
    latest = store.latest().set_index("image_id")["label"].to_dict()
    assert len(acked) == n_labelers * per_labeler and latest == dict(acked)
    assert store.history()["labeler"].eq("crowd").all()


def test_bind_beyond_loopback_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "dataset"
    _queue(root).to_parquet(tmp_path / "queue.parquet")
    served: list[LabelingServer] = []

    def serve_once(server: LabelingServer) -> None:
        served.append(server)
        raise KeyboardInterrupt

    monkeypatch.setattr(LabelingServer, "serve_forever", serve_once)
    parser = add_label_arguments(argparse.ArgumentParser())
    common = ["--queue", str(tmp_path / "queue.parquet"), "--root", str(root), "--store", str(tmp_path / "l.sqlite"),
              "--port", "0", "--labeler", "owner"]
    assert run_label(parser.parse_args(common)) == 0
    assert "WARNING" not in capsys.readouterr().err
    # beyond loopback without labelers and their tokens: refused
    assert run_label(parser.parse_args([*common, "--host", "0.0.0.0"])) == 2
    assert "needs --labelers FILE" in capsys.readouterr().err and len(served) == 1
    labelers = tmp_path / "labelers.txt"
    labelers.write_text("ann  tok-ann-0123456789abcdef\nbob tok-bob-0123456789abcdef\n")
    labelers.chmod(0o600)
    common.remove("--labeler"), common.remove("owner")
    assert run_label(parser.parse_args([*common, "--host", "0.0.0.0", "--labelers", str(labelers)])) == 0
    err = capsys.readouterr().err
    assert "WARNING" in err and "EVERY network interface" in err and "127.0.0.1" in err and "token" in err
    assert served[-1].page.labelers is not None and len(served[-1].page.labelers) == 2


def test_labeler_is_the_servers_not_the_requests(app: LabelingServer) -> None:
    session, _ = _open(app)
    status, _ = _call(app, "/api/label", {"image_id": 101, "label": "good", "labeler": "mallory"}, session=session)
    assert status == 200
    assert app.page.store.history()["labeler"].tolist() == ["tester"]


# ---- tabs: one session per page load --------------------------------------------------------

def test_two_tabs_get_different_images_and_undo_their_own(app: LabelingServer) -> None:
    store = app.page.store
    tab1, state1 = _open(app)
    tab2, state2 = _open(app)
    assert tab1 != tab2
    assert state1["item"]["image_id"] == 101 and state2["item"]["image_id"] == 202
    status, state1 = _call(app, "/api/label", {"image_id": 101, "label": "good"}, session=tab1)
    assert status == 200 and state1["item"]["image_id"] == 303  # 202 is on tab 2's screen
    status, state2 = _call(app, "/api/label", {"image_id": 202, "label": "bad"}, session=tab2)
    assert status == 200 and state2["item"]["image_id"] == 404
    # undo in tab 1 retracts tab 1's last label, not tab 2's newer one
    status, state1 = _call(app, "/api/undo", {}, session=tab1)
    assert status == 200 and state1["retracted"]["image_id"] == 101 and state1["item"]["image_id"] == 101
    assert store.latest().set_index("image_id")["label"].to_dict() == {202: "bad"}
    status, payload = _call(app, "/api/undo", {}, session=tab1)
    assert status == 409 and "nothing to undo in this tab" in payload["error"]
    # skips are per tab too
    status, state2 = _call(app, "/api/skip", {"image_id": 404}, session=tab2)
    assert state2["skipped"] == 1 and _call(app, f"/api/state?session={tab1}")[1]["skipped"] == 0


def test_label_on_an_image_changed_since_the_tab_saw_it_is_a_conflict(app: LabelingServer) -> None:
    store = app.page.store
    tab1, state1 = _open(app)
    tab2, _ = _open(app)
    assert state1["item"]["image_id"] == 101
    assert _call(app, "/api/label", {"image_id": 101, "label": "bad"}, session=tab2)[0] == 200
    status, payload = _call(app, "/api/label", {"image_id": 101, "label": "good"}, session=tab1)
    assert status == 409
    conflict = payload["conflict"]
    assert conflict["image_id"] == 101 and conflict["label"] == "bad" and conflict["yours"] == "good"
    assert conflict["labeler"] == "tester" and conflict["where"] == "in another tab of this page"
    assert "'bad'" in payload["error"] and "another tab" in payload["error"]
    assert store.label_of(101) == "bad" and len(store.history()) == 1
    # another labeler (another process on the same store) counts too
    tab3, state3 = _open(app)
    shown = state3["item"]["image_id"]
    store.add(shown, "questionable", "bob", 2)
    status, payload = _call(app, "/api/label", {"image_id": shown, "label": "good"}, session=tab3)
    assert status == 409 and payload["conflict"]["labeler"] == "bob" and "bob" in payload["error"]
    # a confirmed overwrite replaces the label and keeps both rows in the history
    status, _ = _call(app, "/api/label", {"image_id": 101, "label": "good", "overwrite": True}, session=tab1)
    assert status == 200 and store.label_of(101) == "good"
    assert store.history(101)["label"].tolist() == ["bad", "good"]
    # a tab's own earlier label is no conflict
    assert _call(app, "/api/label", {"image_id": 101, "label": "questionable"}, session=tab1)[0] == 200


def test_simultaneous_labels_of_one_id_one_wins_others_conflict(app: LabelingServer) -> None:
    tabs = [_open(app)[0] for _ in range(3)]
    barrier = threading.Barrier(len(tabs))
    results: dict[str, tuple[int, Any]] = {}

    def send(tab: str, label: str) -> None:
        barrier.wait(timeout=10)
        results[tab] = _call(app, "/api/label", {"image_id": 303, "label": label}, session=tab)

    threads = [threading.Thread(target=send, args=(tab, label)) for tab, label in zip(tabs, ["good", "bad", "questionable"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    codes = sorted(code for code, _ in results.values())
    assert codes == [200, 409, 409]
    winner = next(tab for tab, (code, _) in results.items() if code == 200)
    hist = app.page.store.history(303)
    assert len(hist) == 1
    for tab, (code, payload) in results.items():
        if code == 409:
            assert payload["conflict"]["label"] == hist["label"].iloc[0]
    assert winner in tabs


def test_two_tabs_and_a_rebinding_page_in_real_browser(app: LabelingServer) -> None:
    store = app.page.store
    # what a DNS-rebinding attack achieves: the attacker's name resolves to this machine
    with _chromium("--host-resolver-rules=MAP evil.example 127.0.0.1") as browser:
        context = browser.new_context(viewport={"width": 1000, "height": 700}, bypass_csp=True)
        errors: list[str] = []
        tab1, tab2 = context.new_page(), context.new_page()
        for tab in (tab1, tab2):
            tab.on("pageerror", lambda exc: errors.append(str(exc)))

        def current(tab: Any) -> str:
            tab.wait_for_function("window.labeling && window.labeling.session && window.labeling.pending === 0")
            return tab.evaluate("document.body.dataset.imageId")

        tab1.goto(app.url)
        assert current(tab1) == "101"
        tab2.goto(app.url)
        assert current(tab2) == "202"  # not the image tab 1 shows

        store.add(101, "bad", "bob", 2)  # another labeler, after tab 1 was shown 101
        tab1.keyboard.press("1")
        assert current(tab1) == "101"  # not saved, still on screen
        assert tab1.is_visible("#conflict") and "bob" in tab1.text_content("#conflict-text")
        assert "was not saved" in tab1.text_content("#msg")
        assert store.label_of(101) == "bad"
        tab1.keyboard.press("o")  # confirm: overwrite bob's label
        assert current(tab1) == "303" and not tab1.is_visible("#conflict")
        assert "overwrote 101 good" in tab1.text_content("#last")

        tab2.keyboard.press("3")  # tab 2 labels 202
        assert current(tab2) == "404"
        tab1.keyboard.press("z")  # undoes tab 1's overwrite only
        assert current(tab1) == "303"  # 101 is bob's again, so nothing comes back
        assert "undid good on 101" in tab1.text_content("#last")
        assert store.label_of(101) == "bad" and store.label_of(202) == "bad"

        # the rebinding page: same server, but addressed by the attacker's name
        evil = context.new_page()
        response = evil.goto(f"http://evil.example:{app.port}/")
        assert response is not None and response.status == 403
        assert "evil.example" in evil.text_content("body")
        assert errors == []
    hist = store.history(101)
    assert hist["label"].tolist() == ["bad", "good", "bad"] and hist["labeler"].tolist() == ["bob", "tester", "tester"]
    assert len(store.history()) == 4


def test_least_recently_used_tab_is_forgotten_beyond_the_limit(app: LabelingServer,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("danbooru_assets.labels.app.MAX_SESSIONS", 2)
    first, _ = _open(app)
    second, _ = _open(app)
    assert _call(app, f"/api/state?session={first}")[0] == 200  # first is now the more recently used
    _open(app)
    assert _call(app, f"/api/state?session={first}")[0] == 200
    status, payload = _call(app, f"/api/state?session={second}")
    assert status == 404 and "reload the page" in payload["error"]


def test_the_page_is_assembled_from_its_package_files():
    import importlib.resources

    files = importlib.resources.files("danbooru_assets.labels")
    html = page_html()
    for name in ("page.css", "page.js"):
        part = files.joinpath(name).read_text(encoding="utf-8")
        assert len(part) > 500 and html.count(part) == 1  # inlined once, whole
        assert f"/* {name} */" not in html  # no marker left behind
    assert html.startswith("<!doctype html>") and html.rstrip().endswith("</html>")



# ---- grid mode --------------------------------------------------------------------------------

GRID_IDS = list(range(1001, 1011))  # 10 images; predictions cycle good / bad / questionable
GRID_PRED = {i: ("good", "bad", "questionable")[k % 3] for k, i in enumerate(GRID_IDS)}


def _grid_queue(root: Path) -> pd.DataFrame:
    rows = []
    for rank, image_id in enumerate(GRID_IDS):
        rel = f"original/{image_id % 1000:04d}/{image_id}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (400, 600), (20 * rank, 120, 200 - 10 * rank)).save(root / rel)
        pred = GRID_PRED[image_id]
        row: dict[str, Any] = {"image_id": image_id, "rel_path": rel, "queue_rank": rank, "predicted_class": pred,
                               "width": 400, "height": 600,
                               **{f"p_{c}": (0.6 if c == pred else 0.2) for c in ("good", "questionable", "bad")}}
        for i in range(len(KEYPOINT_COLUMNS) // 3):  # a vertical line of joints down the middle
            row.update({KEYPOINT_COLUMNS[3 * i]: 200.0, KEYPOINT_COLUMNS[3 * i + 1]: 60.0 + 28 * i,
                        KEYPOINT_COLUMNS[3 * i + 2]: 0.9})
        rows.append(row)
    return pd.DataFrame(rows)


@pytest.fixture()
def grid_app(tmp_path: Path) -> Iterator[LabelingServer]:
    root = tmp_path / "dataset"
    store = LabelStore(tmp_path / "labels.sqlite")
    server = make_app(store, root, _grid_queue(root), round=1, labeler="tester", page_size=6).start()
    try:
        yield server
    finally:
        server.stop()


def test_grid_page_is_grouped_by_prediction_and_confirms_every_tile(grid_app: LabelingServer) -> None:
    store = grid_app.page.store
    session, _ = _open(grid_app)
    status, page = _call(grid_app, "/api/grid/page", {}, session=session)
    tiles = page["tiles"]
    assert status == 200 and len(tiles) == 6 and page["page"] == 1
    assert {t["image_id"] for t in tiles} == set(GRID_IDS[:6])  # queue order picks the page
    assert [t["predicted_class"] for t in tiles] == ["good", "good", "questionable", "questionable", "bad", "bad"]
    # the same page while it is open; a second tab gets other images
    assert [t["image_id"] for t in _call(grid_app, "/api/grid/page", {}, session=session)[1]["tiles"]] == \
        [t["image_id"] for t in tiles]
    other, _ = _open(grid_app)
    assert {t["image_id"] for t in _call(grid_app, "/api/grid/page", {}, session=other)[1]["tiles"]} == set(GRID_IDS[6:])
    status, thumb = _call(grid_app, f"/thumbs/{tiles[0]['image_id']}")
    assert status == 200 and thumb[:2] == b"\xff\xd8" and max(Image.open(__import__("io").BytesIO(thumb)).size) <= 256
    labels = {str(t["image_id"]): t["predicted_class"] for t in tiles}
    labels[str(tiles[0]["image_id"])] = "bad"  # one flip
    status, nxt = _call(grid_app, "/api/grid/confirm", {"page": 1, "labels": labels}, session=session)
    assert status == 200 and nxt["confirmed"] == 6 and nxt["labeled"] == 6
    hist = store.history()
    assert len(hist) == 6 and set(hist["mode"]) == {"grid"} and set(hist["session"]) == {session}
    assert hist["seconds_spent"].notna().all() and hist["seconds_spent"].nunique() == 1  # the page's time, shared
    assert store.label_of(tiles[0]["image_id"]) == "bad" and store.label_of(tiles[1]["image_id"]) == "good"
    assert nxt["throughput"]["session_labels"] == 6
    tput = store.throughput()
    assert tput["labels"].tolist() == [6] and tput["mode"].tolist() == ["grid"]
    # page undo: all six retracted in one step, the page comes back with what was sent
    status, back = _call(grid_app, "/api/undo", {"mode": "grid"}, session=session)
    assert status == 200 and sorted(back["retracted"]["images"]) == sorted(GRID_IDS[:6])
    assert store.latest().empty
    assert {t["image_id"]: t["preset"] for t in back["tiles"]} == {int(k): v for k, v in labels.items()}
    status, _ = _call(grid_app, "/api/grid/confirm", {"page": back["page"], "labels": labels}, session=session)
    assert status == 200 and len(store.latest()) == 6
    # tile undo: only that image
    status, one = _call(grid_app, "/api/undo", {"mode": "grid", "image_id": tiles[3]["image_id"]}, session=session)
    assert status == 200 and one["retracted"]["images"] == [tiles[3]["image_id"]]
    assert len(store.latest()) == 5 and store.label_of(tiles[3]["image_id"]) is None
    assert one["tiles"][0]["image_id"] == tiles[3]["image_id"]  # the undone tile comes first


@pytest.mark.parametrize("body,status,message", [
    ({"page": 7, "labels": {"1001": "good"}}, 409, "not the page this tab shows"),
    ({"page": 1, "labels": {}}, 400, "non-empty object"),
    ({"page": 1, "labels": [1001]}, 400, "non-empty object"),
    ({"page": 1, "labels": {"1009": "good"}}, 400, "not on this tab's page"),
    ({"page": 1, "labels": {"99": "good"}}, 404, "unknown image id"),
    ({"page": 1, "labels": {"x1": "good"}}, 400, "image_id must be"),
    ({"page": 1, "labels": {"1001": "great"}}, 400, "unknown class"),
    ({"page": 1, "labels": {"1001": "good"}, "overwrite": 1}, 400, "overwrite must be"),
    ({"page": True, "labels": {"1001": "good"}}, 409, "not the page"),
])
def test_grid_confirm_refuses_bad_input(grid_app: LabelingServer, body: dict, status: int, message: str) -> None:
    session, _ = _open(grid_app)
    assert _call(grid_app, "/api/grid/page", {}, session=session)[0] == 200
    code, payload = _call(grid_app, "/api/grid/confirm", body, session=session)
    assert code == status and message in payload["error"], payload
    assert grid_app.page.store.history().empty


def test_grid_confirm_reports_conflicts_per_tile_and_stores_the_rest(grid_app: LabelingServer) -> None:
    store = grid_app.page.store
    session, _ = _open(grid_app)
    tiles = _call(grid_app, "/api/grid/page", {}, session=session)[1]["tiles"]
    a, b = tiles[0]["image_id"], tiles[4]["image_id"]
    store.add(a, "questionable", "bob", 1)  # another labeler, after the page was shown
    store.add(b, "good", "carol", 1)
    labels = {str(t["image_id"]): "bad" for t in tiles}
    status, payload = _call(grid_app, "/api/grid/confirm", {"page": 1, "labels": labels}, session=session)
    assert status == 409 and "2 of 6 tiles" in payload["error"]
    assert {c["image_id"]: (c["label"], c["labeler"], c["yours"]) for c in payload["conflicts"]} == {
        a: ("questionable", "bob", "bad"), b: ("good", "carol", "bad")}
    assert sorted(payload["written"]) == sorted(set(int(k) for k in labels) - {a, b})
    assert store.label_of(a) == "questionable" and store.label_of(tiles[1]["image_id"]) == "bad"
    # overwrite the two deliberately: both labels stay in the history (agreement sees them)
    status, _ = _call(grid_app, "/api/grid/confirm", {"page": 1, "labels": {str(a): "bad", str(b): "bad"},
                                                      "overwrite": True}, session=session)
    assert status == 200 and store.label_of(a) == "bad"
    assert store.history(a)["labeler"].tolist() == ["bob", "tester"]


def test_rechecks_reshow_labeled_images_blind(tmp_path: Path) -> None:
    root = tmp_path / "dataset"
    store = LabelStore(tmp_path / "labels.sqlite")
    server = make_app(store, root, _grid_queue(root), round=1, labeler="tester", page_size=4,
                      recheck_fraction=0.5, seed=3).start()
    try:
        session, _ = _open(server)
        page = _call(server, "/api/grid/page", {}, session=session)[1]
        assert page["tiles"] and store.history().empty  # nothing labeled yet: nothing to re-show
        seen_rechecks = 0
        for _ in range(6):
            if page["done"]:
                break
            on_page = [t["image_id"] for t in page["tiles"]]
            previously = {i: store.label_of(i) for i in on_page}
            labels = {str(i): "good" for i in on_page}
            status, page = _call(server, "/api/grid/confirm", {"page": page["page"], "labels": labels}, session=session)
            assert status == 200, page
            seen_rechecks += sum(1 for v in previously.values() if v is not None)
        hist = store.history()
        assert seen_rechecks > 0 and (hist["source"] == "recheck").sum() == seen_rechecks
        assert all(t["preset"] is None for t in page["tiles"])  # never shows the earlier label
    finally:
        server.stop()


def test_grid_page_in_real_browser(grid_app: LabelingServer) -> None:
    """A labeler's key presses on a full grid page: move, flip, click, confirm, set all, undo."""
    store = grid_app.page.store
    with _chromium() as browser:
        page = browser.new_page(viewport={"width": 1200, "height": 800}, bypass_csp=True)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(grid_app.url + "?mode=grid")

        def tiles(page_no: int) -> list[str]:
            page.wait_for_function(f"window.labeling && window.labeling.pending === 0 && "
                                   f"document.body.dataset.page === '{page_no}'")
            return page.evaluate("document.body.dataset.tiles").split(",")

        def skeleton_pixels(index: int) -> int:
            page.wait_for_function(f"document.querySelectorAll('.tile img')[{index}].naturalWidth > 0")
            return page.evaluate(f"""() => {{ const c = document.querySelectorAll('.tile canvas')[{index}];
                if (c.style.display === 'none' || !c.width) return 0;
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n; }}""")

        # grouped by prediction: good 1001 1004 · questionable 1003 1006 · bad 1002 1005
        assert tiles(1) == ["1001", "1004", "1003", "1006", "1002", "1005"]
        assert page.evaluate("document.body.dataset.mode") == "grid"
        assert page.locator(".tile").count() == 6
        assert skeleton_pixels(0) > 50
        page.keyboard.press("t")
        assert skeleton_pixels(0) == 0
        page.keyboard.press("t")
        assert skeleton_pixels(0) > 50
        page.keyboard.press("l")            # focus 1004
        page.keyboard.press("3")            # → bad
        page.keyboard.press("ArrowRight")
        page.keyboard.press("ArrowRight")   # focus 1006
        page.keyboard.press("1")            # → good
        page.locator(".tile").nth(5).click()  # 1005: bad → good (a click cycles)
        assert page.locator(".tile.flipped").count() == 3
        page.keyboard.press("Enter")
        assert tiles(2) == ["1007", "1010", "1009", "1008"]
        assert store.latest().set_index("image_id")["label"].to_dict() == {
            1001: "good", 1004: "bad", 1003: "questionable", 1006: "good", 1002: "bad", 1005: "good"}
        assert "6 labels" in page.text_content("#rate")
        page.keyboard.press("Shift+Digit3")  # the whole page → bad
        page.keyboard.press("p")             # back to the predictions
        page.keyboard.press("j")             # down a row (or stay: one row) then set
        page.keyboard.press("Enter")
        page.wait_for_function("window.labeling.pending === 0 && document.getElementById('grid-done').style.display === 'block'")
        assert len(store.latest()) == 10
        page.keyboard.press("z")             # undo the last page: it comes back as it was sent
        assert tiles(3) == ["1007", "1010", "1009", "1008"]
        assert len(store.latest()) == 6
        assert page.evaluate("[...document.querySelectorAll('.tile')].map(t => t.dataset.label)") == [
            "good", "good", "questionable", "bad"]
        page.keyboard.press("Enter")
        page.wait_for_function("window.labeling.pending === 0 && document.getElementById('grid-done').style.display === 'block'")
        assert errors == []
    latest = store.latest().set_index("image_id")["label"].to_dict()
    assert latest == {1001: "good", 1004: "bad", 1003: "questionable", 1006: "good", 1002: "bad", 1005: "good",
                      1007: "good", 1010: "good", 1009: "questionable", 1008: "bad"}
    hist = store.history()
    # 6 + 4 labels, 4 undo rows, 4 labels again: every tile its own row, one session, grid mode
    assert len(hist) == 18 and hist.source.tolist().count("undo") == 4
    assert set(hist["mode"]) == {"grid"} and hist["session"].nunique() == 1
    assert hist.loc[hist.source == "page", "seconds_spent"].notna().all()
