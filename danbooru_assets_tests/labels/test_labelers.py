"""Several labelers on one page: named by the server from their tokens (``--labelers``),
never by a request; a shared page answers nothing without a token."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from danbooru_assets.labels.agreement import agreement_report
from danbooru_assets.labels.app import LabelingServer, make_app
from danbooru_assets.labels.labelers import LabelersFileError, load_labelers, parse_labelers
from danbooru_assets.labels.store import LabelStore
from danbooru_assets_tests.labels.test_app import _chromium, _queue

ALICE, BOB = "alice-token-0123456789", "bob-token-9876543210ab"


@pytest.mark.parametrize("text,message", [
    ("alice short\n", ":1: the token of 'alice' must be at least 16"),
    ("alice\n", ":1: expected 'NAME TOKEN'"),
    (f"alice {ALICE}\nbob {ALICE}\n", ":2: 'bob' has the same token as 'alice'"),
    (f"alice {ALICE}\nalice {BOB}\n", ":2: labeler 'alice' is already on line 1"),
    ("# nobody\n\n", "no labelers"),
])
def test_a_bad_labelers_file_names_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "labelers.txt"
    path.write_text(text)
    with pytest.raises(LabelersFileError, match=None) as err:
        load_labelers(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_names_may_hold_spaces_and_comments_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "labelers.txt"
    path.write_text(f"# team\nAnn Lee  {ALICE}   # lead\n\nbob {BOB}\n")
    path.chmod(0o644)
    labelers, warning = load_labelers(path)
    assert labelers.name_for(ALICE) == "Ann Lee" and labelers.name_for(BOB) == "bob"
    assert labelers.name_for("nope") is None and labelers.name_for(None) is None and labelers.name_for(ALICE[:-1]) is None
    assert warning is not None and "chmod 600" in warning
    path.chmod(0o600)
    assert load_labelers(path)[1] is None


@pytest.fixture()
def shared(tmp_path: Path) -> Iterator[LabelingServer]:
    root = tmp_path / "dataset"
    labelers = parse_labelers(f"alice {ALICE}\nbob {BOB}\n", "labelers.txt")
    server = make_app(LabelStore(tmp_path / "l.sqlite"), root, _queue(root), round=1, labeler="server-user",
                      labelers=labelers).start()
    try:
        yield server
    finally:
        server.stop()


def _req(server: LabelingServer, path: str, body: Any = None, token: str | None = None,
         cookie: str | None = None) -> tuple[int, Any, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(server.url.rstrip("/") + path, data=data, method="POST" if data is not None else "GET")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if cookie:
        req.add_header("Cookie", cookie)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
            ctype = resp.headers["Content-Type"]
            return resp.status, json.loads(raw) if ctype == "application/json" else raw, resp.headers
    except urllib.error.HTTPError as err:
        raw = err.read()
        return err.code, json.loads(raw) if err.headers["Content-Type"] == "application/json" else raw, err.headers


def test_a_shared_page_answers_only_with_a_token_and_names_labels_by_it(shared: LabelingServer) -> None:
    store = shared.page.store
    for path, body in [("/api/config", None), ("/api/session", {}), ("/images/101", None), ("/thumbs/101", None)]:
        status, payload, _ = _req(shared, path, body)
        assert status == 401 and "labeler token" in payload["error"], path
        assert _req(shared, path, body, token="wrong-token-0123456789")[0] == 401
    status, html, _ = _req(shared, "/")
    assert status == 401 and b"token" in html and b"<script" not in html
    status, html, headers = _req(shared, f"/?token={ALICE}")
    assert status == 200 and b"<script" in html
    cookie = headers["Set-Cookie"]
    assert ALICE in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    # the cookie alone works afterwards (what the page's fetches and <img> loads send)
    status, state, _ = _req(shared, "/api/session", {}, cookie=f"danbooru_label_token={ALICE}")
    assert status == 200 and state["labeler"] == "alice"
    status, bob, _ = _req(shared, "/api/session", {}, token=BOB)
    assert bob["labeler"] == "bob" and bob["item"]["image_id"] != state["item"]["image_id"]
    # a name in the request is ignored; a session is its labeler's only
    assert _req(shared, "/api/label", {"session": state["session"], "image_id": state["item"]["image_id"],
                                       "label": "good", "labeler": "bob"}, token=ALICE)[0] == 200
    status, payload, _ = _req(shared, "/api/label", {"session": state["session"], "image_id": 303, "label": "bad"},
                              token=BOB)
    assert status == 403 and "another labeler" in payload["error"]
    assert _req(shared, "/api/label", {"session": bob["session"], "image_id": bob["item"]["image_id"],
                                       "label": "bad"}, token=BOB)[0] == 200
    hist = store.history()
    assert hist["labeler"].tolist() == ["alice", "bob"]
    assert "server-user" not in set(hist["labeler"])


def test_two_labelers_in_real_browsers_are_named_by_their_tokens(shared: LabelingServer) -> None:
    store = shared.page.store
    with _chromium() as browser:
        pages = {}
        for name, token in [("alice", ALICE), ("bob", BOB)]:
            context = browser.new_context(viewport={"width": 1000, "height": 700}, bypass_csp=True)
            page = context.new_page()
            page.goto(shared.url + f"?token={token}")
            page.wait_for_function("window.labeling && window.labeling.session && window.labeling.pending === 0")
            assert "token" not in page.url  # out of the address bar (and the history)
            assert page.text_content("#title").endswith("· " + name)
            page.wait_for_function("document.getElementById('img').naturalWidth > 0")  # images load with the cookie
            pages[name] = page
        labeled: dict[int, str] = {}
        for name, keys in [("alice", "12"), ("bob", "3"), ("alice", "1"), ("bob", "2")]:
            page = pages[name]
            for key in keys:
                shown = page.evaluate("document.body.dataset.imageId")
                labeled[int(shown)] = name
                page.keyboard.press(key)
                page.wait_for_function(f"window.labeling.pending === 0 && document.body.dataset.imageId !== '{shown}'")
    hist = store.history()
    assert hist.set_index("image_id")["labeler"].to_dict() == labeled
    assert sorted(set(labeled.values())) == ["alice", "bob"]
    by_labeler = agreement_report(hist)["by_labeler"]
    assert by_labeler["alice"]["labels"] == 3 and by_labeler["bob"]["labels"] == 2
