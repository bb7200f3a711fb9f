"""Deterministic generator of a small Danbooru20xx-shaped sample dataset.

The demo command, the test-suite and the benchmarks all run on this data, so it copies
the shape of the real thing rather than being a toy:

- images under ``original/<bucket>/<id>.<ext>`` with ``bucket = id % 1000`` (zero-padded),
  spread over exactly ``n_shards`` buckets; mostly JPEG, some PNG/WebP, odd files when
  ``broken_files`` (a truncated JPEG, a zero-byte file, an RGBA PNG, a palette GIF and a
  junk ``.psd``);
- metadata as JSON lines in the two formats found in the wild: the Danbooru API form
  (``metadata/posts000000000000.json``) and the older BigQuery dump form with string
  numbers and a ``tags`` list (``metadata/2020000000000000.json``), with one truncated line,
  some images without metadata and some metadata lines without images;
- the seed author's published keypoints: ``keypoints/keypoints.tar.gz`` holding one
  ``<id>.json`` per figure image with ``[y, x]`` pairs (bizarre-pose-estimator order);
- ``ground_truth.parquet``: what was drawn (kind, keypoints in x/y order, a simulated human
  quality label), for later stages' tests and benchmarks;
- ``SAMPLE_DATASET.json``, written last: the parameters and the summary, so a second call
  with the same parameters returns at once.

Every random choice comes from a numpy ``Generator`` seeded by ``(seed, image_id, stream)``,
so the same parameters give byte-identical files, whatever the number of worker processes.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime as dt
import gzip
import hashlib
import io
import json
import math
import multiprocessing
import os
import shutil
import sys
import tarfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from danbooru_assets.pose import coco
from danbooru_assets.config import KEYPOINTS_TARBALL, default_sample_root
from danbooru_assets.core.shards import shard_key
from danbooru_assets.core.tables import atomic_path, atomic_write_bytes, atomic_write_text, write_parquet

if TYPE_CHECKING:
    import pandas as pd

# Bumped whenever the output for given parameters changes, so stale sample folders regenerate.
GENERATOR_VERSION = 2

MARKER_NAME = "SAMPLE_DATASET.json"
PARTIAL_NAME = ".SAMPLE_DATASET.partial"
ORIGINAL_DIR = "original"
METADATA_DIR = "metadata"
POSTS_FILE = "posts000000000000.json"
DUMP_FILE = "2020000000000000.json"
GROUND_TRUTH_FILE = "ground_truth.parquet"
# Only these paths are ever deleted when a sample folder is regenerated.
_GENERATED_PATHS = (ORIGINAL_DIR, METADATA_DIR, "keypoints", GROUND_TRUTH_FILE, MARKER_NAME)

KINDS: tuple[str, ...] = (
    "single_figure",
    "upper_body",
    "multiple_figures",
    "back_view",
    "manga_page",
    "landscape",
    "black_border",
    "text_page",
    "doll_pattern",
)
FIGURE_KINDS: frozenset[str] = frozenset({"single_figure", "upper_body", "multiple_figures", "back_view"})
# ~32% single/upper-body figures, like the seed's "< 20 of 100 usable" grid plus near misses.
KIND_WEIGHTS: dict[str, float] = {
    "single_figure": 0.20,
    "upper_body": 0.12,
    "multiple_figures": 0.14,
    "back_view": 0.08,
    "manga_page": 0.12,
    "landscape": 0.09,
    "black_border": 0.09,
    "text_page": 0.08,
    "doll_pattern": 0.08,
}
PROBLEMS: tuple[str, ...] = ("truncated", "zero_bytes", "alpha_channel", "palette_gif", "unknown_extension")
# Files no image decoder can read; the other problems are decodable but unusual.
UNREADABLE_PROBLEMS: frozenset[str] = frozenset({"truncated", "zero_bytes", "unknown_extension"})
QUALITY_LABELS: tuple[str, ...] = ("good", "questionable", "bad")
GROUND_TRUTH_COLUMNS: tuple[str, ...] = (
    "image_id", "kind", "file_ext", "has_file", "has_metadata", "problem", "width", "height",
    "quality", "pose", "n_figures", "has_published_keypoints", "published_keypoints_problem",
) + coco.KEYPOINT_COLUMNS
# What the metadata line says (null without one), for the metadata prefilter's tests, and the
# case planted for it (``_prefilter_cases``).
METADATA_TRUTH_COLUMNS: tuple[str, ...] = ("tags", "rating", "score", "is_deleted", "is_banned", "prefilter_case")
GROUND_TRUTH_COLUMNS += METADATA_TRUTH_COLUMNS
# Cases planted on clean single-figure images so the prefilter's non-tag rules have work.
PREFILTER_CASES: tuple[str, ...] = ("low_score", "deleted", "banned", "chibi")

# Duplicate variants planted for near_duplicates (``_plan_duplicates``): ``duplicate_of`` is
# the source image, ``duplicate_kind`` one of DUPLICATE_VARIANTS.
GROUND_TRUTH_COLUMNS += ("duplicate_of", "duplicate_kind")
# exact_copy: the same bytes (same md5) under another id; parent_child: a child post (its
# parent_id is the source) drawn with a coloured emblem; resized: 1.25x the source's size;
# colour: hue turned; text: a caption box drawn over the bottom.
DUPLICATE_VARIANTS: tuple[str, ...] = ("exact_copy", "parent_child", "resized", "colour", "text")

# Parallelise only when the pool's start-up cost is paid back.
_PARALLEL_MIN_FILES = 400
_CHUNK = 40


# --------------------------------------------------------------------------- public API


@dataclasses.dataclass(frozen=True)
class SampleDatasetSummary:
    """What a generation wrote; also stored in the marker file for fast reuse."""

    root: Path
    n_images_written: int
    shards: list[str]
    kind_counts: dict[str, int]  # per kind, over image files written
    ids_without_metadata: list[int]
    ids_metadata_only: list[int]
    broken_ids: dict[str, list[int]]  # problem -> ids (empty lists when broken_files=False)
    n_metadata_lines: dict[str, int]  # metadata file (relative) -> valid JSON lines
    bad_metadata_line: dict[str, Any] | None  # {"file": ..., "line": 1-based} of the truncated line
    n_published_keypoints: int  # valid members in the tarball
    malformed_keypoint_ids: dict[str, list[int]]  # "not_json"/"missing_keys" -> ids
    keypoint_ids_without_image: list[int]
    params: dict[str, Any]
    reused: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["root"] = str(self.root)
        d.pop("reused")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], root: Path, reused: bool) -> "SampleDatasetSummary":
        fields = {f.name for f in dataclasses.fields(cls)} - {"root", "reused"}
        return cls(root=root, reused=reused, **{k: d[k] for k in fields})


def image_relpath(image_id: int, ext: str) -> str:
    """``original/<bucket>/<id>.<ext>`` relative to the dataset root."""
    return f"{ORIGINAL_DIR}/{shard_key(image_id)}/{int(image_id)}.{ext}"


def generate_sample_dataset(
    root: Path | str,
    n_images: int = 300,
    n_shards: int = 10,
    seed: int = 0,
    min_side: int = 256,
    max_side: int = 640,
    broken_files: bool = True,
    overwrite: bool = False,
    workers: int | None = None,
) -> SampleDatasetSummary:
    """Write a sample dataset under ``root`` (or reuse the one already there).

    ``n_images`` image files are written (broken ones included) over exactly ``n_shards``
    buckets, plus ~3% metadata-only ids. ``workers``: processes for drawing and encoding
    (``None``: one per CPU for large sets, in-process for small ones); it never changes the
    output. Regenerating deletes only this generator's own paths, and refuses (unless
    ``overwrite``) to touch a folder it did not write.
    """
    root = Path(root)
    params = _validated_params(n_images, n_shards, seed, min_side, max_side, broken_files)
    marker = root / MARKER_NAME
    if marker.exists() and not overwrite:
        stored = _read_marker(marker)
        if stored is not None and stored.get("params") == params and stored.get("version") == GENERATOR_VERSION:
            return SampleDatasetSummary.from_dict(stored["summary"], root=root, reused=True)
    _clear_previous(root, overwrite)

    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / PARTIAL_NAME, json.dumps(params))
    plan = _plan(params)
    results = _render_files(root, plan, params, workers)
    summary = _write_tables(root, plan, results, params)
    atomic_write_text(
        marker, json.dumps({"version": GENERATOR_VERSION, "params": params, "summary": summary.to_dict()}, indent=1)
    )
    (root / PARTIAL_NAME).unlink()
    return summary


# What `danbooru-assets run` generates: enough images that, after the prefilter, the CLIP
# cut and the pose rules, the labeling pool (~130) holds three rounds of
# quality.min_round_size (20, 40, 60) — the loop, not just one round.
RUN_SAMPLE_IMAGES = 900

# Settings written next to the sample when none exist. The demo CLIP model has random
# weights, so its cut is a coin toss: keep most images rather than a meaningless 20%.
SAMPLE_SETTINGS_YAML = """\
# Written by `danbooru-assets run` for the bundled sample data (demo CLIP model, random
# weights: its scores carry no meaning, so the CLIP stage keeps most images). Edit freely.
clip:
  keep_fraction: 0.8
