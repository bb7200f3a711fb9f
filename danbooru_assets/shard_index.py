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
from danbooru_assets.metadata import METADATA_COLUMNS, empty_metadata_frame

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
    dataset: DanbooruDatasetResource, shard: str, metadata: pd.DataFrame | None
) -> tuple[pd.DataFrame, ShardIndexReport]:
    report = ShardIndexReport()
    metadata = empty_metadata_frame() if metadata is None else metadata
    files = dataset.list_shard_files(shard)
    report.files = len(files)
    rows = []
    for f in files:
        if f.image_id is None:
            report.bad_names.append(f.rel_path)
            continue
        rows.append((f.image_id, f.rel_path, f.ext, f.file_bytes, f.mtime))
    index = pd.DataFrame(rows, columns=["image_id", "rel_path", "ext", "file_bytes", "mtime"]).astype(
        {"image_id": "int64", "file_bytes": "int64", "mtime": "float64"}
    )
    index.insert(1, "shard", shard)
    # Duplicate metadata lines for one id (dumps overlap): the last one wins.
    metadata = metadata.drop_duplicates("image_id", keep="last")
    index = index.merge(metadata, on="image_id", how="left", indicator="_meta")
    has_meta = (index.pop("_meta") == "both").to_numpy()
    report.metadata_without_file = int((~metadata["image_id"].isin(index["image_id"])).sum())

    n = len(index)
    width = np.zeros(n, dtype="int64")
    height = np.zeros(n, dtype="int64")
    size_source = np.full(n, "", dtype=object)
    status = np.full(n, STATUS_OK, dtype=object)
    problem = np.full(n, "", dtype=object)
    # Metadata sizes describe the original file: trust them only for that file.
    meta_ext = index["meta_file_ext"].fillna("").str.lower().replace("jpeg", "jpg").to_numpy()
    ext = index["ext"].replace("jpeg", "jpg").to_numpy()
    meta_size_ok = (
        has_meta
        & (dataset.image_folder == "original")
        & (meta_ext == ext)
        & index["meta_width"].notna().to_numpy()
        & index["meta_height"].notna().to_numpy()
    )
    width[meta_size_ok] = index.loc[meta_size_ok, "meta_width"].astype("int64")
    height[meta_size_ok] = index.loc[meta_size_ok, "meta_height"].astype("int64")
    size_source[meta_size_ok] = "metadata"

    for i, (rel_path, file_ext, nbytes) in enumerate(
        zip(index["rel_path"], index["ext"], index["file_bytes"])
    ):
        if nbytes == 0:
            status[i], problem[i] = STATUS_ZERO_BYTES, "file is empty"
            continue
        if file_ext not in IMAGE_EXTENSIONS:
            status[i], problem[i] = STATUS_UNKNOWN_EXTENSION, f"extension '.{file_ext}' is not an image type"
            continue
        if not meta_size_ok[i]:
            report.header_reads += 1
            try:
                width[i], height[i] = read_header_size(dataset.image_path(rel_path))
                size_source[i] = "header"
            except (UnidentifiedImageError, OSError, ValueError) as exc:
                status[i], problem[i] = STATUS_UNREADABLE_HEADER, f"{type(exc).__name__}: {exc}"
                continue
        if not has_meta[i]:
            status[i], problem[i] = STATUS_NO_METADATA, "no metadata line for this id"

    index.insert(5, "width", width)
    index.insert(6, "height", height)
    index.insert(7, "size_source", size_source)
    index.insert(8, "status", status)
    index.insert(9, "problem", problem)
    index = index[INDEX_COLUMNS].sort_values("image_id", kind="stable").reset_index(drop=True)
    return index, report
