"""The labeling page: one HTML page + a small JSON API on the stdlib HTTP server.

``danbooru-assets label --queue Q.parquet --root DATASET --store labels.sqlite`` serves
the next image of the queue large, with its keypoint skeleton (drawn client-side on a
canvas, so the toggle is instant), its scores and predicted class. Keys: ``1`` good,
``2`` questionable, ``3`` bad, ``z`` undo, ``s`` skip, ``k`` skeleton on/off; after a
conflict, ``o`` overwrites and ``n`` keeps the other label.

Grid mode (``/?mode=grid``, or ``g`` to switch): a page of ``page_size`` thumbnails, in
queue order and then grouped by the model's predicted class, every tile pre-set to its
prediction (``p``) or to one class for the whole page (shift+``1``/``2``/``3``). The
labeler flips the exceptions (click a tile, or move with arrows/``hjkl`` and set with
``1``/``2``/``3``) and confirms the page with Enter: every tile becomes one history row.
``z`` undoes the last page (it comes back as it was sent), ``POST /api/undo`` with an
``image_id`` undoes one tile, ``t`` shows or hides the skeletons. A confirm whose tiles
someone else changed since the page was shown stores the others and answers 409 with one
conflict per tile.

Throughput: every row the page writes carries its session, mode and the seconds since
the tab's previous action (a pause longer than ``MAX_SECONDS_PER_LABEL`` per label counts
as that much); the page shows the tab's count, labels per minute and the round's ETA.
With ``recheck_fraction`` > 0 a few already-labeled images are shown again, blind, and
stored with ``source = "recheck"`` (self-agreement, see ``labels.agreement``).

Each page load (tab) opens a session (``POST /api/session``): its own current image,
skips and undo history. Tabs are handed different images while there are enough, undo
retracts only the tab's own labels, and labeling an image that someone else labeled
after the tab was shown it answers 409 naming who and what, until the tab sends
``"overwrite": true``; both labels stay in the store's history.

Safety: binds to 127.0.0.1 by default (any other address prints a warning); requests
whose ``Host`` is not the bound address are refused (a DNS-rebinding page's requests
carry its own host name), and so are requests whose ``Origin`` is not the page's own;
the labeler name is the server's (``--labeler`` or the OS user), never a request field.
Images are served read-only and only for image ids of the queue, resolved inside the
dataset root; every input is validated (unknown ids → 404, unknown classes / malformed
JSON → 400); POSTs must be JSON, which makes a browser preflight any cross-site
request (which this server never approves).
"""

from __future__ import annotations

import argparse
import functools
import getpass
import importlib.resources
import ipaddress
import json
import math
import secrets
import socket
import sys
import random
import threading
import time
from collections import OrderedDict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pandas as pd
from sqlalchemy.exc import SQLAlchemyError

from danbooru_assets.pose.coco import KEYPOINT_COLUMNS, KEYPOINT_NAMES, NUM_KEYPOINTS, SKELETON, SKELETON_COLORS
from danbooru_assets.labels.store import UNLABELED, LabelConflict, LabelStore
from danbooru_assets.labels.classes import LABEL_CLASSES
from danbooru_assets.labels.agreement import RECHECK_SOURCE
from danbooru_assets.config import DEFAULT_MAX_PIXELS

IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".gif": "image/gif",
               ".webp": "image/webp", ".bmp": "image/bmp"}
MAX_BODY = 64 * 1024
# Page loads kept; the least recently used beyond this is forgotten (its tab must reload).
MAX_SESSIONS = 256
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
# A longer pause per label is a break, not labeling time (throughput figures).
MAX_SECONDS_PER_LABEL = 30.0
THUMB_SIDE = 256  # longest side of a grid thumbnail, pixels
THUMB_CACHE = 4096  # thumbnails kept in memory (~10 kB each)
MAX_PAGE_SIZE = 200


@functools.lru_cache(maxsize=1)
def page_html() -> str:
    """The page served at ``/``: ``page.html`` with ``page.css`` and ``page.js`` (files of
    this package) put in place of their markers, so the page stays one response."""
    files = importlib.resources.files("danbooru_assets.labels")
    html = files.joinpath("page.html").read_text(encoding="utf-8")
    for name in ("page.css", "page.js"):
        marker = f"/* {name} */\n"
        if html.count(marker) != 1:
            raise RuntimeError(f"page.html must hold the marker {marker.strip()!r} once")
        html = html.replace(marker, files.joinpath(name).read_text(encoding="utf-8"))
    return html


