"""The labeling page: one HTML page + a small JSON API, served by Starlette on uvicorn.

``danbooru-assets label --queue Q.parquet --root DATASET --store labels.sqlite`` serves
the next image of the queue large, with its keypoint skeleton (drawn client-side on a
canvas, so the toggle is instant), its scores and predicted class. Keys: ``1`` good,
``2`` questionable, ``3`` bad, ``z`` undo, ``s`` skip, ``k`` skeleton on/off; after a
conflict, ``o`` overwrites and ``n`` keeps the other label.

Grid mode (``/?mode=grid``, or ``g`` to switch): a page of ``page_size`` thumbnails, in
queue order, then ordered for a glance: by the model's predicted class, most confident
first. A tile with a prediction starts at it; a tile without one (round 1: no model yet)
starts unset, and Enter refuses a page with unset tiles. Shift+``1``/``2``/``3`` sets the
whole page, ``p`` goes back to the predictions. The labeler flips the exceptions (click a
tile, or move with arrows/``hjkl`` and set with ``1``/``2``/``3``) and confirms the page
with Enter: every tile becomes one history row. ``z`` undoes the last page: exactly that
page comes back (same tiles, order, number, with the labels sent); ``POST /api/undo`` with
an ``image_id`` undoes one tile, ``t`` shows or hides the skeletons. A confirm whose tiles
someone else changed since the page was shown stores the others and answers 409 with one
conflict per tile.

Queues: a ``labeling_queue`` may hold an ``uncertainty`` part (teaches the model) and a
``verify`` part (the model's most confident predictions, confirmed fast; see
``quality.queue.plan_round``). ``?queue=verify`` / ``?queue=uncertainty`` keeps a tab to one.

Throughput: every row the page writes carries its session, mode and the seconds since
the tab's previous action (a pause longer than ``MAX_SECONDS_PER_LABEL`` per label counts
as that much); the page shows the tab's count (undone labels taken off), labels per minute
and the round's ETA. With ``recheck_fraction`` > 0 a few already-labeled images are shown
again, blind, and stored with ``source = "recheck"`` (self-agreement, see ``labels.agreement``).

Each page load (tab) opens a session (``POST /api/session``): its own current image,
skips and undo history. Tabs are handed different images; an image on another tab's
screen is held for it until that tab is closed (it says so) or idle for
``idle_release_s``; meanwhile the page says the rest is held by another tab rather than
"queue done". Undo retracts only the tab's own labels, and labeling an image that someone
else labeled after the tab was shown it answers 409 naming who and what, until the tab
sends ``"overwrite": true``; both labels stay in the store's history.

Labelers (``labels.labelers``): without a labelers file the one labeler is the server's
(``--labeler`` or the OS user) and the page binds to loopback only; with ``--labelers``
every request needs a labeler's token and its labels carry that labeler's name. A name
never comes from a request field.

Safety: binds to 127.0.0.1 by default; any other address needs ``--labelers`` and prints
a warning. The Host header must name the bound address and port (Starlette's
``TrustedHostMiddleware``, with the port: a DNS-rebinding page's requests carry its own
host name), and an ``Origin`` must be the page's own. Images are served read-only and
only for image ids of the queue, resolved inside the dataset root.

Every request gets a status: unknown ids → 404, unknown classes, malformed or too deeply
nested JSON, non-ASCII digits → 400, bodies over ``MAX_BODY`` → 413, a label store that
cannot be reached (Postgres down, SQLite locked past its timeout) → 503 with
``Retry-After``: the page shows that the label was not saved and sends it again. POSTs
must be JSON, which makes a browser preflight any cross-site request (never approved).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import getpass
import importlib.resources
import ipaddress
import json
import logging
import math
import secrets
import socket
import sys
import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
from sqlalchemy.exc import SQLAlchemyError

from danbooru_assets.pose.coco import KEYPOINT_COLUMNS, KEYPOINT_NAMES, NUM_KEYPOINTS, SKELETON, SKELETON_COLORS
from danbooru_assets.labels.store import UNLABELED, LabelConflict, LabelStore
from danbooru_assets.labels.classes import LABEL_CLASSES
from danbooru_assets.labels.agreement import RECHECK_SOURCE
from danbooru_assets.labels.labelers import Labelers, LabelersFileError, load_labelers
from danbooru_assets.config import DEFAULT_MAX_PIXELS

log = logging.getLogger(__name__)

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
# Connections the kernel queues before uvicorn accepts them (the stdlib server's 5 reset
# bursts of labelers); capped by net.core.somaxconn.
BACKLOG = 2048
# Beyond this many open connections uvicorn answers 503 at once instead of queueing.
MAX_CONNECTIONS = 1000
IDLE_RELEASE_S = 180.0  # a tab without a request this long no longer holds its images
RETRY_AFTER_S = 5  # the Retry-After of a 503 (label store unavailable)
TOKEN_COOKIE = "danbooru_label_token"
QUEUES = ("uncertainty", "verify")
# What the store raises when its database cannot be reached or is locked: answered 503.
_UNAVAILABLE = ("OperationalError", "InterfaceError", "TimeoutError", "DisconnectionError")


def store_unavailable(exc: BaseException) -> bool:
    """Whether a store error means "try again later" (no connection, locked), not a bug."""
    return isinstance(exc, SQLAlchemyError) and (
        type(exc).__name__ in _UNAVAILABLE or bool(getattr(exc, "connection_invalidated", False)))


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

    def __init__(self, status: HTTPStatus, message: str, extra: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra or {}
        self.headers = headers or {}


def _finite(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _show(value: Any, limit: int = 60) -> str:
    """A request value for an error message: repr, cut short (it may be huge or deeply nested)."""
    try:
        text = repr(value)
    except RecursionError:
        text = "<deeply nested value>"
    return text if len(text) <= limit else text[:limit] + "…"


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


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.strip().lower() == "localhost"


def exposure_warning(host: str, port: int, labelers: Labelers | None = None) -> str | None:
    """A warning when the bound address is reachable from other machines, else ``None``."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.is_loopback:
        return None
    where = "EVERY network interface" if ip.is_unspecified else f"the network address {host}"
    return (f"WARNING: the labeling page listens on {where} (port {port}): anyone who can reach this "
            f"machine can load the page; only holders of a token of {labelers.source if labelers else '?'} "
            f"({len(labelers) if labelers else 0} labelers) see images or write labels. The traffic is plain "
            "HTTP (tokens readable on the network): use a trusted network or put TLS in front. "
            "Use the default --host 127.0.0.1 unless that is what you want.")


