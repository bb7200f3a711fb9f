"""What one tick of ``new_data_sensor`` costs, to size its interval.

``python -m danbooru_assets.bench sensor_tick [--shards 1000] [--files 500] [--ticks 5]``
builds a tree of ``--shards`` bucket folders with ``--files`` empty image files each (the
sensor only lists and stats files, it never opens one) under a temporary folder, then
times the real sensor: the first tick (no cursor: every folder is listed and every file
stat-ed) and ``--ticks`` steady ticks with nothing changed (one listdir per folder), and a
tick after one empty file was added to one folder (removed again afterwards). ``--root DIR`` times an existing dataset
instead (its stored tables under ``--storage``, for the first tick's shard_index check).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def _tree(root: Path, shards: int, files: int) -> None:
    from danbooru_assets.core.shards import SHARD_KEYS

    for number in range(shards):
        folder = root / "original" / SHARD_KEYS[number]
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(files):
            (folder / f"{i * 1000 + number}.jpg").touch()
    (root / "metadata").mkdir(exist_ok=True)
    (root / "metadata" / "posts000000000000.json").write_text("")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m danbooru_assets.bench sensor_tick", description=__doc__)
    parser.add_argument("--shards", type=int, default=1000)
    parser.add_argument("--files", type=int, default=500, help="image files per shard folder")
    parser.add_argument("--ticks", type=int, default=5)
    parser.add_argument("--root", type=Path, help="an existing dataset root instead of a generated tree")
    parser.add_argument("--storage", type=Path, help="its storage (default: a temporary folder)")
    args = parser.parse_args(argv)

    import dagster as dg

    from danbooru_assets.definitions import ingest_job, prepare_job, shard_job
    from danbooru_assets.orchestration.resources import DanbooruDatasetResource, StorageResource
    from danbooru_assets.orchestration.sensors import build_new_data_sensor

    with tempfile.TemporaryDirectory(prefix="sensor_tick_") as tmp:
        root = args.root or Path(tmp) / "dataset"
        started = time.perf_counter()
        if args.root is None:
            _tree(root, args.shards, args.files)
        built_s = time.perf_counter() - started
        dataset = DanbooruDatasetResource(root=str(root))
        storage = StorageResource(base_path=str(args.storage or Path(tmp) / "storage"))
        sensor = build_new_data_sensor(shard_job, prepare_job, ingest_job, required_global=[])
        instance = dg.DagsterInstance.ephemeral()

        def tick(cursor):
            ctx = dg.build_sensor_context(instance=instance, cursor=cursor,
                                          resources={"dataset": dataset, "storage": storage})
            t0 = time.perf_counter()
            result = sensor.evaluate_tick(ctx)
            return time.perf_counter() - t0, result

        # The first tick asks for the metadata conversion; pretend it landed, as the
        # converted fingerprint the sensor compares with.
        first_s, result = tick(None)
        cursor = json.loads(result.cursor)
        cursor["metadata_indexed"] = cursor.get("metadata_requested")
        cursor_text = json.dumps(cursor)
        scan_s, result = tick(cursor_text)
        cursor_text = result.cursor
        steady = []
        for _ in range(args.ticks):
            seconds, result = tick(cursor_text)
            steady.append(seconds)
            cursor_text = result.cursor
        layout = dataset.layout()
        shards = layout.shards_with_images()
        added = layout.image_dir(shards[len(shards) // 2]) / "999999999.jpg"
        added.touch()
        try:
            changed_s, result = tick(cursor_text)
        finally:
            added.unlink()  # an existing dataset (--root) is left as it was
        print(json.dumps({
            "shards": len(shards),
            "files_per_shard": args.files if args.root is None else None,
            "tree_built_s": round(built_s, 1),
            "first_tick_s (metadata request)": round(first_s, 3),
            "full_scan_tick_s (every folder listed and every file stat-ed)": round(scan_s, 3),
            "steady_tick_s (median, nothing changed)": round(statistics.median(steady), 3),
            "steady_tick_s_max": round(max(steady), 3),
            "tick_after_one_new_file_s": round(changed_s, 3),
            "runs_requested_after_the_new_file": len(result.run_requests or []),
        }, indent=2))
    return 0
