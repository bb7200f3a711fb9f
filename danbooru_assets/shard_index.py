"""Build one shard's index: a row per image file, metadata joined by id.

Width and height come from the metadata when it describes the same file (the
``original/`` folder, same extension); otherwise from the image header — PIL's
``Image.open`` parses the header only, never decoding pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from danbooru_assets.dataset import IMAGE_EXTENSIONS, DanbooruDatasetResource
import pyarrow as pa

from danbooru_assets.metadata import METADATA_COLUMNS, empty_metadata_frame, last_row_per_id, metadata_arrow_schema

# Status values, most severe first: a row carries the first that applies.
STATUS_OK = "ok"
STATUS_ZERO_BYTES = "zero_bytes"
STATUS_UNKNOWN_EXTENSION = "unknown_extension"
STATUS_UNREADABLE_HEADER = "unreadable_header"
STATUS_NO_METADATA = "no_metadata"
STATUSES = (STATUS_OK, STATUS_NO_METADATA, STATUS_UNREADABLE_HEADER, STATUS_UNKNOWN_EXTENSION, STATUS_ZERO_BYTES)
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


def read_header_size(path) -> tuple[int, int]:
    with Image.open(path) as img:  # lazy: parses the header, decodes nothing
        return img.size


def build_shard_index(
    dataset: DanbooruDatasetResource, shard: str, metadata: pa.Table | pd.DataFrame | None
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

    zero = file_bytes == 0
    unknown = ~zero & ~np.isin(ext, list(IMAGE_EXTENSIONS))
    status[zero], problem[zero] = STATUS_ZERO_BYTES, "file is empty"
    status[unknown] = STATUS_UNKNOWN_EXTENSION
    problem[unknown] = [f"extension '.{e}' is not an image type" for e in ext[unknown]]
    for i in np.flatnonzero(~zero & ~unknown & ~meta_size_ok):
        report.header_reads += 1
        try:
            width[i], height[i] = read_header_size(dataset.image_path(rel_path[i]))
            size_source[i] = "header"
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            status[i], problem[i] = STATUS_UNREADABLE_HEADER, f"{type(exc).__name__}: {exc}"
    no_meta = (status == STATUS_OK) & ~has_meta
    status[no_meta], problem[no_meta] = STATUS_NO_METADATA, "no metadata line for this id"

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