@dataclass
class GridPage:
    """A grid page as the labeler saw it: its number, its tiles in screen order, its rechecks."""

    number: int
    tiles: list[int]
    rechecks: set[int] = field(default_factory=set)


@dataclass
class Action:
    """One undoable action of a tab: its history rows; for a grid page, the page."""

    rows: list[int]
    page: GridPage | None = None


class PageSession:
    """One page load (a browser tab): its labeler, image, skips, undo stack and what it was shown."""

    def __init__(self, session_id: str, cursor: int, clock: int, labeler: str, queue: str | None,
                 now: float) -> None:
        self.id = session_id
        self.labeler = labeler
        self.queue = queue  # None: every part of the labeling queue
        self.opened_at = cursor  # store cursor when the tab opened
        self.current: int | None = None  # the image on the tab's screen
        self.shown: dict[int, int] = {}  # image id → store cursor when the tab was shown it
        self.skipped: set[int] = set()
        self.focus: list[int] = []  # images brought back by an undo, shown first
        self.own_rows: set[int] = set()  # history rows this tab wrote (labels and undos)
        self.undo_stack: list[Action] = []  # this tab's actions (a label, a grid page), newest last
        self.used = clock
        self.alive = now  # when the tab last sent a request (holds its images while recent)
        self.mark = now  # when the tab's previous action ended (throughput)
        self.labels_written = 0  # labels this tab wrote and did not undo
        self.seconds = 0.0
        self.recheck: int | None = None  # the labeled image shown again (single mode), if any
        self.grid: list[int] = []  # the tiles of the grid page on screen, in screen order
        self.grid_rechecks: set[int] = set()
        self.page_no = 0  # the key a grid confirm must name (changes with every page shown)
        self.page_number = 0  # the number the labeler sees
        self.pages_made = 0
        self.pending_pages: list[GridPage] = []  # pages put aside by an undo, shown again next
        self.preset: dict[int, str] = {}  # tile → class it was confirmed with before an undo
        self.row_image: dict[int, int] = {}  # this tab's label rows → their image


