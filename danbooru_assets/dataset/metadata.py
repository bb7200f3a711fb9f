"""Danbooru metadata: JSON-lines in the two formats found in the wild, normalised.

- API form (Danbooru2021 and the live API): ``tag_string``, ``tag_string_general``,
  ``tag_string_character``, ``tag_string_copyright``, ``tag_string_artist``,
  ``tag_string_meta``, ``rating``, ``score``, ``md5``, ``image_width``, …
- Older dump form (Danbooru2017–2020): ``tags`` as a list of ``{id, name, category}``
  objects, numbers often as strings.

Both become one schema (:data:`METADATA_COLUMNS`). Ratings become one vocabulary
(:mod:`danbooru_assets.dataset.ratings`: general, sensitive, questionable, explicit, and
safe for a pre-2022 ``s``), with the letter as written and its era beside it. Tags are
de-duplicated per post, first occurrence kept.

Which files hold posts is decided by :mod:`danbooru_assets.dataset.metadata_discovery`;
files are read plain or compressed (gzip, xz, bzip2, by their magic bytes). Nothing bad in a file stops
the conversion: a line without a valid id (see :func:`strict_int`) is skipped, a bad
value is stored as null, each reported as ``file:line: <reason>``; a repeated id keeps
its last line, counted. Spilled chunks live in a scratch folder under the storage that
the next conversion clears if a run was killed (:func:`run_scratch`).
"""

from __future__ import annotations

import contextlib
import json
import os
import lzma
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator

import pandas as pd

from danbooru_assets.dataset.ratings import ERA_BEFORE_2022, ERA_SINCE_2022, RATING_LETTERS, rating_word


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
    "rating_raw",
    "rating_era",
    "score",
    "meta_width",
    "meta_height",
    "meta_file_ext",
    *TAG_COLUMNS,
    "is_deleted",
    "is_banned",
    "created_at",
    "metadata_format",
    # Danbooru's variant sets (parent/child posts): read by the near_duplicates stage.
    "parent_id",
    "has_children",
]
METADATA_DTYPES = {
    "image_id": "int64",
    "md5": "object",
    "rating": "object",
    "rating_raw": "object",
    "rating_era": "object",
    "score": "Int64",
    "meta_width": "Int64",
    "meta_height": "Int64",
    "meta_file_ext": "object",
    **{c: "object" for c in TAG_COLUMNS},
    "is_deleted": "boolean",
    "is_banned": "boolean",
    "created_at": "object",
    "metadata_format": "object",
    "parent_id": "Int64",
    "has_children": "boolean",
}


# What an id is: a JSON integer, or a string of ASCII digits (the older dumps quote
# numbers), with 0 < id < 2**63 (it is stored as int64). Anything else — a float such
# as 5042.9 or 1e20, true/false, "٤٢" (non-ASCII digits), " 42", a negative or zero id —
# rejects the line, reported as ``file:line: <reason>``: silently turning 5042.9 into
# 5042 would join the metadata to the wrong image.
INT64_MAX = 2**63 - 1
# The other integers kept (score, width, height) follow the same rule (a "-" sign is
# allowed for score); a bad value becomes null, reported as ``file:line: <field> …``,
# and the line is kept: a missing size is read from the image header instead.
_TAG_STRING_KEYS = tuple((c, "tag_string_" + c.removeprefix("tags_")) for c in TAG_COLUMNS)
_TRUE = frozenset({"true", "t", "1", "yes"})
_FALSE = frozenset({"false", "f", "0", "no", ""})
# A problem list keeps this many examples; the counts are always exact.
MAX_EXAMPLES = 1000


