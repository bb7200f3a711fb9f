"""Danbooru metadata: JSON-lines in the two formats found in the wild, normalised.

- API form (Danbooru2021 and the live API): ``tag_string``, ``tag_string_general``,
  ``tag_string_character``, ``tag_string_copyright``, ``tag_string_artist``,
  ``tag_string_meta``, ``rating``, ``score``, ``md5``, ``image_width``, …
- Older dump form (Danbooru2017–2020): ``tags`` as a list of ``{id, name, category}``
  objects, numbers often as strings.

Both become one schema (:data:`METADATA_COLUMNS`). Ratings stay one letter in one
column: ``g s q e`` from the API, and ``s q e`` from pre-2022 dumps, where ``s`` meant
"safe" (today's ``g`` and ``s`` together).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pandas as pd


# Tag categories of the dump form.
_CATEGORY_COLUMN = {
    0: "tags_general",
    1: "tags_artist",
    3: "tags_copyright",
    4: "tags_character",
    5: "tags_meta",
}
TAG_COLUMNS = ["tags_general", "tags_character", "tags_copyright", "tags_artist", "tags_meta"]
METADATA_COLUMNS = [
    "image_id",
    "md5",
    "rating",
    "score",
    "meta_width",
    "meta_height",
    "meta_file_ext",
    *TAG_COLUMNS,
    "is_deleted",
    "created_at",
    "metadata_format",
]
METADATA_DTYPES = {
    "image_id": "int64",
    "md5": "object",
    "rating": "object",
    "score": "Int64",
    "meta_width": "Int64",
    "meta_height": "Int64",
    "meta_file_ext": "object",
    **{c: "object" for c in TAG_COLUMNS},
    "is_deleted": "boolean",
    "created_at": "object",
    "metadata_format": "object",
}
VALID_RATINGS = {"g", "s", "q", "e"}


@dataclass
class MetadataProblem:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass
class ParseReport:
    lines: int = 0
    records: int = 0
    problems: list[MetadataProblem] = field(default_factory=list)


def _int_or_none(value: Any) -> int | None:
    if value is None or value == "":
        return None
    return int(value)


def _bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in {"true", "t", "1", "yes"}
    return bool(value)


def normalise_record(record: dict[str, Any]) -> dict[str, Any]:
    """One raw metadata object (either format) → one row of :data:`METADATA_COLUMNS`.

    Raises ``ValueError``/``KeyError`` with a reason when the record is unusable.
    """
    if "id" not in record:
        raise KeyError("no 'id' field")
    row: dict[str, Any] = {
        "image_id": int(record["id"]),
        "md5": record.get("md5"),
        "score": _int_or_none(record.get("score")),
        "meta_width": _int_or_none(record.get("image_width")),
        "meta_height": _int_or_none(record.get("image_height")),
        "meta_file_ext": (record.get("file_ext") or None),
        "is_deleted": _bool(record.get("is_deleted", False)),
        "created_at": record.get("created_at"),
    }
    rating = str(record.get("rating") or "").strip().lower()[:1]
    row["rating"] = rating if rating in VALID_RATINGS else None
    if isinstance(record.get("tags"), list):
        row["metadata_format"] = "dump"
        buckets: dict[str, list[str]] = {c: [] for c in TAG_COLUMNS}
        for tag in record["tags"]:
            column = _CATEGORY_COLUMN.get(int(tag.get("category", 0)), "tags_general")
            buckets[column].append(str(tag["name"]))
        row.update({c: " ".join(v) for c, v in buckets.items()})
    else:
        row["metadata_format"] = "api"
        for column in TAG_COLUMNS:
            row[column] = record.get("tag_string_" + column.removeprefix("tags_"), "") or ""
        if not any(row[c] for c in TAG_COLUMNS) and record.get("tag_string"):
            # Some API exports carry only the combined tag string.
            row["tags_general"] = record["tag_string"]
    return row


def iter_metadata_records(path: Path, report: ParseReport) -> Iterator[dict[str, Any]]:
    """Normalised rows of one JSON-lines file; bad lines go to ``report`` with file and line."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            report.lines += 1
            try:
                row = normalise_record(json.loads(raw))
            except json.JSONDecodeError as exc:
                report.problems.append(MetadataProblem(path.name, line_no, f"not JSON ({exc.msg})"))
                continue
            except (KeyError, ValueError, TypeError, AttributeError) as exc:
                report.problems.append(MetadataProblem(path.name, line_no, f"unusable record ({exc})"))
                continue
            report.records += 1
            yield row