class LabelingPage:
    """The page's state: the queue, what is labeled (mirrored from the store), the open tabs."""

    def __init__(self, store: LabelStore, dataset_root: Path, queue: pd.DataFrame, round: int, labeler: str,
                 page_size: int = 24, recheck_fraction: float = 0.0, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 seed: int | None = None, labelers: Labelers | None = None,
                 idle_release_s: float = IDLE_RELEASE_S, clock: Callable[[], float] = time.monotonic) -> None:
        missing = {"image_id", "rel_path"} - set(queue.columns)
        if missing:
            raise ValueError(f"queue lacks column(s) {sorted(missing)}")
        if not str(labeler).strip():
            raise ValueError("labeler must be a non-empty name")
        self.store = store
        self.root = Path(dataset_root).resolve()
        self.round = int(round)
        self.labeler = str(labeler).strip()
        self.labelers = labelers
        self.clock = clock
        self.idle_release_s = float(idle_release_s)
        if "queue_rank" in queue.columns:
            queue = queue.sort_values("queue_rank", kind="stable")
        queue = queue.drop_duplicates("image_id")
        self.items: list[dict[str, Any]] = [self._item(rec) for rec in queue.to_dict("records")]
        self.by_id = {item["image_id"]: item for item in self.items}
        self.queues = [q for q in QUEUES if any(i["queue"] == q for i in self.items)]
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
        queue = rec.get("queue")
        item["queue"] = queue if isinstance(queue, str) and queue in QUEUES else "uncertainty"
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

    # ---- requests (called under the lock) ------------------------------------------
    def post(self, action: str, labeler: str, body: dict[str, Any]) -> dict[str, Any]:
        """One POST of the API, as ``labeler`` (the server decides who that is)."""
        if action == "session":
            session = self.open_session(labeler, body.get("queue"))
            return self.state(session)
        handler = {"label": self.label, "skip": self.skip, "undo": self.undo, "unskip": self.unskip,
                   "grid/page": self.grid_page, "grid/confirm": self.grid_confirm,
                   "alive": self.alive, "release": self.release}.get(action)
        if handler is None:
            raise RequestError(HTTPStatus.NOT_FOUND, f"no such action: /api/{action}")
        return handler(self.session(body.get("session"), labeler), body)

    # ---- sessions (called under the lock) ----------------------------------------
    def open_session(self, labeler: str | None = None, queue: Any = None) -> PageSession:
        if queue in (None, "", "all"):
            queue = None
        elif queue not in QUEUES:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"unknown queue {_show(queue)}; expected one of {list(QUEUES)}")
        self.sync()
        while len(self.sessions) >= MAX_SESSIONS:
            oldest = min(self.sessions.values(), key=lambda s: s.used)
            del self.sessions[oldest.id]
        self._clock += 1
        session = PageSession(secrets.token_urlsafe(16), self._seen_id, self._clock, labeler or self.labeler,
                              queue, self.clock())
        self.sessions[session.id] = session
        return session

    def session(self, session_id: Any, labeler: str | None = None) -> PageSession:
        if session_id is None or session_id == "":
            raise RequestError(HTTPStatus.BAD_REQUEST,
                               "missing session: a page load opens one with POST /api/session (reload the page)")
        session = self.sessions.get(session_id) if isinstance(session_id, str) else None
        if session is None:
            raise RequestError(HTTPStatus.NOT_FOUND,
                               "unknown session (the server restarted or this tab was idle too long): reload the page")
        if labeler is not None and session.labeler != labeler:
            raise RequestError(HTTPStatus.FORBIDDEN, "this session belongs to another labeler: reload the page")
        self._clock += 1
        session.used = self._clock
        session.alive = self.clock()
        return session

    def parse_id(self, value: Any) -> int:
        # ASCII digits only: str.isdigit() also takes "²" or "٣", which int() then refuses
        if (isinstance(value, bool) or not isinstance(value, (int, str))
                or not (str(value).isascii() and str(value).isdigit()) or len(str(value)) > 19):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"image_id must be a non-negative integer, got {_show(value)}")
        image_id = int(value)
        if image_id not in self.by_id:
            raise RequestError(HTTPStatus.NOT_FOUND, f"unknown image id {image_id}: not in this labeling queue")
        return image_id

    def _in_queue(self, session: PageSession, image_id: int) -> bool:
        return session.queue is None or self.by_id[image_id]["queue"] == session.queue

    def _open(self, session: PageSession, image_id: int) -> bool:
        return (self.labels.get(image_id) is None and image_id not in session.skipped
                and self._in_queue(session, image_id))

    def next_item(self, session: PageSession) -> dict[str, Any] | None:
        """The tab's next image: one brought back by its undo, else the one it shows, else
        the first open image no other live tab shows; ``None`` when none is left for it."""
        for image_id in session.focus:
            if self.labels.get(image_id) is None:
                return self.by_id[image_id]
        if session.current is not None and (self._open(session, session.current) or session.current == session.recheck):
            return self.by_id[session.current]
        held = self._held(session)
        recheck = self._pick_rechecks(session, 1, held)
        if recheck:
            session.recheck = recheck[0]
            return self.by_id[recheck[0]]
        for item in self.items:
            if self._open(session, item["image_id"]) and item["image_id"] not in held:
                return item
        return None

    def _live(self, session: PageSession) -> bool:
        return self.clock() - session.alive < self.idle_release_s

    def _held(self, session: PageSession) -> set[int]:
        """Images on other live tabs' screens (their current image or grid page). A tab
        closed (``/api/release``) or idle for ``idle_release_s`` holds nothing."""
        held: set[int] = set()
        for s in self.sessions.values():
            if s is not session and self._live(s):
                if s.current is not None:
                    held.add(s.current)
                held.update(s.grid)
        return held

    def _held_open(self, session: PageSession) -> int:
        """Open images of this tab's queue that other live tabs hold: why a tab may be out of work."""
        return sum(1 for i in self._held(session) if self._open(session, i))

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
                and i["image_id"] not in held and self._in_queue(session, i["image_id"])]
        picked = self.rng.sample(pool, min(n, len(pool)))
        self.rechecked.update(picked)
        return picked

    def _throughput(self, session: PageSession, remaining: int) -> dict[str, Any]:
        # the time of undone labels stays in (it was spent), their count does not
        per_label = session.seconds / session.labels_written if session.labels_written else None
        return {
            "session_labels": session.labels_written,
            "labels_per_minute": round(60.0 / per_label, 1) if per_label else None,
            "seconds_per_label": round(per_label, 2) if per_label is not None else None,
            "eta_seconds": round(remaining * per_label) if per_label is not None else None,
        }

    def _elapsed(self, session: PageSession, n_labels: int) -> tuple[float, float]:
        """Seconds since the tab's previous action, a break beyond the cap not counted, and
        now (the caller moves the mark there once its write succeeded)."""
        now = self.clock()
        return min(max(0.0, now - session.mark), MAX_SECONDS_PER_LABEL * max(1, n_labels)), now

    def _counts(self, session: PageSession) -> dict[str, Any]:
        labeled = sum(1 for i in self.items if self.labels.get(i["image_id"]) is not None)
        counts = {c: sum(1 for i in self.items if self.labels.get(i["image_id"]) == c) for c in LABEL_CLASSES}
        queues = {q: {"total": sum(1 for i in self.items if i["queue"] == q),
                      "labeled": sum(1 for i in self.items if i["queue"] == q and self.labels.get(i["image_id"]))}
                  for q in self.queues}
        mine = [i for i in self.items if self._in_queue(session, i["image_id"])]
        remaining = sum(1 for i in mine if self.labels.get(i["image_id"]) is None)
        return {"labeled": labeled, "counts": counts, "queues": queues, "remaining": remaining}

    def _common(self, session: PageSession) -> dict[str, Any]:
        counts = self._counts(session)
        return {
            "session": session.id, "round": self.round, "labeler": session.labeler, "total": len(self.items),
            "queue": session.queue, **counts, "skipped": len(session.skipped),
            "held_elsewhere": self._held_open(session),
            "throughput": self._throughput(session, counts["remaining"]),
        }

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
        return {**self._common(session), "done": item is None, "item": payload}

    # ---- grid mode (called under the lock) -------------------------------------------
    def _tile_open(self, session: PageSession, image_id: int) -> bool:
        if image_id in session.grid_rechecks:
            return True
        return self._open(session, image_id)

    def glance_order(self, image_ids: list[int]) -> list[int]:
        """Tiles in the order a glance confirms fastest: grouped by predicted class (in the
        classes' order), most confident first in each group; tiles without a prediction last."""
        order = {c: k for k, c in enumerate(LABEL_CLASSES)}

        def key(image_id: int) -> tuple:
            it = self.by_id[image_id]
            pc = it["predicted_class"]
            p = (it["probs"] or {}).get(pc) if pc else None
            return (order.get(pc, len(order)), -(p or 0.0))

        return sorted(image_ids, key=key)

    def _show_page(self, session: PageSession, page: GridPage) -> None:
        session.grid = list(page.tiles)
        session.grid_rechecks = set(page.rechecks)
        session.page_no += 1  # a confirm of what was on screen before is refused
        session.page_number = page.number
        for image_id in session.grid:
            session.shown[image_id] = self._seen_id

    def _new_grid_page(self, session: PageSession) -> None:
        """The next page: one put aside by an undo, else the next ``page_size`` open images
        no other live tab holds (an undone tile's first), in glance order."""
        session.grid, session.grid_rechecks = [], set()
        while session.pending_pages:
            page = session.pending_pages.pop()
            if any(self._tile_open(session, i) for i in page.tiles):
                self._show_page(session, page)
                return
        held = self._held(session)
        picked: list[int] = [i for i in dict.fromkeys(session.focus) if self.labels.get(i) is None][: self.page_size]
        for item in self.items:
            if len(picked) >= self.page_size:
                break
            image_id = item["image_id"]
            if image_id not in held and image_id not in picked and self._tile_open(session, image_id):
                picked.append(image_id)
        if not picked:
            return  # nothing open: no new page (and no new number)
        rechecks = self._pick_rechecks(session, len(picked), held | set(picked))
        # rechecks replace the page's last places, so a page never grows past page_size
        tiles = picked[: max(0, len(picked) - len(rechecks))] + rechecks
        session.focus = [i for i in session.focus if i not in tiles]
        session.pages_made += 1
        self._show_page(session, GridPage(session.pages_made, self.glance_order(tiles), set(rechecks)))

    def grid_state(self, session: PageSession, new_page: bool = False) -> dict[str, Any]:
        """The tab's grid page: kept while any of its tiles is open, else the next one."""
        self.sync()
        session.current = None
        if new_page or not any(self._tile_open(session, i) for i in session.grid):
            self._new_grid_page(session)
        tiles = []
        for image_id in session.grid:
            if not self._tile_open(session, image_id):
                continue
            it = self.by_id[image_id]
            tiles.append({
                "image_id": image_id, "thumb_url": f"/thumbs/{image_id}", "predicted_class": it["predicted_class"],
                "probs": it["probs"], "keypoints": it["keypoints"], "width": it["width"], "height": it["height"],
                "rel_path": it["rel_path"], "queue": it["queue"],
                "preset": session.preset.get(image_id) if image_id not in session.grid_rechecks else None,
            })
        return {**self._common(session), "page": session.page_no, "page_number": session.page_number,
                "page_size": self.page_size, "tiles": tiles, "done": not tiles}

    def grid_page(self, session: PageSession, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /api/grid/page``: the page on screen, or with ``"new": true`` the next one
        (after "keep theirs" on conflicts: tiles still open come back later)."""
        new = body.get("new", False)
        if not isinstance(new, bool):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"new must be true or false, got {_show(new)}")
        return self.grid_state(session, new_page=new)

    def grid_confirm(self, session: PageSession, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /api/grid/confirm``: ``{"page": n, "labels": {image_id: class}, "overwrite": bool}``
        stores every tile as a label in one transaction; tiles of the page left out are skipped."""
        page_no = body.get("page")
        if isinstance(page_no, bool) or not isinstance(page_no, int) or page_no != session.page_no:
            raise RequestError(HTTPStatus.CONFLICT, f"page {_show(page_no)} is not the page this tab shows "
                               f"(page {session.page_no}): reload the page")
        labels = body.get("labels")
        if not isinstance(labels, dict) or not labels:
            raise RequestError(HTTPStatus.BAD_REQUEST, "labels must be a non-empty object {image_id: class}")
        if len(labels) > MAX_PAGE_SIZE:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"at most {MAX_PAGE_SIZE} tiles per page")
        overwrite = body.get("overwrite", False)
        if not isinstance(overwrite, bool):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"overwrite must be true or false, got {_show(overwrite)}")
        on_page = set(session.grid)
        chosen: dict[int, str] = {}
        for key, label in labels.items():
            image_id = self.parse_id(key)
            if image_id not in on_page:
                raise RequestError(HTTPStatus.BAD_REQUEST, f"image {image_id} is not on this tab's page")
            if not isinstance(label, str) or label not in LABEL_CLASSES:
                raise RequestError(HTTPStatus.BAD_REQUEST, f"unknown class {_show(label)} for image {image_id}; "
                                   f"expected one of {list(LABEL_CLASSES)}")
            chosen[image_id] = label
        shown = {i: None if overwrite else session.shown.get(i, session.opened_at) for i in chosen}
        sources = {i: RECHECK_SOURCE for i in chosen if i in session.grid_rechecks}
        seconds, now = self._elapsed(session, len(chosen))
        as_seen = GridPage(session.page_number, list(session.grid), set(session.grid_rechecks))
        written, conflicts = self.store.add_page(
            chosen, session.labeler, self.round, shown_since=shown, own_rows=session.own_rows,
            session=session.id, mode="grid", seconds_spent=seconds, sources=sources)
        session.mark = now
        if written:
            session.own_rows.update(written.values())
            session.undo_stack.append(Action(list(written.values()), as_seen))
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

    def resolve_image(self, value: Any) -> tuple[int, Path]:
        """An image id from a URL and its file (the checks of ``parse_id`` and ``image_path``)."""
        image_id = self.parse_id(value)
        return image_id, self.image_path(image_id)

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
        elif row["labeler"] == session.labeler:
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
            raise RequestError(HTTPStatus.BAD_REQUEST, f"unknown class {_show(label)}; expected one of {list(LABEL_CLASSES)}")
        overwrite = body.get("overwrite", False)
        if not isinstance(overwrite, bool):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"overwrite must be true or false, got {_show(overwrite)}")
        # the labeler is the session's, which the server named: a request cannot label as someone else
        since = None if overwrite else session.shown.get(image_id, session.opened_at)
        source = RECHECK_SOURCE if image_id == session.recheck else "page"
        seconds, now = self._elapsed(session, 1)
        try:
            row_id = self.store.add(image_id, label, session.labeler, self.round, source=source,
                                    unless_changed_since=since, own_rows=session.own_rows,
                                    session=session.id, mode="single", seconds_spent=seconds)
        except LabelConflict as exc:
            raise self._conflict(session, image_id, label, exc.row) from None
        session.mark = now
        if source == RECHECK_SOURCE:
            session.recheck = None
        session.own_rows.add(row_id)
        session.undo_stack.append(Action([row_id]))
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
        session.mark = self.clock()  # time on a skipped image is not labeling time
        if image_id in session.focus:
            session.focus.remove(image_id)
        return self.state(session)

    def unskip(self, session: PageSession, body: dict[str, Any]) -> dict[str, Any]:
        session.skipped.clear()
        return self.state(session)

    def alive(self, session: PageSession, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /api/alive``: the labeler is still at this tab (``session`` already noted it)."""
        return {"session": session.id, "alive": True}

    def release(self, session: PageSession, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /api/release`` (sent as the tab closes): its images go back to the others."""
        session.current = None
        session.grid, session.grid_rechecks = [], set()
        session.alive = -math.inf
        return {"session": session.id, "released": True}

    def undo(self, session: PageSession, body: dict[str, Any]) -> dict[str, Any]:
        """Undo the tab's last action (one label, or a whole grid page: exactly that page
        comes back), or with ``image_id`` the tab's last label of that one image (one tile)."""
        grid = body.get("mode", "single") == "grid"
        retracted: list[dict[str, Any]] = []
        page: GridPage | None = None
        if body.get("image_id") is not None:
            image_id = self.parse_id(body.get("image_id"))
            for action in reversed(session.undo_stack):
                mine = [r for r in action.rows if session.row_image.get(r) == image_id]
                if mine:
                    one = self.store.retract(mine[-1], session.labeler)
                    action.rows.remove(mine[-1])
                    retracted = [one] if one is not None else []
                    break
            session.undo_stack = [a for a in session.undo_stack if a.rows]
        else:
            while not retracted and session.undo_stack:
                action = session.undo_stack[-1]
                retracted = self.store.retract_many(action.rows, session.labeler)
                session.undo_stack.pop()  # only once the store took the undo
                page = action.page
        if not retracted:
            raise RequestError(HTTPStatus.CONFLICT, "nothing to undo in this tab")
        ids = [int(r["image_id"]) for r in retracted]
        session.labels_written = max(0, session.labels_written - len(retracted))
        for r in retracted:
            session.own_rows.add(int(r["undo_id"]))
            session.skipped.discard(int(r["image_id"]))
            if r["label"] is not None:
                session.preset[int(r["image_id"])] = r["label"]
        self.sync()
        if grid:
            if any(self._tile_open(session, i) for i in session.grid):
                # the page on screen comes back after the undone one
                session.pending_pages.append(GridPage(session.page_number, list(session.grid),
                                                      set(session.grid_rechecks)))
            if page is not None:
                # a re-shown tile is blind again: it goes back among the rechecks, without its label
                self._show_page(session, page)
            else:
                session.focus = ids + [i for i in session.focus if i not in ids]
                session.grid = []  # the undone tile comes first on the next page
            state = self.grid_state(session)
        else:
            session.focus = ids + [i for i in session.focus if i not in ids]
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


# ---- HTTP: Starlette on uvicorn ---------------------------------------------------------------

class HostCheck:
    """Refuse requests whose ``Host`` is not this server's address and port (DNS rebinding:
    a rebinding page's requests carry its own host name).

    It runs in front of Starlette's ``TrustedHostMiddleware`` (which holds the same names
    but ignores the port and answers a bare 400): this one adds the port, since a page on
    another port of this machine is another origin, and a 403 that says what was expected;
    Starlette's stays behind it as a second guard.
    """

    def __init__(self, app: Any, server: "LabelingServer") -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host")
            text = host.decode("latin-1") if host is not None else None
            if text is None or not self.server.accepts_host(text):
                shown = "the request has no Host header" if text is None else \
                    f"Host {text!r} is not this server's address (expected {self.server.expected_hosts()})"
                await _json_response(HTTPStatus.FORBIDDEN, {
                    "error": f"refused: {shown}; pages of other sites cannot use the labeling page",
                    "status": 403})(scope, receive, send)
                return
        await self.app(scope, receive, send)


class CommonHeaders:
    """Headers every response carries: no MIME sniffing, and other sites may not even embed
    the images (no-cors ``<img>`` loads)."""

    HEADERS = [(b"x-content-type-options", b"nosniff"), (b"cross-origin-resource-policy", b"same-origin")]

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", []), *self.HEADERS])
            await send(message)

        await self.app(scope, receive, send_with_headers if scope["type"] == "http" else send)


def _json_response(status: int, obj: Any, headers: dict[str, str] | None = None) -> Any:
    from starlette.responses import Response

    # the standard encoder (Starlette's JSONResponse refuses NaN; values here are finite or None)
    return Response(json.dumps(obj), status_code=int(status), media_type="application/json",
                    headers={"Cache-Control": "no-store", **(headers or {})})


def build_asgi_app(server: "LabelingServer") -> Any:
    """The page's ASGI application: routes, the Host/Origin/token checks, body limits, and
    an answer with a status for every failure."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, Response
    from starlette.routing import Route

    page = server.page

    def check_origin(request: Request) -> None:
        """Refuse requests sent by another site's page (or a sandboxed one: ``null``)."""
        origin = request.headers.get("origin")
        if origin is None:
            return  # curl, scripts, same-origin GETs
        host = request.headers.get("host", "")
        parts = urlsplit(origin.strip())
        if not (parts.scheme == "http" and parts.path == "" and split_host(parts.netloc) == split_host(host)):
            raise RequestError(HTTPStatus.FORBIDDEN,
                               f"refused: Origin {origin!r} is not this page's origin http://{host.strip()}")

    def token_of(request: Request) -> str | None:
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip()
        return request.cookies.get(TOKEN_COOKIE)

    def labeler_of(request: Request, token: str | None = None) -> str:
        """Who sends the request: the server's labeler, or the holder of the request's token."""
        check_origin(request)
        if page.labelers is None:
            return page.labeler
        name = page.labelers.name_for(token if token is not None else token_of(request))
        if name is None:
            raise RequestError(HTTPStatus.UNAUTHORIZED,
                               "this labeling page is shared: open it with the link holding your labeler token "
                               "(http://HOST:PORT/?token=…), which the person running it gives you")
        return name

    async def index(request: Request) -> Response:
        token = request.query_params.get("token")
        try:
            labeler_of(request, token)
        except RequestError as exc:
            if exc.status != HTTPStatus.UNAUTHORIZED:
                raise
            return HTMLResponse(f"<!doctype html><meta charset=utf-8><title>Label images</title>"
                                f"<p>{exc.message}</p>", status_code=401, headers={"Cache-Control": "no-store"})
        response = HTMLResponse(page_html(), headers={
            "Cache-Control": "no-store",
            "Content-Security-Policy": "default-src 'self'; style-src 'unsafe-inline'; "
                                       "script-src 'unsafe-inline'; img-src 'self'"})
        if page.labelers is not None and token:
            # the page's later requests (fetches, thumbnails) carry it; other sites' requests do not
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict", path="/")
        return response

    async def config(request: Request) -> Response:
        labeler = labeler_of(request)
        return _json_response(200, {
            "classes": list(LABEL_CLASSES), "keypoint_names": list(KEYPOINT_NAMES),
            "skeleton": [list(p) for p in SKELETON], "colors": [list(c) for c in SKELETON_COLORS],
            "round": page.round, "labeler": labeler, "page_size": page.page_size, "queues": page.queues,
            "idle_release_s": page.idle_release_s, "poll_s": server.poll_s, "heartbeat_s": server.heartbeat_s,
        })

    def locked(fn: Callable[..., Any], *args: Any) -> Any:
        with page.lock:
            return fn(*args)

    async def state(request: Request) -> Response:
        labeler = labeler_of(request)
        session_id = request.query_params.get("session")
        return _json_response(200, await run_in_threadpool(
            locked, lambda: page.state(page.session(session_id, labeler))))

    async def image_file(request: Request, thumb: bool) -> Response:
        labeler_of(request)
        image_id, file_path = await run_in_threadpool(locked, page.resolve_image, request.path_params["image_id"])
        if thumb:
            body, media = await run_in_threadpool(page.thumbnail, image_id, file_path), "image/jpeg"
        else:
            body, media = await run_in_threadpool(file_path.read_bytes), IMAGE_TYPES[file_path.suffix.lower()]
        return Response(body, media_type=media, headers={"Cache-Control": "private, max-age=3600"})

    async def thumbs(request: Request) -> Response:
        return await image_file(request, True)

    async def images(request: Request) -> Response:
        return await image_file(request, False)

    async def api_post(request: Request) -> Response:
        labeler = labeler_of(request)
        action = request.path_params["action"]
        body = await read_json(request)
        return _json_response(200, await run_in_threadpool(locked, page.post, action, labeler, body))

    async def read_json(request: Request) -> dict[str, Any]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise RequestError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "POST bodies must be application/json")
        length = request.headers.get("content-length")
        if length is not None and length.isascii() and length.isdigit() and int(length) > MAX_BODY:
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body larger than {MAX_BODY} bytes")
        raw = await request.body()  # the app's max_body_size also stops a chunked body
        try:
            body = json.loads(raw) if raw else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise RequestError(HTTPStatus.BAD_REQUEST, "body is not valid JSON") from None
        except RecursionError:
            raise RequestError(HTTPStatus.BAD_REQUEST, "body is nested too deeply") from None
        if not isinstance(body, dict):
            raise RequestError(HTTPStatus.BAD_REQUEST, "body must be a JSON object")
        return body

    async def not_found(request: Request) -> Response:
        labeler_of(request)
        what = "action" if request.method == "POST" else "page"
        raise RequestError(HTTPStatus.NOT_FOUND, f"no such {what}: {request.url.path}")

    # ---- every failure answered with a status ----
    def request_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestError)
        return _json_response(exc.status, {"error": exc.message, "status": int(exc.status), **exc.extra},
                              exc.headers)

    def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _json_response(exc.status_code, {"error": str(exc.detail), "status": exc.status_code},
                              dict(exc.headers or {}))

    def too_deep(request: Request, exc: Exception) -> Response:
        return _json_response(400, {"error": "request nested too deeply", "status": 400})

    def store_error(request: Request, exc: Exception) -> Response:
        if store_unavailable(exc):
            log.warning("label store unavailable: %s", exc)
            # no URL or SQL in the answer: a URL may hold a password
            return _json_response(503, {
                "error": f"the label store is unavailable ({type(exc).__name__}); nothing was saved",
                "status": 503, "retry_after": server.retry_after_s},
                {"Retry-After": str(server.retry_after_s)})
        return server_error(request, exc)

    def server_error(request: Request, exc: Exception) -> Response:
        log.error("labeling page: %s %s failed", request.method, request.url.path, exc_info=exc)
        return _json_response(500, {"error": f"internal error ({type(exc).__name__}); see the server's log",
                                    "status": 500})

    routes = [
        Route("/", index, methods=["GET"]), Route("/index.html", index, methods=["GET"]),
        Route("/api/config", config, methods=["GET"]), Route("/api/state", state, methods=["GET"]),
        Route("/thumbs/{image_id:path}", thumbs, methods=["GET"]),
        Route("/images/{image_id:path}", images, methods=["GET"]),
        Route("/api/{action:path}", api_post, methods=["POST"]),
        Route("/{path:path}", not_found, methods=["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(CommonHeaders), Middleware(HostCheck, server=server),
                    Middleware(TrustedHostMiddleware, allowed_hosts=server.allowed_host_patterns(),
                               www_redirect=False)],
        # handled where they happen (not re-raised into the log as a crash); the rest → a 500 answer
        exception_handlers={RequestError: request_error, HTTPException: http_error, RecursionError: too_deep,
                            SQLAlchemyError: store_error, Exception: server_error},
        max_body_size=MAX_BODY,
    )


class LabelingServer:
    """The page's HTTP server (uvicorn on a socket bound here, so ``port=0`` is known at
    once); ``start()`` serves in a background thread, ``serve_forever()`` in this one,
    ``stop()`` ends it."""

    def __init__(self, address: tuple[str, int], page: LabelingPage, poll_s: float = 5.0,
                 heartbeat_s: float | None = None, retry_after_s: int = RETRY_AFTER_S) -> None:
        import uvicorn

        self.page = page
        self.poll_s = float(poll_s)
        self.heartbeat_s = float(heartbeat_s) if heartbeat_s is not None else page.idle_release_s / 3
        self.retry_after_s = int(retry_after_s)
        self._thread: threading.Thread | None = None
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind((address[0].strip("[]"), address[1]))
            self.socket.listen(BACKLOG)
        except OSError:
            self.socket.close()
            raise
        self.server_address = self.socket.getsockname()
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
        self.app = build_asgi_app(self)
        self.uvicorn = uvicorn.Server(uvicorn.Config(
            self.app, http="h11", loop="asyncio", lifespan="off", backlog=BACKLOG,
            limit_concurrency=MAX_CONNECTIONS, timeout_keep_alive=15, server_header=False,
            access_log=False, log_config=None, log_level="warning"))

    @property
    def url(self) -> str:
        # bound to every interface, this machine answers on loopback too; browsers refuse 0.0.0.0
        host = self.host
        if self.any_ip:
            host = "::1" if ":" in host else "127.0.0.1"
        return f"http://{_hostport(host, self.port)}/"

    def allowed_host_patterns(self) -> list[str]:
        """``TrustedHostMiddleware``'s list: the names, IPv6 ones in brackets as Host spells
        them; any host when bound to every interface (IP literals are checked by ``accepts_host``)."""
        if self.any_ip:
            return ["*"]
        return sorted(f"[{n}]" if ":" in n else n for n in self.host_names)

    def accepts_host(self, header: str | None) -> bool:
        parsed = split_host(header) if header else None
        if parsed is None or parsed[1] != self.port:
            return False
        return parsed[0] in self.host_names or (self.any_ip and _is_ip(parsed[0]))

    def expected_hosts(self) -> str:
        shown = ", ".join(_hostport(n, self.port) for n in sorted(self.host_names))
        return shown + (" or any IP address of this machine" if self.any_ip else "")

    def serve_forever(self) -> None:
        """Serve until Ctrl-C / SIGTERM (uvicorn's signal handling, in the main thread)."""
        self.uvicorn.run(sockets=[self.socket])

    def start(self) -> "LabelingServer":
        self._thread = threading.Thread(target=lambda: asyncio.run(self.uvicorn.serve(sockets=[self.socket])),
                                        name="labeling-page", daemon=True)
        self._thread.start()
        while not self.uvicorn.started and self._thread.is_alive():
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.uvicorn.should_exit = True
            self._thread.join(timeout=30)
            self._thread = None
        self.server_close()

    def server_close(self) -> None:
        self.socket.close()


def make_app(store: LabelStore, dataset_root: Path | str, queue: pd.DataFrame, round: int, labeler: str,
             host: str = "127.0.0.1", port: int = 0, page_size: int = 24, recheck_fraction: float = 0.0,
             max_pixels: int | None = DEFAULT_MAX_PIXELS, seed: int | None = None,
             labelers: Labelers | None = None, idle_release_s: float = IDLE_RELEASE_S,
             poll_s: float = 5.0, heartbeat_s: float | None = None, retry_after_s: int = RETRY_AFTER_S,
             clock: Callable[[], float] = time.monotonic) -> LabelingServer:
    """A bound (not yet serving) labeling server; ``port=0`` picks a free port.

    Call ``.start()`` to serve in a background thread (tests) or ``.serve_forever()``;
    ``.url`` is the page's address and ``.stop()`` shuts it down. ``labelers`` (token →
    name) makes every request need a token; without it the one labeler is ``labeler``.
    """
    page = LabelingPage(store, Path(dataset_root), queue, round, labeler, page_size=page_size,
                        recheck_fraction=recheck_fraction, max_pixels=max_pixels, seed=seed, labelers=labelers,
                        idle_release_s=idle_release_s, clock=clock)
    return LabelingServer((host, port), page, poll_s=poll_s, heartbeat_s=heartbeat_s, retry_after_s=retry_after_s)


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
                             "the network: it needs --labelers, and prints a warning)")
    parser.add_argument("--port", type=int, default=8765, help="port (0 = any free port)")
    parser.add_argument("--labeler", default=None,
                        help="your name in the label history (default: OS user); every label this page "
                             "writes carries it, whoever sends the request")
    parser.add_argument("--labelers", type=Path, default=None, metavar="FILE",
                        help="several labelers: a file of 'NAME TOKEN' lines; every request then needs a "
                             "token (each labeler opens http://HOST:PORT/?token=THEIRS) and its labels carry "
                             "that name. Required to bind beyond localhost")
    parser.add_argument("--round", type=int, default=None,
                        help="labeling round (default: the queue's 'round' column, else 1)")
    return parser