"""


def write_sample_settings(path: Path | str) -> bool:
    """Write :data:`SAMPLE_SETTINGS_YAML` to ``path`` unless a settings file is there;
    whether it wrote."""
    from danbooru_assets.core.tables import write_bytes
    from danbooru_assets.settings import settings_file

    target = settings_file(path)  # a local file, or next to URL storage like every settings file
    if target.exists():
        return False
    write_bytes(target, SAMPLE_SETTINGS_YAML.encode())
    return True


def read_ground_truth(root: Path | str) -> "pd.DataFrame":
    """The ground-truth table of a generated sample dataset (a pandas DataFrame)."""
    import pandas as pd

    return pd.read_parquet(Path(root) / GROUND_TRUTH_FILE)


# --------------------------------------------------------------------------- CLI


def add_sample_data_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``danbooru-assets sample-data``."""
    parser.add_argument("root", nargs="?", type=Path, default=None,
                        help="output folder (default: $DANBOORU_SAMPLE_ROOT or ./data/sample)")
    parser.add_argument("--images", type=int, default=RUN_SAMPLE_IMAGES,
                        help=f"image files to write (default {RUN_SAMPLE_IMAGES}, what `danbooru-assets run` generates)")
    parser.add_argument("--shards", type=int, default=10, help="bucket folders to spread them over (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-side", type=int, default=256, help="smallest image side in px (default 256)")
    parser.add_argument("--max-side", type=int, default=640, help="largest image side in px (default 640)")
    parser.add_argument("--no-broken-files", action="store_true", help="skip truncated/empty/odd files")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: automatic)")
    parser.add_argument("--overwrite", action="store_true", help="regenerate even if the folder is up to date")
    return parser


def run_sample_data(args: argparse.Namespace) -> int:
    """Run the ``sample-data`` subcommand; print a short summary; return the exit status."""
    import time

    root = args.root if args.root is not None else default_sample_root()
    start = time.perf_counter()
    try:
        s = generate_sample_dataset(
            root, n_images=args.images, n_shards=args.shards, seed=args.seed, min_side=args.min_side,
            max_side=args.max_side, broken_files=not args.no_broken_files, overwrite=args.overwrite,
            workers=args.workers,
        )
    except (ValueError, FileExistsError) as exc:
        print(f"sample-data: error: {exc}", file=sys.stderr)
        return 2
    took = time.perf_counter() - start
    verb = "up to date (reused)" if s.reused else f"written in {took:.1f} s"
    print(f"sample dataset at {s.root}: {verb}")
    print(f"  {s.n_images_written} image files in {len(s.shards)} shards ({s.shards[0]}..{s.shards[-1]})")
    print("  kinds: " + ", ".join(f"{k}={v}" for k, v in s.kind_counts.items()))
    print(f"  metadata lines: {sum(s.n_metadata_lines.values())} (+1 truncated); "
          f"{len(s.ids_without_metadata)} images without metadata, {len(s.ids_metadata_only)} metadata-only ids")
    broken = ", ".join(f"{k}={len(v)}" for k, v in s.broken_ids.items() if v) or "none"
    print(f"  odd/broken files: {broken}")
    print(f"  published keypoints: {s.n_published_keypoints} (+{sum(map(len, s.malformed_keypoint_ids.values()))} malformed)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m danbooru_assets.devtools.sample_data DIR [...]``."""
    parser = add_sample_data_arguments(
        argparse.ArgumentParser(prog="danbooru-assets sample-data",
                                description="Write a deterministic Danbooru-shaped sample dataset.")
    )
    return run_sample_data(parser.parse_args(argv))


# --------------------------------------------------------------------------- planning


@dataclasses.dataclass
class _Item:
    image_id: int
    kind: str
    width: int
    height: int
    ext: str
    has_file: bool
    has_metadata: bool = True
    problem: str | None = None
    variant: str | None = None  # a DUPLICATE_VARIANTS name: this file is drawn from another image
    variant_of: int | None = None
    source_size: tuple[int, int] | None = None
    parent_id: int | None = None  # Danbooru's parent post
    has_children: bool = False


def _validated_params(n_images: int, n_shards: int, seed: int, min_side: int, max_side: int,
                      broken_files: bool) -> dict[str, Any]:
    if not 1 <= n_shards <= 1000:
        raise ValueError(f"n_shards must be in 1..1000, got {n_shards}")
    # Every shard needs a file, and the odd files need ordinary images beside them.
    minimum = max(n_shards, 12 if broken_files else 2)
    if n_images < minimum:
        raise ValueError(f"n_images must be >= {minimum} for n_shards={n_shards}, got {n_images}")
    if n_images > 9000 * n_shards:
        raise ValueError(f"at most 9000 images per shard fit 7-digit ids; got {n_images} for {n_shards} shards")
    if not 32 <= min_side <= max_side:
        raise ValueError(f"need 32 <= min_side <= max_side, got min_side={min_side}, max_side={max_side}")
    return {"n_images": int(n_images), "n_shards": int(n_shards), "seed": int(seed), "min_side": int(min_side),
            "max_side": int(max_side), "broken_files": bool(broken_files)}


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, *keys]))


def _quota(weights: dict[str, float], n: int) -> list[str]:
    """Exactly proportional counts (largest remainder), so small sets still get every kind."""
    raw = {k: w * n for k, w in weights.items()}
    counts = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: counts[k] - raw[k])[: n - sum(counts.values())]:
        counts[k] += 1
    return [k for k in weights for _ in range(counts[k])]


def _image_size(rng: np.random.Generator, kind: str, min_side: int, max_side: int) -> tuple[int, int]:
    """Varied sizes and aspect ratios (width/height) that suit the kind."""
    if kind in ("manga_page", "text_page"):
        aspect = rng.uniform(0.62, 0.78)
    elif kind == "landscape":
        aspect = rng.uniform(1.25, 1.85)
    elif kind == "black_border":
        aspect = float(rng.choice([16 / 9, 4 / 3, 0.75]))
    else:
        aspect = float(rng.choice([rng.uniform(0.6, 0.85), 1.0, rng.uniform(1.15, 1.5)], p=[0.6, 0.2, 0.2]))
    long_side = rng.uniform(min_side, max_side)
    short = max(min_side, long_side * min(aspect, 1 / aspect))
    w, h = (long_side, short) if aspect >= 1 else (short, long_side)
    return int(round(w)), int(round(h))


def _plan(params: dict[str, Any]) -> list[_Item]:
    """Choose ids, kinds, sizes, extensions and the odd cases; sorted by id."""
    seed, n_images, n_shards = params["seed"], params["n_images"], params["n_shards"]
    rng = _rng(seed, 0x91A7)
    # A contiguous run of buckets, like a real download's 0000-0999: one run covers them.
    first = int(rng.integers(0, 1000 - n_shards + 1))
    buckets = np.arange(first, first + n_shards)
    n_meta_only = max(1, round(0.03 * n_images))
    # One file per bucket first, the rest uneven (Danbooru buckets are only roughly equal).
    weights = rng.dirichlet(np.full(n_shards, 4.0))
    file_buckets = np.concatenate([buckets, rng.choice(buckets, size=n_images - n_shards, p=weights)])
    meta_buckets = rng.choice(buckets, size=n_meta_only)
    all_buckets = np.concatenate([file_buckets, meta_buckets])
    ids = np.empty(len(all_buckets), dtype=np.int64)
    for b in buckets:
        where = np.flatnonzero(all_buckets == b)
        ks = rng.choice(np.arange(100, 10000), size=len(where), replace=False)  # 6-7 digit ids
        ids[where] = ks * 1000 + b

    kinds = _quota(KIND_WEIGHTS, n_images)
    kinds = [kinds[i] for i in rng.permutation(n_images)]
    kind_names = list(KIND_WEIGHTS)
    kind_p = np.array([KIND_WEIGHTS[k] for k in kind_names])
    kinds += [kind_names[i] for i in rng.choice(len(kind_names), size=n_meta_only, p=kind_p)]

    items: list[_Item] = []
    for i, (image_id, kind) in enumerate(zip(ids.tolist(), kinds)):
        w, h = _image_size(rng, kind, params["min_side"], params["max_side"])
        ext = str(rng.choice(["jpg", "png", "webp"], p=[0.84, 0.13, 0.03]))
        items.append(_Item(image_id, kind, w, h, ext, has_file=i < n_images))

    files = [it for it in items if it.has_file]
    order = [files[i] for i in rng.permutation(len(files))]
    used: set[int] = set()

    def take(pred) -> _Item:
        item = next(it for it in order if it.image_id not in used and pred(it))
        used.add(item.image_id)
        return item

    if params["broken_files"]:
        alpha = take(lambda it: it.kind == "single_figure")  # a transparent-background PNG cut-out
        alpha.problem, alpha.ext = "alpha_channel", "png"
        trunc = take(lambda it: True)
        trunc.problem, trunc.ext = "truncated", "jpg"
        zero = take(lambda it: True)
        zero.problem = "zero_bytes"
        gif = take(lambda it: True)
        gif.problem, gif.ext = "palette_gif", "gif"
        junk = take(lambda it: it.kind not in FIGURE_KINDS)
        junk.problem, junk.ext = "unknown_extension", "psd"
    for _ in range(max(1, round(0.04 * n_images))):
        take(lambda it: True).has_metadata = False
    _plan_duplicates(_rng(seed, 0xD0B1), order, used, n_images)
    return sorted(items, key=lambda it: it.image_id)


def _plan_duplicates(rng: np.random.Generator, order: list[_Item], used: set[int], n_images: int) -> None:
    """Turn some clean figure images into duplicate variants of others of the same kind (so
    the kind counts stay), ~2% of the images per variant; an own random stream, so the
    rest of the plan is what it was without them."""
    per_variant = round(0.02 * n_images)
    if per_variant < 1 or n_images < 40:
        return
    for variant in DUPLICATE_VARIANTS:
        for _ in range(per_variant):
            clean = [it for it in order if it.image_id not in used and it.problem is None and it.has_metadata
                     and it.kind in ("single_figure", "upper_body")]
            if len(clean) < 2:
                return
            source = clean[int(rng.integers(len(clean)))]
            same_kind = [it for it in clean if it.kind == source.kind and it is not source]
            if not same_kind:
                continue
            copy = same_kind[int(rng.integers(len(same_kind)))]
            used.update((source.image_id, copy.image_id))
            copy.variant, copy.variant_of, copy.source_size = variant, source.image_id, (source.width, source.height)
            copy.width, copy.height = source.width, source.height
            if variant == "exact_copy":
                copy.ext = source.ext  # the same bytes
            elif variant == "resized":
                copy.width, copy.height = round(source.width * 1.25), round(source.height * 1.25)
            elif variant == "parent_child":
                copy.parent_id, source.has_children = source.image_id, True


