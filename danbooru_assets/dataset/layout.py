"""The Danbooru20xx folder layout (:class:`DatasetLayout`; the code location's
``dataset`` resource configures one).

``<root>/<original|512px>/<bucket>/<id>.<ext>`` with ``bucket = id % 1000`` as four
digits, and JSON-lines metadata under ``<root>/metadata/`` (any layout a release used:
:mod:`danbooru_assets.dataset.metadata_discovery`). The 512px folder names every file
``<id>.jpg``, whatever the original's type.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from danbooru_assets.config import DEFAULT_MAX_PIXELS
from danbooru_assets.core.shards import SHARD_KEYS

if TYPE_CHECKING:
    import numpy as np

IMAGE_FOLDERS = ("original", "512px")
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "gif", "webp", "bmp"})


class DatasetRootError(FileNotFoundError):
    pass


# What a shard folder entry that is not a readable regular file is, and why.
ENTRY_LINK_LOOP = "link_loop"
ENTRY_BROKEN_LINK = "broken_link"
ENTRY_NOT_A_FILE = "not_a_file"
ENTRY_PROBLEMS = {
    ENTRY_LINK_LOOP: "a symbolic link loop (too many levels of symbolic links)",
    ENTRY_BROKEN_LINK: "a symbolic link to nothing (its target does not exist)",
    ENTRY_NOT_A_FILE: "not a regular file (a folder, pipe or socket)",
}


def classify_entry(entry: os.DirEntry) -> tuple[str, os.stat_result | None]:
    """``("", stat)`` for a regular file or a link to one, else ``(kind, None)`` with kind
    one of :data:`ENTRY_PROBLEMS`. ``DirEntry.is_file`` says False for a dangling link and
    raises for a loop; both are told apart here so neither vanishes from the index."""
    try:
        st = entry.stat()  # follows links
    except FileNotFoundError:
        return (ENTRY_BROKEN_LINK if entry.is_symlink() else ENTRY_NOT_A_FILE), None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return ENTRY_LINK_LOOP, None
        raise
    return ("", st) if stat.S_ISREG(st.st_mode) else (ENTRY_NOT_A_FILE, None)


def resolve_image_folder(root: Path | str, chosen: str = "") -> str:
    """The image folder to index: ``chosen`` when given (``original`` or ``512px``), else
    the only one of them under ``root``. ``DatasetRootError`` when both exist and none is
    chosen (a Danbooru20xx download may hold both: which one is meant is the user's call),
    or ``chosen`` is neither name. With neither folder present, ``original``."""
    if chosen:
        if chosen not in IMAGE_FOLDERS:
            raise DatasetRootError(f"image folder {chosen!r} is not one of {', '.join(IMAGE_FOLDERS)}")
        return chosen
    present = [f for f in IMAGE_FOLDERS if (Path(root).expanduser() / f).is_dir()]
    if len(present) == 2:
        raise DatasetRootError(
            f"{root} holds both original/ and 512px/: choose one with DANBOORU_IMAGE_FOLDER=original|512px "
            "or `danbooru-assets run --image-folder original|512px`"
        )
    return present[0] if present else IMAGE_FOLDERS[0]


def resolve_inside(root: Path | str, rel_path: str) -> Path:
    """``root / rel_path`` with every symbolic link followed; ``ValueError`` when that
    leads outside ``root`` (itself resolved). Every reader of dataset files (index, exports,
    labeling page) applies this one rule: a link inside the root is fine, one out of it is
    never read."""
    root = Path(root).resolve()
    path = (root / rel_path).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"{rel_path} resolves to {path}, outside the dataset root {root}")
    return path


@dataclass
class ShardFiles:
    """The files of one bucket folder as parallel arrays, sorted by image id (files whose
    name is not an id come last, with id -1)."""

    image_id: np.ndarray  # int64, -1 when the file name is not an integer id
    name: list[str]
    ext: list[str]
    file_bytes: np.ndarray  # int64
    mtime: np.ndarray  # float64
    is_link: np.ndarray  # bool: the directory entry is a symbolic link
    # Per entry: "" for a regular file (or a link to one), else why it is no file to read:
    # one of ENTRY_PROBLEMS' keys (a folder or a link loop named like an image is listed,
    # never skipped in silence).
    not_a_file: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.name)


@dataclass(frozen=True)
class DatasetLayout:
    """Where the dataset lives and how its folders are read.

    ``root`` holds ``<image_folder>/<bucket>/`` and ``metadata/``; ``image_folder`` is
    ``original`` or ``512px`` (Danbooru20xx's downscaled copy); ``max_pixels`` is the most
    pixels one image decode may produce (larger images get the index status 'too_large')."""

    root: str | Path
    image_folder: str = "original"
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.max_pixels <= 0:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels}")

    @property
    def root_path(self) -> Path:
        return Path(self.root).expanduser()

    def check_root(self) -> Path:
        root = self.root_path
        if not root.is_dir():
            raise DatasetRootError(
                f"dataset root {root} does not exist. Set the DANBOORU_ROOT environment variable "
                "(or the `dataset` resource's `root` config) to the folder that holds "
                f"'{self.image_folder}/' and 'metadata/', or unset it to use the bundled sample "
                "data (`danbooru-assets sample-data DIR` creates it)."
            )
        return root

    def image_dir(self, shard: str) -> Path:
        return self.root_path / self.image_folder / shard

    def image_path(self, rel_path: str) -> Path:
        return self.root_path / rel_path

    def outside_root_problem(self, rel_path: str) -> str:
        """Why ``rel_path`` may not be read ("" when it may): following its links leads
        out of the dataset root."""
        try:
            resolve_inside(self.root_path, rel_path)
        except ValueError as exc:
            return str(exc)
        return ""

    def scan_shard(self, shard: str) -> ShardFiles:
        """Every entry of the shard's bucket folder but hidden ones: one ``scandir`` pass,
        one ``stat`` per entry (size, mtime), nothing opened. An entry that is no regular
        file (a folder, a dangling link, a link loop) is listed with size and mtime 0 and
        its kind in ``not_a_file``."""
        import numpy as np

        folder = self.image_dir(shard)
        names: list[str] = []
        sizes: list[int] = []
        mtimes: list[float] = []
        links: list[bool] = []
        kinds: list[str] = []
        if folder.is_dir():
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    kind, st = classify_entry(entry)
                    names.append(entry.name)
                    sizes.append(st.st_size if st is not None else 0)
                    mtimes.append(st.st_mtime if st is not None else 0.0)
                    links.append(entry.is_symlink())  # from the directory entry: no extra syscall
                    kinds.append(kind)
        stems = [n.partition(".")[0] for n in names]
        ids = np.array([int(s) if s.isdigit() else -1 for s in stems], dtype=np.int64)
        # By id, then name (123.jpg before 123.png); files without an id last.
        name_rank = np.argsort(np.argsort(np.array(names, dtype=object))) if names else ids
        order = np.lexsort((name_rank, ids, ids < 0))
        return ShardFiles(
            image_id=ids[order],
            name=[names[i] for i in order],
            ext=[names[i].partition(".")[2].lower() for i in order],
            file_bytes=np.array(sizes, dtype=np.int64)[order] if names else np.zeros(0, dtype=np.int64),
            mtime=np.array(mtimes, dtype=np.float64)[order] if names else np.zeros(0, dtype=np.float64),
            is_link=np.array(links, dtype=bool)[order] if names else np.zeros(0, dtype=bool),
            not_a_file=[kinds[i] for i in order],
        )

    def shards_with_images(self) -> list[str]:
        base = self.root_path / self.image_folder
        if not base.is_dir():
            return []
        present = {p.name for p in base.iterdir() if p.is_dir()}
        return [k for k in SHARD_KEYS if k in present]

    @property
    def metadata_dir(self) -> Path:
        return self.root_path / "metadata"

    def discover_metadata(self):
        """Every file under ``metadata/``, classified by what it is
        (:func:`~danbooru_assets.dataset.metadata_discovery.discover_metadata`)."""
        from danbooru_assets.dataset.metadata_discovery import discover_metadata

        return discover_metadata(self.metadata_dir)

    def metadata_files(self) -> list[Path]:
        """The post files under ``metadata/`` (companion tables and unknown files left out)."""
        from danbooru_assets.dataset.metadata_discovery import KIND_POSTS

        return [f.path for f in self.discover_metadata() if f.kind == KIND_POSTS]

    def metadata_fingerprint(self) -> str:
        """Changes when a file under ``metadata/`` is added, removed, resized or touched
        (every file, companion tables included: the tags table lends categories)."""
        from danbooru_assets.dataset.metadata_discovery import metadata_file_stats

        h = hashlib.sha256()
        for name, size, mtime_ns in metadata_file_stats(self.metadata_dir):
            h.update(f"{name}:{size}:{mtime_ns};".encode())
        return h.hexdigest()[:16]

    def shard_fingerprint(self, shard: str, previous: dict | None = None) -> dict:
        """File count, folder mtime and newest file mtime of a bucket folder.

        The folder's own mtime changes when files are added, removed or renamed; only then
        is the folder listed and its files stat-ed again, so an unchanged shard costs one
        stat (the new-data sensor's steady tick: README, New data).
        """
        folder = self.image_dir(shard)
        try:
            dir_mtime = folder.stat().st_mtime_ns
            if previous and previous.get("dir_mtime") == dir_mtime:
                return dict(previous)
            names = os.listdir(folder)
        except FileNotFoundError:
            return {"files": 0, "dir_mtime": 0, "newest_mtime": 0}
        newest = 0
        for name in names:
            try:
                newest = max(newest, os.stat(folder / name).st_mtime_ns)
            except OSError:  # removed between listdir and stat, a dangling link, a link loop
                continue
        return {"files": len(names), "dir_mtime": dir_mtime, "newest_mtime": newest}
