"""A stage of ``danbooru-assets run`` skipped when nothing it reads has changed.

After a stage's runs succeed, the CLI writes one record per stage (atomically, under
``$DAGSTER_HOME/run_fingerprints/``): the identity (path, size, mtime) of every stored
table written by it and by the stages before it, a fingerprint of the dataset's files, the
hashes of the settings sections its assets declare, the code version (the package's
sources and Dagster's version), the project's environment variables and the label store
file. Before the next run of that stage, the same is computed again; the stage is skipped
only when every part is equal and every asset it materializes is recorded in the Dagster
instance. Otherwise the CLI says which part changed, and the stage runs.

Why files and not Dagster's data versions: a range run records one materialization per
shard, and asking the instance for the staleness of a thousand partitions of a dozen
assets costs more than the stages it would skip; stat-ing the tables costs milliseconds.

Conservative on purpose: any change to the dataset (one new image) re-runs every stage
(each reuses its stored rows, so only the new work is done), and a change to a table of an
earlier stage re-runs every later one, so the tables after a skip are the tables a full
run would have left (a test compares them).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import dagster as dg

from danbooru_assets import config
from danbooru_assets.core.tables import atomic_write_text
from danbooru_assets.settings import CurationSettings, section_asset_name, section_hashes

RECORD_VERSION = 1
RECORDS_FOLDER = "run_fingerprints"
PACKAGE_DIR = Path(__file__).resolve().parents[1]
# Files in the storage folder that are no stage's output.
_IGNORED_SUFFIXES = (".tmp", ".partial")

Stat = tuple[int, int]  # size, mtime_ns


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _walk(root: Path) -> dict[str, Stat]:
    """``{relative path: (size, mtime_ns)}`` of every file under ``root`` (links followed
    once: a loop is the dataset's problem, reported by shard_index, not here)."""
    found: dict[str, Stat] = {}
    if not root.exists():
        return found
    stack = [root]
    seen: set[tuple[int, int]] = set()
    while stack:
        folder = stack.pop()
        try:
            st = folder.stat()
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir():
                    stack.append(Path(entry.path))
                elif entry.is_file():
                    s = entry.stat()
                    found[os.path.relpath(entry.path, root)] = (s.st_size, s.st_mtime_ns)
            except OSError:
                continue
    return found


_code_version: str | None = None


def code_version() -> str:
    """The package's Python sources (content) and Dagster's version."""
    global _code_version
    if _code_version is None:
        digest = hashlib.sha256(dg.__version__.encode())
        for path in sorted(PACKAGE_DIR.rglob("*.py")):
            digest.update(str(path.relative_to(PACKAGE_DIR)).encode())
            digest.update(path.read_bytes())
        _code_version = digest.hexdigest()[:16]
    return _code_version


def environment_fingerprint() -> str:
    """The project's variables (config.ENVIRONMENT) and the files some of them name
    (weights, checkpoints, keypoint files)."""
    values: dict[str, Any] = {name: config.env(name) for name in config.ENVIRONMENT}
    for name in ("DANBOORU_CLIP_PRETRAINED", "DANBOORU_POSE_CHECKPOINT", "DANBOORU_KEYPOINTS"):
        path = Path(config.env(name)).expanduser() if config.env(name) else None
        if path is not None and path.exists():
            values[name + ":files"] = _walk(path) if path.is_dir() else [path.stat().st_size, path.stat().st_mtime_ns]
    return _hash(values)


@dataclass
class Stage:
    """What the fingerprint needs to know of a stage job: the asset keys it materializes,
    the settings sections its assets read, and whether it reads the label store."""

    name: str
    asset_keys: list[str]
    sections: list[str]
    reads_labels: bool
    reads_images: bool = True  # False: only the dataset's other files (metadata, keypoints) count

    @classmethod
    def of(cls, name: str, assets: Iterable[dg.AssetsDefinition], reads_images: bool = True) -> "Stage":
        from danbooru_assets.settings import SECTIONS

        keys: list[str] = []
        deps: set[str] = set()
        labels = reads_settings = False
        for asset in assets:
            keys += [k.to_user_string() for k in asset.keys]
            deps |= {k.to_user_string() for k in asset.dependency_keys}
            labels = labels or "label_store" in asset.required_resource_keys
            reads_settings = reads_settings or "settings" in asset.required_resource_keys
        sections = [s for s in SECTIONS if section_asset_name(s) in deps]
        if reads_settings and not sections:  # reads the file but declares no section: any may matter
            sections = list(SECTIONS)
        return cls(name=name, asset_keys=sorted(keys), sections=sections, reads_labels=labels, reads_images=reads_images)


@dataclass
class Decision:
    skip: bool
    reason: str
    record: dict[str, Any] = field(default_factory=dict)


class StageFingerprints:
    """Records and checks of the stages of one ``danbooru-assets run`` invocation."""

    def __init__(
        self,
        home: Path,
        storage: str,
        dataset_root: Path,
        settings: CurationSettings,
        shards: list[str],
        instance: dg.DagsterInstance | None = None,
        image_folder: str = "",
    ):
        self.image_folder = image_folder
        self.folder = Path(home) / RECORDS_FOLDER
        self.enabled = not config.is_url(storage)
        self.storage = Path(storage.removeprefix("file://")).expanduser()
        self.dataset_root = Path(dataset_root)
        self.instance = instance
        self.sections = section_hashes(settings)
        self.scope = _hash(sorted(shards))
        labels = config.labels_path()
        self.labels_file = labels if isinstance(labels, Path) else None
        settings_file = config.settings_path()
        self.settings_rel = None
        if isinstance(settings_file, Path):
            try:
                self.settings_rel = os.path.relpath(settings_file.resolve(), self.storage.resolve())
            except ValueError:
                self.settings_rel = None
        # Computed once per invocation: the dataset and code do not change while it runs
        # (a file added meanwhile is seen by the next run: the record holds the value
        # taken before the stage, so the stage runs again then).
        self._common: dict[str, str] | None = None
        self._dataset_folders: dict[str, str] = {}
        # Skipped stages change nothing: one look at the tables and the records serves
        # every check until a stage runs (a thousand shards: ~12k files, 11 records).
        self._files: dict[str, Stat] | None = None
        self._records: dict[str, dict[str, Any] | None] = {}

    # ------------------------------------------------------------------ parts

    def common(self) -> dict[str, str]:
        if self._common is None:
            files = _walk(self.dataset_root)
            folders: dict[str, list] = {}
            for path, stat in files.items():
                folders.setdefault(os.path.dirname(path) or ".", []).append((path, stat))
            # Per folder too (a shard's folder), so a change can be named.
            self._dataset_folders = {folder: _hash(sorted(items)) for folder, items in folders.items()}
            inside = (self.image_folder + os.sep) if self.image_folder else None
            self._common = {
                "dataset": _hash(sorted(files.items())),
                # Everything but the image folder: what a stage that reads no image depends on.
                "dataset_other": _hash(sorted(
                    (f, h) for f, h in self._dataset_folders.items()
                    if inside is None or not (f + os.sep).startswith(inside)
                )),
                "code": code_version(),
                "environment": environment_fingerprint(),
                "scope": self.scope,
            }
        return self._common

    def _changed_folders(self, before: dict[str, str]) -> str:
        now = self._dataset_folders
        changed = sorted(f for f in set(before) | set(now) if before.get(f) != now.get(f))
        if not changed:
            return ""
        return " (in " + ", ".join(changed[:3]) + (f" and {len(changed) - 3} more folders" if len(changed) > 3 else "") + ")"

    def storage_files(self) -> dict[str, Stat]:
        if self._files is None:
            self._files = self._storage_files()
        return self._files

    def _storage_files(self) -> dict[str, Stat]:
        files = _walk(self.storage) if self.enabled else {}
        return {
            path: stat
            for path, stat in files.items()
            if path != self.settings_rel and not path.endswith(_IGNORED_SUFFIXES) and "/." not in "/" + path
        }

    def labels_stat(self) -> list[Any] | None:
        if self.labels_file is None:
            return None
        return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in
                (self.labels_file, self.labels_file.with_name(self.labels_file.name + "-wal")) if p.exists()]

    def _path(self, stage: str) -> Path:
        return self.folder / f"{stage}.json"

    def read(self, stage: str) -> dict[str, Any] | None:
        if stage not in self._records:
            try:
                record = json.loads(self._path(stage).read_text())
            except (OSError, ValueError):
                record = None
            ok = isinstance(record, dict) and record.get("version") == RECORD_VERSION
            self._records[stage] = record if ok else None
        return self._records[stage]

    # ------------------------------------------------------------------ decisions

    def check(self, stage: Stage, earlier: list[str]) -> Decision:
        """Whether ``stage`` can be skipped; ``earlier``: the stages before it this run."""
        if not self.enabled:
            return Decision(False, "tables at a URL: no fingerprint")
        record = self.read(stage.name)
        if record is None:
            return Decision(False, "no record of an earlier successful run")
        common = self.common()
        dataset_part = "dataset" if stage.reads_images else "dataset_other"
        for part, what in (("code", "the code changed"), ("environment", "an environment variable or a file it names changed"),
                           ("scope", "another set of shards"), (dataset_part, "the dataset's files changed")):
            if record.get(part) != common[part]:
                if part.startswith("dataset"):
                    what += self._changed_folders(record.get("dataset_folders") or {})
                return Decision(False, what)
        changed = [s for s in stage.sections if record.get("sections", {}).get(s) != self.sections[s]]
        if changed:
            return Decision(False, "settings changed: " + ", ".join(changed))
        if stage.reads_labels:
            if self.labels_file is None:
                return Decision(False, "labels in a database: not fingerprinted")
            if record.get("labels") != self.labels_stat():
                return Decision(False, "the labels changed")
        watched = set(record.get("outputs", []))
        for name in earlier:
            earlier_record = self.read(name)
            if earlier_record is None:
                return Decision(False, f"{name} has no record")
            watched |= set(earlier_record.get("outputs", []))
        files = self.storage_files()
        recorded = record.get("tables", {})
        missing_from_record = watched - set(recorded)
        if missing_from_record:
            return Decision(False, f"new tables since its run (e.g. {sorted(missing_from_record)[0]})")
        differing = sorted(p for p, stat in recorded.items() if tuple(files.get(p, ())) != tuple(stat))
        if differing:
            gone = [p for p in differing if p not in files]
            example = gone[0] + " deleted" if gone else differing[0] + " rewritten"
            return Decision(False, f"{len(differing)} table(s) changed (e.g. {example})")
        if self.instance is not None:
            for key in stage.asset_keys:
                if self.instance.get_latest_materialization_event(dg.AssetKey.from_user_string(key)) is None:
                    return Decision(False, f"{key} is not materialized in this Dagster instance")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("at", 0)))
        return Decision(True, f"inputs, settings and code unchanged since {when}", record)

    def changed_shards(self, stage: Stage, earlier: list[str], shards: list[str]) -> list[str] | None:
        """For a stage whose assets read only their own shard's images and tables: the
        shards whose inputs changed, when nothing else did (one new image re-runs its
        shard, not the range); ``None`` when the whole stage must run."""
        record = self.read(stage.name)
        if not self.enabled or record is None:
            return None
        common = self.common()
        if any(record.get(part) != common[part] for part in ("code", "environment", "scope")):
            return None
        if any(record.get("sections", {}).get(s) != self.sections[s] for s in stage.sections) or stage.reads_labels:
            return None
        wanted = set(shards)
        changed: set[str] = set()
        before = record.get("dataset_folders") or {}
        now = self._dataset_folders
        for folder in set(before) | set(now):
            if before.get(folder) != now.get(folder):
                parts = folder.split(os.sep)
                if len(parts) != 2 or parts[1] not in wanted:  # not <image folder>/<shard>
                    return None
                changed.add(parts[1])
        watched = set(record.get("outputs", []))
        for name in earlier:
            watched |= set((self.read(name) or {}).get("outputs", []))
        files = self.storage_files()
        recorded = record.get("tables", {})
        for path in watched | set(recorded):
            if path in recorded and tuple(files.get(path, ())) == tuple(recorded[path]):
                continue
            shard, ext = os.path.splitext(os.path.basename(path))
            if ext != ".parquet" or shard not in wanted:  # a table of every shard (or none) changed
                return None
            changed.add(shard)
        return sorted(changed) or None

    def forget(self, stage: str) -> None:
        """Before a stage runs: a failed run leaves no record that could skip it."""
        self._files = None
        self._records.pop(stage, None)
        try:
            self._path(stage).unlink()
        except FileNotFoundError:
            pass

    def record(self, stage: Stage, earlier: list[str], before: dict[str, Stat], previous: dict[str, Any] | None,
               summary: dict[str, Any]) -> None:
        """After every run of ``stage`` succeeded: ``before``, the storage's files when it
        started; ``previous``, its last record (outputs a re-run did not rewrite are still
        its outputs); ``summary``, what the CLI prints for a skipped stage."""
        if not self.enabled:
            return
        self._files = None
        after = self.storage_files()
        outputs = {p for p, stat in after.items() if before.get(p) != stat}
        outputs |= {p for p in (previous or {}).get("outputs", []) if p in after}
        watched = set(outputs)
        for name in earlier:
            watched |= set((self.read(name) or {}).get("outputs", []))
        record = {
            "version": RECORD_VERSION,
            "stage": stage.name,
            "at": time.time(),
            **self.common(),
            "dataset_folders": self._dataset_folders,
            "sections": {s: self.sections[s] for s in stage.sections},
            "labels": self.labels_stat() if stage.reads_labels else None,
            "outputs": sorted(outputs),
            "tables": {p: list(after[p]) for p in sorted(watched) if p in after},
            "summary": json.loads(json.dumps(summary, default=str)),
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self._path(stage.name), json.dumps(record))
        self._records[stage.name] = record