@dataclass
class MetadataProblem:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass
class FileSummary:
    name: str
    gzip: bool  # compressed (any kind; the name is kept for readers of earlier reports)
    lines: int = 0
    records: int = 0
    error: str | None = None  # why reading stopped early (a cut-short gzip stream)
    compression: str = ""  # gzip, xz, bz2 or ""
    api_rows: int = 0  # records in the API form (tag_string_*)
    g_ratings: int = 0  # of them, rated "g"

    @property
    def api_rows_before_2022(self) -> bool:
        """API-form rows without a single "g": an export from before 2022 (a 2021 mirror in
        the API's shape), whose "s" meant safe. The live API rates a large share of posts "g"."""
        return self.api_rows > 0 and self.g_ratings == 0

    def __str__(self) -> str:
        packed = f" ({self.compression or 'gzip'})" if self.gzip else ""
        text = f"{self.name}{packed}: {self.lines:,} lines, {self.records:,} records"
        if self.api_rows_before_2022:
            text += "; API form without any 'g' rating: ratings read as before 2022 (s = safe)"
        return text + (f"; {self.error}" if self.error else "")


@dataclass
class ParseReport:
    lines: int = 0
    records: int = 0
    bad_lines: int = 0  # lines skipped
    problems: list[MetadataProblem] = field(default_factory=list)  # the first MAX_EXAMPLES skipped lines
    bad_values: int = 0  # field values stored as null, their line kept
    value_problems: list[MetadataProblem] = field(default_factory=list)  # the first MAX_EXAMPLES of them
    duplicates: int = 0  # lines superseded by a later line with the same id
    duplicate_examples: list[str] = field(default_factory=list)
    files: list[FileSummary] = field(default_factory=list)

    def skip_line(self, file: str, line: int, reason: str) -> None:
        self.bad_lines += 1
        if len(self.problems) < MAX_EXAMPLES:
            self.problems.append(MetadataProblem(file, line, reason))

    def merge(self, other: "ParseReport") -> None:
        """Add another file's report (files merged in their order keep the examples' order)."""
        self.lines += other.lines
        self.records += other.records
        self.bad_lines += other.bad_lines
        self.bad_values += other.bad_values
        self.problems.extend(other.problems[: MAX_EXAMPLES - len(self.problems)])
        self.value_problems.extend(other.value_problems[: MAX_EXAMPLES - len(self.value_problems)])
        self.files.extend(other.files)

    def null_value(self, file: str, line: int, reason: str) -> None:
        self.bad_values += 1
        if len(self.value_problems) < MAX_EXAMPLES:
            self.value_problems.append(MetadataProblem(file, line, reason))


def _shown(value: Any) -> str:
    """A value as it appeared in the JSON (containers by kind), short enough for a log line."""
    if isinstance(value, (list, dict)):
        return "an array" if isinstance(value, list) else "an object"
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def strict_int(value: Any, minimum: int, what: str) -> int:
    """``value`` as an int when it is a JSON integer or a string of ASCII digits (a
    leading "-" allowed when ``minimum`` < 0) within ``minimum`` … 2**63-1; else
    ``ValueError`` saying why. Never coerces a float, a bool or other digits."""
    if type(value) is int:  # not isinstance: True/False are ints too
        number = value
    elif type(value) is str:
        digits = value[1:] if value[:1] == "-" and minimum < 0 else value
        if not (digits.isascii() and digits.isdigit()):
            raise ValueError(f"{what} {_shown(value)} is not an integer (ASCII digits)")
        if len(digits) > 19:  # longer than any int64: no int() of a huge string
            raise ValueError(f"{what} {_shown(value)} is out of range ({minimum} to 2**63-1)")
        number = int(value)
    else:
        raise ValueError(f"{what} {_shown(value)} is not an integer")
    if not minimum <= number <= INT64_MAX:
        raise ValueError(f"{what} {_shown(value)} is out of range ({minimum} to 2**63-1)")
    return number


def _strict_bool(value: Any) -> bool:
    if type(value) is bool:
        return value
    if value is None:  # null: as if missing
        return False
    if type(value) is str:
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    elif type(value) is int and value in (0, 1):
        return bool(value)
    raise ValueError(f"is_deleted {_shown(value)} is not a boolean")


def _bool_or_null(record: dict, key: str, value_problems: list[str]) -> bool | None:
    value = record.get(key)
    if value is None or type(value) is bool:
        return value
    try:
        return _strict_bool(value)
    except ValueError:
        value_problems.append(f"{key} {_shown(value)} is not a boolean; stored as null")
        return None


