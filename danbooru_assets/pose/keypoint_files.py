r"""Import and export per-image keypoint JSON files (the seed's published format).

One JSON object per image, named ``<image_id>.json``, with exactly the 17 keys of
``coco.KEYPOINT_NAMES``, each ``[a, b]``. The seed's files are bizarre-pose-estimator
output, which is ``(row, col)`` = ``(y, x)``; other sources write ``(x, y)``. The table
this module produces always holds ``x`` to the right and ``y`` down, in image pixels.

Files live in a directory or in a ``.tar`` / ``.tar.gz`` that is streamed in one pass
(never extracted). Missing and malformed files are counted and reported, never fatal.

The seed's keypoints were estimated on Danbooru20xx's 512px release, whose images are the
originals shrunk (never enlarged) to fit 512×512 and centred on a black 512×512 square
(gwern: ImageMagick ``-resize 512x512\> -gravity center -background black -extent
512x512``). Such keypoints are in that padded frame (``frame="512px"``);
:func:`release_frame_to_image` moves them to the frame of the image actually indexed.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import tarfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pandas as pd

from danbooru_assets.pose.backend_names import KEYPOINT_FILES
from danbooru_assets.pose.coco import KEYPOINT_COLUMNS, KEYPOINT_INDEX, KEYPOINT_NAMES, NUM_KEYPOINTS
from danbooru_assets.pose.features import keypoint_array, keypoint_frame
from danbooru_assets.core.tables import add_tar_member, atomic_path, atomic_write_text

AXIS_ORDERS = ("auto", "yx", "xy")
# The frame published keypoints are in: the 512px release's padded square, or each
# indexed image's own pixels (keypoints made from the images at hand, the sample's).
KEYPOINT_FRAMES = ("512px", "image")
RELEASE_SIDE = 512
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_KEY_SET = frozenset(KEYPOINT_NAMES)


@dataclass
class ImportReport:
    """What an import saw: counts, problems, and how the axis order was decided."""

    files_seen: int = 0
    files_read: int = 0
    malformed: list[tuple[str, str]] = field(default_factory=list)
    missing_ids: list[int] = field(default_factory=list)
    axis_order: str = "yx"
    axis_evidence: dict = field(default_factory=dict)

    def to_dict(self, max_listed: int = 50) -> dict:
        """JSON-friendly summary (long lists truncated) for Dagster metadata."""
        d = asdict(self)
        d["n_malformed"] = len(self.malformed)
        d["n_missing"] = len(self.missing_ids)
        d["malformed"] = [list(m) for m in self.malformed[:max_listed]]
        d["missing_ids"] = self.missing_ids[:max_listed]
        return d


def _is_tar(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and (name.endswith(_TAR_SUFFIXES) or tarfile.is_tarfile(path))


def _iter_dir(root: Path, wanted: set[int] | None) -> Iterator[tuple[str, bytes | None, str]]:
    """Yield (relative name, bytes or None, error) for every ``*.json`` under ``root``."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in sorted(filenames):
            if not fn.endswith(".json") or fn.startswith("."):
                continue  # temp files of an in-progress atomic write start with "."
            full = os.path.join(dirpath, fn)
            rel = os.path.relpath(full, root)
            stem = fn[:-5]
            if wanted is not None and stem.isdigit() and int(stem) not in wanted:
                yield rel, b"", "skip"  # counted as seen, never opened
                continue
            try:
                with open(full, "rb") as fh:
                    yield rel, fh.read(), ""
            except OSError as exc:
                yield rel, None, f"unreadable: {exc}"


