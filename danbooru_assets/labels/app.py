"""The labeling page: one HTML page + a small JSON API on the stdlib HTTP server.

``danbooru-assets label --queue Q.parquet --root DATASET --store labels.sqlite`` serves
the next image of the queue large, with its keypoint skeleton (drawn client-side on a
canvas, so the toggle is instant), its scores and predicted class. Keys: ``1`` good,
``2`` questionable, ``3`` bad, ``z`` undo, ``s`` skip, ``k`` skeleton on/off; after a
conflict, ``o`` overwrites and ``n`` keeps the other label.

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
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pandas as pd

from danbooru_assets.pose.coco import KEYPOINT_COLUMNS, KEYPOINT_NAMES, NUM_KEYPOINTS, SKELETON, SKELETON_COLORS
from danbooru_assets.labels.store import UNLABELED, LabelConflict, LabelStore
from danbooru_assets.labels.classes import LABEL_CLASSES

IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".gif": "image/gif",
               ".webp": "image/webp", ".bmp": "image/bmp"}
MAX_BODY = 64 * 1024
# Page loads kept; the least recently used beyond this is forgotten (its tab must reload).
MAX_SESSIONS = 256
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


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
        self.undo_stack: list[int] = []  # this tab's label rows, newest last
        self.used = clock


class LabelingPage:
    """The page's state: the queue, what is labeled (mirrored from the store), the open tabs."""

    def __init__(self, store: LabelStore, dataset_root: Path, queue: pd.DataFrame, round: int, labeler: str) -> None:
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
        if session.current is not None and open_(session.current):
            return self.by_id[session.current]
        held = {s.current for s in self.sessions.values() if s is not session}
        shared = None
        for item in self.items:
            if open_(item["image_id"]):
                if item["image_id"] not in held:
                    return item
                shared = shared or item
        # A closed tab's image must stay reachable; a clash is caught by the conflict check.
        return shared

    def state(self, session: PageSession) -> dict[str, Any]:
        self.sync()
        item = self.next_item(session)
        session.current = None if item is None else item["image_id"]
        labeled = sum(1 for i in self.items if self.labels.get(i["image_id"]) is not None)
        counts = {c: sum(1 for i in self.items if self.labels.get(i["image_id"]) == c) for c in LABEL_CLASSES}
        payload = None
        if item is not None:
            session.shown[item["image_id"]] = self._seen_id
            payload = dict(item, image_url=f"/images/{item['image_id']}",
                           current_label=self.labels.get(item["image_id"]))
        return {
            "session": session.id, "round": self.round, "labeler": self.labeler, "total": len(self.items),
            "labeled": labeled, "skipped": len(session.skipped), "counts": counts, "done": item is None,
            "item": payload,
        }

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
        try:
            row_id = self.store.add(image_id, label, self.labeler, self.round, source="page",
                                    unless_changed_since=since, own_rows=session.own_rows)
        except LabelConflict as exc:
            raise self._conflict(session, image_id, label, exc.row) from None
        session.own_rows.add(row_id)
        session.undo_stack.append(row_id)
        session.shown[image_id] = row_id  # what came before this write is settled (seen or overwritten)
        session.skipped.discard(image_id)
        if image_id in session.focus:
            session.focus.remove(image_id)
        return self.state(session)

    def skip(self, session: PageSession, body: dict[str, Any]) -> dict[str, Any]:
        image_id = self.parse_id(body.get("image_id"))
        session.skipped.add(image_id)
        if image_id in session.focus:
            session.focus.remove(image_id)
        return self.state(session)

    def unskip(self, session: PageSession, body: dict[str, Any]) -> dict[str, Any]:
        session.skipped.clear()
        return self.state(session)

    def undo(self, session: PageSession, body: dict[str, Any]) -> dict[str, Any]:
        retracted = None
        while retracted is None and session.undo_stack:
            retracted = self.store.retract(session.undo_stack.pop(), self.labeler)
        if retracted is None:
            raise RequestError(HTTPStatus.CONFLICT, "nothing to undo in this tab")
        session.own_rows.add(int(retracted["undo_id"]))
        image_id = int(retracted["image_id"])
        session.skipped.discard(image_id)
        session.focus = [image_id] + [i for i in session.focus if i != image_id]
        state = self.state(session)
        state["retracted"] = {"image_id": image_id, "label": retracted["label"], "id": retracted["id"]}
        return state


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
                    "round": page.round, "labeler": page.labeler,
                })
            elif path == "/api/state":
                session_id = parse_qs(url.query).get("session", [None])[0]
                with page.lock:
                    self._json(200, page.state(page.session(session_id)))
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
                   "/api/undo": page.undo, "/api/unskip": page.unskip}
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
             host: str = "127.0.0.1", port: int = 0) -> LabelingServer:
    """A bound (not yet serving) labeling server; ``port=0`` picks a free port.

    Call ``.start()`` to serve in a background thread (tests) or ``.serve_forever()``;
    ``.url`` is the page's address and ``.stop()`` shuts it down.
    """
    page = LabelingPage(store, Path(dataset_root), queue, round, labeler)
    return LabelingServer((host, port), page)


def load_queue(path: Path | str) -> pd.DataFrame:
    """Read a ``labeling_queue`` Parquet file (or a folder of them) and check its columns."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"queue {path} does not exist; materialize the labeling_queue asset first")
    queue = pd.read_parquet(path)
    missing = {"image_id", "rel_path"} - set(queue.columns)
    if missing:
        raise ValueError(f"queue {path} lacks column(s) {sorted(missing)}")
    return queue


def add_label_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``danbooru-assets label``."""
    parser.add_argument("--queue", type=Path, default=None,
                        help="labeling_queue Parquet file (default: the asset's table under $DANBOORU_STORAGE "
                             "or data/storage)")
    parser.add_argument("--root", type=Path, default=None,
                        help="dataset root the queue's rel_path values are relative to (default: $DANBOORU_ROOT "
                             "or the sample data)")
    parser.add_argument("--store", type=Path, default=None,
                        help="label store, a SQLite file (default: $DANBOORU_LABELS or data/labels.sqlite)")
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
        # The labeling_queue asset's table, where the Parquet IO manager keeps it.
        args.queue = Path(config.storage_base()) / "labeling_queue.parquet"
    root = Path(args.root) if args.root is not None else config.dataset_root()
    store_path = Path(args.store) if args.store is not None else config.labels_path()
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
    server = make_app(LabelStore(store_path), root, queue, round_, labeler, host=args.host, port=args.port)
    warning = exposure_warning(server.host, server.port)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    print(f"labeling round {round_} as {labeler!r}: {len(server.page.items)} images in the queue; "
          f"labels go to {store_path}")
    print(f"open {server.url}  (keys: 1 good, 2 questionable, 3 bad, z undo, s skip, k skeleton; Ctrl-C stops)",
          flush=True)
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