def _int_or_null(record: dict, key: str, minimum: int, value_problems: list[str]) -> int | None:
    value = record.get(key)
    if type(value) is int and minimum <= value <= INT64_MAX:  # the common case, first
        return value
    if value is None or value == "":
        return None
    try:
        return strict_int(value, minimum, key)
    except ValueError as exc:
        value_problems.append(f"{exc}; stored as null")
        return None


def _str_or_null(record: dict, key: str, value_problems: list[str]) -> str | None:
    value = record.get(key)
    if value is None or type(value) is str:
        return value
    value_problems.append(f"{key} {_shown(value)} is not a string; stored as null")
    return None


def _dedup(names: list[str]) -> list[str]:
    """Tags in first-seen order, each once (the real dumps repeat a tag now and then)."""
    return list(dict.fromkeys(names)) if len(set(names)) != len(names) else names


def _dedup_string(text: str) -> str:
    names = text.split()
    return " ".join(_dedup(names))


def normalise_record(
    record: Any, value_problems: list[str] | None = None, tag_categories: dict[str, int] | None = None
) -> dict[str, Any]:
    """One raw metadata object (either format) → one row of :data:`METADATA_COLUMNS`.

    Raises ``ValueError``/``KeyError`` with a reason when the record is unusable (no
    valid id, see :func:`strict_int`). A field of the wrong type or range becomes null
    (tag strings: empty) and its reason is appended to ``value_problems``. The rating is
    read in the era of the record's form (:data:`RATING_LETTERS`); tags are de-duplicated
    per column, first occurrence kept. ``tag_categories`` (the export's tags table) splits
    a record that carries only the combined ``tag_string`` by category.
    """
    if type(record) is not dict:
        if type(record) is list:
            raise ValueError("a JSON array, not an object (JSON-lines expected: one post per line)")
        raise ValueError(f"a JSON {type(record).__name__}, not an object")
    if "id" not in record:
        raise KeyError("no 'id' field")
    if value_problems is None:
        value_problems = []
    image_id = record["id"]
    if not (type(image_id) is int and 0 < image_id <= INT64_MAX):
        image_id = strict_int(image_id, 1, "id")
    get = record.get
    is_deleted = get("is_deleted", False)
    if type(is_deleted) is not bool:
        try:
            is_deleted = _strict_bool(is_deleted)
        except ValueError as exc:
            value_problems.append(f"{exc}; stored as null")
            is_deleted = None
    tags = get("tags")
    era = ERA_BEFORE_2022 if type(tags) is list else ERA_SINCE_2022
    raw_rating = get("rating")
    rating = rating_word(raw_rating, era)
    if rating is None and raw_rating is not None and raw_rating != "":
        value_problems.append(
            f"rating {_shown(raw_rating)} is not a rating of the {era.replace('_', ' ')} era "
            f"({', '.join(RATING_LETTERS[era])}); stored as null"
        )
    row: dict[str, Any] = {
        "image_id": image_id,
        "md5": _str_or_null(record, "md5", value_problems),
        "rating": rating,
        "rating_raw": raw_rating if type(raw_rating) is str else None,
        "rating_era": era,
        "score": _int_or_null(record, "score", -INT64_MAX, value_problems),
        "meta_width": _int_or_null(record, "image_width", 1, value_problems),
        "meta_height": _int_or_null(record, "image_height", 1, value_problems),
        "meta_file_ext": _str_or_null(record, "file_ext", value_problems) or None,
        "is_deleted": is_deleted,
        "is_banned": _bool_or_null(record, "is_banned", value_problems),
        "created_at": _str_or_null(record, "created_at", value_problems),
        # The dump form writes "0" for "no parent".
        "parent_id": _int_or_null(record, "parent_id", 0, value_problems) or None,
        "has_children": _bool_or_null(record, "has_children", value_problems),
    }
    if type(tags) is list:
        row["metadata_format"] = "dump"
        buckets: dict[str, list[str]] = {c: [] for c in TAG_COLUMNS}
        for tag in tags:
            if type(tag) is str:  # a bare name: its category from the tags table, if any
                name, category = tag, (tag_categories or {}).get(tag, 0)
            else:
                category = tag.get("category", 0)
                category = 0 if category is None else strict_int(category, 0, "tag category")
                name = str(tag["name"])
            buckets[_CATEGORY_COLUMN.get(category, "tags_general")].append(name)
        row.update({c: " ".join(_dedup(v)) for c, v in buckets.items()})
    else:
        row["metadata_format"] = "api"
        for column, key in _TAG_STRING_KEYS:
            value = get(key)
            if type(value) is not str:
                if value is not None:
                    value_problems.append(f"{key} {_shown(value)} is not a string; stored as empty")
                value = ""
            row[column] = _dedup_string(value)
        combined = get("tag_string")
        if type(combined) is str and combined and not any(row[c] for c in TAG_COLUMNS):
            # Some API exports carry only the combined tag string: the tags table (when the
            # export has one) says each tag's category, else they count as general.
            names = _dedup(combined.split())
            if tag_categories:
                buckets = {c: [] for c in TAG_COLUMNS}
                for name in names:
                    buckets[_CATEGORY_COLUMN.get(tag_categories.get(name, 0), "tags_general")].append(name)
                row.update({c: " ".join(v) for c, v in buckets.items()})
            else:
                row["tags_general"] = " ".join(names)
    return row


