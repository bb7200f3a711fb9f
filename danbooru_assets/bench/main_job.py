"""Benchmark: the main job, its no-change re-run, one new image and a threshold change.

    python -m danbooru_assets.bench main_job [--shards 10,100] [--images-per-shard 3] [--out DIR] [--only 3,4,5]

For each tree size (sample images, demo CLIP model, the sample's published keypoints, all
in a work folder: ``--out`` or a temporary one), each as a subprocess, wall time:

1. ``danbooru-assets run`` on the fresh tree (the first run);
2. ``danbooru-assets run`` again, nothing changed (every stage skipped: stage_fingerprints);
3. one new image copied into one shard, ``danbooru-assets run``;
4. ``settings set clip.keep_fraction=0.5``, then ``rethreshold_job`` as one run over every
   shard (what the job's Launchpad does), in a fresh process;
5. ``danbooru-assets run --force``: every stage again on the unchanged tree.

For the runs of (1) it reads the Dagster instance: the seconds inside the runs and inside
their steps (the asset bodies and their Parquet), so the table shows what the run
machinery costs around the work. The issue's "floor" (the library functions in one
process) is not computed here. A failed step is reported and the others still run.
Timings depend on the machine and its load: compare rows of one table, not machines.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from danbooru_assets.bench.orchestration import Bench, StepFailed, fmt_s

RETHRESHOLD = """
import sys, dagster as dg
from danbooru_assets.definitions import defs
from danbooru_assets.orchestration.partitions import range_tags
job = defs.resolve_job_def("rethreshold_job")
r = job.execute_in_process(instance=dg.DagsterInstance.get(), tags=range_tags(sys.argv[1], sys.argv[2]),
                           run_config={"loggers": {"console": {"config": {"log_level": "ERROR"}}}})
sys.exit(0 if r.success else 1)
"""

STEP_STATS = """
import json, sys, dagster as dg
instance = dg.DagsterInstance.get()
since = float(sys.argv[1]); until = float(sys.argv[2])
runs = [r for r in instance.get_run_records() if r.start_time and since <= r.start_time <= until]
in_runs = sum((r.end_time or r.start_time) - r.start_time for r in runs)
in_steps = 0.0
for r in runs:
    for s in instance.get_run_step_stats(r.dagster_run.run_id):
        if s.start_time and s.end_time:
            in_steps += s.end_time - s.start_time
print(json.dumps({"runs": len(runs), "in_runs_s": in_runs, "in_steps_s": in_steps}))
"""


def run_python(bench: Bench, name: str, code: str, argv: list[str], timeout: float) -> tuple[float, str]:
    log_path = bench.logs / f"{name}.log"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=bench.work, env=bench.proc_env(),
                          capture_output=True, text=True, timeout=timeout)
    took = time.perf_counter() - t0
    log_path.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise StepFailed(f"{name} exited {proc.returncode}; log {log_path}:\n{proc.stderr[-2000:]}")
    return took, proc.stdout


def one_tree(shards: int, per_shard: int, work: Path, timeout: float, only: set[str] | None = None) -> dict[str, Any]:
    args = SimpleNamespace(work=work, shards=shards, images=shards * per_shard, sensor_interval=30,
                           step_timeout=timeout)
    bench = Bench(args)
    bench.generate()
    from danbooru_assets.devtools.sample_data import write_sample_settings

    write_sample_settings(work / "settings.yaml")  # the sample's keep_fraction (0.8): a few images per shard pass
    out: dict[str, Any] = {"shards": shards, "images": shards * per_shard}

    with bench.step("1", f"{shards} shards: danbooru-assets run (first)") as r:
        since = time.time()
        out["first_s"] = r["wall_s"] = bench.run_cli("first", ["run"], timeout)
        _, stats = run_python(bench, "step_stats", STEP_STATS, [str(since), str(time.time())], 300)
        out.update(json.loads(stats))
        print(f"  {fmt_s(out['first_s'])}; inside {out['runs']} runs {fmt_s(out['in_runs_s'])}, "
              f"inside their steps {fmt_s(out['in_steps_s'])}")
    with bench.step("2", f"{shards} shards: no-change re-run") as r:
        out["rerun_s"] = r["wall_s"] = bench.run_cli("rerun", ["run"], timeout)
        print(f"  {fmt_s(out['rerun_s'])}: " + (bench.logs / "rerun.log").read_text().strip().splitlines()[-2])
    if only is None or "3" in only:
        with bench.step("3", f"{shards} shards: one new image, danbooru-assets run") as r:
            shard = sorted(p for p in (bench.root / "original").iterdir() if p.is_dir())[0]
            source = next(p for p in sorted(shard.iterdir()) if p.suffix == ".jpg")
            shutil.copy(source, shard / f"9{source.stem[1:]}{source.suffix}")
            out["new_image_s"] = r["wall_s"] = bench.run_cli("new_image", ["run"], timeout)
            print(f"  {fmt_s(out['new_image_s'])}")
    if only is None or "4" in only:
        with bench.step("4", f"{shards} shards: keep_fraction=0.5, rethreshold_job over every shard") as r:
            bench.run_cli("settings", ["settings", "set", "clip.keep_fraction=0.5"], 300)
            first, last = bench.shards[0], bench.shards[-1]
            out["rethreshold_s"], _ = run_python(bench, "rethreshold", RETHRESHOLD, [first, last], timeout)
            r["wall_s"] = out["rethreshold_s"]
            print(f"  {fmt_s(out['rethreshold_s'])}")
    if only is None or "5" in only:
        with bench.step("5", f"{shards} shards: danbooru-assets run --force") as r:
            out["force_s"] = r["wall_s"] = bench.run_cli("force", ["run", "--force"], timeout)
            print(f"  {fmt_s(out['force_s'])}")
    return out


def table(results: list[dict[str, Any]]) -> str:
    rows = [
        "| shards (images) | first run | inside runs | inside steps | no-change re-run | one new image | "
        "rethreshold_job | run --force |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r['shards']:,} ({r['images']:,}) | {fmt_s(r.get('first_s'))} | {fmt_s(r.get('in_runs_s'))} | "
            f"{fmt_s(r.get('in_steps_s'))} | {fmt_s(r.get('rerun_s'))} | {fmt_s(r.get('new_image_s'))} | "
            f"{fmt_s(r.get('rethreshold_s'))} | {fmt_s(r.get('force_s'))} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m danbooru_assets.bench main_job", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", default="10,100", help="comma-separated tree sizes in shards (default 10,100)")
    parser.add_argument("--images-per-shard", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    parser.add_argument("--step-timeout", type=float, default=3600)
    parser.add_argument("--only", default=None, help="comma-separated steps 3,4,5 to run after 1 and 2 (default: all)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.shards.split(",") if s.strip()]
    base = args.out or Path(tempfile.mkdtemp(prefix="bench_main_job_"))
    results = []
    try:
        for n in sizes:
            results.append(one_tree(n, args.images_per_shard, base / f"shards_{n}", args.step_timeout,
                                    set(args.only.split(",")) if args.only is not None else None))
            print("\n" + table(results), flush=True)
    finally:
        if args.out is None:
            shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True, exist_ok=True)
    if args.out is not None:
        (base / "results.json").write_text(json.dumps(results, indent=2))
    print("\nmain job benchmark (wall seconds; the machine's load shows in every column):\n" + table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