def records_to_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=METADATA_COLUMNS)
    return df.astype(METADATA_DTYPES)


def empty_metadata_frame() -> pd.DataFrame:
    return records_to_frame([])


def metadata_arrow_schema():
    import pyarrow as pa

    arrow_types = {"int64": pa.int64(), "Int64": pa.int64(), "object": pa.string(), "boolean": pa.bool_()}
    return pa.schema([(c, arrow_types[METADATA_DTYPES[c]]) for c in METADATA_COLUMNS])


def last_row_per_id(ids):
    """Row positions keeping the last occurrence of each id, in ascending id order."""
    import numpy as np

    _, first_from_end = np.unique(ids[::-1], return_index=True)
    return len(ids) - 1 - first_from_end


def convert_metadata_to_shards(
    files: list[Path], out_dir, chunk_rows: int = 500_000, write_threads: int = 4
) -> tuple[pd.DataFrame, ParseReport]:
    """Stream every metadata file once and write one Parquet per shard to ``out_dir``.

    Memory stays bounded by ``chunk_rows``: each parsed chunk is sorted by shard and
    spilled to a local Arrow file; at the end each shard's rows are sliced from the
    memory-mapped chunks, de-duplicated (the last line for an id wins), sorted by id and
    written. Shard files from an earlier conversion that no longer have rows are
    removed. Returns a per-shard summary.
    """
    import shutil
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import pyarrow as pa
    from upath import UPath

    from danbooru_assets.io_manager import prune_shard_files, write_arrow
    from danbooru_assets.partitions import NUM_SHARDS

    out_dir = UPath(out_dir)
    report = ParseReport()
    scratch = Path(tempfile.mkdtemp(prefix="danbooru-metadata-"))
    schema = metadata_arrow_schema()
    chunks: list[tuple[Path, np.ndarray]] = []  # (spilled chunk, row offset of each shard)

    def spill(rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        table = pa.Table.from_pandas(records_to_frame(rows), schema=schema, preserve_index=False)
        bucket = table["image_id"].to_numpy() % NUM_SHARDS
        order = np.argsort(bucket, kind="stable")  # stable: line order kept within a shard
        table = table.take(pa.array(order))
        offsets = np.searchsorted(bucket[order], np.arange(NUM_SHARDS + 1))
        path = scratch / f"chunk-{len(chunks):05d}.arrow"
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            writer.write_table(table)
        chunks.append((path, offsets))
        rows.clear()

    try:
        rows: list[dict[str, Any]] = []
        for path in files:
            for row in iter_metadata_records(path, report):
                rows.append(row)
                if len(rows) >= chunk_rows:
                    spill(rows)
        spill(rows)
        mapped = [(pa.ipc.open_file(pa.memory_map(str(p))).read_all(), o) for p, o in chunks]

        def finish_shard(bucket: int) -> tuple[str, int]:
            parts = [t.slice(o[bucket], o[bucket + 1] - o[bucket]) for t, o in mapped]
            table = pa.concat_tables(parts)
            table = table.take(pa.array(last_row_per_id(table["image_id"].to_numpy())))
            shard = f"{bucket:04d}"
            write_arrow(out_dir / f"{shard}.parquet", table)
            return shard, table.num_rows

        present = [b for b in range(NUM_SHARDS) if any(o[b + 1] > o[b] for _, o in mapped)]
        # Parquet encoding and file I/O release the GIL: threads overlap them.
        with ThreadPoolExecutor(write_threads) as pool:
            summary = list(pool.map(finish_shard, present))
        mapped.clear()  # release the memory maps before the scratch folder goes
        prune_shard_files(out_dir, {s for s, _ in summary})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return pd.DataFrame(summary, columns=["shard", "rows"]), report