# ---------------------------------------------------------------- the fast path
#
# ``bench metadata`` measured the candidates side by side: a typed msgspec decode that keeps
# only these fields, then the columns filled straight from it, beats json/orjson + a dict per
# row several times over, and pyarrow/polars/duckdb (they read a whole file as one table:
# one bad line stops the file, and the quirks still need this normaliser). Any value the
# fast path is not sure of sends its line down :func:`normalise_record` (the reference, with
# its messages), so both give the same rows.

import msgspec  # noqa: E402


class _Tag(msgspec.Struct):
    name: str
    category: int | str | None = 0


class _Post(msgspec.Struct):
    id: int | str
    md5: str | None = None
    rating: str | None = None
    score: int | str | None = None
    image_width: int | str | None = None
    image_height: int | str | None = None
    file_ext: str | None = None
    is_deleted: bool | None = False
    is_banned: bool | None = None
    created_at: str | None = None
    parent_id: int | str | None = None
    has_children: bool | None = None
    tags: list[_Tag] | None = None
    tag_string: str | None = None
    tag_string_general: str | None = None
    tag_string_character: str | None = None
    tag_string_copyright: str | None = None
    tag_string_artist: str | None = None
    tag_string_meta: str | None = None


_POST_DECODER = msgspec.json.Decoder(_Post)
_FAST_CATEGORY = {**{k: v for k, v in _CATEGORY_COLUMN.items()}, **{str(k): v for k, v in _CATEGORY_COLUMN.items()}}
_FAST_CATEGORY.update({2: "tags_general", "2": "tags_general", None: "tags_general"})  # 2: unused ("deprecated" in old dumps)
_FAST_CATEGORY_INDEX = {key: TAG_COLUMNS.index(column) for key, column in _FAST_CATEGORY.items()}


class _Unsure(Exception):
    """The fast path cannot vouch for a value: the line goes to :func:`normalise_record`."""


def _fast_int(value, minimum: int) -> int | None:
    if type(value) is int:
        if minimum <= value <= INT64_MAX:
            return value
        raise _Unsure
    if value is None or value == "":
        return None
    digits = value[1:] if minimum < 0 and value[:1] == "-" else value
    if len(digits) <= 18 and digits.isascii() and digits.isdigit():  # 18 digits: always in range
        number = int(value)
        if number >= minimum:
            return number
    raise _Unsure


