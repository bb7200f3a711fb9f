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
import pyarrow.parquet as pq
from PIL import Image

from danbooru_assets.dataset import DanbooruDatasetResource
from danbooru_assets.metadata import convert_metadata_to_shards
from danbooru_assets.partitions import SHARD_KEYS, shard_key
from danbooru_assets.shard_index import build_shard_index


def build_tree(root: Path, n_files: int, metadata_fraction: float = 0.95, seed: int = 0) -> None:
    marker = root / "BENCH_TREE.json"
    params = {"n_files": n_files, "metadata_fraction": metadata_fraction, "seed": seed}
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
        for image_id in range(100_000, 100_000 + n_files):
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


def our_index(root: Path, scratch: Path) -> int:
    dataset = DanbooruDatasetResource(root=str(root))
    convert_metadata_to_shards(dataset.metadata_files(), scratch)
    n = 0
    for shard in SHARD_KEYS:
        path = scratch / f"{shard}.parquet"
        meta = pq.read_table(path) if path.exists() else None
        index, _ = build_shard_index(dataset, shard, meta)
        n += len(index)
    return n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m danbooru_assets.bench shard_index", description=__doc__)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--workdir", type=Path, default=Path("bench_out/shard_index"))
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    root = args.workdir / "tree"
    t0 = time.perf_counter()
    build_tree(root, args.files)
    print(f"tree: {args.files} files over 1,000 shards at {root} (ready in {time.perf_counter() - t0:.1f}s)")
    # Warm the page cache the same way for both contenders.
    naive_index(root)
    t0 = time.perf_counter()
    n_naive = naive_index(root)
    naive_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    n_ours = our_index(root, args.workdir / "metadata_shards")
    ours_s = time.perf_counter() - t0
    figures = {
        "files": args.files,
        "cpu_count": os.cpu_count(),
        "naive_files_per_s": round(n_naive / naive_s),
        "shard_index_files_per_s": round(n_ours / ours_s),
        "speedup": round(naive_s / ours_s, 2),
        "naive_s": round(naive_s, 2),
        "shard_index_s": round(ours_s, 2),
    }
    print(f"naive glob + PIL open : {figures['naive_files_per_s']:>9,} files/s ({naive_s:.1f}s, {n_naive} files)")
    print(f"shard_index (all 1000): {figures['shard_index_files_per_s']:>9,} files/s ({ours_s:.1f}s, {n_ours} rows, "
          "metadata conversion included)")
    print(f"speedup: {figures['speedup']}x")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0
