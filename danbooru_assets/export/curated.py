"""Training exports of the curated dataset: a manifest table and WebDataset tar shards.

The manifest says, per image, which class it ended up in and why (a human label or the
classifier's prediction). Shards follow the WebDataset convention: consecutive tar
members sharing a key (``<key>.jpg`` + ``<key>.json``) form one sample, so any WebDataset
loader streams them without an index. Output is deterministic (sorted by image id,
fixed member metadata) and every file is written atomically.

Keypoints are in the displayed frame (EXIF orientation applied, like every stage), so a
sample's image must show that frame to any loader, including PIL's ``Image.open`` which
ignores EXIF: a file whose EXIF orientation is not 1 is exported as the decoded, upright
pixels in PNG (lossless from the decode; ``orientation_applied`` in its JSON says which
orientation was applied). Every other file is exported byte for byte.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import tarfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from danbooru_assets.pose.coco import KEYPOINT_COLUMNS, NUM_KEYPOINTS
from danbooru_assets.dataset.layout import resolve_inside
from danbooru_assets.core.images import open_image_rgb, read_image_header
from danbooru_assets.labels.classes import LABEL_CLASSES
from danbooru_assets.pose.keypoint_files import keypoint_json
from danbooru_assets.core.tables import add_tar_member, atomic_path, write_parquet

log = logging.getLogger(__name__)

PROBA_COLUMNS: tuple[str, ...] = tuple(f"p_{c}" for c in LABEL_CLASSES)
MANIFEST_COLUMNS: tuple[str, ...] = ("image_id", "rel_path", "class", "source", *PROBA_COLUMNS)
SHARD_PATTERN = "shard-{:06d}.tar"
_SHARD_RE = re.compile(r"^shard-(\d{6})\.tar$")


def build_manifest(images: pd.DataFrame, labels: pd.DataFrame | None = None,
                   predictions: pd.DataFrame | None = None,
                   classes: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per image: ``image_id, rel_path, class, source, p_*`` (+ ``md5``, ``tags``).

    ``images`` has ``image_id, rel_path`` (and optionally ``md5``, ``tags``); ``labels`` is
    ``LabelStore.latest()`` (``image_id, label``); ``predictions`` has ``image_id, p_*,
    predicted_class``. A human label wins over a prediction (``source`` says which);
    images with neither get ``class`` NA and ``source`` "unlabeled". ``classes`` keeps only
    those classes (e.g. ``["good", "questionable"]`` for training). Sorted by image id.
    """
    missing = {"image_id", "rel_path"} - set(images.columns)
    if missing:
        raise ValueError(f"images lack column(s) {sorted(missing)}")
    extra = [c for c in ("md5", "tags") if c in images.columns]
    out = images[["image_id", "rel_path", *extra]].drop_duplicates("image_id").copy()
    out["image_id"] = out["image_id"].astype("int64")

    if predictions is not None and len(predictions):
        pred_cols = [c for c in (*PROBA_COLUMNS, "predicted_class") if c in predictions.columns]
        out = out.merge(predictions[["image_id", *pred_cols]].drop_duplicates("image_id"),
                        on="image_id", how="left")
    for c in PROBA_COLUMNS:
        if c not in out.columns:
            out[c] = np.nan
        out[c] = out[c].astype("float32")
    predicted = out["predicted_class"] if "predicted_class" in out.columns else pd.Series(pd.NA, index=out.index)

    human = pd.Series(pd.NA, index=out.index, dtype="string")
    if labels is not None and len(labels):
        human_map = labels.drop_duplicates("image_id", keep="last").set_index("image_id")["label"]
        human = out["image_id"].map(human_map).astype("string")

    cls = human.fillna(predicted.astype("string"))
    source = np.where(human.notna(), "human", np.where(predicted.notna(), "predicted", "unlabeled"))
    out["class"] = cls.astype("string")
    out["source"] = pd.Series(source, index=out.index, dtype="string")
    if classes is not None:
        unknown = set(classes) - set(LABEL_CLASSES)
        if unknown:
            raise ValueError(f"unknown class(es) {sorted(unknown)}")
        out = out[out["class"].isin(list(classes)).fillna(False)]
    cols = [*MANIFEST_COLUMNS, *extra]
    return out[cols].sort_values("image_id", kind="stable").reset_index(drop=True)