def fast_row(raw: bytes, tag_categories: dict[str, int] | None = None) -> dict[str, Any]:
    """:func:`normalise_record` of one line for the lines it would take without a note;
    raises :class:`_Unsure` (or a msgspec error) for every other line."""
    post = _POST_DECODER.decode(raw)
    image_id = post.id
    if type(image_id) is not int:
        if not (len(image_id) <= 18 and image_id.isascii() and image_id.isdigit()):
            raise _Unsure
        image_id = int(image_id)
    if not 0 < image_id <= INT64_MAX:
        raise _Unsure
    tags = post.tags
    era = ERA_BEFORE_2022 if tags is not None else ERA_SINCE_2022
    raw_rating = post.rating
    rating = rating_word(raw_rating, era)
    if rating is None and raw_rating is not None and raw_rating != "":
        raise _Unsure
    parent = _fast_int(post.parent_id, 0)
    row = {
        "image_id": image_id,
        "md5": post.md5,
        "rating": rating,
        "rating_raw": raw_rating,
        "rating_era": era,
        "score": _fast_int(post.score, -INT64_MAX),
        "meta_width": _fast_int(post.image_width, 1),
        "meta_height": _fast_int(post.image_height, 1),
        "meta_file_ext": post.file_ext or None,
        "is_deleted": bool(post.is_deleted),
        "is_banned": post.is_banned,
        "created_at": post.created_at,
        "parent_id": parent or None,
        "has_children": post.has_children,
    }
    if tags is not None:
        row["metadata_format"] = "dump"
        buckets: list[list[str]] = [[], [], [], [], []]  # in TAG_COLUMNS order
        index = _FAST_CATEGORY_INDEX
        try:
            for tag in tags:
                buckets[index[tag.category]].append(tag.name)
        except KeyError:
            raise _Unsure from None
        # One set for the whole post: a repeated tag (rare) is the only case to de-duplicate.
        repeated = len({t.name for t in tags}) != len(tags)
        for c, v in zip(TAG_COLUMNS, buckets):
            row[c] = " ".join(_dedup(v) if repeated else v)
    else:
        row["metadata_format"] = "api"
        general = post.tag_string_general or ""
        row["tags_general"] = _dedup_string(general) if general else ""
        for column, value in (
            ("tags_character", post.tag_string_character), ("tags_copyright", post.tag_string_copyright),
            ("tags_artist", post.tag_string_artist), ("tags_meta", post.tag_string_meta),
        ):
            row[column] = _dedup_string(value) if value else ""
        combined = post.tag_string
        if combined and not any(row[c] for c in TAG_COLUMNS):
            names = _dedup(combined.split())
            if tag_categories:
                split: dict[str, list[str]] = {c: [] for c in TAG_COLUMNS}
                for name in names:
                    split[_CATEGORY_COLUMN.get(tag_categories.get(name, 0), "tags_general")].append(name)
                row.update({c: " ".join(v) for c, v in split.items()})
            else:
                row["tags_general"] = " ".join(names)
    return row