# --------------------------------------------------------------------------- figures

# Unit lengths of the stick figure: hip midpoint at the origin, standing height ~0.9.
_TORSO, _NECK, _HEAD_R = 0.30, 0.085, 0.075
_SHOULDER_W, _HIP_W = 0.09, 0.055
_UPPER_ARM, _FOREARM, _THIGH, _SHIN = 0.16, 0.15, 0.22, 0.21
_OUTLINE = (38, 28, 44)

_HAIR = {"black": (40, 36, 52), "brown": (125, 75, 42), "blonde": (248, 218, 120), "red": (205, 55, 55),
         "blue": (70, 110, 220), "pink": (248, 150, 190), "silver": (208, 214, 226), "green": (80, 170, 100),
         "purple": (140, 90, 190), "white": (246, 246, 246)}
_EYES = {"blue": (50, 100, 220), "red": (200, 30, 40), "green": (40, 160, 80), "brown": (110, 60, 30),
         "purple": (130, 60, 180), "yellow": (220, 180, 30)}
_SKIN = ((255, 230, 214), (250, 216, 192), (236, 196, 166), (198, 150, 114))

_FIGURE_POSES = ("standing", "arms_raised", "hands_on_hips", "walking", "sitting", "leaning")
_ODD_POSES = ("kicking", "upside_down", "no_arms_big_feet")
_POSE_TAGS = {"standing": ["standing"], "arms_raised": ["arms_up"], "hands_on_hips": ["hands_on_hips", "standing"],
              "walking": ["walking"], "sitting": ["sitting"], "leaning": ["leaning_to_the_side"],
              "kicking": ["kicking", "leg_up"], "upside_down": ["upside-down"],
              "no_arms_big_feet": ["arms_behind_back", "foreshortening"]}


@dataclasses.dataclass(frozen=True)
class _Pose:
    name: str
    lean: float  # torso tilt, degrees
    rot: float  # whole-figure rotation about the hips, degrees
    arm_l: tuple[float, float]  # (shoulder, elbow) angles from straight down, outward positive
    arm_r: tuple[float, float]
    leg_l: tuple[float, float]  # (hip, knee)
    leg_r: tuple[float, float]
    thigh_scale: float  # < 1: foreshortened thighs (sitting facing the viewer)
    turn: float  # head yaw, -1..1
    arms_visible: bool = True
    big_feet: bool = False

    @property
    def odd(self) -> bool:
        return self.name in _ODD_POSES


@dataclasses.dataclass(frozen=True)
class _Look:
    hair: str
    eyes: str
    skin: tuple[int, int, int]
    outfit: tuple[int, int, int]
    accent: tuple[int, int, int]
    long_hair: bool
    dress: bool
    stockings: bool


@dataclasses.dataclass(frozen=True)
class _Figure:
    kp: np.ndarray  # (17, 2) x, y in image pixels
    visible: np.ndarray  # (17,) drawn and not hidden (image bounds not yet applied)
    head: np.ndarray  # head centre, pixels
    up: np.ndarray  # unit vector from hips towards the head
    scale: float  # pixels per unit length
    pose: _Pose
    look: _Look
    back: bool


def _sample_pose(rng: np.random.Generator, name: str) -> _Pose:
    u = rng.uniform
    lean, rot, ts, arms_visible, big_feet = u(-4, 4), 0.0, 1.0, True, False
    arm_l, arm_r = (u(8, 25), u(-5, 20)), (u(8, 25), u(-5, 20))
    leg_l, leg_r = (u(3, 9), u(-4, 4)), (u(3, 9), u(-4, 4))
    if name == "arms_raised":
        arm_l = (u(140, 175), u(-25, 15))
        if rng.random() < 0.6:
            arm_r = (u(140, 175), u(-25, 15))
    elif name == "hands_on_hips":
        arm_l, arm_r = (u(35, 50), u(-115, -95)), (u(35, 50), u(-115, -95))
    elif name == "walking":
        leg_l, leg_r = (u(12, 24), u(-12, 0)), (u(-14, -4), u(0, 10))
        arm_l, arm_r = (u(-15, -5), u(0, 15)), (u(10, 25), u(0, 15))
    elif name == "sitting":
        if rng.random() < 0.5:  # facing the viewer: thighs foreshortened
            ts = u(0.3, 0.45)
            leg_l, leg_r = (u(8, 20), u(-8, 0)), (u(8, 20), u(-8, 0))
        else:  # side-on: both thighs to one side, shins down
            sd = float(rng.choice([-1.0, 1.0]))
            leg_l = (80 * sd + u(-8, 8), -80 * sd + u(-10, 10))
            leg_r = (-80 * sd + u(-8, 8), 80 * sd + u(-10, 10))
    elif name == "leaning":
        lean = float(rng.choice([-1.0, 1.0])) * u(12, 25)
    elif name == "kicking":
        kick = (u(70, 115), u(-30, 0))
        leg_l, leg_r = (kick, leg_r) if rng.random() < 0.5 else (leg_l, kick)
        arm_l, arm_r = (u(60, 100), u(-10, 10)), (u(60, 100), u(-10, 10))
    elif name == "upside_down":
        rot = 180 + u(-20, 20)
        arm_l, arm_r = (u(100, 160), u(-20, 20)), (u(100, 160), u(-20, 20))
    elif name == "no_arms_big_feet":  # the seed's "feet too big and no arms"
        arms_visible, big_feet, ts = False, True, u(0.6, 0.8)
        arm_l, arm_r = (u(0, 5), 0.0), (u(0, 5), 0.0)
    return _Pose(name, float(lean), float(rot), arm_l, arm_r, leg_l, leg_r, float(ts), float(u(-0.6, 0.6)),
                 arms_visible, big_feet)


def _sample_look(rng: np.random.Generator, mono: bool) -> _Look:
    hair = str(rng.choice(list(_HAIR)))
    eyes = str(rng.choice(list(_EYES)))
    skin = _SKIN[int(rng.integers(len(_SKIN)))]
    outfit = tuple(int(c) for c in rng.integers(30, 240, 3))
    accent = tuple(int(c) for c in rng.integers(120, 256, 3))
    if mono:
        skin, outfit, accent = (255, 255, 255), (150, 150, 150), (225, 225, 225)
    return _Look(hair, eyes, skin, outfit, accent, bool(rng.random() < 0.6), bool(rng.random() < 0.55),
                 bool(rng.random() < 0.3))