def write_manifest(manifest: pd.DataFrame, path: Path | str) -> Path:
    """Write the manifest Parquet atomically."""
    write_parquet(path, manifest)
    return Path(path)


def keypoints_dict(row: np.ndarray, min_confidence: float | None = None) -> dict[str, list[float | None]]:
    """The seed's per-image keypoint JSON as a dict: ``{name: [y, x]}`` in COCO order.

    ``row`` is [17, 3] (x, y, conf) as in the keypoint table; absent (NaN or, with
    ``min_confidence``, low-confidence) keypoints are ``[null, null]`` — the same text the
    pose helper's ``write_keypoint_files`` writes (its ``keypoint_json`` is reused).
    """
    arr = np.asarray(row, dtype=np.float64).reshape(NUM_KEYPOINTS, -1).copy()
    if min_confidence is not None and arr.shape[1] > 2:
        arr[~(arr[:, 2] >= min_confidence), :2] = np.nan
    return json.loads(keypoint_json(arr, axis_order="yx"))


def _resolve_inside(root: Path, rel_path: str) -> Path:
    """``root / rel_path`` resolved, refusing anything that points outside ``root`` (the
    dataset's one rule, :func:`danbooru_assets.dataset.layout.resolve_inside`)."""
    try:
        return resolve_inside(root, rel_path)
    except ValueError as exc:
        raise ValueError(f"rel_path {rel_path!r} escapes the dataset root: {exc}") from None


# Formats whose files can carry an EXIF orientation (what the decoder applies).
_EXIF_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp"})


def _export_image(path: Path) -> tuple[str, bytes, int]:
    """``(extension, bytes, orientation applied)`` of one sample's image: the file as
    stored, or, when its EXIF turns or mirrors it, the upright decoded pixels as PNG."""
    ext = path.suffix.lstrip(".").lower() or "bin"
    if ext in _EXIF_EXTENSIONS:
        orientation = read_image_header(path).orientation
        if orientation != 1:
            upright, _ = open_image_rgb(path)
            buf = io.BytesIO()
            upright.save(buf, format="PNG")
            return "png", buf.getvalue(), orientation
    return ext, path.read_bytes(), 1


def _none_if_nan(value: Any) -> Any:
    if value is None or value is pd.NA:
        return None
    if isinstance(value, (float, np.floating)) and math.isnan(value):
        return None
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _tags(value: Any) -> list[str]:
    value = _none_if_nan(value)
    if value is None:
        return []
    if isinstance(value, str):
        return value.split()  # Danbooru's space-separated tag string
    return [str(t) for t in value]


