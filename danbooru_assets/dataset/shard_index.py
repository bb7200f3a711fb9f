"""Build one shard's index: a row per image file, metadata joined by id.

Width and height come from the metadata when it describes the same file (the
``original/`` folder, same extension); otherwise from the image header
(:func:`danbooru_assets.core.images.read_image_header`: the header only, never pixels),
in the displayed frame, EXIF orientation applied. Danbooru's metadata sizes are the stored
frame (exiftool's ``File:ImageWidth``); they differ only for a JPEG whose EXIF turns it by
90 degrees, and the CLIP stage's decode reports the displayed size (``image_stats``'
``orig_width``/``orig_height``). Reading every header to learn its orientation would cost
the index its speed.

What later stages may read is decided here, once: a row whose ``status`` is not in
:data:`USABLE_STATUSES` is never opened again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from danbooru_assets.dataset.layout import (
    ENTRY_BROKEN_LINK,
    ENTRY_LINK_LOOP,
    ENTRY_NOT_A_FILE,
    ENTRY_PROBLEMS,
    IMAGE_EXTENSIONS,
    DatasetLayout,
)
from danbooru_assets.core.images import (
    STATUS_TOO_LARGE as DECODE_TOO_LARGE,
    ImageDecodeError,
    pil_pixel_ceiling,
    read_image_header,
    size_problem,
    smallest_decode_pixels,
)
from danbooru_assets.dataset.metadata import METADATA_COLUMNS, empty_metadata_frame, last_row_per_id, metadata_arrow_schema
from danbooru_assets.core.shards import NUM_SHARDS, shard_key

# A row carries the first status that applies, in this order: link_loop / broken_link /
# not_a_file, outside_root, wrong_shard, zero_bytes, unknown_extension, unreadable_header /
# too_large, no_metadata, duplicate_file, ok.
STATUS_OK = "ok"
STATUS_LINK_LOOP = ENTRY_LINK_LOOP  # a symbolic link loop named like an image
STATUS_BROKEN_LINK = ENTRY_BROKEN_LINK  # a symbolic link whose target does not exist
STATUS_NOT_A_FILE = ENTRY_NOT_A_FILE  # a folder (or pipe, socket) named like an image
# Another file of the same id in the same folder (90036063.jpg + .png + 090036063.jpg) is
# the one read (chosen_file); this row's problem names it.
STATUS_DUPLICATE_FILE = "duplicate_file"
STATUS_OUTSIDE_ROOT = "outside_root"  # a symbolic link (or folder) leading out of the dataset root: never read
STATUS_WRONG_SHARD = "wrong_shard"  # id % 1000 is another bucket: not read (its own bucket is where it belongs)
STATUS_ZERO_BYTES = "zero_bytes"
STATUS_UNKNOWN_EXTENSION = "unknown_extension"
STATUS_UNREADABLE_HEADER = "unreadable_header"
STATUS_TOO_LARGE = "too_large"  # over the dataset layout's max_pixels: never decoded
STATUS_NO_METADATA = "no_metadata"
STATUSES = (
    STATUS_OK, STATUS_NO_METADATA, STATUS_UNREADABLE_HEADER, STATUS_TOO_LARGE, STATUS_UNKNOWN_EXTENSION,
    STATUS_ZERO_BYTES, STATUS_WRONG_SHARD, STATUS_OUTSIDE_ROOT, STATUS_DUPLICATE_FILE, STATUS_LINK_LOOP,
    STATUS_BROKEN_LINK, STATUS_NOT_A_FILE,
)
# Which file of an id is read when its folder holds several (see chosen_files): after the
# metadata's file_ext, extensions in this order.
EXTENSION_PREFERENCE = ("jpg", "png", "webp", "gif", "bmp")
# Rows with these statuses hold a decodable-looking image; later stages read them.
USABLE_STATUSES = (STATUS_OK, STATUS_NO_METADATA)

INDEX_COLUMNS = [
    "image_id",
    "shard",
    "rel_path",
    "ext",
    "file_bytes",
    "mtime",
    "width",
    "height",
    "size_source",
    "status",
    "problem",
    *[c for c in METADATA_COLUMNS if c != "image_id"],
]


@dataclass
class ShardIndexReport:
    files: int = 0
    bad_names: list[str] = field(default_factory=list)
    metadata_without_file: int = 0
    header_reads: int = 0


def _outside_root(dataset: DatasetLayout, shard: str, rel_path: np.ndarray, is_link: np.ndarray):
    """``(mask, problems)`` of rows whose path leads out of the dataset root: all of them
    when the bucket folder does, else the symbolic links that do (only links are resolved,
    so a shard of plain files costs one folder resolve)."""
    outside = np.zeros(len(rel_path), dtype=bool)
    problems = np.full(len(rel_path), "", dtype=object)
    folder_problem = dataset.outside_root_problem(f"{dataset.image_folder}/{shard}")
    if folder_problem:
        outside[:] = True
        problems[:] = f"the bucket folder {folder_problem}"
        return outside, problems
    for i in np.flatnonzero(is_link):
        problems[i] = dataset.outside_root_problem(rel_path[i])
        outside[i] = bool(problems[i])
    return outside, problems


def chosen_files(ids: np.ndarray, names: list[str], norm_ext: np.ndarray, meta_ext: np.ndarray,
                 candidate: np.ndarray) -> np.ndarray:
    """For rows that share an id, the row each one defers to (-1: none, it is read).

    Among an id's ``candidate`` rows (readable so far) one is read, by this rule, first
    difference wins: its extension is the metadata's ``file_ext``; its name is the id's
    plain spelling (``90036063.jpg``, not ``090036063.jpg``); its extension comes first in
    :data:`EXTENSION_PREFERENCE`; its name sorts first."""
    defer = np.full(len(ids), -1, dtype=np.int64)
    rows = np.flatnonzero(candidate)
    if len(rows) < 2:
        return defer
    unique, counts = np.unique(ids[rows], return_counts=True)
    repeated = rows[np.isin(ids[rows], unique[counts > 1])]
    by_id: dict[int, list[int]] = {}
    for i in repeated:
        by_id.setdefault(int(ids[i]), []).append(int(i))
    rank = {e: n for n, e in enumerate(EXTENSION_PREFERENCE)}
    for image_id, group in by_id.items():
        def key(i: int):
            return (
                norm_ext[i] != meta_ext[i],
                names[i].partition(".")[0] != str(image_id),
                rank.get(norm_ext[i], len(rank)),
                names[i],
            )
        best = min(group, key=key)
        for i in group:
            if i != best:
                defer[i] = best
    return defer


def build_shard_index(
    dataset: DatasetLayout, shard: str, metadata: pa.Table | pd.DataFrame | None
) -> tuple[pd.DataFrame, ShardIndexReport]:
    """Index one shard. ``metadata`` is the shard's metadata slice (any order)."""
    report = ShardIndexReport()
    if metadata is None:
        metadata = empty_metadata_frame()
    if isinstance(metadata, pd.DataFrame):
        metadata = pa.Table.from_pandas(metadata, schema=metadata_arrow_schema(), preserve_index=False)
    meta_ids = metadata["image_id"].to_numpy()
    if len(meta_ids) > 1 and not np.all(np.diff(meta_ids) > 0):
        # Unsorted or repeated ids (a slice not made by the conversion): the last line
        # for an id wins, rows sorted by id.
        metadata = metadata.take(pa.array(last_row_per_id(meta_ids)))
        meta_ids = metadata["image_id"].to_numpy()

    files = dataset.scan_shard(shard)
    report.files = len(files)
    named = files.image_id >= 0
    prefix = f"{dataset.image_folder}/{shard}/"
    report.bad_names = [prefix + n for n, ok in zip(files.name, named) if not ok]
    ids = files.image_id[named]
    rel_path = np.array([prefix + n for n, ok in zip(files.name, named) if ok], dtype=object)
    ext = np.array([e for e, ok in zip(files.ext, named) if ok], dtype=object)
    file_bytes = files.file_bytes[named]
    mtime = files.mtime[named]
    is_link = files.is_link[named]
    not_a_file = np.array([k for k, ok in zip(files.not_a_file, named) if ok], dtype=object)
    names = [n for n, ok in zip(files.name, named) if ok]

    # Join by id: metadata is sorted by id, so a binary search finds each file's row.
    if len(meta_ids):
        pos = np.minimum(np.searchsorted(meta_ids, ids), len(meta_ids) - 1)
        has_meta = meta_ids[pos] == ids
    else:
        pos = np.zeros(len(ids), dtype=np.int64)
        has_meta = np.zeros(len(ids), dtype=bool)
    joined = metadata.take(pa.array(pos, mask=~has_meta)) if len(ids) else metadata.slice(0, 0)
    report.metadata_without_file = int(len(meta_ids) - np.isin(meta_ids, ids[has_meta]).sum())

    n = len(ids)
    meta_width = joined["meta_width"].fill_null(0).to_numpy()
    meta_height = joined["meta_height"].fill_null(0).to_numpy()
    norm_ext = np.where(ext == "jpeg", "jpg", ext) if n else ext
    meta_ext = np.array(
        [("jpg" if e == "jpeg" else (e or "").lower()) for e in joined["meta_file_ext"].to_pylist()], dtype=object
    )
    # Metadata sizes describe the original file: trust them only for that file.
    meta_size_ok = (
        has_meta
        & (dataset.image_folder == "original")
        & (meta_ext == norm_ext)
        & (meta_width > 0)
        & (meta_height > 0)
    )
    width = np.where(meta_size_ok, meta_width, 0).astype(np.int64)
    height = np.where(meta_size_ok, meta_height, 0).astype(np.int64)
    size_source = np.where(meta_size_ok, "metadata", "").astype(object)
    status = np.full(n, STATUS_OK, dtype=object)
    problem = np.full(n, "", dtype=object)

    # Nothing to read at all: a folder, a dangling link, a link loop named like an image.
    entry_bad = not_a_file != "" if n else np.zeros(0, dtype=bool)
    status[entry_bad] = not_a_file[entry_bad]
    problem[entry_bad] = [ENTRY_PROBLEMS[k] for k in not_a_file[entry_bad]]
    outside, outside_problems = _outside_root(dataset, shard, rel_path, is_link & ~entry_bad)
    outside &= ~entry_bad
    status[outside], problem[outside] = STATUS_OUTSIDE_ROOT, outside_problems[outside]
    # A misplaced file (123.jpg in 0042) is listed where it lies but never read: its id's
    # own shard is where later stages look for it, and reading it here would give one id
    # two rows across shards.
    wrong = ~entry_bad & ~outside & (ids % NUM_SHARDS != int(shard))
    status[wrong] = STATUS_WRONG_SHARD
    problem[wrong] = [f"id {i} belongs in bucket {shard_key(i)}, not {shard}" for i in ids[wrong]]
    zero = ~entry_bad & ~outside & ~wrong & (file_bytes == 0)
    unknown = ~entry_bad & ~outside & ~wrong & ~zero & ~np.isin(ext, list(IMAGE_EXTENSIONS))
    status[zero], problem[zero] = STATUS_ZERO_BYTES, "file is empty"
    status[unknown] = STATUS_UNKNOWN_EXTENSION
    problem[unknown] = [f"extension '.{e}' is not an image type" for e in ext[unknown]]
    jpeg = norm_ext == "jpg"
    for i in np.flatnonzero((status == STATUS_OK) & ~meta_size_ok):
        report.header_reads += 1
        try:
            header = read_image_header(dataset.image_path(rel_path[i]))
            width[i], height[i], jpeg[i] = header.width, header.height, header.format == "JPEG"
            size_source[i] = "header"
        except ImageDecodeError as exc:
            too_large = exc.status == DECODE_TOO_LARGE
            status[i] = STATUS_TOO_LARGE if too_large else STATUS_UNREADABLE_HEADER
            problem[i] = exc.reason
    # Over the pixel limit even at the smallest decode: no later stage decodes it.
    ceiling = pil_pixel_ceiling()
    over = (status == STATUS_OK) & (smallest_decode_pixels(width, height, jpeg) > dataset.max_pixels)
    if ceiling is not None:
        over |= (status == STATUS_OK) & (width * height > ceiling)
    for i in np.flatnonzero(over):
        status[i], problem[i] = STATUS_TOO_LARGE, size_problem(width[i], height[i], bool(jpeg[i]), dataset.max_pixels)
    no_meta = (status == STATUS_OK) & ~has_meta
    status[no_meta], problem[no_meta] = STATUS_NO_METADATA, "no metadata line for this id"
    # One file per id is read; the others of the same folder name it.
    defer = chosen_files(ids, names, norm_ext, meta_ext, np.isin(status, USABLE_STATUSES))
    for i in np.flatnonzero(defer >= 0):
        status[i] = STATUS_DUPLICATE_FILE
        problem[i] = f"id {ids[i]} has another file in this folder; {rel_path[defer[i]]} is read"

    columns = {
        "image_id": pa.array(ids, pa.int64()),
        "shard": pa.array([shard] * n, pa.string()),
        "rel_path": pa.array(rel_path, pa.string()),
        "ext": pa.array(ext, pa.string()),
        "file_bytes": pa.array(file_bytes, pa.int64()),
        "mtime": pa.array(mtime, pa.float64()),
        "width": pa.array(width, pa.int64()),
        "height": pa.array(height, pa.int64()),
        "size_source": pa.array(size_source, pa.string()),
        "status": pa.array(status, pa.string()),
        "problem": pa.array(problem, pa.string()),
    }
    for name in METADATA_COLUMNS:
        if name != "image_id":
            columns[name] = joined[name]
    table = pa.table(columns)
    return table.select(INDEX_COLUMNS).to_pandas(), report