def _unit_skeleton(pose: _Pose, back: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Keypoints (x right, y down) in unit lengths, hip midpoint at the origin.

    COCO "left" is the character's left: image right when facing the viewer, image left
    when seen from behind.
    """
    s_left = -1.0 if back else 1.0
    lean = math.radians(pose.lean)
    up = np.array([math.sin(lean), -math.cos(lean)])
    rv = np.array([-up[1], up[0]])  # image-right when upright
    neck = _TORSO * up
    head = neck + (_NECK + _HEAD_R) * up
    r = _HEAD_R
    face = pose.turn * 0.25 * r * rv
    eye_dx = 0.42 * r * (1 - 0.3 * abs(pose.turn))
    kp = np.empty((coco.NUM_KEYPOINTS, 2))
    kp[0] = head - 0.45 * r * up + face
    kp[1] = head - 0.12 * r * up + s_left * eye_dx * rv + face
    kp[2] = head - 0.12 * r * up - s_left * eye_dx * rv + face
    kp[3] = head - 0.15 * r * up + s_left * 0.97 * r * rv
    kp[4] = head - 0.15 * r * up - s_left * 0.97 * r * rv
    kp[5] = neck - 0.02 * up + s_left * _SHOULDER_W * rv
    kp[6] = neck - 0.02 * up - s_left * _SHOULDER_W * rv

    def limb(start: np.ndarray, side: float, angles: tuple[float, float], l1: float, l2: float):
        a1, a2 = math.radians(angles[0]), math.radians(angles[0] + angles[1])
        mid = start + l1 * np.array([side * math.sin(a1), math.cos(a1)])
        return mid, mid + l2 * np.array([side * math.sin(a2), math.cos(a2)])

    kp[7], kp[9] = limb(kp[5], s_left, pose.arm_l, _UPPER_ARM, _FOREARM)
    kp[8], kp[10] = limb(kp[6], -s_left, pose.arm_r, _UPPER_ARM, _FOREARM)
    kp[11] = s_left * _HIP_W * rv
    kp[12] = -s_left * _HIP_W * rv
    kp[13], kp[15] = limb(kp[11], s_left, pose.leg_l, _THIGH * pose.thigh_scale, _SHIN)
    kp[14], kp[16] = limb(kp[12], -s_left, pose.leg_r, _THIGH * pose.thigh_scale, _SHIN)
    visible = np.ones(coco.NUM_KEYPOINTS, dtype=bool)
    if back:
        visible[:3] = False  # nose and eyes face away
    if not pose.arms_visible:
        visible[7:11] = False
    if pose.rot:
        c, s = math.cos(math.radians(pose.rot)), math.sin(math.radians(pose.rot))
        m = np.array([[c, -s], [s, c]])
        kp, head, up = kp @ m.T, m @ head, m @ up
    return kp, visible, head, up


def _unit_extent(kp: np.ndarray, head: np.ndarray, pose: _Pose) -> tuple[float, float, float, float]:
    """Bounding box (x0, y0, x1, y1) of everything drawn: hair, hands and feet included."""
    foot = 0.16 if pose.big_feet else 0.06
    pts = [kp, head + 1.3 * _HEAD_R * np.array([[1, 0], [-1, 0], [0, 1], [0, -1]]),
           kp[[15, 16]] + foot, kp[[15, 16]] - foot, kp[[9, 10]] + 0.03, kp[[9, 10]] - 0.03]
    allp = np.vstack(pts)
    return float(allp[:, 0].min()), float(allp[:, 1].min()), float(allp[:, 0].max()), float(allp[:, 1].max())


def _make_figure(kp: np.ndarray, visible: np.ndarray, head: np.ndarray, up: np.ndarray, scale: float,
                 offset: np.ndarray, pose: _Pose, look: _Look, back: bool) -> _Figure:
    return _Figure(kp * scale + offset, visible, head * scale + offset, up, scale, pose, look, back)


def _fit_figure(rng: np.random.Generator, w: int, h: int, pose: _Pose, look: _Look, back: bool,
                frac: tuple[float, float]) -> _Figure:
    """A whole figure, its height a ``frac`` share of the image, wholly inside it."""
    kp, vis, head, up = _unit_skeleton(pose, back)
    x0, y0, x1, y1 = _unit_extent(kp, head, pose)
    margin = 0.02 * min(w, h)
    scale = min(rng.uniform(*frac) * h / (y1 - y0), (w - 2 * margin) / (x1 - x0), (h - 2 * margin) / (y1 - y0))
    lo_x, lo_y = margin - x0 * scale, margin - y0 * scale
    # max(): when the figure exactly fills a side, rounding can make the range a hair negative.
    ox = rng.uniform(lo_x, max(lo_x, w - margin - x1 * scale))
    oy = rng.uniform(lo_y, max(lo_y, h - margin - y1 * scale))
    return _make_figure(kp, vis, head, up, scale, np.array([ox, oy]), pose, look, back)


# --------------------------------------------------------------------------- specs


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything about one image that tags, ground truth and drawing share."""

    image_id: int
    kind: str
    width: int
    height: int
    figures: tuple[_Figure, ...] = ()
    background: str = "none"  # white/simple/gradient/outdoors/cluttered/transparent
    mono: bool = False
    inner: "_Spec | None" = None  # black_border: the small picture in the middle
    inner_box: tuple[int, int, int, int] | None = None
    n_panels: int = 0
    girls: int = 1
    boys: int = 0

    @property
    def main_figure(self) -> _Figure | None:
        return max(self.figures, key=lambda f: f.scale) if self.figures else None


def _sample_spec(seed: int, image_id: int, kind: str, w: int, h: int, problem: str | None = None) -> _Spec:
    """Pure function of its arguments: the main process and workers derive the same spec."""
    rng = _rng(seed, image_id, 1)
    transparent = problem == "alpha_channel"
    mono = (not transparent) and kind in FIGURE_KINDS and rng.random() < 0.08
    background = "transparent" if transparent else ("white" if mono else str(
        rng.choice(["white", "simple", "gradient", "outdoors", "cluttered"], p=[0.2, 0.25, 0.2, 0.2, 0.15])))
    if kind == "single_figure":
        name = str(rng.choice(_ODD_POSES)) if rng.random() < 0.15 else str(rng.choice(_FIGURE_POSES))
        fig = _fit_figure(rng, w, h, _sample_pose(rng, name), _sample_look(rng, mono), False, (0.55, 0.93))
        return _gendered(_Spec(image_id, kind, w, h, (fig,), background, mono), rng)
    if kind == "back_view":
        name = str(rng.choice(["standing", "arms_raised", "walking", "sitting"]))
        fig = _fit_figure(rng, w, h, _sample_pose(rng, name), _sample_look(rng, mono), True, (0.5, 0.9))
        return _gendered(_Spec(image_id, kind, w, h, (fig,), background, mono), rng)
    if kind == "upper_body":
        pose = _sample_pose(rng, str(rng.choice(["standing", "arms_raised", "hands_on_hips", "leaning"])))
        kp, vis, head, up = _unit_skeleton(pose, False)
        top = head[1] - 1.3 * _HEAD_R
        top_px, hip_px = rng.uniform(0.03, 0.12) * h, rng.uniform(0.95, 1.3) * h
        scale = (hip_px - top_px) / (0.0 - top)
        # Centre the head (not the hips): a leaning torso must not push the face out of frame.
        offset = np.array([rng.uniform(0.35, 0.65) * w - head[0] * scale, hip_px])
        fig = _make_figure(kp, vis, head, up, scale, offset, pose, _sample_look(rng, mono), False)
        return _gendered(_Spec(image_id, kind, w, h, (fig,), background, mono), rng)
    if kind == "multiple_figures":
        n = int(rng.integers(2, 5))
        figs = []
        for i in range(n):
            pose = _sample_pose(rng, str(rng.choice(_FIGURE_POSES)))
            back = bool(rng.random() < 0.1)
            kp, vis, head, up = _unit_skeleton(pose, back)
            x0, y0, x1, y1 = _unit_extent(kp, head, pose)
            scale = min(rng.uniform(0.4, 0.88) * h / (y1 - y0), 1.3 * w / n / (x1 - x0))
            cx = (i + 0.5) * w / n + rng.uniform(-0.15, 0.15) * w / n
            offset = np.array([cx - 0.5 * (x0 + x1) * scale, rng.uniform(0.9, 0.98) * h - y1 * scale])
            figs.append(_make_figure(kp, vis, head, up, scale, offset, pose, _sample_look(rng, mono), back))
        figs.sort(key=lambda f: f.scale)  # larger figures stand in front
        girls = int(rng.integers(1, n + 1)) if rng.random() < 0.3 else n
        return _Spec(image_id, kind, w, h, tuple(figs), background, mono, girls=girls, boys=n - girls)
    if kind == "black_border":
        bw, bh = int(w * rng.uniform(0.25, 0.45)), int(h * rng.uniform(0.25, 0.45))
        bw, bh = max(bw, 16), max(bh, 16)
        x, y = int((w - bw) * rng.uniform(0.4, 0.6)), int((h - bh) * rng.uniform(0.4, 0.6))
        inner_kind = "single_figure" if rng.random() < 0.6 else "landscape"
        inner = _sample_spec(seed, image_id + 7_919_000_000, inner_kind, bw, bh)  # distinct stream
        return _Spec(image_id, kind, w, h, background="black", inner=inner, inner_box=(x, y, bw, bh))
    if kind == "manga_page":
        return _Spec(image_id, kind, w, h, mono=True, n_panels=int(rng.integers(3, 7)),
                     girls=int(rng.integers(1, 3)), boys=0)
    return _Spec(image_id, kind, w, h, background="paper" if kind == "text_page" else "none", girls=0, boys=0)


def _gendered(spec: _Spec, rng: np.random.Generator) -> _Spec:
    """One character: mostly a girl, as on Danbooru."""
    girl = rng.random() < 0.85
    return dataclasses.replace(spec, girls=int(girl), boys=int(not girl))


def _figure_height_frac(fig: _Figure, h: int) -> float:
    """Visible height of the figure (keypoints and head top) as a share of the image height."""
    pts_y = np.concatenate([fig.kp[:, 1], [fig.head[1] - 1.3 * _HEAD_R * fig.scale]])
    return float(min(1.0, (min(pts_y.max(), h) - max(pts_y.min(), 0)) / h))


def _quality(spec: _Spec, problem: str | None, noise: float) -> str:
    """Simulated human label: a fixed function of the drawing plus annotator noise.

    Clean single figures are mostly "good"; half portraits and odd poses "questionable";
    everything else "bad". Small figures, clutter and monochrome sketches cost points, so a
    classifier on image features can learn the label, but not perfectly.
    """
    if problem in UNREADABLE_PROBLEMS:
        return "bad"
    base = {"single_figure": 0.80, "upper_body": 0.52, "back_view": 0.30, "multiple_figures": 0.15}
    score = base.get(spec.kind, 0.02)
    fig = spec.main_figure
    if fig is not None:
        if fig.pose.odd:
            score -= 0.33
        elif fig.pose.name in ("sitting", "leaning"):
            score -= 0.06
        score -= 0.3 * max(0.0, 0.7 - _figure_height_frac(fig, spec.height))
    if spec.background == "cluttered":
        score -= 0.15
    if spec.mono:
        score -= 0.2
    score += noise
    return "good" if score >= 0.6 else "questionable" if score >= 0.35 else "bad"


# --------------------------------------------------------------------------- drawing


def _gradient(w: int, h: int, top: Sequence[float], bottom: Sequence[float]) -> Image.Image:
    t = np.linspace(0.0, 1.0, h)[:, None]
    col = ((1 - t) * np.asarray(top, float) + t * np.asarray(bottom, float)).round().astype(np.uint8)
    return Image.fromarray(col[:, None, :]).resize((w, h), Image.Resampling.NEAREST)


def _pastel(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(185, 256, 3))


def _stroke(d: ImageDraw.ImageDraw, pts: list[tuple[float, float]], width: int, fill, outline: int) -> None:
    """A thick rounded line with a dark outline: the flat anime look."""
    for colour, extra in ((_OUTLINE, outline), (fill, 0)):
        wd = width + 2 * extra
        d.line(pts, fill=colour, width=wd, joint="curve")
        rad = wd / 2
        for x, y in (pts[0], pts[-1]):
            d.ellipse([x - rad, y - rad, x + rad, y + rad], fill=colour)


def _draw_figure(d: ImageDraw.ImageDraw, fig: _Figure) -> None:
    s, look, kp = fig.scale, fig.look, fig.kp
    ol = max(1, round(0.008 * s))
    limb = max(2, round(0.045 * s))
    hair = (90, 90, 90) if look.skin == (255, 255, 255) else _HAIR[look.hair]
    P = lambda i: (float(kp[i, 0]), float(kp[i, 1]))  # noqa: E731
    up = fig.up
    rv = np.array([-up[1], up[0]])
    r = _HEAD_R * s
    hc = fig.head
    if look.long_hair or fig.back:  # hair falling behind the shoulders
        poly = [hc - 1.1 * r * rv, hc + 1.1 * r * rv, hc + 1.3 * r * rv - 3.2 * r * up, hc - 1.3 * r * rv - 3.2 * r * up]
        d.polygon([tuple(p) for p in poly], fill=hair, outline=_OUTLINE, width=ol)
    leg = look.accent if look.stockings else look.skin
    foot_len = (0.16 if fig.pose.big_feet else 0.055) * s
    for hip, knee, ankle in ((11, 13, 15), (12, 14, 16)):
        _stroke(d, [P(hip), P(knee), P(ankle)], limb, leg, ol)
        x, y = P(ankle)
        d.ellipse([x - foot_len, y - 0.35 * foot_len, x + foot_len, y + 0.35 * foot_len], fill=look.outfit,
                  outline=_OUTLINE, width=ol)
    torso = [P(5), P(6), P(12), P(11)]
    d.polygon(torso, fill=look.outfit, outline=_OUTLINE, width=ol)
    if look.dress:
        down = -up * 0.2 * s
        out = (kp[11] - kp[12]) * 0.9
        skirt = [P(11), P(12), tuple(kp[12] + down - out), tuple(kp[11] + down + out)]
        d.polygon(skirt, fill=look.accent, outline=_OUTLINE, width=ol)
    neck = (kp[5] + kp[6]) / 2
    _stroke(d, [tuple(neck), tuple(hc - 0.6 * r * up)], max(2, round(0.03 * s)), look.skin, ol)
    if fig.pose.arms_visible:
        for sh, el, wr in ((5, 7, 9), (6, 8, 10)):
            _stroke(d, [P(sh), P(el)], limb, look.outfit, ol)
            _stroke(d, [P(el), P(wr)], max(2, round(limb * 0.8)), look.skin, ol)
            x, y = P(wr)
            hr = 0.025 * s
            d.ellipse([x - hr, y - hr, x + hr, y + hr], fill=look.skin, outline=_OUTLINE, width=ol)
    box = [hc[0] - r, hc[1] - r, hc[0] + r, hc[1] + r]
    hbox = [hc[0] - 1.1 * r, hc[1] - 1.1 * r, hc[0] + 1.1 * r, hc[1] + 1.1 * r]
    if fig.back:
        d.ellipse(hbox, fill=hair, outline=_OUTLINE, width=ol)
        return
    d.ellipse(box, fill=look.skin, outline=_OUTLINE, width=ol)
    a = math.degrees(math.atan2(up[1], up[0]))
    d.pieslice(hbox, a - 82, a + 82, fill=hair, outline=_OUTLINE, width=ol)
    eye = (90, 90, 90) if look.skin == (255, 255, 255) else _EYES[look.eyes]
    ex, ey = 0.2 * r, 0.28 * r
    for i in (1, 2):
        x, y = P(i)
        d.ellipse([x - ex, y - ey, x + ex, y + ey], fill=eye, outline=_OUTLINE, width=ol)
        d.ellipse([x - 0.4 * ex, y - 0.7 * ey, x + 0.2 * ex, y - 0.1 * ey], fill=(255, 255, 255))
    m = hc - 0.62 * r * up
    d.line([tuple(m - 0.15 * r * rv), tuple(m + 0.15 * r * rv)], fill=_OUTLINE, width=ol)


def _draw_background(img: Image.Image, spec: _Spec, rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    d = ImageDraw.Draw(img)
    bg = spec.background
    if bg == "simple":
        d.rectangle([0, 0, w, h], fill=_pastel(rng))
    elif bg == "gradient":
        img.paste(_gradient(w, h, _pastel(rng), _pastel(rng)))
    elif bg == "outdoors":
        img.paste(_gradient(w, h, (110, 170, 240), (215, 235, 255)))
        horizon = int(h * rng.uniform(0.55, 0.8))
        d.rectangle([0, horizon, w, h], fill=(110, 180, 90))
    elif bg == "cluttered":  # a busy room / pattern: the classifier's "complex visual" cue
        d.rectangle([0, 0, w, h], fill=_pastel(rng))
        for _ in range(int(rng.integers(25, 60))):
            x, y = rng.uniform(-0.1, 1.0, 2) * (w, h)
            sz = rng.uniform(0.05, 0.3) * min(w, h)
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            box = [x, y, x + sz, y + sz * rng.uniform(0.5, 1.5)]
            (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=colour, outline=_OUTLINE)
    return img


def _render(spec: _Spec, seed: int) -> Image.Image:
    """Draw the image a spec describes (RGB, RGBA for transparent cut-outs, L for manga)."""
    rng = _rng(seed, spec.image_id, 3)
    w, h = spec.width, spec.height
    if spec.kind in FIGURE_KINDS:
        mode, fill = ("RGBA", (255, 255, 255, 0)) if spec.background == "transparent" else ("RGB", (255, 255, 255))
        img = _draw_background(Image.new(mode, (w, h), fill), spec, rng)
        d = ImageDraw.Draw(img)
        for fig in spec.figures:
            _draw_figure(d, fig)
        return img.convert("L") if spec.mono else img
    if spec.kind == "black_border":
        img = Image.new("RGB", (w, h), (0, 0, 0))
        x, y, _, _ = spec.inner_box
        img.paste(_render(spec.inner, seed).convert("RGB"), (x, y))
        return img
    return {"manga_page": _draw_manga, "landscape": _draw_landscape, "text_page": _draw_text_page,
            "doll_pattern": _draw_doll_pattern}[spec.kind](w, h, rng, spec)


def _draw_manga(w: int, h: int, rng: np.random.Generator, spec: _Spec) -> Image.Image:
    img = Image.new("L", (w, h), 255)
    d = ImageDraw.Draw(img)
    m, gap = int(0.05 * w), max(3, int(0.015 * w))
    line = max(2, w // 180)
    rows = max(2, spec.n_panels // 2)
    cuts = np.sort(rng.uniform(0.2, 0.8, rows - 1)) if rows > 1 else np.array([])
    ys = [m, *[int(m + c * (h - 2 * m)) for c in cuts], h - m]
    for r0, r1 in zip(ys[:-1], ys[1:]):
        cols = int(rng.integers(1, 3))
        xs = [m, *([int(m + rng.uniform(0.35, 0.65) * (w - 2 * m))] if cols == 2 else []), w - m]
        for c0, c1 in zip(xs[:-1], xs[1:]):
            box = (c0 + gap // 2, r0 + gap // 2, c1 - gap // 2, r1 - gap // 2)
            if box[2] - box[0] < 8 or box[3] - box[1] < 8:
                continue
            pw, ph = box[2] - box[0], box[3] - box[1]
            if rng.random() < 0.3:  # speed lines / screentone hatching
                for _ in range(int(rng.integers(8, 25))):
                    x0 = box[0] + rng.uniform(0, pw)
                    d.line([(x0, box[1]), (x0 + rng.uniform(-0.3, 0.3) * pw, box[3])], fill=int(rng.integers(60, 180)))
            if rng.random() < 0.7:  # a character's head in line art
                cx, cy = box[0] + rng.uniform(0.3, 0.7) * pw, box[1] + rng.uniform(0.4, 0.7) * ph
                hr = rng.uniform(0.15, 0.3) * min(pw, ph)
                d.ellipse([cx - hr, cy - hr, cx + hr, cy + hr], fill=255, outline=0, width=line)
                d.pieslice([cx - 1.1 * hr, cy - 1.1 * hr, cx + 1.1 * hr, cy + 1.1 * hr], 190, 350, fill=40)
                for sx in (-0.4, 0.4):
                    d.ellipse([cx + sx * hr - 0.12 * hr, cy - 0.05 * hr, cx + sx * hr + 0.12 * hr, cy + 0.3 * hr], fill=0)
                d.line([(cx - hr, cy + hr), (cx - 1.6 * hr, box[3]), (cx + 1.6 * hr, box[3]), (cx + hr, cy + hr)],
                       fill=0, width=line)
            if rng.random() < 0.75:  # speech bubble with text strokes
                bw, bh = rng.uniform(0.25, 0.45) * pw, rng.uniform(0.2, 0.4) * ph
                bx, by = box[0] + rng.uniform(0.02, 0.98) * (pw - bw), box[1] + rng.uniform(0.02, 0.3) * (ph - bh)
                d.ellipse([bx, by, bx + bw, by + bh], fill=255, outline=0, width=line)
                for k in range(int(rng.integers(2, 4))):
                    ty = by + bh * (0.3 + 0.18 * k)
                    d.line([(bx + 0.25 * bw, ty), (bx + rng.uniform(0.5, 0.75) * bw, ty)], fill=30, width=max(1, line // 2))
            d.rectangle(box, outline=0, width=line)
    return img


def _draw_landscape(w: int, h: int, rng: np.random.Generator, spec: _Spec) -> Image.Image:
    sunset = rng.random() < 0.3
    top, low = ((60, 60, 140), (250, 160, 90)) if sunset else ((70, 140, 235), (200, 230, 255))
    img = _gradient(w, h, top, low)
    d = ImageDraw.Draw(img)
    sr = rng.uniform(0.04, 0.09) * w
    sx, sy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.35) * h
    d.ellipse([sx - sr, sy - sr, sx + sr, sy + sr], fill=(255, 200, 120) if sunset else (255, 250, 210))
    for _ in range(int(rng.integers(2, 6))):
        cx, cy, cw = rng.uniform(0, 1) * w, rng.uniform(0.05, 0.4) * h, rng.uniform(0.08, 0.2) * w
        d.ellipse([cx - cw, cy - 0.3 * cw, cx + cw, cy + 0.3 * cw], fill=(250, 250, 252))
    xs = np.linspace(0, w, 48)
    for layer, (base, colour) in enumerate((((0.5, 0.6), (120, 150, 170)), ((0.65, 0.75), (90, 160, 80)))):
        y0 = rng.uniform(*base) * h
        amp, freq, phase = rng.uniform(0.04, 0.1) * h, rng.uniform(1, 3), rng.uniform(0, 2 * math.pi)
        ys = y0 + amp * np.sin(freq * 2 * math.pi * xs / w + phase)
        d.polygon([(0, h), *zip(xs.tolist(), ys.tolist()), (w, h)], fill=colour)
    for _ in range(int(rng.integers(3, 12))):
        tx, ty = rng.uniform(0, 1) * w, rng.uniform(0.7, 0.95) * h
        th = rng.uniform(0.08, 0.2) * h
        d.rectangle([tx - 0.04 * th, ty - 0.2 * th, tx + 0.04 * th, ty], fill=(100, 70, 40))
        d.polygon([(tx - 0.3 * th, ty - 0.2 * th), (tx + 0.3 * th, ty - 0.2 * th), (tx, ty - th)], fill=(40, 110, 50))
    return img


def _draw_text_page(w: int, h: int, rng: np.random.Generator, spec: _Spec) -> Image.Image:
    paper = tuple(int(c) for c in rng.integers(232, 252, 3))
    img = Image.new("RGB", (w, h), paper)
    d = ImageDraw.Draw(img)
    g = max(6.0, rng.uniform(0.025, 0.04) * w)  # glyph cell
    ink = (30, 30, 40)
    m = 0.07 * w
    d.rectangle([m, m, w - m, m + 1.8 * g], fill=tuple(int(c) for c in rng.integers(60, 200, 3)))  # title bar
    y = m + 3 * g
    lw = max(1, round(g / 8))
    while y < h - m - g:
        x, end = m, w - m - rng.uniform(0, 0.3) * w
        while x < end:
            n = int(rng.integers(2, 5))
            pts = rng.uniform(0.1, 0.9, (n, 2, 2)) * g  # pseudo-glyph: a few strokes in a cell
            for p in pts:
                d.line([(x + p[0, 0], y + p[0, 1]), (x + p[1, 0], y + p[1, 1])], fill=ink, width=lw)
            x += g * (1.15 if rng.random() > 0.15 else 2.0)
        y += 1.6 * g
    return img


def _draw_doll_pattern(w: int, h: int, rng: np.random.Generator, spec: _Spec) -> Image.Image:
    img = Image.new("RGB", (w, h), _pastel(rng))
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.04, 0.08) * min(w, h)
    hair, eye = _HAIR[str(rng.choice(list(_HAIR)))], _EYES[str(rng.choice(list(_EYES)))]
    faces = []
    for row, y in enumerate(np.arange(r, h + r, 2.6 * r)):
        for x in np.arange(r + (1.3 * r if row % 2 else 0), w + r, 2.6 * r):
            faces.append((x, y, r))
    if rng.random() < 0.5:  # a girl holding one big doll face in the middle
        faces.append((w / 2, h / 2, 3.5 * r))
    for x, y, rr in faces:
        ol = max(1, round(rr / 12))
        d.ellipse([x - rr, y - rr, x + rr, y + rr], fill=(255, 228, 214), outline=_OUTLINE, width=ol)
        d.pieslice([x - 1.1 * rr, y - 1.1 * rr, x + 1.1 * rr, y + 1.1 * rr], 190, 350, fill=hair)
        for sx in (-0.4, 0.4):
            d.ellipse([x + sx * rr - 0.18 * rr, y - 0.05 * rr, x + sx * rr + 0.18 * rr, y + 0.35 * rr], fill=eye,
                      outline=_OUTLINE)
    return img


# --------------------------------------------------------------------------- encoding / files


def _encode(img: Image.Image, ext: str, rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    if ext == "jpg":
        img = img.convert("RGB") if img.mode not in ("RGB", "L") else img
        img.save(buf, "JPEG", quality=int(rng.integers(85, 96)))
    elif ext == "png":
        img.save(buf, "PNG", compress_level=3)  # fast; the size is not what the demo is about
    elif ext == "webp":
        img.convert("RGB").save(buf, "WEBP", quality=int(rng.integers(80, 95)), method=2)
    elif ext == "gif":
        img.convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(buf, "GIF")
    elif ext == "psd":  # junk with a Photoshop magic number: no decoder here can read it
        return b"8BPS\x00\x01" + rng.bytes(int(rng.integers(1500, 4000)))
    else:
        raise ValueError(f"no encoder for .{ext}")
    return buf.getvalue()


def _render_one(root: str, seed: int, image_id: int, kind: str, w: int, h: int, ext: str,
                problem: str | None, variant: str | None = None, variant_of: int | None = None,
                source_size: tuple[int, int] | None = None) -> tuple[int, str, int]:
    """Draw, encode and write one image file; return (id, md5, size) of the *intended* file.

    Danbooru's metadata describes the file as uploaded, so a truncated or emptied local copy
    keeps the original md5 and size there: a md5 check can catch the corruption.
    """
    if variant is not None:
        data = _render_variant(seed, image_id, kind, (w, h), ext, variant, variant_of, source_size)
    else:
        data = _encode(_render(_sample_spec(seed, image_id, kind, w, h, problem), seed), ext, _rng(seed, image_id, 4))
    written = data[: int(len(data) * 0.6)] if problem == "truncated" else b"" if problem == "zero_bytes" else data
    atomic_write_bytes(Path(root) / image_relpath(image_id, ext), written)
    return image_id, hashlib.md5(data).hexdigest(), len(data)


def _render_variant(seed: int, image_id: int, kind: str, size: tuple[int, int], ext: str, variant: str,
                    source_id: int, source_size: tuple[int, int]) -> bytes:
    """The encoded file of a duplicate variant of ``source_id`` (see DUPLICATE_VARIANTS)."""
    img = _render(_sample_spec(seed, source_id, kind, *source_size), seed)
    if variant == "exact_copy":  # the source's own encoder stream: byte-identical
        return _encode(img, ext, _rng(seed, source_id, 4))
    img = img.convert("RGB")
    if variant == "resized":
        img = img.resize(size, Image.Resampling.LANCZOS)
    elif variant == "colour":
        hsv = np.asarray(img.convert("HSV")).copy()
        hsv[..., 0] += 64  # a quarter turn of hue (uint8 wraps)
        img = Image.fromarray(hsv, "HSV").convert("RGB")
    elif variant == "text":
        d = ImageDraw.Draw(img)
        w, h = img.size
        d.rectangle((w // 10, h * 4 // 5, w * 9 // 10, h * 19 // 20), fill=(255, 255, 255), outline=(0, 0, 0), width=2)
        d.text((w // 10 + 6, h * 4 // 5 + 6), "sample text, sample text", fill=(0, 0, 0))
    elif variant == "parent_child":
        d = ImageDraw.Draw(img)
        w, h = img.size
        r = max(6, min(w, h) // 12)
        d.ellipse((w - 3 * r, r, w - r, 3 * r), fill=(230, 40, 90), outline=(0, 0, 0), width=2)
    return _encode(img, ext, _rng(seed, image_id, 4))


def _variant_spec(seed: int, it: _Item) -> _Spec:
    """What a variant's file shows: its source's drawing, scaled to the variant's size."""
    src = _sample_spec(seed, it.variant_of, it.kind, *it.source_size)
    f = it.width / it.source_size[0]
    figures = tuple(dataclasses.replace(fig, kp=fig.kp * f, head=fig.head * f, scale=fig.scale * f) for fig in src.figures)
    return dataclasses.replace(src, image_id=it.image_id, width=it.width, height=it.height, figures=figures)


def _render_chunk(root: str, seed: int, tasks: list[tuple]) -> list[tuple[int, str, int]]:
    return [_render_one(root, seed, *t) for t in tasks]


def _render_files(root: Path, plan: list[_Item], params: dict[str, Any], workers: int | None
                  ) -> dict[int, tuple[str, int]]:
    tasks = [(it.image_id, it.kind, it.width, it.height, it.ext, it.problem, it.variant, it.variant_of, it.source_size)
             for it in plan if it.has_file]
    if workers is None:
        workers = 1 if len(tasks) < _PARALLEL_MIN_FILES else min(8, os.cpu_count() or 1)
    seed = params["seed"]
    if workers <= 1:
        out = _render_chunk(str(root), seed, tasks)
    else:
        chunks = [tasks[i: i + _CHUNK] for i in range(0, len(tasks), _CHUNK)]
        # spawn: safe inside threaded hosts (Dagster), and output never depends on the workers.
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            futures = [pool.submit(_render_chunk, str(root), seed, c) for c in chunks]
            out = [r for f in futures for r in f.result()]
    return {i: (md5, size) for i, md5, size in out}


def _clear_previous(root: Path, overwrite: bool) -> None:
    """Remove a previous (or half-written) sample dataset; never a folder we did not write."""
    ours = (root / MARKER_NAME).exists() or (root / PARTIAL_NAME).exists()
    present = [p for p in _GENERATED_PATHS if (root / p).exists()]
    if present and not ours and not overwrite:
        raise FileExistsError(
            f"{root} already holds {', '.join(present)} but no {MARKER_NAME}: not a sample dataset this generator "
            "wrote; pass overwrite=True (--overwrite) to replace those paths"
        )
    for p in present:
        path = root / p
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # unreadable marker: regenerate


# --------------------------------------------------------------------------- metadata


_CHARACTERS = {"hakurei_reimu": "touhou", "kirisame_marisa": "touhou", "remilia_scarlet": "touhou",
               "hatsune_miku": "vocaloid", "saber_(fate)": "fate/stay_night", "akiyama_mio": "k-on!",
               "megumin": "kono_subarashii_sekai_ni_shukufuku_wo!", "kaname_madoka": "mahou_shoujo_madoka_magica"}
_SYLLABLES = ("ka", "mi", "ro", "su", "to", "na", "ha", "ri", "ko", "yu", "shi", "ta", "ne", "mo", "ze", "ki")
_KIND_TAGS = {
    "manga_page": ["comic", "monochrome", "greyscale", "speech_bubble"],
    "landscape": ["scenery", "no_humans", "outdoors", "sky", "cloud", "tree", "grass", "mountain"],
    "black_border": ["letterboxed", "black_border"],
    "text_page": ["text_focus", "text-only_page", "no_humans", "english_text"],
    "doll_pattern": ["doll", "pattern", "too_many", "repeating_pattern"],
}
_TAG_CATEGORY = {"general": 0, "artist": 1, "copyright": 3, "character": 4, "meta": 5}
# Danbooru ids grow with time: map the 6-7 digit id range onto 2005-05..2025-06.
_T0, _T1 = dt.datetime(2005, 5, 24, tzinfo=dt.timezone.utc).timestamp(), dt.datetime(2025, 6, 30, tzinfo=dt.timezone.utc).timestamp()
_EST = dt.timezone(dt.timedelta(hours=-5))


def _tag_id(name: str) -> int:
    return zlib.crc32(name.encode()) % 1_900_000 + 1


def _tags(spec: _Spec, item: _Item, rng: np.random.Generator, artists: list[str]) -> dict[str, list[str]]:
    """Plausible tags, correlated with what was drawn."""
    general: list[str] = []
    fig = spec.main_figure
    if spec.kind in FIGURE_KINDS and fig is not None:
        n = len(spec.figures)
        if n == 1:
            general += ["1girl" if spec.girls else "1boy", "solo"]
        else:
            if spec.girls:
                general.append(f"{spec.girls}girl{'s' if spec.girls > 1 else ''}")
            if spec.boys:
                general.append(f"{spec.boys}boy{'s' if spec.boys > 1 else ''}")
            general += (["multiple_girls"] if spec.girls > 1 else []) + (["multiple_boys"] if spec.boys > 1 else [])
        general += _POSE_TAGS[fig.pose.name]
        general.append({"single_figure": "full_body", "upper_body": "upper_body", "back_view": "from_behind",
                        "multiple_figures": "group"}[spec.kind])
        if spec.kind == "back_view":
            general.append("facing_away")
        elif rng.random() < 0.6:
            general.append("looking_at_viewer")
        general += [f"{fig.look.hair}_hair", "long_hair" if fig.look.long_hair else "short_hair"]
        if not fig.back:
            general.append(f"{fig.look.eyes}_eyes")
            general += ["smile"] if rng.random() < 0.5 else []
        general += ["dress"] if fig.look.dress else ["shirt", "pants"]
        general += ["thighhighs"] if fig.look.stockings else []
        general += {"white": ["white_background", "simple_background"], "simple": ["simple_background"],
                    "gradient": ["gradient_background"], "outdoors": ["outdoors", "sky", "grass"],
                    "cluttered": ["indoors"], "transparent": ["transparent_background"]}[spec.background]
        if spec.mono:
            general += ["monochrome", "greyscale", "sketch"]
    else:
        base = _KIND_TAGS[spec.kind]
        general += base[:2] + [t for t in base[2:] if rng.random() < 0.7]
        if spec.kind == "manga_page":
            general += ["multiple_girls"] if spec.girls > 1 else ["1girl"]
        if spec.kind == "black_border" and spec.inner is not None:
            general += ["1girl", "solo"] if spec.inner.kind == "single_figure" else ["scenery", "no_humans"]
    meta = []
    if item.width >= 1600 or item.height >= 1200:
        meta.append("highres")
    if item.width <= 500 and item.height <= 500:
        meta.append("lowres")
    if rng.random() < 0.4:
        meta.append("commentary_request")
    if spec.kind in ("manga_page", "text_page") and rng.random() < 0.5:
        meta.append("translated")
    artist = [] if rng.random() < 0.05 else [artists[min(int(rng.zipf(1.6)) - 1, len(artists) - 1)]]
    if not artist:
        meta.append("artist_request")
    character, copyright_ = [], ["original"]
    if spec.kind in FIGURE_KINDS and rng.random() < 0.6:
        name = str(rng.choice(list(_CHARACTERS)))
        character, copyright_ = [name], [_CHARACTERS[name]]
    return {"general": sorted(set(general)), "artist": artist, "copyright": copyright_, "character": character,
            "meta": sorted(meta)}


def _created(image_id: int, rng: np.random.Generator) -> dt.datetime:
    frac = (image_id - 100_000) / (9_999_999 - 100_000)
    ts = _T0 + frac * (_T1 - _T0) + rng.uniform(0, 3600)
    return dt.datetime.fromtimestamp(round(ts, 3), tz=dt.timezone.utc)


def _api_record(item: _Item, tags: dict[str, list[str]], md5: str, size: int, rating: str, score: int,
                created: dt.datetime, rng: np.random.Generator) -> dict[str, Any]:
    """A post as the Danbooru JSON API returns it (Danbooru2021 ``posts*.json``)."""
    ts = lambda t: t.astimezone(_EST).isoformat(timespec="milliseconds")  # noqa: E731
    all_tags = sorted(t for cat in tags.values() for t in cat)
    pixiv = int(rng.integers(10_000_000, 99_999_999)) if rng.random() < 0.6 else None
    up = score + int(rng.integers(0, 3))
    return {
        "id": item.image_id, "created_at": ts(created), "uploader_id": int(rng.integers(1, 900_000)),
        "score": score, "source": f"https://www.pixiv.net/artworks/{pixiv}" if pixiv else "", "md5": md5,
        "last_comment_bumped_at": None, "rating": rating, "image_width": item.width, "image_height": item.height,
        "tag_string": " ".join(all_tags), "is_note_locked": False, "fav_count": max(0, score + int(rng.integers(-2, 8))),
        "file_ext": item.ext, "last_noted_at": None, "is_rating_locked": False, "parent_id": item.parent_id,
        "has_children": item.has_children, "approver_id": None,
        "tag_count_general": len(tags["general"]), "tag_count_artist": len(tags["artist"]),
        "tag_count_character": len(tags["character"]), "tag_count_copyright": len(tags["copyright"]),
        "file_size": size, "up_score": up, "down_score": score - up, "is_pending": False, "is_flagged": False,
        "is_deleted": bool(rng.random() < 0.02), "tag_count": len(all_tags),
        "updated_at": ts(created + dt.timedelta(days=float(rng.uniform(0, 400)))), "is_banned": False,
        "pixiv_id": pixiv, "last_commented_at": None, "has_active_children": False, "bit_flags": 0,
        "tag_count_meta": len(tags["meta"]), "has_large": item.width > 850, "has_visible_children": False,
        "tag_string_general": " ".join(tags["general"]), "tag_string_character": " ".join(tags["character"]),
        "tag_string_copyright": " ".join(tags["copyright"]), "tag_string_artist": " ".join(tags["artist"]),
        "tag_string_meta": " ".join(tags["meta"]),
        "file_url": f"https://cdn.donmai.us/original/{md5[:2]}/{md5[2:4]}/{md5}.{item.ext}",
        "large_file_url": f"https://cdn.donmai.us/sample/{md5[:2]}/{md5[2:4]}/sample-{md5}.jpg",
        "preview_file_url": f"https://cdn.donmai.us/preview/{md5[:2]}/{md5[2:4]}/{md5}.jpg",
    }


def _dump_record(item: _Item, tags: dict[str, list[str]], md5: str, size: int, rating: str, score: int,
                 created: dt.datetime, rng: np.random.Generator) -> dict[str, Any]:
    """A post in the older BigQuery dump form (Danbooru2017-2020): numbers as strings, a tag list."""
    ts = lambda t: t.strftime("%Y-%m-%d %H:%M:%S.%f")[:-1] + " UTC"  # noqa: E731
    up = score + int(rng.integers(0, 3))
    tag_list = [{"id": str(_tag_id(name)), "name": name, "category": str(_TAG_CATEGORY[cat])}
                for cat in ("general", "artist", "copyright", "character", "meta") for name in tags[cat]]
    tag_list.sort(key=lambda t: t["name"])
    return {
        "id": str(item.image_id), "created_at": ts(created), "uploader_id": str(int(rng.integers(1, 900_000))),
        "score": str(score), "source": "", "md5": md5, "last_commented_at": "1970-01-01 00:00:00 UTC",
        "rating": "s" if rating == "g" else rating,  # the old dumps had no "general" rating
        "image_width": str(item.width), "image_height": str(item.height), "is_note_locked": False,
        "file_ext": item.ext, "last_noted_at": "1970-01-01 00:00:00 UTC", "is_rating_locked": False,
        "parent_id": str(item.parent_id or 0), "has_children": item.has_children, "approver_id": "0",
        "file_size": str(size),
        "is_status_locked": False, "up_score": str(up), "down_score": str(score - up), "is_pending": False,
        "is_flagged": False, "is_deleted": bool(rng.random() < 0.02),
        "updated_at": ts(created + dt.timedelta(days=float(rng.uniform(0, 400)))), "is_banned": False,
        "pixiv_id": "0", "tags": tag_list, "pools": [],
        "favs": [str(int(x)) for x in np.sort(rng.integers(1, 900_000, max(0, score)))],
    }


# --------------------------------------------------------------------------- tables


def _published_keypoints(fig_kp: np.ndarray, rng: np.random.Generator) -> dict[str, list[float]]:
    """What the seed's estimator would publish: jittered, on a 0.4 px grid, ``[y, x]``."""
    noisy = fig_kp + np.clip(rng.normal(0.0, 1.5, fig_kp.shape), -4.0, 4.0)
    q = np.round(noisy / 0.4)
    return {name: [float(q[i, 1]) * 0.4, float(q[i, 0]) * 0.4] for i, name in enumerate(coco.KEYPOINT_NAMES)}


def _write_tables(root: Path, plan: list[_Item], results: dict[int, tuple[str, int]],
                  params: dict[str, Any]) -> SampleDatasetSummary:
    import pandas as pd

    seed = params["seed"]
    rng = _rng(seed, 0x7A65)
    artists = sorted({"".join(rng.choice(_SYLLABLES, int(rng.integers(2, 4)))) for _ in range(40)})
    metadata_ids = [it.image_id for it in plan if it.has_metadata]
    in_posts = rng.random(len(metadata_ids)) < 0.5
    in_posts[0], in_posts[-1] = True, False  # both files always non-empty
    posts_ids = {i for i, p in zip(metadata_ids, in_posts) if p}
    no_meta = [it for it in plan if not it.has_metadata]
    bad_line_id = no_meta[int(rng.integers(len(no_meta)))].image_id  # its one line got cut off

    metadata_only = [it for it in plan if not it.has_file]
    orphan_kp_id = metadata_only[0].image_id  # published keypoints for an image we do not have
    keypoint_candidates = [it for it in plan if it.has_file and it.kind in FIGURE_KINDS
                           and it.problem not in UNREADABLE_PROBLEMS]
    malformed = {}
    if len(keypoint_candidates) >= 4:
        picks = rng.choice(len(keypoint_candidates), 2, replace=False)
        malformed = {keypoint_candidates[int(picks[0])].image_id: "not_json",
                     keypoint_candidates[int(picks[1])].image_id: "missing_keys"}

    planted = _prefilter_cases(plan, seed)
    posts_lines: list[str] = []
    dump_lines: list[str] = []
    bad_line_no = 0
    rows: list[dict[str, Any]] = []
    members: list[tuple[str, bytes]] = []
    for it in plan:
        spec = (_variant_spec(seed, it) if it.variant else
                _sample_spec(seed, it.image_id, it.kind, it.width, it.height, it.problem))
        r = _rng(seed, it.image_id, 5)
        if it.has_file:
            md5, size = results[it.image_id]
        else:
            md5, size = r.bytes(16).hex(), int(r.integers(40_000, 3_000_000))
        quality = _quality(spec, it.problem, float(r.normal(0.0, 0.08))) if it.has_file else None
        tags = _tags(spec, it, r, artists)
        rating = str(r.choice(["g", "s", "q", "e"], p=[0.55, 0.35, 0.08, 0.02]))
        score = int(r.geometric(0.08 if quality == "good" else 0.15)) - 1
        created = _created(it.image_id, r)
        case = planted.get(it.image_id)
        tags, score = _planted_tags_and_score(case, tags, score)
        record = None
        if it.has_metadata or it.image_id == bad_line_id:
            if it.image_id in posts_ids or it.image_id == bad_line_id:
                record = _planted_flags(case, _api_record(it, tags, md5, size, rating, score, created, r))
                line = json.dumps(record, separators=(",", ":"))
                if it.image_id == bad_line_id:
                    line, bad_line_no = line[: len(line) * 3 // 5], len(posts_lines) + 1
                posts_lines.append(line)
            else:
                record = _planted_flags(case, _dump_record(it, tags, md5, size, rating, score, created, r))
                dump_lines.append(json.dumps(record, separators=(",", ":")))

        row: dict[str, Any] = {
            "image_id": it.image_id, "kind": it.kind, "file_ext": it.ext, "has_file": it.has_file,
            "has_metadata": it.has_metadata, "problem": it.problem, "width": it.width, "height": it.height,
            "quality": quality, "pose": None, "n_figures": len(spec.figures),
            "has_published_keypoints": False, "published_keypoints_problem": None,
            "duplicate_of": it.variant_of, "duplicate_kind": it.variant,
            **_metadata_truth(record if it.has_metadata else None, tags, score, case),
        }
        fig = spec.main_figure
        drawn = it.has_file and fig is not None
        if drawn:
            row["pose"] = fig.pose.name
            inside = ((fig.kp[:, 0] >= 0) & (fig.kp[:, 0] < it.width) & (fig.kp[:, 1] >= 0) & (fig.kp[:, 1] < it.height))
            conf = (fig.visible & inside).astype(float)
        for k, name in enumerate(coco.KEYPOINT_NAMES):
            cx, cy, cc = coco.keypoint_columns(name)
            row[cx] = float(fig.kp[k, 0]) if drawn else math.nan
            row[cy] = float(fig.kp[k, 1]) if drawn else math.nan
            row[cc] = float(conf[k]) if drawn else math.nan
        kr = _rng(seed, it.image_id, 6)
        member = f"{it.image_id}.json"
        if drawn and it.problem not in UNREADABLE_PROBLEMS:
            payload = _published_keypoints(fig.kp, kr)
            problem = malformed.get(it.image_id)
            if problem == "not_json":
                members.append((member, json.dumps(payload).encode()[:57]))
            elif problem == "missing_keys":
                members.append((member, json.dumps({k: v for k, v in payload.items() if "ankle" not in k}).encode()))
            else:
                members.append((member, json.dumps(payload).encode()))
            row["has_published_keypoints"] = problem is None
            row["published_keypoints_problem"] = problem
        elif it.image_id == orphan_kp_id:
            pose = _sample_pose(kr, "standing")
            orphan = _fit_figure(kr, it.width, it.height, pose, _sample_look(kr, False), False, (0.6, 0.9))
            members.append((member, json.dumps(_published_keypoints(orphan.kp, kr)).encode()))
            row["has_published_keypoints"] = True
        rows.append(row)

    meta_dir = root / METADATA_DIR
    atomic_write_text(meta_dir / POSTS_FILE, "".join(line + "\n" for line in posts_lines))
    atomic_write_text(meta_dir / DUMP_FILE, "".join(line + "\n" for line in dump_lines))
    _write_tarball(root / KEYPOINTS_TARBALL, members)
    gt = pd.DataFrame(rows, columns=list(GROUND_TRUTH_COLUMNS))
    gt = gt.astype({"image_id": "int64", "width": "int64", "height": "int64", "n_figures": "int64",
                    "has_file": bool, "has_metadata": bool, "has_published_keypoints": bool,
                    "score": "Int64", "is_deleted": "boolean", "is_banned": "boolean",
                    "duplicate_of": "Int64", "duplicate_kind": "string"})
    write_parquet(root / GROUND_TRUTH_FILE, gt)

    files = [it for it in plan if it.has_file]
    kind_counts = {k: sum(it.kind == k for it in files) for k in KINDS}
    return SampleDatasetSummary(
        root=root,
        n_images_written=len(files),
        shards=sorted({shard_key(it.image_id) for it in files}),
        kind_counts=kind_counts,
        ids_without_metadata=[it.image_id for it in no_meta],
        ids_metadata_only=[it.image_id for it in metadata_only],
        broken_ids={p: [it.image_id for it in files if it.problem == p] for p in PROBLEMS},
        n_metadata_lines={f"{METADATA_DIR}/{POSTS_FILE}": len(posts_lines) - 1, f"{METADATA_DIR}/{DUMP_FILE}": len(dump_lines)},
        bad_metadata_line={"file": f"{METADATA_DIR}/{POSTS_FILE}", "line": bad_line_no, "image_id": bad_line_id},
        n_published_keypoints=int(sum(r["has_published_keypoints"] for r in rows)),
        malformed_keypoint_ids={p: sorted(i for i, q in malformed.items() if q == p) for p in ("not_json", "missing_keys")},
        keypoint_ids_without_image=[orphan_kp_id],
        params=params,
    )


def _prefilter_cases(plan: list[_Item], seed: int) -> dict[int, str]:
    """``{image_id: case}``: a few clean single-figure images with metadata get a case of
    :data:`PREFILTER_CASES` (a negative score, a deleted or banned post, a ``chibi`` tag),
    about 1% of the images each, so every non-tag rule of the prefilter has work."""
    eligible = [it.image_id for it in plan if it.has_file and it.has_metadata and it.problem is None
                and it.kind in ("single_figure", "upper_body")]
    per_case = max(1, round(0.01 * sum(it.has_file for it in plan)))
    picks = _rng(seed, 0x9F17).permutation(eligible).tolist()
    return {int(i): PREFILTER_CASES[k // per_case] for k, i in enumerate(picks[: per_case * len(PREFILTER_CASES)])}


def _planted_tags_and_score(case: str | None, tags: dict[str, list[str]], score: int) -> tuple[dict, int]:
    if case == "chibi":
        tags = {**tags, "general": sorted({*tags["general"], "chibi"})}
    if case == "low_score":
        score = -3 - score % 5  # Danbooru: a post voted down
    return tags, score


def _planted_flags(case: str | None, record: dict[str, Any]) -> dict[str, Any]:
    if case == "deleted":
        record["is_deleted"] = True
    if case == "banned":
        record["is_banned"] = True
    return record


def _metadata_truth(record: dict[str, Any] | None, tags: dict[str, list[str]], score: int,
                    case: str | None) -> dict[str, Any]:
    """The ground truth's :data:`METADATA_TRUTH_COLUMNS` for one image."""
    if record is None:
        return {"tags": None, "rating": None, "score": None, "is_deleted": None, "is_banned": None,
                "prefilter_case": None}
    return {"tags": " ".join(sorted(t for cat in tags.values() for t in cat)), "rating": record["rating"],
            "score": score, "is_deleted": bool(record["is_deleted"]), "is_banned": bool(record["is_banned"]),
            "prefilter_case": case}


def _write_tarball(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A gzip'd tar with fixed timestamps and owners, so it is byte-identical run to run."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))


if __name__ == "__main__":
    sys.exit(main())