def write_webdataset_shards(manifest: pd.DataFrame, dataset_root: Path | str,
                            keypoints: pd.DataFrame | None, out_dir: Path | str,
                            samples_per_shard: int = 1000, missing: str = "error",
                            min_confidence: float | None = None) -> list[Path]:
    """Write ``shard-000000.tar``… with ``<key>.<ext>`` (image bytes) + ``<key>.json`` per sample.

    The key is the image id; samples go in image-id order, ``samples_per_shard`` per
    shard. The JSON (keys in a fixed order) holds ``image_id, class, source, probs, tags, md5, rel_path`` and
    ``keypoints`` in the seed's format (``{name: [y, x]}``; null when the image has none) and
    ``orientation_applied`` (1: the image bytes as stored; else the EXIF orientation applied
    to give the upright PNG the keypoints refer to).
    Each shard is written atomically, and shards left over from a previous, larger export
    are removed. ``missing="skip"`` skips (and logs) images whose file is absent instead of
    raising. Returns the shard paths in order.
    """
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be >= 1")
    if missing not in ("error", "skip"):
        raise ValueError("missing must be 'error' or 'skip'")
    root = Path(dataset_root).resolve()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    kp_by_id: dict[int, np.ndarray] = {}
    if keypoints is not None and len(keypoints):
        arr = keypoints[list(KEYPOINT_COLUMNS)].to_numpy(dtype=np.float64)
        kp_by_id = dict(zip(keypoints["image_id"].astype("int64").tolist(), arr))

    rows = manifest.sort_values("image_id", kind="stable").drop_duplicates("image_id")
    samples: list[tuple[str, Path, dict[str, Any]]] = []
    for rec in rows.to_dict("records"):
        image_id = int(rec["image_id"])
        path = _resolve_inside(root, str(rec["rel_path"]))
        if not path.is_file():
            if missing == "skip":
                log.warning("image %s missing at %s; skipped", image_id, path)
                continue
            raise FileNotFoundError(f"image {image_id}: {path} does not exist")
        kp = kp_by_id.get(image_id)
        meta = {
            "image_id": image_id,
            "class": _none_if_nan(rec.get("class")),
            "source": _none_if_nan(rec.get("source")),
            "probs": {c: _none_if_nan(rec.get(f"p_{c}")) for c in LABEL_CLASSES},
            "tags": _tags(rec.get("tags")),
            "md5": _none_if_nan(rec.get("md5")),
            "rel_path": str(rec["rel_path"]),
            "keypoints": None if kp is None else keypoints_dict(kp, min_confidence),
        }
        samples.append((str(image_id), path, meta))

    written: list[Path] = []
    for shard_no, start in enumerate(range(0, len(samples), samples_per_shard)):
        shard_path = out / SHARD_PATTERN.format(shard_no)
        with atomic_path(shard_path) as tmp:
            with tarfile.open(tmp, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for key, path, meta in samples[start:start + samples_per_shard]:
                    ext, data, orientation = _export_image(path)
                    meta = {**meta, "orientation_applied": orientation}
                    add_tar_member(tar, f"{key}.{ext}", data)
                    add_tar_member(tar, f"{key}.json", json.dumps(meta).encode("utf-8"))
        written.append(shard_path)
    # a previous export with more samples left higher-numbered shards: they are stale now
    for stale in out.iterdir():
        m = _SHARD_RE.match(stale.name)
        if m and int(m.group(1)) >= len(written):
            stale.unlink()
    return written


def read_webdataset_samples(shards: Iterable[Path | str]) -> list[dict[str, Any]]:
    """Read shards back into ``[{"__key__", "<ext>": bytes, "json": dict}, ...]`` (for
    tests and spot checks; training uses a WebDataset loader)."""
    samples: list[dict[str, Any]] = []
    for shard in shards:
        with tarfile.open(shard, mode="r") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                if not samples or samples[-1]["__key__"] != key:
                    samples.append({"__key__": key})
                samples[-1][ext] = json.loads(data) if ext == "json" else data
    return samples


def export_curated(storage, dataset_root: Path | str, out: Path, samples_per_shard: int = 1000) -> dict[str, int]:
    """Everything a training run needs from ``curated_dataset``, under ``out``:
    ``manifest.parquet``, ``keypoints/<id>.json`` + ``keypoints.tar.gz`` in the seed's
    format, and ``webdataset/shard-*.tar``. Raises ``LookupError`` before it exists."""
    from danbooru_assets.pose.keypoint_files import write_keypoint_files

    curated = storage.shard_tables("curated_dataset")
    if not curated:
        raise LookupError("curated_dataset is not materialized yet: run `danbooru-assets run` first")
    manifest = curated.concat().sort_values("image_id").reset_index(drop=True)
    keypoints = storage.shard_tables("pose_keypoints").rows(
        manifest["image_id"], ["image_id", "status", *KEYPOINT_COLUMNS]
    )
    keypoints = keypoints.loc[keypoints["status"] == "ok"]
    out = Path(out)
    write_manifest(manifest, out / "manifest.parquet")
    n_json = write_keypoint_files(keypoints, out_dir=out / "keypoints", tarball=out / "keypoints.tar.gz")
    shards = write_webdataset_shards(manifest, dataset_root, keypoints, out / "webdataset", samples_per_shard)
    return {"images": len(manifest), "keypoint_files": n_json, "shards": len(shards)}