class RequestError(Exception):
    """An input problem reported to the client with an HTTP status and a clear message."""

    def __init__(self, status: HTTPStatus, message: str, extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra or {}


def _finite(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def split_host(value: str) -> tuple[str, int] | None:
    """``host[:port]`` (IPv6 in brackets) → (normalised host, port; 80 when absent), or ``None``."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[1:end], value[end + 1:]
    else:
        host, sep, port_text = value.partition(":")
        rest = sep + port_text
    if not host:
        return None
    if rest == "":
        port = 80
    elif rest.startswith(":") and rest[1:].isascii() and rest[1:].isdigit():
        port = int(rest[1:])
    else:
        return None
    try:
        host = str(ipaddress.ip_address(host))  # one spelling per address: [0::1] == [::1]
    except ValueError:
        pass
    return host, port


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _hostport(name: str, port: int) -> str:
    return f"[{name}]:{port}" if ":" in name else f"{name}:{port}"


def exposure_warning(host: str, port: int) -> str | None:
    """A warning when the bound address is reachable from other machines, else ``None``."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.is_loopback:
        return None
    where = "EVERY network interface" if ip.is_unspecified else f"the network address {host}"
    return (f"WARNING: the labeling page listens on {where} (port {port}): anyone who can reach this "
            "machine can see the queue's images and write labels under this server's labeler name; "
            "there is no login. Use the default --host 127.0.0.1 unless that is what you want.")


class PageSession:
    """One page load (a browser tab): its image, skips, undo stack and what it was shown."""

    def __init__(self, session_id: str, cursor: int, clock: int) -> None:
        self.id = session_id
        self.opened_at = cursor  # store cursor when the tab opened
        self.current: int | None = None  # the image on the tab's screen
        self.shown: dict[int, int] = {}  # image id → store cursor when the tab was shown it
        self.skipped: set[int] = set()
        self.focus: list[int] = []  # images brought back by an undo, shown first
        self.own_rows: set[int] = set()  # history rows this tab wrote (labels and undos)
        self.undo_stack: list[list[int]] = []  # this tab's actions (a label, a grid page) as row ids, newest last
        self.used = clock
        self.mark = time.monotonic()  # when the tab's previous action ended (throughput)
        self.labels_written = 0
        self.seconds = 0.0
        self.recheck: int | None = None  # the labeled image shown again (single mode), if any
        self.grid: list[int] = []  # the tiles of the grid page on screen
        self.grid_rechecks: set[int] = set()
        self.page_no = 0
        self.preset: dict[int, str] = {}  # tile → class it was confirmed with before an undo
        self.row_image: dict[int, int] = {}  # this tab's label rows → their image


class LabelingPage:
    """The page's state: the queue, what is labeled (mirrored from the store), the open tabs."""

    def __init__(self, store: LabelStore, dataset_root: Path, queue: pd.DataFrame, round: int, labeler: str,
                 page_size: int = 24, recheck_fraction: float = 0.0, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 seed: int | None = None) -> None:
        missing = {"image_id", "rel_path"} - set(queue.columns)
        if missing:
            raise ValueError(f"queue lacks column(s) {sorted(missing)}")
        if not str(labeler).strip():
            raise ValueError("labeler must be a non-empty name")
        self.store = store
        self.root = Path(dataset_root).resolve()
        self.round = int(round)
        self.labeler = str(labeler).strip()
        if "queue_rank" in queue.columns:
            queue = queue.sort_values("queue_rank", kind="stable")
        queue = queue.drop_duplicates("image_id")
        self.items: list[dict[str, Any]] = [self._item(rec) for rec in queue.to_dict("records")]
        self.by_id = {item["image_id"]: item for item in self.items}
        self.sessions: dict[str, PageSession] = {}
        self._clock = 0  # counts session uses, for least-recently-used eviction
        self.labels: dict[int, str | None] = {}
        self._seen_id = 0
        self.lock = threading.Lock()
        if not 1 <= int(page_size) <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be 1..{MAX_PAGE_SIZE}, got {page_size}")
        if not 0.0 <= float(recheck_fraction) <= 0.5:
            raise ValueError(f"recheck_fraction must be in [0, 0.5], got {recheck_fraction}")
        self.page_size = int(page_size)
        self.recheck_fraction = float(recheck_fraction)
        self.rng = random.Random(seed)
        self.rechecked: set[int] = set()  # images already shown again (once each per page server)
        self.max_pixels = max_pixels
        self._thumbs: OrderedDict[int, bytes] = OrderedDict()
        self._thumb_lock = threading.Lock()
        self.sync()

    @staticmethod
    def _item(rec: dict[str, Any]) -> dict[str, Any]:
        item: dict[str, Any] = {"image_id": int(rec["image_id"]), "rel_path": str(rec["rel_path"])}
        item["portrait_score"] = _finite(rec.get("portrait_score"))
        pc = rec.get("predicted_class")
        item["predicted_class"] = pc if isinstance(pc, str) and pc in LABEL_CLASSES else None
        probs = {c: _finite(rec.get(f"p_{c}")) for c in LABEL_CLASSES}
        item["probs"] = probs if any(v is not None for v in probs.values()) else None
        item["uncertainty"] = _finite(rec.get("uncertainty"))
        item["width"] = _finite(rec.get("width"))
        item["height"] = _finite(rec.get("height"))
        if all(c in rec for c in KEYPOINT_COLUMNS):
            kp = [[_finite(rec[c]) for c in KEYPOINT_COLUMNS[3 * i:3 * i + 3]] for i in range(NUM_KEYPOINTS)]
            item["keypoints"] = kp if any(p[0] is not None and p[1] is not None for p in kp) else None
        else:
            item["keypoints"] = None
        return item

    def sync(self) -> None:
        """Apply store rows written since the last sync (by us or another labeler)."""
        for row_id, image_id, label in self.store.rows_since(self._seen_id):
            if image_id in self.by_id:
                self.labels[image_id] = label
            self._seen_id = row_id

    # ---- sessions (called under the lock) ----------------------------------------
    def open_session(self) -> PageSession:
        self.sync()
        while len(self.sessions) >= MAX_SESSIONS:
            oldest = min(self.sessions.values(), key=lambda s: s.used)
            del self.sessions[oldest.id]
        self._clock += 1
        session = PageSession(secrets.token_urlsafe(16), self._seen_id, self._clock)
        self.sessions[session.id] = session
        return session

    def session(self, session_id: Any) -> PageSession:
        if session_id is None or session_id == "":
            raise RequestError(HTTPStatus.BAD_REQUEST,
                               "missing session: a page load opens one with POST /api/session (reload the page)")
        session = self.sessions.get(session_id) if isinstance(session_id, str) else None
        if session is None:
            raise RequestError(HTTPStatus.NOT_FOUND,
                               "unknown session (the server restarted or this tab was idle too long): reload the page")
        self._clock += 1
        session.used = self._clock
        return session

    def parse_id(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).isdigit():
            raise RequestError(HTTPStatus.BAD_REQUEST, f"image_id must be a non-negative integer, got {value!r}")
        image_id = int(value)
        if image_id not in self.by_id:
            raise RequestError(HTTPStatus.NOT_FOUND, f"unknown image id {image_id}: not in this labeling queue")
        return image_id

    def next_item(self, session: PageSession) -> dict[str, Any] | None:
        """The tab's next image: one brought back by its undo, else the one it shows, else
        the first open image no other tab shows, else (only other tabs' images left) one of those."""
        def open_(image_id: int) -> bool:
            return self.labels.get(image_id) is None and image_id not in session.skipped

        for image_id in session.focus:
            if self.labels.get(image_id) is None:
                return self.by_id[image_id]
        if session.current is not None and (open_(session.current) or session.current == session.recheck):
            return self.by_id[session.current]
        held = self._held(session)
        recheck = self._pick_rechecks(session, 1, held)
        if recheck:
            session.recheck = recheck[0]
            return self.by_id[recheck[0]]
        shared = None
        for item in self.items:
            if open_(item["image_id"]):
                if item["image_id"] not in held:
                    return item
                shared = shared or item
        # A closed tab's image must stay reachable; a clash is caught by the conflict check.
        return shared

    def _held(self, session: PageSession) -> set[int]:
        """Images on other tabs' screens (their current image or grid page)."""
        held: set[int] = set()
        for s in self.sessions.values():
            if s is not session:
                held.add(s.current) if s.current is not None else None
                held.update(s.grid)
        return held

    def _pick_rechecks(self, session: PageSession, slots: int, held: set[int]) -> list[int]:
        """For each of ``slots`` places, with probability ``recheck_fraction``, an image of
        the queue that is labeled already (by anyone), shown again blind; each at most once."""
        if self.recheck_fraction <= 0:
            return []
        n = sum(self.rng.random() < self.recheck_fraction for _ in range(slots))
        if not n:
            return []
        pool = [i["image_id"] for i in self.items
                if self.labels.get(i["image_id"]) is not None and i["image_id"] not in self.rechecked
                and i["image_id"] not in held]
        picked = self.rng.sample(pool, min(n, len(pool)))
        self.rechecked.update(picked)
        return picked

    def _throughput(self, session: PageSession, labeled: int) -> dict[str, Any]:
        per_label = session.seconds / session.labels_written if session.labels_written else None
        remaining = len(self.items) - labeled
        return {
            "session_labels": session.labels_written,
            "labels_per_minute": round(60.0 / per_label, 1) if per_label else None,
            "seconds_per_label": round(per_label, 2) if per_label is not None else None,
            "eta_seconds": round(remaining * per_label) if per_label is not None else None,
        }

    def _elapsed(self, session: PageSession, n_labels: int) -> float:
        """Seconds since the tab's previous action, a break beyond the cap not counted; resets the mark."""
        now = time.monotonic()
        seconds = min(max(0.0, now - session.mark), MAX_SECONDS_PER_LABEL * max(1, n_labels))
        session.mark = now
        return seconds

    def _counts(self) -> dict[str, Any]:
        labeled = sum(1 for i in self.items if self.labels.get(i["image_id"]) is not None)
        counts = {c: sum(1 for i in self.items if self.labels.get(i["image_id"]) == c) for c in LABEL_CLASSES}
        return {"labeled": labeled, "counts": counts}

    def state(self, session: PageSession) -> dict[str, Any]:
        self.sync()
        item = self.next_item(session)
        session.current = None if item is None else item["image_id"]
        payload = None
        if item is not None:
            session.shown[item["image_id"]] = self._seen_id
            # a re-shown image is blind: its current label is not shown
            current = None if item["image_id"] == session.recheck else self.labels.get(item["image_id"])
            payload = dict(item, image_url=f"/images/{item['image_id']}", current_label=current)
        counts = self._counts()
        return {
            "session": session.id, "round": self.round, "labeler": self.labeler, "total": len(self.items),
            **counts, "skipped": len(session.skipped), "done": item is None, "item": payload,
            "throughput": self._throughput(session, counts["labeled"]),
        }

    # ---- grid mode (called under the lock) -------------------------------------------
    def _tile_open(self, session: PageSession, image_id: int) -> bool:
        if image_id in session.grid_rechecks:
            return True
        return self.labels.get(image_id) is None and image_id not in session.skipped

    def grid_state(self, session: PageSession, new_page: bool = False) -> dict[str, Any]:
        """The tab's grid page: kept while any of its tiles is open, else the next
        ``page_size`` open images (an undone page's first), grouped by predicted class."""
        self.sync()
        session.current = None
        if new_page or not any(self._tile_open(session, i) for i in session.grid):
            session.grid, session.grid_rechecks = [], set()
            held = self._held(session)
            picked: list[int] = [i for i in dict.fromkeys(session.focus) if self.labels.get(i) is None][: self.page_size]
            for item in self.items:
                if len(picked) >= self.page_size:
                    break
                image_id = item["image_id"]
                if image_id not in held and image_id not in picked and self._tile_open(session, image_id):
                    picked.append(image_id)
            rechecks = self._pick_rechecks(session, len(picked), held | set(picked)) if picked else []
            order = {c: k for k, c in enumerate(LABEL_CLASSES)}

            def by_prediction(image_id: int) -> tuple:
                it = self.by_id[image_id]
                pc = it["predicted_class"]
                p = (it["probs"] or {}).get(pc) if pc else None
                return (order.get(pc, len(order)), -(p or 0.0))

            # rechecks replace the page's last places, so a page never grows past page_size
            tiles = picked[: max(0, len(picked) - len(rechecks))] + rechecks
            session.grid = sorted(tiles, key=by_prediction)
            session.grid_rechecks = set(rechecks)
            session.focus = [i for i in session.focus if i not in session.grid]
            if session.grid:  # an empty page (queue done) is no new page
                session.page_no += 1
            for image_id in session.grid:
                session.shown[image_id] = self._seen_id
        tiles = []
        for image_id in session.grid:
            if not self._tile_open(session, image_id):
                continue
            it = self.by_id[image_id]
            tiles.append({
                "image_id": image_id, "thumb_url": f"/thumbs/{image_id}", "predicted_class": it["predicted_class"],
                "probs": it["probs"], "keypoints": it["keypoints"], "width": it["width"], "height": it["height"],
                "rel_path": it["rel_path"], "preset": session.preset.get(image_id),
            })
        counts = self._counts()
        return {
            "session": session.id, "round": self.round, "labeler": self.labeler, "total": len(self.items),
            **counts, "skipped": len(session.skipped), "page": session.page_no, "page_size": self.page_size,
            "tiles": tiles, "done": not tiles, "throughput": self._throughput(session, counts["labeled"]),
        }

    def grid_page(self, session: PageSession, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /api/grid/page``: the page on screen, or with ``"new": true`` the next one
        (after "keep theirs" on conflicts: tiles still open come back later)."""
        new = body.get("new", False)
        if not isinstance(new, bool):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"new must be true or false, got {new!r}")
        return self.grid_state(session, new_page=new)

    def grid_confirm(self, session: PageSession, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /api/grid/confirm``: ``{"page": n, "labels": {image_id: class}, "overwrite": bool}``
        stores every tile as a label in one transaction; tiles of the page left out are skipped."""
        page_no = body.get("page")
        if isinstance(page_no, bool) or not isinstance(page_no, int) or page_no != session.page_no:
            raise RequestError(HTTPStatus.CONFLICT, f"page {page_no!r} is not the page this tab shows "
                               f"(page {session.page_no}): reload the page")
        labels = body.get("labels")
        if not isinstance(labels, dict) or not labels:
            raise RequestError(HTTPStatus.BAD_REQUEST, "labels must be a non-empty object {image_id: class}")
        if len(labels) > MAX_PAGE_SIZE:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"at most {MAX_PAGE_SIZE} tiles per page")
        overwrite = body.get("overwrite", False)
        if not isinstance(overwrite, bool):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"overwrite must be true or false, got {overwrite!r}")
        on_page = set(session.grid)
        chosen: dict[int, str] = {}
        for key, label in labels.items():
            image_id = self.parse_id(key)
            if image_id not in on_page:
                raise RequestError(HTTPStatus.BAD_REQUEST, f"image {image_id} is not on this tab's page")
            if not isinstance(label, str) or label not in LABEL_CLASSES:
                raise RequestError(HTTPStatus.BAD_REQUEST,
                                   f"unknown class {label!r} for image {image_id}; expected one of {list(LABEL_CLASSES)}")
            chosen[image_id] = label
        shown = {i: None if overwrite else session.shown.get(i, session.opened_at) for i in chosen}
        sources = {i: RECHECK_SOURCE for i in chosen if i in session.grid_rechecks}
        seconds = self._elapsed(session, len(chosen))
        written, conflicts = self.store.add_page(
            chosen, self.labeler, self.round, shown_since=shown, own_rows=session.own_rows,
            session=session.id, mode="grid", seconds_spent=seconds, sources=sources)
        if written:
            session.own_rows.update(written.values())
            session.undo_stack.append(list(written.values()))
            session.labels_written += len(written)
            session.seconds += seconds
        for image_id, row_id in written.items():
            session.row_image[row_id] = image_id
            session.shown[image_id] = row_id
            session.grid_rechecks.discard(image_id)
            session.preset.pop(image_id, None)
        for image_id in on_page - set(chosen) - set(written):
            if self.labels.get(image_id) is None:
                session.skipped.add(image_id)
            session.grid_rechecks.discard(image_id)
        if conflicts:
            self.sync()
            errors = [self._conflict(session, int(row["image_id"]), chosen[int(row["image_id"])], row)
                      for row in conflicts]
            raise RequestError(HTTPStatus.CONFLICT,
                               f"{len(conflicts)} of {len(chosen)} tiles were changed by someone else after this "
                               f"page was shown; the other {len(written)} are saved. Send those again with "
                               "overwrite to replace theirs, or take the next page to keep theirs.",
                               {"conflicts": [e.extra["conflict"] for e in errors], "written": sorted(written)})
        state = self.grid_state(session)
        state["confirmed"] = len(written)
        return state

    def image_path(self, image_id: int) -> Path:
        rel = self.by_id[image_id]["rel_path"]
        path = (self.root / rel).resolve()
        # resolve() follows symlinks too, so a link pointing out of the root is refused
        if not path.is_relative_to(self.root):
            raise RequestError(HTTPStatus.FORBIDDEN, f"path of image {image_id} is outside the dataset root")
        if path.suffix.lower() not in IMAGE_TYPES:
            raise RequestError(HTTPStatus.FORBIDDEN, f"image {image_id} is not an image file type")
        if not path.is_file():
            raise RequestError(HTTPStatus.NOT_FOUND, f"image file for {image_id} is missing")
        return path

    # ---- actions (called under the lock) -----------------------------------------
    def _conflict(self, session: PageSession, image_id: int, yours: str, row: dict[str, Any]) -> RequestError:
        theirs = row["label"] if row["label"] is not None else UNLABELED
        if any(row["id"] in s.own_rows for s in self.sessions.values() if s is not session):
            where = "in another tab of this page"
        elif row["labeler"] == self.labeler:
            where = "from another page or import under the same name"
        else:
            where = "(another labeler)"
        action = "an undo" if row["source"] == "undo" else "a label"
        message = (f"image {image_id} was set to {theirs!r} ({action}) by {row['labeler']!r} {where} at "
                   f"{row['labeled_at']}, after this tab was shown it; your {yours!r} was not saved. "
                   "Send it again with overwrite to replace theirs (both stay in the history).")
        return RequestError(HTTPStatus.CONFLICT, message, {"conflict": {
            "image_id": image_id, "yours": yours, "label": theirs, "labeler": row["labeler"],
            "where": where, "labeled_at": row["labeled_at"], "source": row["source"], "row": row["id"]}})

    def label(self, session: PageSession, body: dict[str, Any]) -> dict[str, Any]:
        image_id = self.parse_id(body.get("image_id"))
        label = body.get("label")
        if not isinstance(label, str) or label not in LABEL_CLASSES:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"unknown class {label!r}; expected one of {list(LABEL_CLASSES)}")
        overwrite = body.get("overwrite", False)
        if not isinstance(overwrite, bool):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"overwrite must be true or false, got {overwrite!r}")
        # the labeler is the server's own name: a request cannot label as someone else
        since = None if overwrite else session.shown.get(image_id, session.opened_at)
        source = RECHECK_SOURCE if image_id == session.recheck else "page"
        seconds = self._elapsed(session, 1)
        try:
            row_id = self.store.add(image_id, label, self.labeler, self.round, source=source,
                                    unless_changed_since=since, own_rows=session.own_rows,
                                    session=session.id, mode="single", seconds_spent=seconds)
        except LabelConflict as exc:
            raise self._conflict(session, image_id, label, exc.row) from None
        if source == RECHECK_SOURCE:
            session.recheck = None
        session.own_rows.add(row_id)
        session.undo_stack.append([row_id])
        session.row_image[row_id] = image_id
        session.labels_written += 1
        session.seconds += seconds
        session.shown[image_id] = row_id  # what came before this write is settled (seen or overwritten)
        session.skipped.discard(image_id)
        if image_id in session.focus:
            session.focus.remove(image_id)
        return self.state(session)

    def skip(self, session: PageSession, body: dict[str, Any]) -> dict[str, Any]:
        image_id = self.parse_id(body.get("image_id"))
        session.skipped.add(image_id)
        if image_id == session.recheck:
            session.recheck = None
        session.mark = time.monotonic()  # time on a skipped image is not labeling time
        if image_id in session.focus:
            session.focus.remove(image_id)
        return self.state(session)

    def unskip(self, session: PageSession, body: dict[str, Any]) -> dict[str, Any]:
        session.skipped.clear()
        return self.state(session)

    def undo(self, session: PageSession, body: dict[str, Any]) -> dict[str, Any]:
        """Undo the tab's last action (one label, or a whole grid page), or with
        ``image_id`` the tab's last label of that one image (one tile of a page)."""
        grid = body.get("mode", "single") == "grid"
        retracted: list[dict[str, Any]] = []
        if body.get("image_id") is not None:
            image_id = self.parse_id(body.get("image_id"))
            for action in reversed(session.undo_stack):
                mine = [r for r in action if session.row_image.get(r) == image_id]
                if mine:
                    action.remove(mine[-1])
                    one = self.store.retract(mine[-1], self.labeler)
                    retracted = [one] if one is not None else []
                    break
            session.undo_stack = [a for a in session.undo_stack if a]
        else:
            while not retracted and session.undo_stack:
                retracted = self.store.retract_many(session.undo_stack.pop(), self.labeler)
        if not retracted:
            raise RequestError(HTTPStatus.CONFLICT, "nothing to undo in this tab")
        ids = [int(r["image_id"]) for r in retracted]
        for r in retracted:
            session.own_rows.add(int(r["undo_id"]))
            session.skipped.discard(int(r["image_id"]))
            if r["label"] is not None:
                session.preset[int(r["image_id"])] = r["label"]
        session.focus = ids + [i for i in session.focus if i not in ids]
        if grid:
            session.grid = []  # the undone tiles come back as the next page
            state = self.grid_state(session)
        else:
            state = self.state(session)
        last = retracted[-1]
        state["retracted"] = {"image_id": int(last["image_id"]), "label": last["label"], "id": last["id"],
                              "images": ids}
        return state

    # ---- thumbnails (outside the lock: decoding is slow) --------------------------------
    def thumbnail(self, image_id: int, path: Path) -> bytes:
        """A small JPEG of the image (the project's one decode, with the dataset's pixel
        limit), cached in memory; a broken or too-large file answers 404."""
        with self._thumb_lock:
            cached = self._thumbs.get(image_id)
            if cached is not None:
                self._thumbs.move_to_end(image_id)
                return cached
        import io

        from danbooru_assets.core.images import ImageDecodeError, open_image_rgb

        try:
            img, _ = open_image_rgb(path, THUMB_SIDE, self.max_pixels)
        except ImageDecodeError as exc:
            raise RequestError(HTTPStatus.NOT_FOUND, f"image {image_id} cannot be shown: {exc}") from None
        img.thumbnail((THUMB_SIDE, THUMB_SIDE))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=80)
        data = buf.getvalue()
        with self._thumb_lock:
            self._thumbs[image_id] = data
            while len(self._thumbs) > THUMB_CACHE:
                self._thumbs.popitem(last=False)
        return data


