"""Benchmark the pose filter and the keypoint-JSON importer.

``python -m danbooru_assets.bench pose [--rows 1000000] [--files 100000]``

1. Filter: ``pose_features`` + ``apply_pose_rules`` over ``--rows`` synthetic keypoint
   rows (read back through Parquet, as the IO manager hands them over), plus
   ``robust_statistics`` (the global ``pose_statistics`` step) timed on its own. Baseline:
   the same rules written as a per-row Python loop, timed on a subsample.
2. Importer: ``read_keypoint_files`` on a ``.tar.gz`` of ``--files`` small JSON files
   generated into a temp dir. Baseline: extract the archive, then ``json.load`` each
   file into a list of dicts and build a DataFrame, timed on a subset.

Target: the whole filter (features + rules) under 3 s for 1,000,000 rows on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tarfile
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from danbooru_assets.pose.coco import KEYPOINT_COLUMNS, KEYPOINT_NAMES
from danbooru_assets.settings import PoseRules
from danbooru_assets.pose.synthetic import synthetic_poses
from danbooru_assets.pose.rules import apply_pose_rules
from danbooru_assets.pose.features import LIMBS, pose_features, robust_statistics
from danbooru_assets.pose.keypoint_files import read_keypoint_files, write_keypoint_files


def _timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def _naive_filter(df: pd.DataFrame, rules: PoseRules, stats: dict) -> list[str]:
    """The rules as one might first write them: a Python loop over rows (no density rule)."""
    fs = stats["features"]
    out = []
    for rec in df.to_dict("records"):
        w, h = rec["width"], rec["height"]
        pts = {n: (rec[f"kp_{n}_x"], rec[f"kp_{n}_y"], rec[f"kp_{n}_conf"]) for n in KEYPOINT_NAMES}
        reasons = []
        for name in rules.required_inside:
            x, y, c = pts[name]
            if math.isnan(x) or math.isnan(y):
                reasons.append("missing_keypoint")
            elif c < rules.min_confidence:
                reasons.append("low_confidence")
            elif not (-rules.margin <= x / w <= 1 + rules.margin and -rules.margin <= y / h <= 1 + rules.margin):
                reasons.append("outside_image")
        sx = (pts["shoulder_left"][0] + pts["shoulder_right"][0]) / 2
        sy = (pts["shoulder_left"][1] + pts["shoulder_right"][1]) / 2
        hx = (pts["hip_left"][0] + pts["hip_right"][0]) / 2
        hy = (pts["hip_left"][1] + pts["hip_right"][1]) / 2
        torso = math.hypot(sx - hx, sy - hy)
        if torso > 0:
            for name, a, b in LIMBS:
                ratio = math.hypot(pts[a][0] - pts[b][0], pts[a][1] - pts[b][1]) / torso
                s = fs[name]
                if not math.isnan(ratio) and abs(ratio - s["median"]) > rules.ratio_mad_k * s["mad"]:
                    reasons.append("limb_ratio_outlier")
                    break
        out.append("|".join(dict.fromkeys(reasons)))
    return out


def bench_filter(rows: int, seed: int = 0) -> dict:
    df = synthetic_poses(rows, seed=seed, outlier_fraction=0.05)
    # through Parquet: one column per array, as the IO manager returns it
    df = pq.read_table(pa.BufferReader(_parquet_bytes(df))).to_pandas()
    rules = PoseRules()
    feats, t_feat = _timed(pose_features, df, df["width"], df["height"])
    stats, t_stats = _timed(robust_statistics, feats)
    decisions, t_rules = _timed(apply_pose_rules, feats, rules, stats)
    n_naive = min(rows, 20_000)
    _, t_naive = _timed(_naive_filter, df.iloc[:n_naive], rules, stats)
    t_filter = t_feat + t_rules
    return {
        "rows": rows,
        "features_s": t_feat,
        "rules_s": t_rules,
        "filter_s": t_filter,
        "filter_rows_per_s": rows / t_filter,
        "statistics_s": t_stats,
        "kept_fraction": float(decisions["keep"].mean()),
        "naive_rows": n_naive,
        "naive_rows_per_s": n_naive / t_naive,
    }


def _parquet_bytes(df: pd.DataFrame) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), sink)
    return sink.getvalue()


def _naive_import(tar_path: Path, workdir: Path) -> pd.DataFrame:
    out = workdir / "extracted"
    with tarfile.open(tar_path, "r:gz") as tar:
        tar.extractall(out, filter="data")
    records = []
    for fn in sorted(os.listdir(out)):
        with open(out / fn) as fh:
            obj = json.load(fh)
        rec = {"image_id": int(fn[:-5])}
        for name in KEYPOINT_NAMES:
            a, b = obj[name]
            rec[f"kp_{name}_x"], rec[f"kp_{name}_y"] = b, a
            rec[f"kp_{name}_conf"] = 1.0
        records.append(rec)
    return pd.DataFrame(records, columns=["image_id", *KEYPOINT_COLUMNS])


def bench_import(files: int, seed: int = 0) -> dict:
    table = synthetic_poses(files, seed=seed, outlier_fraction=0.0, missing_fraction=0.0)
    table = table[["image_id", *KEYPOINT_COLUMNS]].copy()
    for name in KEYPOINT_NAMES:  # as imported files carry no confidence
        table[f"kp_{name}_conf"] = 1.0
    with tempfile.TemporaryDirectory(prefix="bench_pose_") as tmp:
        tmp_path = Path(tmp)
        tar_path = tmp_path / "keypoints.tar.gz"
        _, t_write = _timed(write_keypoint_files, table, tarball=tar_path)
        (frame, report), t_read = _timed(read_keypoint_files, tar_path, "auto")
        assert report.files_read == files and report.axis_order == "yx"
        # same-size comparison with the naive approach on a subset
        n_small = min(files, 10_000)
        small_tar = tmp_path / "small.tar.gz"
        write_keypoint_files(table.iloc[:n_small], tarball=small_tar)
        (_, _), t_small = _timed(read_keypoint_files, small_tar, "yx")
        _, t_naive = _timed(_naive_import, small_tar, tmp_path)
        size = tar_path.stat().st_size
    return {
        "files": files,
        "tar_gz_mb": size / 1e6,
        "export_s": t_write,
        "import_s": t_read,
        "import_files_per_s": files / t_read,
        "subset_files": n_small,
        "subset_import_files_per_s": n_small / t_small,
        "naive_files_per_s": n_small / t_naive,
    }


def bench_estimator(images: int, device: str, batch_size: int, input_size: int) -> dict:
    """Keypoint R-CNN (random weights: the real architecture's speed, no download) over
    generated illustrations, batched as ``pose_keypoints`` runs it."""
    import numpy as np
    from PIL import Image

    from danbooru_assets.pose.backends import make_estimator, run_estimator

    estimator = make_estimator("keypoint_rcnn", device=device, allow_random_weights=True,
                               batch_size=batch_size, min_size=input_size)
    rng = np.random.default_rng(0)
    batch = [Image.fromarray(rng.integers(0, 255, (input_size, input_size * 3 // 4, 3), dtype=np.uint8))
             for _ in range(batch_size)]
    run_estimator(estimator, list(range(batch_size)), batch)  # warm-up (CUDA context, cudnn autotune)
    started = time.perf_counter()
    done = 0
    while done < images:
        run_estimator(estimator, list(range(done, done + batch_size)), batch)
        done += batch_size
    seconds = time.perf_counter() - started
    return {"images": done, "seconds": seconds, "images_per_s": done / seconds, "device": device}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m danbooru_assets.bench pose", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="synthetic keypoint rows for the filter")
    parser.add_argument("--files", type=int, default=100_000, help="JSON files in the generated tar.gz")
    parser.add_argument("--skip-import", action="store_true")
    parser.add_argument("--skip-filter", action="store_true")
    parser.add_argument("--estimator-images", type=int, default=0,
                        help="also time Keypoint R-CNN (random weights) over this many images (0: skip)")
    parser.add_argument("--device", default="auto", help="for --estimator-images: auto, cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--input-size", type=int, default=800)
    args = parser.parse_args(argv)
    print(f"cpu cores available: {len(os.sched_getaffinity(0))}")
    if not args.skip_filter:
        r = bench_filter(args.rows)
        print(f"pose filter over {r['rows']:,} rows (features + rules, vectorised):")
        print(f"  pose_features     {r['features_s']:.3f} s")
        print(f"  apply_pose_rules  {r['rules_s']:.3f} s   (kept {r['kept_fraction']:.1%})")
        per_million = 1e6 / r["filter_rows_per_s"]
        print(f"  whole filter      {r['filter_s']:.3f} s = {r['filter_rows_per_s']:,.0f} rows/s"
              f"   ({per_million:.2f} s per 1,000,000 rows{'' if r['rows'] >= 1_000_000 else ', extrapolated'};"
              f" target < 3 s: {'met' if per_million < 3 else 'MISSED'})")
        print(f"  robust_statistics {r['statistics_s']:.3f} s (global pose_statistics step)")
        print(f"  naive per-row Python loop (subset of {r['naive_rows']:,}, fewer rules): "
              f"{r['naive_rows_per_s']:,.0f} rows/s -> vectorised is "
              f"{r['filter_rows_per_s'] / r['naive_rows_per_s']:.0f}x faster")
    if not args.skip_import:
        r = bench_import(args.files)
        print(f"keypoint JSON import from a {r['tar_gz_mb']:.1f} MB tar.gz of {r['files']:,} files (one streamed pass):")
        print(f"  read_keypoint_files  {r['import_s']:.2f} s = {r['import_files_per_s']:,.0f} files/s"
              f"   (export: {r['export_s']:.2f} s)")
        print(f"  subset of {r['subset_files']:,}: streamed {r['subset_import_files_per_s']:,.0f} files/s vs naive "
              f"extract + json.load {r['naive_files_per_s']:,.0f} files/s -> "
              f"{r['subset_import_files_per_s'] / r['naive_files_per_s']:.1f}x")
    if args.estimator_images:
        r = bench_estimator(args.estimator_images, args.device, args.batch_size, args.input_size)
        print(f"keypoint_rcnn (random weights) on {r['device']}: {r['images']} images of {args.input_size}px "
              f"in {r['seconds']:.2f} s = {r['images_per_s']:.1f} images/s (batch {args.batch_size})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