def iter_metadata_records(
    path: Path,
    report: ParseReport,
    file_index: int | None = None,
    name: str | None = None,
    tag_categories: dict[str, int] | None = None,
) -> Iterator[dict[str, Any]]:
    """Normalised rows of one JSON-lines file (plain, gzip, xz or bzip2, by its magic
    bytes); bad lines and bad values go to ``report`` with file (``name``, default the
    file name) and line. With ``file_index``, each row also carries ``source_file`` (that
    index) and ``source_line``, to name duplicates later."""
    from danbooru_assets.dataset.metadata_discovery import open_metadata

    name = name or path.name
    f, packed = open_metadata(path)
    summary = FileSummary(name, bool(packed), compression=packed)
    report.files.append(summary)
    line_no = 0
    with f:
        try:
            for line_no, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                report.lines += 1
                summary.lines += 1
                try:
                    row = fast_row(raw, tag_categories)
                except (_Unsure, msgspec.MsgspecError):
                    row = None
                notes: list[str] = []
                try:
                    if row is None:
                        row = normalise_record(json.loads(raw), notes, tag_categories)
                except json.JSONDecodeError as exc:
                    report.skip_line(name, line_no, f"not JSON ({exc.msg})")
                    continue
                except UnicodeDecodeError:
                    report.skip_line(name, line_no, "not JSON (not UTF-8 text)")
                    continue
                except RecursionError:
                    report.skip_line(name, line_no, "not JSON (nested too deeply)")
                    continue
                except (KeyError, ValueError, TypeError, AttributeError) as exc:
                    reason = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
                    report.skip_line(name, line_no, f"unusable record ({reason})")
                    continue
                for note in notes:
                    report.null_value(name, line_no, note)
                if file_index is not None:
                    row["source_file"] = file_index
                    row["source_line"] = line_no
                report.records += 1
                summary.records += 1
                if row["metadata_format"] == "api":
                    summary.api_rows += 1
                    if row["rating"] == "general":
                        summary.g_ratings += 1
                yield row
        except (EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
            # A cut-short or corrupt gzip download: the lines before stay, the rest
            # cannot be read. Counted as a bad line so it is never silent.
            summary.error = f"unreadable after line {line_no} ({exc}); the rest of the file is not read"
            report.skip_line(name, line_no + 1, f"file unreadable from here ({exc})")


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


# Spilled chunks carry where each row came from, to name both lines of a duplicate id.
SOURCE_DTYPES = {"source_file": "int32", "source_line": "int64"}
SCRATCH_DIR = ".scratch"


def default_scratch_root(out_dir) -> Path:
    """Where a conversion into ``out_dir`` spills its chunks (memory-mapped, so a local
    folder): ``<storage>/.scratch/<out_dir name>/`` when the storage is a local folder,
    else a folder under the system temp folder named after the storage URL. Either way a
    fixed place, so the next run finds and removes what a killed run left."""
    import hashlib
    import tempfile

    from upath import UPath

    from danbooru_assets.core.tables import is_local

    out_dir = UPath(out_dir)
    if is_local(out_dir):
        return Path(out_dir.path).parent / SCRATCH_DIR / out_dir.name
    digest = hashlib.sha256(str(out_dir).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"danbooru_assets-scratch-{digest}" / out_dir.name


def _try_lock(f: IO[bytes], blocking: bool = False) -> bool:
    """An exclusive lock on an open file: the OS drops it when its process dies, however
    it dies, so "lockable" means "no live run holds it". Without ``fcntl`` (Windows)
    every folder counts as stale: conversions run one at a time there."""
    try:
        import fcntl
    except ImportError:
        return True
    try:
        fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def remove_stale_scratch(root: Path) -> list[str]:
    """Remove the run folders under ``root`` that no live run holds; their names."""
    import shutil

    removed = []
    for entry in sorted(root.iterdir()):
        if not entry.is_dir():
            continue
        try:
            with open(entry / ".lock", "rb") as lock:
                if not _try_lock(lock):
                    continue  # a live run's
        except FileNotFoundError:
            pass  # died before taking its lock
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry.name)
    return removed


@contextlib.contextmanager
def run_scratch(root: Path) -> Iterator[Path]:
    """A scratch folder for this run under ``root``, locked while the run lives and
    removed when it ends; folders of dead runs (kill -9, out of memory) are removed first."""
    import shutil
    import tempfile

    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "ab") as setup:
        _try_lock(setup, blocking=True)  # sweeping and taking a folder: one run at a time
        remove_stale_scratch(root)
        mine = Path(tempfile.mkdtemp(prefix="run-", dir=root))
        held = open(mine / ".lock", "wb")
        _try_lock(held)
    try:
        yield mine
    finally:
        shutil.rmtree(mine, ignore_errors=True)
        held.close()


