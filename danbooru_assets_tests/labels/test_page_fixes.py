"""The labeling page's traps for a team (issue 23), each clicked through in a real browser:
round-1 tiles start unset, page undo brings back exactly that page, the tab counter goes
down on undo, "queue done" vs "held by another tab" with release on close / idle, and a
label the store could not save is shown as not saved and sent again."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import pytest
from PIL import Image

from danbooru_assets.labels.app import LabelingServer, make_app
from danbooru_assets.labels.store import LabelStore
from danbooru_assets_tests.labels.test_app import IDS, _call, _chromium, _open, _queue

# Screenshots for a person to look at, only where asked: LABEL_SCREENSHOTS=folder.
SCREENSHOTS = os.environ.get("LABEL_SCREENSHOTS")


def _images(root: Path, ids: list[int]) -> list[str]:
    rels = []
    for k, image_id in enumerate(ids):
        rel = f"original/{image_id % 1000:04d}/{image_id}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (300, 400), (30 * (k % 8), 140, 220 - 20 * (k % 8))).save(root / rel)
        rels.append(rel)
    return rels


def _wait(page: Any, expression: str = "true") -> None:
    page.wait_for_function(f"window.labeling && window.labeling.session && window.labeling.pending === 0 && ({expression})")


def _shot(page: Any, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / f"{name}.png"))


@pytest.fixture()
def round1(tmp_path: Path) -> Iterator[LabelingServer]:
    """12 images: the first 6 without a prediction (round 1), the last 6 predicted."""
    root = tmp_path / "dataset"
    ids = list(range(2001, 2013))
    rows = []
    for k, (image_id, rel) in enumerate(zip(ids, _images(root, ids))):
        row: dict[str, Any] = {"image_id": image_id, "rel_path": rel, "queue_rank": k}
        if k >= 6:
            pred = ("good", "bad")[k % 2]
            row.update(predicted_class=pred, **{f"p_{c}": (0.7 if c == pred else 0.15)
                                                for c in ("good", "questionable", "bad")})
        rows.append(row)
    server = make_app(LabelStore(tmp_path / "labels.sqlite"), root, pd.DataFrame(rows), round=1, labeler="ann",
                      page_size=6).start()
    try:
        yield server
    finally:
        server.stop()


def test_round1_tiles_start_unset_and_enter_refuses_them(round1: LabelingServer) -> None:
    store = round1.page.store
    with _chromium() as browser:
        page = browser.new_page(viewport={"width": 1200, "height": 800}, bypass_csp=True)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(round1.url + "?mode=grid")
        _wait(page, "document.body.dataset.page === '1'")
        badges = page.eval_on_selector_all(".tile .badge", "els => els.map(e => e.textContent)")
        assert badges == ["unset"] * 6
        _shot(page, "grid_round1_unset")
        page.keyboard.press("Enter")  # a stray Enter stores nothing
        _wait(page)
        assert "6 of 6 tiles are unset" in page.text_content("#grid-msg") and store.history().empty
        page.keyboard.press("1")  # the focused tile only
        page.keyboard.press("Enter")
        _wait(page)
        assert "5 of 6 tiles are unset" in page.text_content("#grid-msg") and store.history().empty
        page.keyboard.press("Shift+Digit1")  # the page → good, then flip two to bad
        page.keyboard.press("l")
        page.keyboard.press("3")
        page.keyboard.press("l")
        page.keyboard.press("3")
        assert page.locator(".tile.flipped").count() == 0  # no prediction: nothing "changed" from one
        page.keyboard.press("Enter")
        _wait(page, "document.body.dataset.page === '2'")
        assert page.text_content("#grid-last") == "confirmed 6 tiles (6 without a prediction, set by you)"
        labels = store.latest()["label"].value_counts().to_dict()
        assert labels == {"good": 4, "bad": 2}
        # a page with predictions (good, good, good, bad, bad, bad): three flipped → "3 of 6 changed"
        assert page.eval_on_selector_all(".tile .badge", "els => els.map(e => e.textContent)") == \
            ["good"] * 3 + ["bad"] * 3
        page.keyboard.press("Shift+Digit2")
        page.keyboard.press("p")  # back to the predictions
        assert page.locator(".tile.flipped").count() == 0
        for key in ("3", "l", "2", "l", "l", "1", "l", "3"):  # the last one sets a bad tile to bad
            page.keyboard.press(key)
        assert page.locator(".tile.flipped").count() == 3
        page.keyboard.press("Enter")
        _wait(page, "document.getElementById('grid-done').style.display === 'block'")
        assert page.text_content("#grid-last") == "confirmed 6 tiles (3 of 6 changed from the prediction)"
        assert "Queue done." in page.text_content("#grid-done")
        assert errors == []
    assert len(store.latest()) == 12


def test_grid_page_orders_by_predicted_class_then_confidence(tmp_path: Path) -> None:
    root = tmp_path / "dataset"
    ids = list(range(3001, 3009))
    preds = ["bad", "good", "good", "questionable", "bad", "good", None, "questionable"]
    conf = [0.5, 0.6, 0.9, 0.4, 0.95, 0.75, None, 0.8]
    rows = []
    for k, (image_id, rel) in enumerate(zip(ids, _images(root, ids))):
        row: dict[str, Any] = {"image_id": image_id, "rel_path": rel, "queue_rank": k}
        if preds[k]:
            rest = (1 - conf[k]) / 2
            row.update(predicted_class=preds[k], **{f"p_{c}": (conf[k] if c == preds[k] else rest)
                                                    for c in ("good", "questionable", "bad")})
        rows.append(row)
    server = make_app(LabelStore(tmp_path / "l.sqlite"), root, pd.DataFrame(rows), round=2, labeler="ann",
                      page_size=8).start()
    try:
        session, _ = _open(server)
        tiles = _call(server, "/api/grid/page", {}, session=session)[1]["tiles"]
        assert [t["image_id"] for t in tiles] == [3003, 3006, 3002, 3008, 3004, 3005, 3001, 3007]
    finally:
        server.stop()


@pytest.fixture()
def grid10(tmp_path: Path) -> Iterator[LabelingServer]:
    root = tmp_path / "dataset"
    ids = list(range(1001, 1011))
    rows = []
    for k, (image_id, rel) in enumerate(zip(ids, _images(root, ids))):
        pred = ("good", "bad", "questionable")[k % 3]
        rows.append({"image_id": image_id, "rel_path": rel, "queue_rank": k, "predicted_class": pred,
                     **{f"p_{c}": ((0.9 - 0.02 * k) if c == pred else 0.05) for c in ("good", "questionable", "bad")}})
    server = make_app(LabelStore(tmp_path / "labels.sqlite"), root, pd.DataFrame(rows), round=2, labeler="ann",
                      page_size=6).start()
    try:
        yield server
    finally:
        server.stop()


def test_page_undo_brings_back_exactly_that_page_and_the_counter_goes_down(grid10: LabelingServer) -> None:
    store = grid10.page.store
    with _chromium() as browser:
        page = browser.new_page(viewport={"width": 1200, "height": 800}, bypass_csp=True)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(grid10.url + "?mode=grid")

        def screen() -> tuple[str, list[str], list[str]]:
            return (page.text_content("#page-no"), page.evaluate("document.body.dataset.tiles").split(","),
                    page.eval_on_selector_all(".tile", "els => els.map(e => e.dataset.label)"))

        _wait(page, "document.body.dataset.page === '1'")
        page.keyboard.press("l")
        page.keyboard.press("3")  # flip one tile
        first = screen()
        assert first[0] == "1" and len(first[1]) == 6
        page.keyboard.press("Enter")
        _wait(page, "document.body.dataset.page === '2'")
        second = screen()
        assert second[0] == "2" and len(second[1]) == 4 and "6 labels" in page.text_content("#rate")
        page.keyboard.press("z")
        _wait(page, "document.body.dataset.page === '3'")
        assert screen() == first  # same number, same tiles in the same order, the labels sent
        assert "page 1 is back as you sent it" in page.text_content("#grid-last")
        assert "this tab: 0 labels" in page.text_content("#rate") and store.latest().empty
        _shot(page, "grid_undo_same_page")
        page.keyboard.press("Enter")
        _wait(page, "document.body.dataset.page === '4'")
        assert screen() == second  # the page that was on screen before the undo comes back
        assert "this tab: 6 labels" in page.text_content("#rate")
        assert errors == []
    assert len(store.latest()) == 6


def test_single_mode_counter_goes_down_on_undo(tmp_path: Path) -> None:
    root = tmp_path / "dataset"
    server = make_app(LabelStore(tmp_path / "l.sqlite"), root, _queue(root), round=1, labeler="ann").start()
    try:
        with _chromium() as browser:
            page = browser.new_page(viewport={"width": 1000, "height": 700}, bypass_csp=True)
            page.goto(server.url)
            _wait(page, "document.body.dataset.imageId === '101'")
            for key, nxt in zip("1231", ["202", "303", "404", "505"]):
                page.keyboard.press(key)
                _wait(page, f"document.body.dataset.imageId === '{nxt}'")
            assert "this tab: 4 labels" in page.text_content("#rate")
            page.keyboard.press("z")
            _wait(page, "document.body.dataset.imageId === '404'")
            assert "this tab: 3 labels" in page.text_content("#rate")
            assert len(server.page.store.latest()) == 3
    finally:
        server.stop()


def test_rest_held_by_another_tab_is_said_and_released_on_close_and_idle(tmp_path: Path) -> None:
    root = tmp_path / "dataset"
    now = [1000.0]
    server = make_app(LabelStore(tmp_path / "l.sqlite"), root, _queue(root), round=1, labeler="ann",
                      idle_release_s=120, poll_s=0.3, heartbeat_s=3600, clock=lambda: now[0]).start()
    store = server.page.store
    try:
        with _chromium() as browser:
            context = browser.new_context(viewport={"width": 1000, "height": 700}, bypass_csp=True)
            idle_tab, closing_tab, worker = context.new_page(), context.new_page(), context.new_page()
            idle_tab.goto(server.url)
            _wait(idle_tab, "document.body.dataset.imageId === '101'")
            closing_tab.goto(server.url)
            _wait(closing_tab, "document.body.dataset.imageId === '202'")
            worker.goto(server.url)
            for shown in ["303", "404", "505"]:
                _wait(worker, f"document.body.dataset.imageId === '{shown}'")
                worker.keyboard.press("1")
            _wait(worker, "document.body.dataset.imageId === ''")
            text = worker.text_content("#done")
            assert "Queue done" not in text and "rest of the queue (2 images) is on another tab's screen" in text, text
            _shot(worker, "held_by_another_tab")
            closing_tab.close()  # its image is released as it closes
            _wait(worker, "document.body.dataset.imageId === '202'")
            worker.keyboard.press("2")
            _wait(worker, "document.body.dataset.imageId === ''")
            assert "rest of the queue (1 image) is on another tab's screen" in worker.text_content("#done")
            now[0] += 121  # the first tab has been idle past idle_release_s
            _wait(worker, "document.body.dataset.imageId === '101'")
            worker.keyboard.press("3")
            _wait(worker, "document.body.dataset.imageId === ''")
            assert worker.text_content("#done-text") == "Queue done."
    finally:
        server.stop()
    assert store.latest().set_index("image_id")["label"].to_dict() == {
        101: "bad", 202: "questionable", 303: "good", 404: "good", 505: "good"}


def test_a_label_the_store_could_not_save_is_shown_and_sent_again(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlalchemy as sa

    root = tmp_path / "dataset"
    server = make_app(LabelStore(tmp_path / "l.sqlite"), root, _queue(root), round=1, labeler="ann",
                      retry_after_s=1).start()
    store = server.page.store
    real_add = store.add
    attempts: list[int] = []

    def down(*args: Any, **kwargs: Any) -> int:
        attempts.append(1)
        raise sa.exc.OperationalError("INSERT", {}, ConnectionRefusedError("could not connect to server"))

    try:
        with _chromium() as browser:
            page = browser.new_page(viewport={"width": 1000, "height": 700}, bypass_csp=True)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(server.url)
            _wait(page, "document.body.dataset.imageId === '101'")
            monkeypatch.setattr(store, "add", down)
            page.keyboard.press("1")
            page.wait_for_function("document.getElementById('unsaved').style.display === 'block'")
            assert "NOT SAVED" in page.text_content("#unsaved") and "label store is unavailable" in page.text_content("#unsaved")
            assert page.evaluate("document.body.dataset.imageId") == "101" and store.history().empty
            page.wait_for_function("document.getElementById('unsaved').textContent.includes('attempt 2')")
            _shot(page, "label_not_saved")
            monkeypatch.setattr(store, "add", real_add)  # the store is back
            _wait(page, "document.body.dataset.imageId === '202'")
            assert page.evaluate("document.getElementById('unsaved').style.display") == "none"
            assert "labeled 101 good" in page.text_content("#last")
            assert errors == []
    finally:
        server.stop()
    assert len(attempts) >= 2 and store.latest().set_index("image_id")["label"].to_dict() == {101: "good"}
    assert len(store.history()) == 1  # sent again, stored once


def test_a_tab_keeps_to_the_verify_or_the_uncertainty_queue(tmp_path: Path) -> None:
    root = tmp_path / "dataset"
    queue = _queue(root).assign(queue=["uncertainty", "uncertainty", "uncertainty", "verify", "verify"])
    server = make_app(LabelStore(tmp_path / "l.sqlite"), root, queue, round=2, labeler="ann", page_size=4).start()
    try:
        status, state = _call(server, "/api/session", {"queue": "verify"})
        assert status == 200 and state["item"]["image_id"] == 404 and state["queue"] == "verify"
        assert state["queues"] == {"uncertainty": {"total": 3, "labeled": 0}, "verify": {"total": 2, "labeled": 0}}
        tiles = _call(server, "/api/grid/page", {}, session=state["session"])[1]["tiles"]
        assert {t["image_id"] for t in tiles} == {404, 505} and {t["queue"] for t in tiles} == {"verify"}
        mixed, _ = _open(server)  # no queue: every part, in queue order (verify tiles are held by the first tab)
        assert {t["image_id"] for t in _call(server, "/api/grid/page", {}, session=mixed)[1]["tiles"]} == {101, 202, 303}
        status, payload = _call(server, "/api/session", {"queue": "easy"})
        assert status == 400 and "unknown queue 'easy'" in payload["error"]
    finally:
        server.stop()