class LabelingServer(ThreadingHTTPServer):
    """The page's HTTP server; ``start()`` serves in a background thread, ``stop()`` ends it."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], page: LabelingPage) -> None:
        self.page = page
        self._thread: threading.Thread | None = None
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.port = int(self.server_address[1])
        bound = str(ipaddress.ip_address(self.server_address[0]))
        self.host = bound
        bound_ip = ipaddress.ip_address(bound)
        # Names a browser may use for this server: what it was bound to, its loopback
        # aliases when it is loopback, and (bound to every interface) this machine's names
        # and any IP literal, which a rebinding page cannot produce (its host is its name).
        names = {bound, address[0].strip("[]").lower()} - {""}
        if bound_ip.is_loopback or bound_ip.is_unspecified:
            names |= LOOPBACK_NAMES
        if bound_ip.is_unspecified:
            names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
        self.host_names = frozenset(names)
        self.any_ip = bound_ip.is_unspecified

    @property
    def url(self) -> str:
        # bound to every interface, this machine answers on loopback too; browsers refuse 0.0.0.0
        host = self.host
        if self.any_ip:
            host = "::1" if ":" in host else "127.0.0.1"
        return f"http://{_hostport(host, self.port)}/"

    def accepts_host(self, header: str | None) -> bool:
        parsed = split_host(header) if header else None
        if parsed is None or parsed[1] != self.port:
            return False
        return parsed[0] in self.host_names or (self.any_ip and _is_ip(parsed[0]))

    def expected_hosts(self) -> str:
        shown = ", ".join(_hostport(n, self.port) for n in sorted(self.host_names))
        return shown + (" or any IP address of this machine" if self.any_ip else "")

    def start(self) -> "LabelingServer":
        self._thread = threading.Thread(target=self.serve_forever, name="labeling-page", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: LabelingServer
    server_version = "danbooru-labels/1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # quiet: the terminal shows the URL and errors only

    # ---- responses ------------------------------------------------------------------
    def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        # other sites may not even embed the images (no-cors <img> loads)
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode("utf-8"), "application/json", {"Cache-Control": "no-store"})

    def _error(self, exc: RequestError) -> None:
        self._json(exc.status, {"error": exc.message, "status": int(exc.status), **exc.extra})

    def _check_origin(self) -> None:
        """Refuse requests not addressed to this server (DNS rebinding) or sent by another site."""
        host = self.headers.get("Host")
        if host is None:
            raise RequestError(HTTPStatus.FORBIDDEN, "refused: the request has no Host header")
        if not self.server.accepts_host(host):
            raise RequestError(HTTPStatus.FORBIDDEN,
                               f"refused: Host {host!r} is not this server's address (expected "
                               f"{self.server.expected_hosts()}); pages of other sites cannot use the labeling page")
        origin = self.headers.get("Origin")
        if origin is not None:
            parts = urlsplit(origin.strip())
            own = parts.scheme == "http" and parts.path == "" and split_host(parts.netloc) == split_host(host)
            if not own:
                raise RequestError(HTTPStatus.FORBIDDEN,
                                   f"refused: Origin {origin!r} is not this page's origin http://{host.strip()}")

    # ---- routing --------------------------------------------------------------------
    def do_GET(self) -> None:
        page = self.server.page
        url = urlsplit(self.path)
        path = url.path
        try:
            self._check_origin()
            if path in ("/", "/index.html"):
                self._send(200, page_html().encode("utf-8"), "text/html; charset=utf-8",
                           {"Content-Security-Policy": "default-src 'self'; style-src 'unsafe-inline'; "
                                                       "script-src 'unsafe-inline'; img-src 'self'"})
            elif path == "/api/config":
                self._json(200, {
                    "classes": list(LABEL_CLASSES), "keypoint_names": list(KEYPOINT_NAMES),
                    "skeleton": [list(p) for p in SKELETON], "colors": [list(c) for c in SKELETON_COLORS],
                    "round": page.round, "labeler": page.labeler, "page_size": page.page_size,
                })
            elif path == "/api/state":
                session_id = parse_qs(url.query).get("session", [None])[0]
                with page.lock:
                    self._json(200, page.state(page.session(session_id)))
            elif path.startswith("/thumbs/"):
                with page.lock:
                    image_id = page.parse_id(path[len("/thumbs/"):])
                    file_path = page.image_path(image_id)
                self._send(200, page.thumbnail(image_id, file_path), "image/jpeg",
                           {"Cache-Control": "private, max-age=3600"})
            elif path.startswith("/images/"):
                with page.lock:
                    file_path = page.image_path(page.parse_id(path[len("/images/"):]))
                self._send(200, file_path.read_bytes(), IMAGE_TYPES[file_path.suffix.lower()],
                           {"Cache-Control": "private, max-age=3600"})
            else:
                raise RequestError(HTTPStatus.NOT_FOUND, f"no such page: {path}")
        except RequestError as exc:
            self._error(exc)

    do_HEAD = do_GET

    def do_POST(self) -> None:
        page = self.server.page
        path = urlsplit(self.path).path
        actions = {"/api/label": page.label, "/api/skip": page.skip,
                   "/api/undo": page.undo, "/api/unskip": page.unskip,
                   "/api/grid/page": page.grid_page, "/api/grid/confirm": page.grid_confirm}
        try:
            self._check_origin()
            if path != "/api/session" and path not in actions:
                raise RequestError(HTTPStatus.NOT_FOUND, f"no such action: {path}")
            body = self._read_json()
            with page.lock:
                if path == "/api/session":
                    self._json(200, page.state(page.open_session()))
                else:
                    self._json(200, actions[path](page.session(body.get("session")), body))
        except RequestError as exc:
            self._error(exc)

    def _read_json(self) -> dict[str, Any]:
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise RequestError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "POST bodies must be application/json")
        length_text = (self.headers.get("Content-Length") or "0").strip()
        # digits only: int() would also take "-5", "+5", " 5_0" or non-ASCII digits
        if not (length_text.isascii() and length_text.isdigit()):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"invalid Content-Length {length_text!r}")
        length = int(length_text)
        if length > MAX_BODY:
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body larger than {MAX_BODY} bytes")
        raw = self.rfile.read(length) if length else b"{}"
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise RequestError(HTTPStatus.BAD_REQUEST, "body is not valid JSON") from None
        if not isinstance(body, dict):
            raise RequestError(HTTPStatus.BAD_REQUEST, "body must be a JSON object")
        return body


def make_app(store: LabelStore, dataset_root: Path | str, queue: pd.DataFrame, round: int, labeler: str,
             host: str = "127.0.0.1", port: int = 0, page_size: int = 24, recheck_fraction: float = 0.0,
             max_pixels: int | None = DEFAULT_MAX_PIXELS, seed: int | None = None) -> LabelingServer:
    """A bound (not yet serving) labeling server; ``port=0`` picks a free port.

    Call ``.start()`` to serve in a background thread (tests) or ``.serve_forever()``;
    ``.url`` is the page's address and ``.stop()`` shuts it down.
    """
    page = LabelingPage(store, Path(dataset_root), queue, round, labeler, page_size=page_size,
                        recheck_fraction=recheck_fraction, max_pixels=max_pixels, seed=seed)
    return LabelingServer((host, port), page)


def load_queue(path: Any) -> pd.DataFrame:
    """Read a ``labeling_queue`` Parquet file (or a folder of them), a local path or an fsspec
    URL (``s3://…``, like ``$DANBOORU_STORAGE``), and check its columns."""
    from upath import UPath

    from danbooru_assets.core.tables import PARQUET_SUFFIX, read_parquet

    path = UPath(path)
    files = sorted(path.glob(f"*{PARQUET_SUFFIX}")) if path.is_dir() else [path] if path.exists() else []
    if not files:
        raise FileNotFoundError(f"queue {path} does not exist; materialize the labeling_queue asset first")
    queue = pd.concat([read_parquet(file) for file in files], ignore_index=True)
    missing = {"image_id", "rel_path"} - set(queue.columns)
    if missing:
        raise ValueError(f"queue {path} lacks column(s) {sorted(missing)}")
    return queue


def add_label_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``danbooru-assets label``."""
    parser.add_argument("--queue", default=None,
                        help="labeling_queue Parquet file, a path or an fsspec URL (default: the asset's table "
                             "under $DANBOORU_STORAGE or data/storage)")
    parser.add_argument("--root", type=Path, default=None,
                        help="dataset root the queue's rel_path values are relative to (default: $DANBOORU_ROOT "
                             "or the sample data)")
    parser.add_argument("--store", default=None,
                        help="label store, a SQLite file or a SQLAlchemy URL such as "
                             "postgresql+psycopg2://user@host:5432/labels (default: $DANBOORU_LABELS or "
                             "data/labels.sqlite)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="bind address (default: localhost only; any other address is reachable from "
                             "the network without a login and prints a warning)")
    parser.add_argument("--port", type=int, default=8765, help="port (0 = any free port)")
    parser.add_argument("--labeler", default=None,
                        help="your name in the label history (default: OS user); every label this page "
                             "writes carries it, whoever sends the request")
    parser.add_argument("--round", type=int, default=None,
                        help="labeling round (default: the queue's 'round' column, else 1)")
    return parser


def run_label(args: argparse.Namespace) -> int:
    """Serve the labeling page until Ctrl-C; returns a process exit code."""
    from danbooru_assets import config

    if args.queue is None:
        from upath import UPath

        from danbooru_assets.core.tables import PARQUET_SUFFIX

        # The labeling_queue asset's table, where the Parquet IO manager keeps it
        # (StorageResource.asset_path), also when the storage is an fsspec URL.
        args.queue = UPath(config.storage_base()) / f"labeling_queue{PARQUET_SUFFIX}"
    root = Path(args.root) if args.root is not None else config.dataset_root()
    # a path or a SQLAlchemy URL, passed through as given (pathlib would mangle "://")
    store_location = args.store if args.store is not None else config.labels_path()
    try:
        queue = load_queue(args.queue)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not root.is_dir():
        print(f"error: dataset root {root} is not a directory", file=sys.stderr)
        return 2
    round_ = args.round
    if round_ is None:
        rounds = queue["round"].dropna().unique() if "round" in queue.columns else np.array([])
        round_ = int(rounds.max()) if len(rounds) else 1
    labeler = args.labeler or getpass.getuser()
    from danbooru_assets.settings import SettingsError, load_settings

    try:
        quality = load_settings(config.settings_path()).quality
    except (SettingsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        store = LabelStore(store_location)
    except (ValueError, OSError, SQLAlchemyError) as exc:
        print(f"error: label store: {exc}", file=sys.stderr)  # no location: a URL may hold a password
        return 2
    server = make_app(store, root, queue, round_, labeler, host=args.host, port=args.port,
                      page_size=quality.grid_page_size, recheck_fraction=quality.recheck_fraction)
    warning = exposure_warning(server.host, server.port)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    print(f"labeling round {round_} as {labeler!r}: {len(server.page.items)} images in the queue; "
          f"labels go to {store}")
    print(f"open {server.url}  (keys: 1 good, 2 questionable, 3 bad, z undo, s skip, k skeleton; Ctrl-C stops)",
          flush=True)
    print(f"grid mode: {server.url}?mode=grid  ({quality.grid_page_size} thumbnails a page, pre-set to the "
          "prediction: flip the exceptions with click or arrows/hjkl + 1/2/3, Enter confirms the page)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m danbooru_assets.labels.app`` — the same as ``danbooru-assets label``."""
    parser = add_label_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    return run_label(parser.parse_args(argv))



if __name__ == "__main__":
    sys.exit(main())