def _duplicate_examples(table, ids, keep, file_names: list[str], limit: int) -> list[str]:
    """``id …: file:line (w×h) superseded by file:line (w×h)`` for the first ``limit``
    superseded rows of one shard."""
    import numpy as np

    superseded = np.ones(len(ids), dtype=bool)
    superseded[keep] = False
    kept_ids = ids[keep]  # ascending
    files, lines = table["source_file"], table["source_line"]
    width, height = table["meta_width"], table["meta_height"]

    def where(i: int) -> str:
        return f"{file_names[files[i].as_py()]}:{lines[i].as_py()} ({width[i].as_py()}×{height[i].as_py()})"

    examples = []
    for i in np.flatnonzero(superseded)[:limit]:
        winner = keep[np.searchsorted(kept_ids, ids[i])]
        examples.append(f"id {ids[i]}: {where(int(i))} superseded by {where(int(winner))}")
    return examples


def _as_before_2022(table, file_indexes: list[int]):
    """The API-form rows of those files re-read in the pre-2022 era: "s" is safe."""
    import pyarrow as pa
    import pyarrow.compute as pc

    rows = pc.and_(pc.is_in(table["source_file"], pa.array(file_indexes, pa.int32())), pc.equal(table["metadata_format"], "api"))
    rows = pc.fill_null(rows, False)
    was_sensitive = pc.fill_null(pc.and_(rows, pc.equal(table["rating"], "sensitive")), False)
    was_letter = pc.fill_null(pc.equal(pc.utf8_lower(pc.utf8_trim_whitespace(table["rating_raw"])), "s"), False)
    rating = pc.if_else(pc.and_(was_sensitive, was_letter), "safe", table["rating"])
    era = pc.if_else(rows, ERA_BEFORE_2022, table["rating_era"])
    table = table.set_column(table.schema.get_field_index("rating"), "rating", rating)
    return table.set_column(table.schema.get_field_index("rating_era"), "rating_era", era)


# Below this much metadata the files are parsed in the calling process.
PARALLEL_MIN_BYTES = 256 << 20


def _spill_schema():
    import numpy as np
    import pyarrow as pa

    schema = metadata_arrow_schema()
    for column, dtype in SOURCE_DTYPES.items():
        schema = schema.append(pa.field(column, pa.from_numpy_dtype(np.dtype(dtype))))
    return schema