def run_label(args: argparse.Namespace) -> int:
    """Serve the labeling page until Ctrl-C; returns a process exit code."""
    from danbooru_assets import config

    if args.queue is None:
        from danbooru_assets.core.tables import TableLayout

        # The labeling_queue asset's table, where the Parquet IO manager keeps it, also
        # when the storage is an fsspec URL.
        args.queue = TableLayout(config.storage_base()).table_path("labeling_queue")
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
    labelers = None
    if args.labelers is not None:
        if args.labeler is not None:
            print("error: give --labeler or --labelers, not both (with --labelers each token names its labeler)",
                  file=sys.stderr)
            return 2
        try:
            labelers, file_warning = load_labelers(args.labelers)
        except LabelersFileError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if file_warning:
            print(file_warning, file=sys.stderr, flush=True)
    elif not is_loopback(args.host):
        print(f"error: --host {args.host} makes the labeling page reachable from other machines; a shared page "
              "needs --labelers FILE (one 'NAME TOKEN' line per labeler), so that every label is someone's "
              "and nobody else can write. Without it, keep the default --host 127.0.0.1.", file=sys.stderr)
        return 2
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
    try:
        server = make_app(store, root, queue, round_, labeler, host=args.host, port=args.port,
                          page_size=quality.grid_page_size, recheck_fraction=quality.recheck_fraction,
                          labelers=labelers)
    except OSError as exc:
        print(f"error: cannot listen on {args.host} port {args.port}: {exc}", file=sys.stderr)
        return 2
    except SQLAlchemyError as exc:
        print(f"error: label store: {type(exc).__name__}: the store cannot be read", file=sys.stderr)
        return 2
    warning = exposure_warning(server.host, server.port, labelers)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    who = (f"{len(labelers)} labelers of {labelers.source}" if labelers is not None else repr(labeler))
    parts = ", ".join(f"{q} {sum(1 for i in server.page.items if i['queue'] == q)}" for q in server.page.queues)
    print(f"labeling round {round_} as {who}: {len(server.page.items)} images in the queue ({parts}); "
          f"labels go to {store}")
    print(f"open {server.url}  (keys: 1 good, 2 questionable, 3 bad, z undo, s skip, k skeleton; Ctrl-C stops)",
          flush=True)
    print(f"grid mode: {server.url}?mode=grid  ({quality.grid_page_size} thumbnails a page, each starting at its "
          "prediction, unset without one: flip the exceptions with click or arrows/hjkl + 1/2/3, Enter confirms the "
          "page)" + ("; ?queue=verify for the model's most confident ones" if "verify" in server.page.queues else ""),
          flush=True)
    if labelers is not None:
        print("each labeler opens " + server.url + "?token=THEIR_TOKEN (the page keeps it in a cookie)", flush=True)
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
