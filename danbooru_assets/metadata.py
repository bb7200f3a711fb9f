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
METADATA_SUFFIXES = (".json", ".jsonl")


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


def convert_metadata_to_shards(
    files: list[Path], out_dir, chunk_rows: int = 250_000
) -> tuple[pd.DataFrame, ParseReport]:
    """Stream every metadata file once and write one Parquet per shard to ``out_dir``.

    Memory stays bounded by ``chunk_rows``: each chunk is split by shard into a local
    scratch folder, and each shard's parts are joined at the end. Shard files from an
    earlier conversion that no longer have rows are removed. Returns a per-shard summary.
    """
    import shutil
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq
    from upath import UPath

    from danbooru_assets.io_manager import write_parquet
    from danbooru_assets.partitions import NUM_SHARDS

    out_dir = UPath(out_dir)
    report = ParseReport()
    scratch = Path(tempfile.mkdtemp(prefix="danbooru-metadata-"))
    n_chunks = 0

    def flush(rows: list[dict[str, Any]]) -> None:
        nonlocal n_chunks
        if not rows:
            return
        df = records_to_frame(rows)
        for bucket, part in df.groupby(df["image_id"] % NUM_SHARDS):
            shard_dir = scratch / f"{int(bucket):04d}"
            shard_dir.mkdir(exist_ok=True)
            pq.write_table(pa.Table.from_pandas(part, preserve_index=False), shard_dir / f"{n_chunks:06d}.parquet")
        n_chunks += 1
        rows.clear()

    try:
        rows: list[dict[str, Any]] = []
        for path in files:
            for row in iter_metadata_records(path, report):
                rows.append(row)
                if len(rows) >= chunk_rows:
                    flush(rows)
        flush(rows)
        summary = []
        for shard_dir in sorted(scratch.iterdir()):
            df = pd.concat([pd.read_parquet(p) for p in sorted(shard_dir.iterdir())], ignore_index=True)
            df = df.drop_duplicates("image_id", keep="last").sort_values("image_id").reset_index(drop=True)
            write_parquet(out_dir / f"{shard_dir.name}.parquet", df.astype(METADATA_DTYPES))
            summary.append((shard_dir.name, len(df)))
        written = {s for s, _ in summary}
        if out_dir.exists():
            for old in out_dir.iterdir():
                if old.name.endswith(".parquet") and old.name[:-8] not in written:
                    old.unlink()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return pd.DataFrame(summary, columns=["shard", "rows"]), report
