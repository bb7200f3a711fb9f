"""Benchmark: ``shard_index`` over a synthetic tree against a naive glob-and-open loop.

    python -m danbooru_assets.bench shard_index --files 100000 --workdir /tmp/bench-index

Builds (or reuses) a Danbooru-shaped tree of small JPEGs over all 1,000 shards with
API-form metadata for most ids, then times, on the same warm tree:
- naive: ``glob`` every file and open each with PIL to read its size;
- ours: the metadata conversion (once) plus ``build_shard_index`` for every shard.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from danbooru_assets.orchestration.resources import DanbooruDatasetResource
from danbooru_assets.core.tables import read_arrow
from danbooru_assets.dataset.metadata import convert_metadata_to_shards
from danbooru_assets.core.shards import shard_key
from danbooru_assets.dataset.shard_index import build_shard_index


def build_tree(root: Path, n_files: int, n_shards: int = 1000, metadata_fraction: float = 0.95, seed: int = 0) -> None:
    marker = root / "BENCH_TREE.json"
    params = {"n_files": n_files, "n_shards": n_shards, "metadata_fraction": metadata_fraction, "seed": seed}
    if marker.exists() and json.loads(marker.read_text()) == params:
        return
    rng = np.random.default_rng(seed)
    variants = []
    for w, h in [(64, 48), (48, 64), (80, 80)]:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
        variants.append(((w, h), buf.getvalue()))
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    with open(root / "metadata" / "posts000000000000.json", "w") as meta:
        for i in range(n_files):
            image_id = 100_000 + (i // n_shards) * 1000 + i % n_shards
            (w, h), data = variants[image_id % len(variants)]
            folder = root / "original" / shard_key(image_id)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{image_id}.jpg").write_bytes(data)
            if rng.random() < metadata_fraction:
                meta.write(json.dumps({"id": image_id, "md5": f"{image_id:032x}", "rating": "g", "score": 1,
                                       "image_width": w, "image_height": h, "file_ext": "jpg",
                                       "tag_string_general": "1girl solo"}) + "\n")
    marker.write_text(json.dumps(params))


def naive_index(root: Path) -> int:
    n = 0
    for path in glob.glob(str(root / "original" / "*" / "*")):
        with Image.open(path) as img:
            img.size
        n += 1
    return n


def _index_shard(args: tuple[str, str, str]) -> int:
    root, scratch, shard = args
    path = Path(scratch) / f"{shard}.parquet"
    meta = read_arrow(path) if path.exists() else None
    index, _ = build_shard_index(DanbooruDatasetResource(root=root).layout(), shard, meta)
    return len(index)


def convert_metadata(root: Path, scratch: Path) -> None:
    dataset = DanbooruDatasetResource(root=str(root))
    convert_metadata_to_shards(dataset.layout().metadata_files(), scratch)


def our_index(root: Path, scratch: Path, workers: int = 1) -> int:
    """``build_shard_index`` for every shard; with ``workers`` > 1, shards run in parallel
    processes, as a backfill's concurrent runs do."""
    shards = DanbooruDatasetResource(root=str(root)).shards_with_images()
    jobs = [(str(root), str(scratch), shard) for shard in shards]
    if workers <= 1:
        return sum(map(_index_shard, jobs))
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return sum(pool.map(_index_shard, jobs, chunksize=max(1, len(jobs) // (4 * workers))))


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m danbooru_assets.bench shard_index", description=__doc__)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument(
        "--shards", type=int, default=1000,
        help="shard folders the files spread over (1000: 100 files each; 20: Danbooru2021's ~5,000 per shard)",
    )
    parser.add_argument(
        "--cold", action="store_true",
        help="drop the OS page cache before each contender (root only): the disk-bound case the seed describes",
    )
    parser.add_argument("--workdir", type=Path, default=Path("bench_out/shard_index"))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes indexing shards in parallel, like a backfill's concurrent runs")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    root = args.workdir / f"tree-{args.files}-{args.shards}"
    t0 = time.perf_counter()
    build_tree(root, args.files, args.shards)
    print(f"tree: {args.files} files over {args.shards} shards at {root} (ready in {time.perf_counter() - t0:.1f}s)")
    # Both contenders start from the same cache state: warm (read once) or dropped.
    prepare_cache = drop_caches if args.cold else (lambda: naive_index(root))
    prepare_cache()
    t0 = time.perf_counter()
    n_naive = naive_index(root)
    naive_s = time.perf_counter() - t0
    scratch = args.workdir / "metadata_shards"
    prepare_cache()
    t0 = time.perf_counter()
    convert_metadata(root, scratch)
    convert_s = time.perf_counter() - t0
    timings = {}
    for workers in sorted({1, args.workers}):
        prepare_cache()
        t0 = time.perf_counter()
        n_ours = our_index(root, scratch, workers)
        timings[workers] = time.perf_counter() - t0
    figures = {
        "files": args.files,
        "shards": args.shards,
        "cache": "cold" if args.cold else "warm",
        "cpu_count": os.cpu_count(),
        "naive_files_per_s": round(n_naive / naive_s),
        "metadata_conversion_s": round(convert_s, 2),
        **{f"shard_index_files_per_s_{w}_process": round(n_ours / t) for w, t in timings.items()},
        **{f"speedup_{w}_process": round(naive_s / t, 2) for w, t in timings.items()},
    }
    print(f"naive glob + PIL open, 1 process     : {figures['naive_files_per_s']:>9,} files/s ({naive_s:.2f}s, {n_naive} files)")
    for w, t in timings.items():
        print(f"shard_index, {w} process{'es' if w > 1 else '  '} over shards : {round(n_ours / t):>9,} files/s "
              f"({t:.2f}s, {n_ours} rows) -> {naive_s / t:.2f}x")
    print(f"danbooru_metadata (once, separate asset): {convert_s:.2f}s for the metadata of {args.files} files")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0