def _iter_tar(path: Path, wanted: set[int] | None) -> Iterator[tuple[str, bytes | None, str]]:
    """Stream a tarball once ("r|*" mode: sequential, no seeking, no extraction)."""
    with tarfile.open(path, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            if not base.endswith(".json") or base.startswith("."):
                continue
            if wanted is not None:
                stem = base[:-5]
                # skip unwanted members without reading their bytes
                if stem.isdigit() and int(stem) not in wanted:
                    yield member.name, b"", "skip"
                    continue
            fh = tar.extractfile(member)
            if fh is None:
                yield member.name, None, "unreadable member"
                continue
            yield member.name, fh.read(), ""


def _parse(data: bytes) -> np.ndarray:
    """Parse one file's bytes into a [17, 2] float64 array of (a, b); raise ValueError."""
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"invalid JSON: {exc.__class__.__name__}") from None
    if not isinstance(obj, dict):
        raise ValueError("top level is not an object")
    keys = obj.keys()
    if keys != _KEY_SET:
        missing = sorted(_KEY_SET - set(keys))
        extra = sorted(set(keys) - _KEY_SET)
        parts = []
        if missing:
            parts.append("missing keys " + ",".join(missing))
        if extra:
            parts.append("unexpected keys " + ",".join(map(str, extra)))
        raise ValueError("; ".join(parts))
    # fast path: no string or boolean values (only the 17 quoted keys), all pairs
    if data.count(b'"') == 2 * NUM_KEYPOINTS and b"true" not in data and b"false" not in data:
        try:
            out = np.array([obj[name] for name in KEYPOINT_NAMES], dtype=np.float64)  # null -> NaN
        except (TypeError, ValueError):
            out = None
        if out is not None and out.shape == (NUM_KEYPOINTS, 2):
            out[~np.isfinite(out).all(axis=1)] = np.nan  # present only as a whole, and finite
            return out
    # slow path: find and name the problem
    out = np.empty((NUM_KEYPOINTS, 2), dtype=np.float64)
    for name, value in obj.items():
        i = KEYPOINT_INDEX[name]
        if not isinstance(value, list) or len(value) != 2:
            raise ValueError(f"{name} is not a pair")
        for j, v in enumerate(value):
            if v is None:  # exporter writes absent keypoints as null
                out[i, j] = np.nan
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out[i, j] = v
            else:
                raise ValueError(f"{name} has a non-numeric value")
    # a keypoint is present only as a whole, and finite
    out[~np.isfinite(out).all(axis=1)] = np.nan
    return out


def _upright_fraction(vertical: np.ndarray) -> tuple[float, int]:
    """Share of poses that look upright when ``vertical`` [N,17] is the down axis.

    Checks (each only where both ends exist): nose above hips, shoulders above hips,
    shoulders above knees, hips above ankles, nose above ankles. A pose counts as
    upright when most of its available checks pass. Returns (fraction, poses evaluated).
    """
    k = KEYPOINT_INDEX

    def mid(a: str, b: str) -> np.ndarray:
        return np.nanmean(vertical[:, [k[a], k[b]]], axis=1)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pairs -> NaN, intended
        nose = vertical[:, k["nose"]]
        shoulders = mid("shoulder_left", "shoulder_right")
        hips = mid("hip_left", "hip_right")
        knees = mid("knee_left", "knee_right")
        ankles = mid("ankle_left", "ankle_right")
    pairs = [(nose, hips), (shoulders, hips), (shoulders, knees), (hips, ankles), (nose, ankles)]
    passed = np.zeros(len(vertical))
    available = np.zeros(len(vertical))
    for upper, lower in pairs:
        ok = np.isfinite(upper) & np.isfinite(lower)
        available += ok
        passed += ok & (upper < lower)
    evaluated = available > 0
    n = int(evaluated.sum())
    if n == 0:
        return float("nan"), 0
    upright = passed[evaluated] / available[evaluated] > 0.5
    return float(upright.mean()), n


