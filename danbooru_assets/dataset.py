"""The Danbooru20xx folder layout, read through a Dagster resource.

``<root>/<original|512px>/<bucket>/<id>.<ext>`` with ``bucket = id % 1000`` as four
digits, and JSON-lines metadata under ``<root>/metadata/``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
from pydantic import Field

from danbooru_assets.metadata import METADATA_SUFFIXES
from danbooru_assets.partitions import SHARD_KEYS

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "gif", "webp", "bmp"})


class DatasetRootError(FileNotFoundError):
    pass


@dataclass(frozen=True)
class ImageFile:
    image_id: int | None  # None when the file name is not an integer id
    rel_path: str
    ext: str
    file_bytes: int
    mtime: float


class DanbooruDatasetResource(dg.ConfigurableResource):
    """Where the dataset lives. ``root`` defaults to ``$DANBOORU_ROOT`` (unset: the bundled
    sample data, generated on first use by ``danbooru-assets run``)."""

    root: str = Field(description="Dataset root folder (holds original/ or 512px/, and metadata/).")
    image_folder: str = Field(
        default="original",
        description="Image folder under the root: 'original' or '512px' (Danbooru20xx's downscaled copy).",
    )

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

    def list_shard_files(self, shard: str) -> list[ImageFile]:
        """Every regular file in the shard's bucket folder, one ``scandir`` pass."""
        folder = self.image_dir(shard)
        if not folder.is_dir():
            return []
        files: list[ImageFile] = []
        with os.scandir(folder) as entries:
            for entry in entries:
                if not entry.is_file() or entry.name.startswith("."):
                    continue
                stem, _, ext = entry.name.partition(".")
                st = entry.stat()
                files.append(
                    ImageFile(
                        image_id=int(stem) if stem.isdigit() else None,
                        rel_path=f"{self.image_folder}/{shard}/{entry.name}",
                        ext=ext.lower(),
                        file_bytes=st.st_size,
                        mtime=st.st_mtime,
                    )
                )
        files.sort(key=lambda f: (f.image_id is None, f.image_id or 0, f.rel_path))
        return files

    def shards_with_images(self) -> list[str]:
        base = self.root_path / self.image_folder
        if not base.is_dir():
            return []
        present = {p.name for p in base.iterdir() if p.is_dir()}
        return [k for k in SHARD_KEYS if k in present]

    def metadata_files(self) -> list[Path]:
        folder = self.root_path / "metadata"
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in METADATA_SUFFIXES)

    def metadata_fingerprint(self) -> str:
        """Changes when a metadata file is added, removed, resized or touched."""
        h = hashlib.sha256()
        for p in self.metadata_files():
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
        return h.hexdigest()[:16]

    def shard_fingerprint(self, shard: str, previous: dict | None = None) -> dict:
        """File count, folder mtime and newest file mtime of a bucket folder.

        The folder's own mtime changes when files are added or removed; only then are
        the files stat-ed again, so an unchanged 5,000-file shard costs one listdir.
        """
        folder = self.image_dir(shard)
        try:
            dir_mtime = folder.stat().st_mtime_ns
            names = os.listdir(folder)
        except FileNotFoundError:
            return {"files": 0, "dir_mtime": 0, "newest_mtime": 0}
        if previous and previous.get("dir_mtime") == dir_mtime and previous.get("files") == len(names):
            return dict(previous)
        newest = 0
        for name in names:
            try:
                newest = max(newest, os.stat(folder / name).st_mtime_ns)
            except FileNotFoundError:  # removed between listdir and stat
                continue
        return {"files": len(names), "dir_mtime": dir_mtime, "newest_mtime": newest}
