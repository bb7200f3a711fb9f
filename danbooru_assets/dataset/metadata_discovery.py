"""What each file under ``<root>/metadata/`` is, decided by its content, not its place.

The published layouts differ by release:

- Danbooru2017–2020 (and Danbooru2021's old-format tarball): year folders of files without
  an extension, ``metadata/2020/2020000000000000``;
- Danbooru2021: ``metadata/posts000000000000.json`` … beside the same export's ``tags…``,
  ``pools…``, ``artists…`` and ``notes…`` tables;
- mirrors and API scrapes: ``posts.json``, ``posts.jsonl``, ``posts.json.gz``, ``.json.xz``.

So every file under ``metadata/`` (sub-folders included, hidden files excepted) is opened,
decompressed by its magic bytes whatever its name, and its first JSON object classified by
its keys (:func:`classify_record`). Posts are read; the companion tables are never read as
posts (a tag id must never become a post); the tags table lends its categories to posts that
carry only a flat tag list; anything else is listed with the reason, never guessed at.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO

GZIP_MAGIC = b"\x1f\x8b"
XZ_MAGIC = b"\xfd7zXZ\x00"
BZIP2_MAGIC = b"BZh"

KIND_POSTS = "posts"
KIND_TAGS = "tags"
# The other tables of a Danbooru export: recognised, counted, not read.
COMPANION_KINDS = ("tags", "pools", "artists", "notes", "comments", "wiki_pages", "tag_aliases", "tag_implications")
KIND_UNKNOWN = "unknown"

# How far a file is read to find its first record: a few broken lines do not hide a posts
# file, and a binary file without newlines costs at most this much.
_SNIFF_LINES = 20
_SNIFF_LINE_BYTES = 1 << 20

# Keys only a post has (any release): a record with two of them is a post.
_POST_KEYS = frozenset({
    "md5", "rating", "tag_string", "tag_string_general", "image_width", "image_height", "file_ext",
    "file_size", "fav_count", "score", "uploader_id", "parent_id", "has_children", "is_deleted",
})


def compression(head: bytes) -> str:
    """``gzip``, ``xz``, ``bz2`` or ``""`` from a file's first bytes."""
    if head[:2] == GZIP_MAGIC:
        return "gzip"
    if head[:6] == XZ_MAGIC:
        return "xz"
    if head[:3] == BZIP2_MAGIC:
        return "bz2"
    return ""


def open_metadata(path: Path) -> tuple[IO[bytes], str]:
    """A binary stream of the file's text (decompressed by its magic bytes) and the
    compression found. The caller closes the stream."""
    raw = open(path, "rb")
    kind = compression(raw.peek(6)[:6])
    if not kind:
        return raw, kind
    raw.close()  # each opener below owns its own handle, closed with the stream
    opener = {"gzip": gzip.open, "xz": lzma.open, "bz2": bz2.open}[kind]
    return opener(path, "rb"), kind


def classify_record(record: object) -> str:
    """What table a record of a Danbooru export belongs to, from its keys."""
    if not isinstance(record, dict):
        return KIND_UNKNOWN
    keys = record.keys()
    if len(_POST_KEYS & keys) >= 2 or (isinstance(record.get("tags"), list) and "rating" in keys):
        return KIND_POSTS
    if "post_ids" in keys:
        return "pools"
    if "post_id" in keys and "body" in keys:
        return "notes" if {"x", "y"} & keys else "comments"
    if "antecedent_name" in keys:
        return "tag_aliases"  # aliases and implications share a shape: listed as one
    if "other_names" in keys or "group_name" in keys:
        return "artists"
    if "name" in keys and "category" in keys and "post_count" in keys:
        return KIND_TAGS
    if "title" in keys and "body" in keys:
        return "wiki_pages"
    return KIND_UNKNOWN


@dataclass(frozen=True)
class MetadataFile:
    path: Path
    name: str  # relative to the metadata folder, as messages name it
    kind: str  # posts, one of COMPANION_KINDS, or unknown
    compression: str
    why: str = ""  # for an unknown file: why it is not read


def _sniff(path: Path) -> tuple[str, str, str]:
    """``(kind, compression, why)`` from the first record of the file."""
    try:
        stream, packed = open_metadata(path)
    except OSError as exc:
        return KIND_UNKNOWN, "", f"unreadable ({exc})"
    seen = 0
    try:
        with stream:
            for _ in range(_SNIFF_LINES):
                line = stream.readline(_SNIFF_LINE_BYTES)
                if not line:
                    break
                if not line.strip():
                    continue
                seen += 1
                try:
                    record = json.loads(line)
                except (ValueError, RecursionError):
                    continue
                kind = classify_record(record)
                if kind != KIND_UNKNOWN:
                    return kind, packed, ""
                keys = ", ".join(sorted(record)[:8]) if isinstance(record, dict) else type(record).__name__
                return KIND_UNKNOWN, packed, f"its first record is not a Danbooru post or table ({keys})"
    except (OSError, EOFError, lzma.LZMAError) as exc:
        return KIND_UNKNOWN, packed, f"unreadable ({exc})"
    if not seen:
        return KIND_UNKNOWN, packed, "empty"
    return KIND_UNKNOWN, packed, f"no JSON object in its first {seen} line(s) (JSON lines expected)"


def discover_metadata(folder: Path) -> list[MetadataFile]:
    """Every non-hidden file under ``folder`` (sub-folders included), classified, sorted by
    relative name (year folders, then files, in name order: later exports come later)."""
    if not folder.is_dir():
        return []
    found = []
    for path in _walk(folder, hidden=True):
        name = path.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in Path(name).parts):  # ._posts.json (macOS), .part files
            found.append(MetadataFile(path, name, KIND_UNKNOWN, "", "a hidden file"))
            continue
        kind, packed, why = _sniff(path)
        found.append(MetadataFile(path, name, kind, packed, why))
    return found


def _walk(folder: Path, hidden: bool = False) -> list[Path]:
    """Regular files under ``folder`` (hidden files too with ``hidden``; hidden folders never),
    each real folder visited once (a symbolic link loop is not followed round)."""
    out: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if (hidden or not name.startswith(".")) and path.is_file():
                out.append(path)
    return sorted(out, key=lambda p: p.relative_to(folder).as_posix())


def metadata_file_stats(folder: Path) -> list[tuple[str, int, int]]:
    """``(relative name, size, mtime_ns)`` of the files :func:`discover_metadata` looks at,
    without opening any (the sensor's fingerprint)."""
    if not folder.is_dir():
        return []
    stats = []
    for path in _walk(folder):
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        stats.append((path.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns))
    return stats


def read_tag_categories(files: list[MetadataFile]) -> tuple[dict[str, int], int]:
    """``{tag name: category}`` from the tags tables among ``files``, and how many of their
    lines could not be used (counted, never fatal: the categories only help)."""
    categories: dict[str, int] = {}
    bad = 0
    for file in files:
        if file.kind != KIND_TAGS:
            continue
        stream, _ = open_metadata(file.path)
        with stream:
            try:
                for line in stream:
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                        name, category = record["name"], int(record["category"])
                    except (ValueError, KeyError, TypeError, RecursionError):
                        bad += 1
                        continue
                    if isinstance(name, str):
                        categories[name] = category
                    else:
                        bad += 1
            except (OSError, EOFError, lzma.LZMAError):
                bad += 1
    return categories, bad