def detect_axis_order(raw: np.ndarray, default: str = "yx") -> tuple[str, dict]:
    """Decide whether raw pairs [N,17,2] are (y, x) or (x, y) from anatomy.

    Under the right interpretation most illustrated figures are upright (head above
    hips above feet, y down). Returns the decision and its evidence; with no usable
    evidence or a tie, falls back to ``default`` (the seed's ``yx``) and says so.
    """
    frac_yx, n = _upright_fraction(raw[:, :, 0])  # yx: first value is the row (y)
    frac_xy, _ = _upright_fraction(raw[:, :, 1])
    evidence = {
        "poses_evaluated": n,
        "upright_fraction_if_yx": None if math.isnan(frac_yx) else round(frac_yx, 4),
        "upright_fraction_if_xy": None if math.isnan(frac_xy) else round(frac_xy, 4),
    }
    if n == 0 or frac_yx == frac_xy:
        decision, reason = default, f"no anatomical evidence either way; default {default}"
    elif frac_yx > frac_xy:
        decision, reason = "yx", "more poses are upright when the first value is the row"
    else:
        decision, reason = "xy", "more poses are upright when the second value is the row"
    evidence["decision"] = decision
    evidence["reason"] = reason
    return decision, evidence


def source_fingerprint(source: Path | str) -> dict:
    """What identifies a keypoint source's content without reading it.

    A tarball: its size and mtime. A folder: the name, size and mtime (ns) of every JSON
    file under it, hashed; the folder's own mtime would miss a file edited in place.
    One directory walk with a ``stat`` per file, no file opened.
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"keypoint source {path} does not exist")
    fp: dict = {"backend": KEYPOINT_FILES, "source": str(path.resolve())}
    if not path.is_dir():
        st = path.stat()
        return {**fp, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    digest = hashlib.sha256()
    files = 0
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for fn in sorted(filenames):
            if not fn.endswith(".json") or fn.startswith("."):
                continue  # the files the importer reads, as _iter_dir picks them
            full = os.path.join(dirpath, fn)
            try:
                st = os.stat(full)
            except FileNotFoundError:  # removed while we walked: the next run sees it gone
                continue
            digest.update(f"{os.path.relpath(full, path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            files += 1
    return {**fp, "files": files, "files_sha256": digest.hexdigest()}


def read_keypoint_files(
    source: Path | str,
    axis_order: str = "auto",
    image_ids: Iterable[int] | None = None,
) -> tuple[pd.DataFrame, ImportReport]:
    """Read ``<image_id>.json`` keypoint files from a directory or tarball.

    Returns a frame (image_id int64 + ``KEYPOINT_COLUMNS`` float64, x right / y down,
    confidence 1.0 where a keypoint is present and NaN where absent), sorted by
    image_id, and an ``ImportReport``. With ``image_ids`` only those ids are parsed
    and ids not found are listed in ``missing_ids``. Tarballs are read in one pass.
    """
    if axis_order not in AXIS_ORDERS:
        raise ValueError(f"axis_order must be one of {AXIS_ORDERS}, got {axis_order!r}")
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"keypoint source {source} does not exist")
    wanted = None if image_ids is None else {int(i) for i in image_ids}
    report = ImportReport()
    ids: list[int] = []
    arrays: list[np.ndarray] = []
    seen_ids: set[int] = set()

    members = _iter_dir(source, wanted) if source.is_dir() else (
        _iter_tar(source, wanted) if _is_tar(source) else None
    )
    if members is None:
        raise ValueError(f"{source} is neither a directory nor a tar archive")
    for name, data, error in members:
        report.files_seen += 1
        if error == "skip":
            continue
        base = name.rsplit("/", 1)[-1]
        stem = base[:-5]
        if not stem.isdigit():
            report.malformed.append((name, "file name is not an image id"))
            continue
        image_id = int(stem)
        if wanted is not None and image_id not in wanted:
            continue
        if error:
            report.malformed.append((name, error))
            continue
        if image_id in seen_ids:
            report.malformed.append((name, "duplicate image id (first file kept)"))
            continue
        try:
            arr = _parse(data or b"")
        except ValueError as exc:
            report.malformed.append((name, str(exc)))
            continue
        seen_ids.add(image_id)
        ids.append(image_id)
        arrays.append(arr)
    report.files_read = len(ids)
    if wanted is not None:
        report.missing_ids = sorted(wanted - seen_ids)

    raw = np.stack(arrays) if arrays else np.empty((0, NUM_KEYPOINTS, 2))
    if axis_order == "auto":
        decided, evidence = detect_axis_order(raw)
    else:
        decided = axis_order
        _, evidence = detect_axis_order(raw)
        evidence["decision"] = decided
        evidence["reason"] = "set explicitly"
    report.axis_order = decided
    report.axis_evidence = evidence
    return _to_frame(np.asarray(ids, dtype=np.int64), raw, decided), report


def _to_frame(ids: np.ndarray, raw: np.ndarray, axis_order: str) -> pd.DataFrame:
    n = len(ids)
    xy = raw[:, :, ::-1] if axis_order == "yx" else raw
    conf = np.where(np.isnan(xy[:, :, 0]), np.nan, 1.0)
    values = np.concatenate([xy, conf[:, :, None]], axis=2).reshape(n, NUM_KEYPOINTS * 3)
    order = np.argsort(ids, kind="stable")
    frame = pd.DataFrame(values[order], columns=list(KEYPOINT_COLUMNS))
    frame.insert(0, "image_id", ids[order])
    return frame


def release_padding(width: np.ndarray, height: np.ndarray, side: int = RELEASE_SIDE):
    """``(scale_x, scale_y, offset_x, offset_y)`` of images ``width`` × ``height`` in the
    512px release: shrunk (never enlarged) to fit ``side``, rounded to whole pixels, centred
    on a ``side``-square (offsets floor((side - scaled) / 2), as ImageMagick's centre gravity)."""
    w = np.asarray(width, dtype=np.float64)
    h = np.asarray(height, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.minimum(1.0, side / np.maximum(w, h))
    sw = np.maximum(1.0, np.floor(w * scale + 0.5))
    sh = np.maximum(1.0, np.floor(h * scale + 0.5))
    with np.errstate(divide="ignore", invalid="ignore"):
        return sw / w, sh / h, np.floor((side - sw) / 2), np.floor((side - sh) / 2)


def release_frame_to_image(
    xy: np.ndarray, width: np.ndarray, height: np.ndarray, indexed_folder: str = "original"
) -> np.ndarray:
    """Keypoints ``xy`` [N, 17, 2] (x, y) in the 512px release's padded frame, moved to the
    frame of the indexed images of size ``width`` × ``height`` (the originals). Under the
    ``512px`` folder the indexed image is that padded square: unchanged. An unknown size
    (0 or missing) gives NaN: a keypoint in a frame it does not belong to is worse than none."""
    xy = np.asarray(xy, dtype=np.float64)
    if indexed_folder == "512px":
        return xy.copy()
    sx, sy, ox, oy = release_padding(width, height)
    out = np.empty_like(xy)
    out[:, :, 0] = (xy[:, :, 0] - ox[:, None]) / sx[:, None]
    out[:, :, 1] = (xy[:, :, 1] - oy[:, None]) / sy[:, None]
    known = (np.asarray(width, dtype=np.float64) > 0) & (np.asarray(height, dtype=np.float64) > 0)
    out[~known] = np.nan
    return out


def keypoints_for_ids(
    published: pd.DataFrame | None,
    image_ids: np.ndarray,
    fingerprint: str,
    frame: str = "image",
    sizes: tuple[np.ndarray, np.ndarray] | None = None,
    indexed_folder: str = "original",
) -> pd.DataFrame:
    """The ``pose_keypoints`` rows of ``image_ids`` (in that order) from imported keypoints
    (``read_keypoint_files``' table; None: nothing imported): status ``ok`` where an id
    has a keypoint, ``no_keypoint_file`` (all NaN) where it has none. With ``frame``
    ``512px``, the keypoints are moved from the 512px release's frame to the indexed images'
    (``sizes``: their widths and heights, aligned with ``image_ids``; ``indexed_folder``)."""
    if frame not in KEYPOINT_FRAMES:
        raise ValueError(f"keypoint frame must be one of {KEYPOINT_FRAMES}, got {frame!r}")
    if published is None:
        published = pd.DataFrame(columns=["image_id", *KEYPOINT_COLUMNS])
    ids = np.asarray(image_ids, dtype=np.int64)
    rows = pd.DataFrame({"image_id": ids}).merge(published, on="image_id", how="left")
    kps = keypoint_array(rows)
    if frame == "512px":
        if sizes is None:
            raise ValueError("keypoints in the 512px frame need the indexed images' sizes")
        kps = kps.copy()
        kps[:, :, :2] = release_frame_to_image(kps[:, :, :2], sizes[0], sizes[1], indexed_folder)
    found = np.isfinite(kps[:, :, 0]).any(axis=1)
    status = np.where(found, "ok", "no_keypoint_file")
    return keypoint_frame(ids, kps, None, backend=KEYPOINT_FILES, backend_fingerprint=fingerprint, status=list(status))


def _json_number(v: float) -> float | None:
    # repr of a Python float round-trips exactly through json; NaN becomes null
    return None if math.isnan(v) else float(v)


def keypoint_json(row_xy: np.ndarray, axis_order: str = "yx") -> str:
    """One file's text for a [17, 2+] array of (x, y[, conf]) in the seed's format."""
    out = {}
    for i, name in enumerate(KEYPOINT_NAMES):
        x, y = float(row_xy[i, 0]), float(row_xy[i, 1])
        if math.isnan(x) or math.isnan(y):
            pair = [None, None]
        else:
            pair = [_json_number(y), _json_number(x)] if axis_order == "yx" else [x, y]
        out[name] = pair
    return json.dumps(out)


def write_keypoint_files(
    keypoints: pd.DataFrame,
    out_dir: Path | None = None,
    tarball: Path | None = None,
    axis_order: str = "yx",
    min_confidence: float | None = None,
) -> int:
    """Write one ``<image_id>.json`` per row into ``out_dir`` and/or ``tarball``.

    Keypoints with NaN coordinates (or, with ``min_confidence``, a lower confidence)
    are written as ``[null, null]``. Each directory file and the tarball are written
    atomically; the tarball is byte-for-byte deterministic (members sorted by id,
    mtime 0, no owner names, gzip header without time or name). Returns files written.
    """
    if axis_order not in ("yx", "xy"):
        raise ValueError("axis_order must be 'yx' or 'xy' for export")
    if out_dir is None and tarball is None:
        raise ValueError("give out_dir and/or tarball")
    ids = keypoints["image_id"].to_numpy(dtype=np.int64)
    if len(np.unique(ids)) != len(ids):
        raise ValueError("duplicate image_id rows; one file per image")
    arr = keypoints[list(KEYPOINT_COLUMNS)].to_numpy(dtype=np.float64).reshape(
        len(keypoints), NUM_KEYPOINTS, 3
    )
    if min_confidence is not None:
        arr = arr.copy()
        low = ~(arr[:, :, 2] >= min_confidence)
        arr[low, :2] = np.nan
    order = np.argsort(ids, kind="stable")
    texts = [(int(ids[i]), keypoint_json(arr[i], axis_order)) for i in order]

    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for image_id, text in texts:
            atomic_write_text(out_dir / f"{image_id}.json", text)
    if tarball is not None:
        tarball = Path(tarball)
        compress = tarball.name.lower().endswith((".gz", ".tgz"))
        with atomic_path(tarball) as tmp, open(tmp, "wb") as raw_fh:
            # our own GzipFile: tarfile's "w:gz" stamps the current time into the header
            fh = gzip.GzipFile(filename="", mode="wb", fileobj=raw_fh, mtime=0) if compress else raw_fh
            try:
                with tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tar:
                    for image_id, text in texts:
                        add_tar_member(tar, f"{image_id}.json", text.encode("utf-8"))
            finally:
                if compress:
                    fh.close()
    return len(texts)