def _parse_file_to_chunks(job) -> tuple[ParseReport, list[tuple[Path, Any]]]:
    """Parse one file into Arrow chunks under the scratch folder, each sorted by shard with
    its shard offsets; the file's own report. Runs in a worker process or in the caller."""
    import numpy as np
    import pyarrow as pa

    from danbooru_assets.core.shards import NUM_SHARDS, shard_numbers

    file_index, path, name, tag_categories, chunk_rows, scratch = job
    report = ParseReport()
    schema = _spill_schema()
    columns = [*METADATA_COLUMNS, *SOURCE_DTYPES]
    chunks: list[tuple[Path, Any]] = []

    def spill(rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        # Column lists straight to Arrow: a third faster than through a DataFrame (bench metadata).
        table = pa.table({c: pa.array([r[c] for r in rows], type=schema.field(c).type) for c in columns}, schema=schema)
        bucket = shard_numbers(table["image_id"].to_numpy())
        order = np.argsort(bucket, kind="stable")  # stable: line order kept within a shard
        table = table.take(pa.array(order))
        offsets = np.searchsorted(bucket[order], np.arange(NUM_SHARDS + 1))
        chunk = Path(scratch) / f"chunk-{file_index:05d}-{len(chunks):05d}.arrow"
        with pa.OSFile(str(chunk), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            writer.write_table(table)
        chunks.append((chunk, offsets))
        rows.clear()

    rows: list[dict[str, Any]] = []
    for row in iter_metadata_records(path, report, file_index, name, tag_categories):
        rows.append(row)
        if len(rows) >= chunk_rows:
            spill(rows)
    spill(rows)
    return report, chunks


def convert_metadata_to_shards(
    files: list[Path],
    out_dir,
    chunk_rows: int = 100_000,  # ~0.3 GB of parsed rows held at once (1M lines in 10 spills)
    write_threads: int = 4,
    scratch_root: Path | None = None,
    names: list[str] | None = None,
    tag_categories: dict[str, int] | None = None,
    workers: int | None = None,
) -> tuple[pd.DataFrame, ParseReport]:
    """Stream every metadata file once and write one Parquet per shard to ``out_dir``.
    Files are parsed by ``workers`` processes (default: 2 when there are several files and
    at least :data:`PARALLEL_MIN_BYTES`, else this process).

    Memory stays bounded by ``chunk_rows``: each parsed chunk is sorted by shard and
    spilled to a local Arrow file under ``scratch_root`` (default
    :func:`default_scratch_root`); at the end each shard's rows are sliced from the
    memory-mapped chunks, de-duplicated, sorted by id and written. Shard files from an
    earlier conversion that no longer have rows are removed. Returns a per-shard summary.

    Duplicate ids: the last line wins, in the order ``files`` are given (the asset gives
    them sorted by path under metadata/) and line order within a file, because mirrors append updated
    posts after the old ones. Each superseded line is counted (``report.duplicates``),
    with examples naming both lines.
    """
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import pyarrow as pa
    from upath import UPath

    from danbooru_assets.core.shards import NUM_SHARDS, SHARD_KEYS
    from danbooru_assets.core.tables import prune_shard_files, write_arrow

    out_dir = UPath(out_dir)
    report = ParseReport()
    file_names = names or [p.name for p in files]
    chunks: list[tuple[Path, np.ndarray]] = []  # (spilled chunk, row offset of each shard)
    if workers is None:
        # Files are the unit of parallel work (a release ships many); small inputs stay in
        # this process, where starting workers would cost more than it saves.
        big = sum(p.stat().st_size for p in files) >= PARALLEL_MIN_BYTES
        workers = min(2, os.cpu_count() or 1, len(files)) if big else 1

    with run_scratch(scratch_root or default_scratch_root(out_dir)) as scratch:
        jobs = [(i, p, file_names[i], tag_categories, chunk_rows, scratch) for i, p in enumerate(files)]
        if workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn: a fork of a process with threads (Dagster's) may hang
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                parsed = list(pool.map(_parse_file_to_chunks, jobs))
        else:
            parsed = [_parse_file_to_chunks(job) for job in jobs]
        for file_report, file_chunks in parsed:  # in file order: the last line of an id wins
            report.merge(file_report)
            chunks.extend(file_chunks)
        mapped = [(pa.ipc.open_file(pa.memory_map(str(p))).read_all(), o) for p, o in chunks]

        def finish_shard(bucket: int) -> tuple[str, int, int, list[str]]:
            parts = [t.slice(o[bucket], o[bucket + 1] - o[bucket]) for t, o in mapped]
            table = pa.concat_tables(parts)
            ids = table["image_id"].to_numpy()
            keep = last_row_per_id(ids)
            superseded = len(ids) - len(keep)
            examples = _duplicate_examples(table, ids, keep, file_names, 3) if superseded else []
            table = table.take(pa.array(keep))
            if old_api_files:
                table = _as_before_2022(table, old_api_files)
            table = table.drop_columns(list(SOURCE_DTYPES))
            shard = SHARD_KEYS[bucket]
            write_arrow(out_dir / f"{shard}.parquet", table)
            return shard, table.num_rows, superseded, examples

        # A file's era is known once it is read: API-form files without any "g" are pre-2022.
        old_api_files = [i for i, f in enumerate(report.files) if f.api_rows_before_2022]
        present = [b for b in range(NUM_SHARDS) if any(o[b + 1] > o[b] for _, o in mapped)]
        # Parquet encoding and file I/O release the GIL: threads overlap them.
        with ThreadPoolExecutor(write_threads) as pool:
            finished = list(pool.map(finish_shard, present))
        mapped.clear()  # release the memory maps before the scratch folder goes
    summary = [(shard, rows) for shard, rows, _, _ in finished]
    for _, _, superseded, examples in finished:
        report.duplicates += superseded
        report.duplicate_examples.extend(examples[: 20 - len(report.duplicate_examples)])
    prune_shard_files(out_dir, {s for s, _ in summary})
    return pd.DataFrame(summary, columns=["shard", "rows"]), report
