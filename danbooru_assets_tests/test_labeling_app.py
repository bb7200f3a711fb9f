"""The labeling page: JSON API validation, path safety, the CLI entry, and a real browser run."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from danbooru_assets.coco import KEYPOINT_COLUMNS
from danbooru_assets.labels.app import LabelingServer, add_label_arguments, make_app, run_label
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
          ctype: str = "application/json") -> tuple[int, Any]:
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


def test_api_labels_skips_undoes(app: LabelingServer) -> None:
    store = app.session.store
    status, state = _call(app, "/api/state")
    assert status == 200 and state["item"]["image_id"] == 101 and state["total"] == 7 and state["round"] == 2
    assert state["item"]["keypoints"] is not None and len(state["item"]["keypoints"]) == 17
    status, state = _call(app, "/api/label", {"image_id": 101, "label": "good"})
    assert status == 200 and state["item"]["image_id"] == 202 and state["labeled"] == 1
    status, state = _call(app, "/api/skip", {"image_id": 202})
    assert state["item"]["image_id"] == 303 and state["skipped"] == 1
    status, state = _call(app, "/api/undo", {})
    assert status == 200 and state["retracted"]["image_id"] == 101 and state["item"]["image_id"] == 101
    assert store.latest().empty and store.history()["round"].tolist() == [2, 2]
    assert _call(app, "/api/undo", {})[0] == 409  # nothing left to undo
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
    ("/api/nope", {}, 404, "no such action"),
])
def test_api_refuses_bad_input(app: LabelingServer, path: str, body: Any, status: int, message: str) -> None:
    code, payload = _call(app, path, body)
    assert code == status and message in payload["error"]
    assert app.session.store.history().empty


def test_api_refuses_non_json_and_escaping_paths(app: LabelingServer) -> None:
    assert _call(app, "/api/label", raw=b"{not json", ctype="application/json")[0] == 400
    # a form post (what a foreign web page can send without a preflight) is refused
    assert _call(app, "/api/label", raw=b"image_id=101&label=good", ctype="application/x-www-form-urlencoded")[0] == 415
    for path, code in [("/images/666", 403), ("/images/777", 403), ("/images/..%2F..%2Fetc%2Fpasswd", 400),
                       ("/images/../../secret.png", 400), ("/images/12345", 404), ("/etc/passwd", 404)]:
        status, payload = _call(app, path)
        assert status == code, (path, payload)
        assert "error" in payload
    assert app.session.store.history().empty


def test_run_label_validates_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = add_label_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--queue", str(tmp_path / "missing.parquet"), "--root", str(tmp_path)])
    assert args.host == "127.0.0.1"
    assert run_label(args) == 2
    assert "labeling_queue" in capsys.readouterr().err


def test_label_command_serves_until_interrupted(tmp_path: Path) -> None:
    root = tmp_path / "dataset"
    _queue(root).to_parquet(tmp_path / "queue.parquet")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "danbooru_assets.labels.app", "--queue", str(tmp_path / "queue.parquet"),
         "--root", str(root), "--store", str(tmp_path / "l.sqlite"), "--port", "0", "--labeler", "cli"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        url = lines[1].split()[1]
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url + "api/state", timeout=10) as resp:
            state = json.loads(resp.read())
        assert state["labeler"] == "cli" and state["total"] == len(IDS) and state["item"]["image_id"] == IDS[0]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()
        proc.communicate(timeout=20)


def _browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"chromium not installed at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")
    return sync_api


def test_page_in_real_browser(app: LabelingServer) -> None:
    sync_api = _browser()
    store = app.session.store
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
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
        finally:
            browser.close()
    latest = store.latest().set_index("image_id")["label"].to_dict()
    assert latest == {101: "good", 202: "bad", 404: "questionable", 505: "good"}
    hist = store.history()
    assert len(hist) == 6 and set(hist.labeler) == {"tester"} and set(hist["round"]) == {2}
    assert hist.source.tolist().count("undo") == 1
