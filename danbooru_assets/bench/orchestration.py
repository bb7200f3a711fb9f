"""Benchmark: the orchestration around the assets — runs, backfills, sensors, imports.

    python -m danbooru_assets.bench orchestration [--shards 1000] [--images 3000] [--out DIR] [--skip-contrast]

Everything happens in a work folder (``--out``, else a temporary one) with
``DANBOORU_ROOT``, ``DANBOORU_STORAGE``, ``DANBOORU_SETTINGS``, ``DANBOORU_LABELS`` and
``DAGSTER_HOME`` pointing inside it, the demo CLIP model and the sample's published
keypoints. Steps, each timed and printed as it ends:

a. generate a sample dataset of ``--images`` small images over ``--shards`` shards;
b. the main job, ``danbooru-assets run``, as a subprocess (wall time);
c. ``danbooru-assets settings set clip.keep_fraction=0.3``;
f. import time of ``danbooru_assets.definitions`` against ``dagster`` alone, each in fresh
   subprocesses (medians of 5; measured before the servers start, so they add no noise);
d. a real local deployment (:class:`~danbooru_assets.devtools.local_dagster.LocalDagster`:
   webserver + daemon) and, through GraphQL as the UI's Materialize button does, a
   backfill of ``clip_threshold`` + ``clip_subset`` over every partition: launch →
   backfill completed successfully, and how many runs it made (with where each run's
   time went);
d2. the same work as one run over the whole partition range launched directly
   (``launchRun`` with range tags): what the backfill costs without the backfill
   daemon's 30-second planning loop;
e. a run of ``clip_subset`` for one shard (launch → success), 3 times, median, with where
   the time goes (queue, process start, code load, the step itself);
g. contrast (unless ``--skip-contrast``): the one-run-per-shard path, 20 single-partition
   runs of ``clip_subset`` through the run queue, extrapolated to 1,000 shards;
h. sensor latency: ``new_data_sensor`` is started (interval ``DANBOORU_SENSOR_INTERVAL_S``,
   ``--sensor-interval``), its first tick passes (the runs of that first full scan are
   canceled), one new image is copied into a shard, and the tick that requests it and
   its run's success are awaited: seconds from that tick to run success.

A failing step prints why (with log tails) and the benchmark goes on where it can. The
results table is printed at the end and written to ``results.json`` in the work folder.
Never a unit test: timings depend on the machine (and on a backfill daemon that wakes
every 30 s).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

from danbooru_assets.devtools.local_dagster import ASSET_JOB, DagsterHarnessError, LocalDagster, tail
from danbooru_assets.config import PLANNED_EVENTS_ENV

SENSOR = "new_data_sensor"
TARGETS = {
    "main_job": ("main job over 1,000 shards", 300.0, "≤ 5 min"),
    "threshold_backfill": ("threshold change → all shards (backfill)", 60.0, "≤ 60 s"),
    "one_shard": ("one shard, launch → success (median of 3)", 5.0, "≤ 5 s"),
    "sensor": ("new image: sensor tick → run success", 15.0, "≤ 15 s after the tick"),
    "import": ("import danbooru_assets.definitions / import dagster", 1.3, "≤ 1.3×"),
}


def fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds:.1f} s" if seconds < 600 else f"{seconds / 60:.1f} min"


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work: Path = args.work
        self.root = self.work / "sample"
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        from danbooru_assets.devtools.sample_data import KEYPOINTS_TARBALL

        self.env: dict[str, str] = {
            "DANBOORU_ROOT": str(self.root),
            "DANBOORU_STORAGE": str(self.work / "storage"),
            "DANBOORU_SETTINGS": str(self.work / "settings.yaml"),
            "DANBOORU_LABELS": str(self.work / "labels.sqlite"),
            "DAGSTER_HOME": str(self.work / "dagster_home"),
            # DANBOORU_ROOT set means "a real dataset": ask for the demo model and the
            # sample's published keypoints explicitly.
            "DANBOORU_CLIP_MODEL": "danbooru-demo-tiny",
            "DANBOORU_CLIP_PRETRAINED": "",
            "DANBOORU_KEYPOINTS": str(self.root / KEYPOINTS_TARBALL),
            "DANBOORU_SENSOR_INTERVAL_S": str(args.sensor_interval),
            # The README's recommended deployment setting: one "planned" event per asset
            # for a range run instead of one per shard (see README: Runs cover ranges).
            PLANNED_EVENTS_ENV: os.environ.get(PLANNED_EVENTS_ENV, "true"),
        }
        self.steps: dict[str, dict[str, Any]] = {}
        self.shards: list[str] = []
        self.dagster: LocalDagster | None = None

    # ------------------------------------------------------------------ plumbing
    def proc_env(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    @contextlib.contextmanager
    def step(self, key: str, title: str) -> Iterator[dict[str, Any]]:
        """Times a step, records ``seconds``/``ok``/``error`` and never lets it stop the bench."""
        print(f"\n== {key}) {title}", flush=True)
        record: dict[str, Any] = {"title": title}
        self.steps[key] = record
        t0 = time.perf_counter()
        try:
            yield record
            record.setdefault("ok", True)
        except Exception as exc:  # a failed step is reported, the next one runs
            record["ok"] = False
            record["error"] = f"{type(exc).__name__}: {exc}"
            print(f"  FAILED: {record['error']}", flush=True)
            if not isinstance(exc, (DagsterHarnessError, StepFailed)):
                traceback.print_exc()
        record["seconds"] = time.perf_counter() - t0
        print(f"  [{key}] {'ok' if record.get('ok') else 'FAILED'} in {fmt_s(record['seconds'])}", flush=True)

    def run_cli(self, name: str, argv: list[str], timeout: float) -> float:
        """``danbooru-assets ARGV`` in a subprocess (the venv's Python), output to a log; wall seconds."""
        log_path = self.logs / f"{name}.log"
        cmd = [sys.executable, "-m", "danbooru_assets.cli", *argv]
        t0 = time.perf_counter()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, cwd=self.work, env=self.proc_env(), stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise StepFailed(f"`danbooru-assets {' '.join(argv)}` still running after {timeout:.0f}s; "
                                 f"killed. Log ({log_path}):\n{tail(log_path, 15)}")
        took = time.perf_counter() - t0
        if code != 0:
            raise StepFailed(f"`danbooru-assets {' '.join(argv)}` exited {code}. Log ({log_path}):\n{tail(log_path, 30)}")
        return took

    # ------------------------------------------------------------------ steps
    def generate(self) -> None:
        with self.step("a", f"generate {self.args.images} images over {self.args.shards} shards") as r:
            from danbooru_assets.devtools.sample_data import generate_sample_dataset

            summary = generate_sample_dataset(
                self.root, n_images=self.args.images, n_shards=self.args.shards, min_side=256, max_side=320
            )
            self.shards = list(summary.shards)
            r.update(images=summary.n_images_written, shards=len(self.shards), reused=summary.reused)
            print(f"  {summary.n_images_written} images in {len(self.shards)} shards"
                  f"{' (reused)' if summary.reused else ''} under {self.root}")

    def main_job(self) -> None:
        with self.step("b", "main job: danbooru-assets run") as r:
            took = self.run_cli("main_job", ["run"], self.args.step_timeout)
            r["wall_s"] = took
            r["per_1000_shards_s"] = took * 1000 / max(1, len(self.shards))
            print(f"  {fmt_s(took)} over {len(self.shards)} shards (log: {self.logs / 'main_job.log'})")
            print("  " + tail(self.logs / "main_job.log", 1))

    def settings(self) -> None:
        with self.step("c", "danbooru-assets settings set clip.keep_fraction=0.3") as r:
            r["wall_s"] = self.run_cli("settings", ["settings", "set", "clip.keep_fraction=0.3"], 120)
            print(f"  {fmt_s(r['wall_s'])}")

    def imports(self) -> None:
        with self.step("f", "import time: danbooru_assets.definitions vs dagster (fresh processes, median of 5)") as r:
            code = ("import time; t = time.perf_counter(); import {mod}; "
                    "print(time.perf_counter() - t)")
            figures: dict[str, list[float]] = {"dagster": [], "danbooru_assets.definitions": []}
            walls: dict[str, list[float]] = {k: [] for k in figures}
            for _ in range(5):
                for mod in figures:  # interleaved, so drift hits both alike
                    t0 = time.perf_counter()
                    proc = subprocess.run([sys.executable, "-c", code.format(mod=mod)], cwd=self.work,
                                          env=self.proc_env(), capture_output=True, text=True, timeout=300)
                    walls[mod].append(time.perf_counter() - t0)
                    if proc.returncode != 0:
                        raise StepFailed(f"import {mod} failed:\n{proc.stderr[-3000:]}")
                    figures[mod].append(float(proc.stdout.strip().splitlines()[-1]))
            med = {k: statistics.median(v) for k, v in figures.items()}
            r.update(import_s=med, process_wall_s={k: statistics.median(v) for k, v in walls.items()},
                     samples=figures, ratio=med["danbooru_assets.definitions"] / med["dagster"])
            print(f"  import dagster {med['dagster']:.2f} s, import danbooru_assets.definitions "
                  f"{med['danbooru_assets.definitions']:.2f} s: {r['ratio']:.2f}× "
                  f"(whole processes {r['process_wall_s']['dagster']:.2f} s vs "
                  f"{r['process_wall_s']['danbooru_assets.definitions']:.2f} s)")

    def start_dagster(self, stack: contextlib.ExitStack) -> None:
        with self.step("d0", "start the local deployment (webserver + daemon)") as r:
            dagster = LocalDagster(Path(self.env["DAGSTER_HOME"]), self.env, cwd=self.work,
                                   startup_timeout=self.args.step_timeout)
            stack.enter_context(dagster)
            self.dagster = dagster
            r.update(url=dagster.url, ready_s=dagster.started_in_s)
            print(f"  {dagster.url} ready in {fmt_s(dagster.started_in_s)} (logs: {dagster.log_dir})")

    def _need_dagster(self) -> LocalDagster:
        if self.dagster is None:
            raise StepFailed("the local deployment did not start (see step d0)")
        return self.dagster

    def threshold_backfill(self) -> None:
        with self.step("d", "backfill clip_threshold + clip_subset over every partition (the UI's Materialize)") as r:
            d = self._need_dagster()
            keys = d.partition_keys("clip_subset")
            t0 = time.time()
            backfill_id = d.launch_backfill(["clip_threshold", "clip_subset"], partition_names=keys,
                                            tags={"danbooru/bench": "orchestration"})
            print(f"  backfill {backfill_id}: {len(keys)} partitions; waiting (timeout {self.args.step_timeout:.0f}s)",
                  flush=True)
            result = d.wait_backfill(backfill_id, self.args.step_timeout, since=t0)
            runs = d.runs({"tags": [{"key": "dagster/backfill", "value": backfill_id}]}, limit=10000)
            first_created = min((x["creationTime"] for x in runs), default=None)
            last_end = max((x["endTime"] for x in runs if x.get("endTime")), default=None)
            fresh = {m["partition"] for m in d.materializations("clip_subset", after=t0)}
            r.update(
                backfill_id=backfill_id, status=result.status, wall_s=result.seconds, runs=result.n_runs,
                run_statuses=result.run_statuses, partitions=len(keys),
                launch_to_first_run_s=None if first_created is None else first_created - t0,
                # the data is there when the last run ends; the backfill is marked completed
                # by the daemon's next iteration (it wakes every 30 s)
                launch_to_last_run_end_s=None if last_end is None else last_end - t0,
                data_shards_materialized=len(fresh & set(self.shards)), data_shards=len(self.shards),
                partitions_materialized=len(fresh), asset_statuses=result.asset_statuses,
            )
            if len(runs) <= 10:  # where a few big runs spent their time
                r["run_breakdowns"] = {}
                for x in sorted(runs, key=lambda x: x["creationTime"]):
                    parts = breakdown(x["creationTime"], d.run_events_times(x["runId"]))
                    r["run_breakdowns"][x["runId"]] = parts
                    print(f"    run {x['runId'][:8]} {partition_label(x['tags'])}: created "
                          f"+{x['creationTime'] - t0:.1f} s, ended +{(x.get('endTime') or time.time()) - t0:.1f} s; "
                          + ", ".join(f"{k} {v:.1f}" for k, v in parts.items() if v is not None))
            print(f"  {result.status} after {fmt_s(result.seconds)}: {result.n_runs} runs {result.run_statuses}; "
                  f"first run created {fmt_s(r['launch_to_first_run_s'])} after the launch, last run ended "
                  f"after {fmt_s(r['launch_to_last_run_end_s'])}; clip_subset "
                  f"materialized for {r['data_shards_materialized']}/{len(self.shards)} shards with data "
                  f"({len(fresh)} partitions in all)")
            if not result.success:
                if result.status.startswith("TIMEOUT"):
                    counts = [a for a in result.asset_statuses if a["assetKey"]["path"] == ["clip_subset"]]
                    done = sum(a["numPartitionsMaterialized"] + a["numPartitionsFailed"] for a in counts)
                    if done:
                        r["extrapolated_s"] = result.seconds * len(keys) / done
                        print(f"  {done}/{len(keys)} clip_subset partitions done (materialized or failed) in "
                              f"{fmt_s(result.seconds)}: at that pace, all of them in {fmt_s(r['extrapolated_s'])}")
                    n = d.cancel_backfill(backfill_id)
                    print(f"  canceled the backfill and {n} unfinished runs", flush=True)
                failed = [x for x in runs if x["status"] == "FAILURE"]
                raise StepFailed(
                    f"backfill {result.status}" + (f": {result.error}" if result.error else "")
                    + (f"; {len(failed)} failed runs, e.g. {failed[0]['runId']}" if failed else "")
                )

    def threshold_one_run(self) -> None:
        with self.step("d2", "the same as one run over the whole range, launched directly (no backfill daemon)") as r:
            d = self._need_dagster()
            keys = d.partition_keys("clip_subset")
            t0 = time.time()
            run_id = d.launch_run(ASSET_JOB, ["clip_threshold", "clip_subset"], partition_range=(keys[0], keys[-1]),
                                  tags={"danbooru/bench": "one_run"})
            res = d.wait_run(run_id, self.args.step_timeout, since=t0)
            parts = breakdown(t0, d.run_events_times(run_id))
            r.update(run_id=run_id, status=res.status, wall_s=res.wall_s, breakdown=parts)
            print(f"  {res.status} in {fmt_s(res.wall_s)}  "
                  + ", ".join(f"{k} {v:.1f}" for k, v in parts.items() if v is not None))
            if not res.success:
                raise StepFailed(f"run {run_id} {res.status}: {' | '.join(d.run_errors(run_id))[:1500]}")

    def one_shard(self) -> None:
        with self.step("e", "one shard: a run of clip_subset for one partition, launch → success, 3×") as r:
            d = self._need_dagster()
            shard = self.shards[0]
            reps = []
            for i in range(3):
                t0 = time.time()
                run_id = d.launch_run(ASSET_JOB, ["clip_subset"], partition_key=shard,
                                      tags={"danbooru/bench": "one_shard"})
                res = d.wait_run(run_id, self.args.step_timeout, since=t0)
                times = d.run_events_times(run_id)
                reps.append({"run_id": run_id, "status": res.status, "wall_s": res.wall_s,
                             "breakdown": breakdown(t0, times)})
                print(f"  [{i + 1}/3] shard {shard}: {res.status} in {fmt_s(res.wall_s)}  "
                      + ", ".join(f"{k} {v:.1f}" for k, v in reps[-1]["breakdown"].items() if v is not None),
                      flush=True)
                if not res.success:
                    raise StepFailed(f"run {run_id} {res.status}")
            walls = [x["wall_s"] for x in reps]
            r.update(shard=shard, reps=reps, median_s=statistics.median(walls))
            print(f"  median {fmt_s(r['median_s'])}")

    def contrast(self) -> None:
        n = min(20, len(self.shards))
        with self.step("g", f"contrast: one run per shard, {n} single-partition runs of clip_subset") as r:
            d = self._need_dagster()
            shards = self.shards[:n]
            t0 = time.time()
            run_ids = [d.launch_run(ASSET_JOB, ["clip_subset"], partition_key=s, tags={"danbooru/bench": "contrast"})
                       for s in shards]
            results = [d.wait_run(rid, self.args.step_timeout, since=t0) for rid in run_ids]
            wall = max((x.end_time or time.time()) for x in results) - t0
            statuses: dict[str, int] = {}
            for x in results:
                statuses[x.status] = statuses.get(x.status, 0) + 1
            r.update(runs=n, wall_s=wall, statuses=statuses, per_run_s=wall / n,
                     extrapolated_1000_s=wall * 1000 / n)
            print(f"  {n} runs in {fmt_s(wall)} ({statuses}); {wall / n:.1f} s per shard → "
                  f"{fmt_s(wall * 1000 / n)} for 1,000 shards")
            if statuses.keys() - {"SUCCESS"}:
                raise StepFailed(f"not every run succeeded: {statuses}")

    def sensor(self) -> None:
        with self.step("h", f"sensor latency: {SENSOR}, one new image") as r:
            d = self._need_dagster()
            interval = int(d.sensor(SENSOR)["minIntervalSeconds"])
            r["interval_s"] = interval
            if interval != self.args.sensor_interval:
                print(f"  note: the sensor's interval is {interval} s (DANBOORU_SENSOR_INTERVAL_S="
                      f"{self.args.sensor_interval} not honoured by this code)")
            wait_tick = interval + 120.0
            seen = {t["tickId"] for t in d.sensor_ticks(SENSOR)}
            d.start_sensor(SENSOR)
            try:
                first = self._next_tick(d, seen, wait_tick, lambda t: True)
                seen.add(first["tickId"])
                r["first_tick"] = {"status": first["status"], "runs": len(first["runIds"]),
                                   "skip_reason": first.get("skipReason")}
                if first["status"] == "FAILURE":
                    raise StepFailed(f"first tick failed: {(first.get('error') or {}).get('message')}")
                print(f"  first tick: {first['status']}, {len(first['runIds'])} runs requested"
                      f"{' — ' + first['skipReason'] if first.get('skipReason') else ''}", flush=True)
                if first["runIds"]:  # the first full scan: out of the way of the measurement
                    n = d.terminate_runs(list(first["runIds"]))
                    for run_id in first["runIds"]:  # terminated, or finished on their own
                        d.wait_run(run_id, self.args.step_timeout)
                    print(f"  canceled {n} runs of the first full scan (the others had started or ended)")
                target_shard = self.shards[0]
                new_path = add_image(self.root, target_shard)
                t_add = time.time()
                r.update(shard=target_shard, new_file=str(new_path))
                print(f"  added {new_path.relative_to(self.root)}; waiting for a tick (interval {interval} s)",
                      flush=True)
                tick = self._next_tick(d, seen, wait_tick, lambda t: bool(t["runIds"]) or t["status"] == "FAILURE")
                if tick["status"] == "FAILURE":
                    raise StepFailed(f"tick failed: {(tick.get('error') or {}).get('message')}")
                results = [d.wait_run(rid, self.args.step_timeout) for rid in tick["runIds"]]
                end = max((x.end_time or time.time()) for x in results)
                statuses = sorted({x.status for x in results})
                partitions = [partition_label(d.run_status(x.run_id)["tags"]) for x in results]
                r.update(tick_to_success_s=end - tick["timestamp"], add_to_tick_s=tick["timestamp"] - t_add,
                         tick_eval_s=(tick.get("endTimestamp") or tick["timestamp"]) - tick["timestamp"],
                         runs=len(results), statuses=statuses, partitions=partitions,
                         breakdown=breakdown(tick["timestamp"], d.run_events_times(results[0].run_id)))
                print(f"  tick {fmt_s(r['add_to_tick_s'])} after the copy (evaluation {r['tick_eval_s']:.1f} s) "
                      f"requested {len(results)} run(s) for {partitions}: {statuses}, "
                      f"{fmt_s(r['tick_to_success_s'])} from the tick to success  "
                      + ", ".join(f"{k} {v:.1f}" for k, v in r["breakdown"].items() if v is not None))
                if statuses != ["SUCCESS"]:
                    raise StepFailed(f"the sensor's run ended {statuses}")
            finally:
                with contextlib.suppress(Exception):
                    d.stop_sensor(SENSOR)

    @staticmethod
    def _next_tick(d: LocalDagster, seen: set, timeout: float, accept: Callable[[dict], bool]) -> dict:
        """The oldest finished tick not in ``seen`` that ``accept`` takes; others are added to ``seen``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t in reversed(d.sensor_ticks(SENSOR, limit=20)):  # oldest first
                if t["tickId"] in seen or t["status"] == "STARTED":
                    continue
                seen.add(t["tickId"])
                if accept(t):
                    return t
            time.sleep(0.5)
        raise StepFailed(f"no matching tick of {SENSOR} within {timeout:.0f}s\n{d.log_tails(15)}")

    # ------------------------------------------------------------------ report
    def table(self) -> list[dict[str, Any]]:
        s = self.steps
        rows: list[dict[str, Any]] = []

        def row(what: str, measured: str, target: str = "—", ok: bool | None = None, key: str = "") -> None:
            rows.append({"what": what, "measured": measured, "target": target,
                         "ok": ok if ok is not None else None, "step": key})

        def failed(key: str) -> str | None:
            rec = s.get(key)
            if rec is None:
                return "not run"
            return None if rec.get("ok") else f"FAILED ({rec.get('error', '')[:60].splitlines()[0]})"

        if "a" in s:
            row(f"generate {self.args.images} images / {self.args.shards} shards",
                failed("a") or fmt_s(s["a"]["seconds"]), key="a")
        title, limit, target = TARGETS["main_job"]
        b = s.get("b", {})
        if b.get("ok"):
            per = b["per_1000_shards_s"]
            measured = fmt_s(b["wall_s"]) + ("" if len(self.shards) == 1000 else f" ({len(self.shards)} shards; "
                                                                                  f"{fmt_s(per)} per 1,000)")
            row(title, measured, target, per <= limit, "b")
        else:
            row(title, failed("b") or "—", target, False, "b")
        if "c" in s:
            row("settings set clip.keep_fraction=0.3", failed("c") or fmt_s(s["c"]["wall_s"]), key="c")
        title, limit, target = TARGETS["threshold_backfill"]
        dd = s.get("d", {})
        if "wall_s" in dd:
            measured = (f"{fmt_s(dd['wall_s'])}, {dd['runs']} runs, {dd['status']}"
                        + (f"; last run done at {fmt_s(dd['launch_to_last_run_end_s'])}"
                           if dd.get("launch_to_last_run_end_s") else "")
                        + (f" (pace: {fmt_s(dd['extrapolated_s'])} for all)" if "extrapolated_s" in dd else ""))
            row(title, measured, target, bool(dd.get("ok")) and dd["wall_s"] <= limit, "d")
        else:
            row(title, failed("d") or "—", target, False, "d")
        d2 = s.get("d2")
        if d2 is not None:
            row("the same, one run launched directly (no backfill daemon)",
                fmt_s(d2["wall_s"]) + ("" if d2.get("ok") else f" {d2.get('status', '')}") if "wall_s" in d2
                else (failed("d2") or "—"), target, bool(d2.get("ok")) and d2["wall_s"] <= limit, "d2")
        title, limit, target = TARGETS["one_shard"]
        e = s.get("e", {})
        row(title, fmt_s(e["median_s"]) if e.get("ok") else (failed("e") or "—"), target,
            bool(e.get("ok")) and e["median_s"] <= limit, "e")
        title, limit, target = TARGETS["import"]
        f = s.get("f", {})
        if f.get("ok"):
            med = f["import_s"]
            row(title, f"{med['danbooru_assets.definitions']:.2f} s / {med['dagster']:.2f} s = {f['ratio']:.2f}×",
                target, f["ratio"] <= limit, "f")
        else:
            row(title, failed("f") or "—", target, False, "f")
        g = s.get("g")
        if g is not None:
            row(f"contrast: {g.get('runs', 20)} one-shard runs through the queue",
                f"{fmt_s(g['wall_s'])} → {fmt_s(g['extrapolated_1000_s'])} per 1,000 shards"
                if "wall_s" in g else (failed("g") or "—"), key="g")
        title, limit, target = TARGETS["sensor"]
        h = s.get("h", {})
        if "tick_to_success_s" in h:
            row(title, fmt_s(h["tick_to_success_s"]) + ("" if h.get("ok") else " " + (failed("h") or "")), target,
                bool(h.get("ok")) and h["tick_to_success_s"] <= limit, "h")
        else:
            row(title, failed("h") or "—", target, False, "h")
        return rows

    def report(self) -> Path:
        rows = self.table()
        widths = [max(len(str(r[k])) for r in rows + [{"what": "what", "measured": "measured", "target": "target"}])
                  for k in ("what", "measured", "target")]
        print("\n" + "  ".join(h.ljust(w) for h, w in zip(("what", "measured", "target"), widths)) + "  ok")
        print("  ".join("-" * w for w in widths) + "  --")
        for r in rows:
            mark = {True: "yes", False: "NO", None: ""}[r["ok"]]
            print("  ".join(str(r[k]).ljust(w) for k, w in zip(("what", "measured", "target"), widths)) + f"  {mark}")
        out = self.work / (f"results-{self.args.only.replace(',', '-')}.json" if self.args.only else "results.json")
        out.write_text(json.dumps({
            "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self.args).items()},
            "cpus": os.cpu_count(), "env": self.env, "steps": self.steps, "table": rows,
        }, indent=1, default=str))
        print(f"\nresults: {out}")
        return out


class StepFailed(RuntimeError):
    """A step's expected failure, with its explanation (no traceback needed)."""


def breakdown(t_launch: float, times: dict[str, float | None]) -> dict[str, float | None]:
    """Where a run's time went, from :meth:`LocalDagster.run_events_times` (seconds)."""

    def span(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else b - a

    end = times.get("RUN_SUCCESS") or times.get("RUN_FAILURE")
    n_mat = int(times.get("n_materializations") or 0)
    return {
        # the launcher writes one ASSET_MATERIALIZATION_PLANNED event per asset partition first
        "planned_events": span(times.get("created"), times.get("RUN_ENQUEUED")) if n_mat > 1 else None,
        "queue": span(times.get("RUN_ENQUEUED") if n_mat > 1 else t_launch,
                      times.get("RUN_STARTING") or times.get("RUN_START")),
        "process_start": span(times.get("RUN_STARTING"), times.get("RUN_START")),
        # with the multiprocess executor, each step starts a process of its own that loads the code again
        "step_process": span(times.get("first_STEP_WORKER_STARTING"), times.get("first_STEP_START")),
        "to_first_step": span(times.get("RUN_START"), times.get("first_STEP_WORKER_STARTING")
                              or times.get("first_STEP_START")),
        "steps": span(times.get("first_STEP_START"), times.get("last_STEP_SUCCESS")),
        # the span over which the step(s) reported their partitions' materializations
        f"{n_mat}_partition_materialization_events": span(times.get("first_ASSET_MATERIALIZATION"),
                                                  times.get("last_ASSET_MATERIALIZATION")) if n_mat > 1 else None,
        "finish": span(times.get("last_STEP_SUCCESS"), end),
    }


def partition_label(tags: list[dict[str, str]]) -> str:
    """``0042``, ``0000..0999`` (a range run) or ``-`` from a run's tags."""
    t = {x["key"]: x["value"] for x in tags}
    if "dagster/partition" in t:
        return t["dagster/partition"]
    if "dagster/asset_partition_range_start" in t:
        return f"{t['dagster/asset_partition_range_start']}..{t.get('dagster/asset_partition_range_end')}"
    return "-"


def add_image(root: Path, shard: str) -> Path:
    """Copy an image of ``shard`` to a new id of the same shard (``id % 1000``); the new path."""
    folder = root / "original" / shard
    images = sorted(p for p in folder.iterdir() if p.stem.isdigit() and p.suffix and p.stat().st_size > 0)
    if not images:
        raise StepFailed(f"no image in {folder} to copy")
    source = images[0]
    new_id = max(int(p.stem) for p in images) + 1000
    while any(folder.glob(f"{new_id}.*")):
        new_id += 1000
    target = folder / f"{new_id}{source.suffix}"
    tmp = folder / f".{new_id}.tmp"
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m danbooru_assets.bench orchestration",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=1000,
                        help="shards with data (default 1000; with fewer, step d's backfill over every partition "
                        "also targets shards the main job never indexed)")
    parser.add_argument("--images", type=int, default=3000, help="images in all (default 3000)")
    parser.add_argument("--out", type=Path, help="work folder, kept (default: a temporary one, bulky data removed)")
    parser.add_argument("--skip-contrast", action="store_true", help="skip the one-run-per-shard contrast (g)")
    parser.add_argument("--sensor-interval", type=int, default=15,
                        help="DANBOORU_SENSOR_INTERVAL_S for new_data_sensor (default 15)")
    parser.add_argument("--only", help="comma-separated steps to run (a,b,c,f,d,d2,e,g,h), e.g. `e,h` again "
                        "on the --out folder of an earlier full run")
    parser.add_argument("--step-timeout", type=float, default=1800.0,
                        help="seconds a step may take before it is stopped and reported (default 1800)")
    args = parser.parse_args(argv)
    args.work = (args.out or Path(tempfile.mkdtemp(prefix="danbooru-bench-orchestration-"))).resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"work folder {args.work}; {os.cpu_count()} CPUs; {sys.executable}")

    bench = Bench(args)
    only = set(args.only.split(",")) if args.only else None

    def wanted(step: str) -> bool:  # a (generate) always: it reuses an existing tree in a moment
        return only is None or step in only or step == "a"

    try:
        for step, run in (("a", bench.generate), ("b", bench.main_job), ("c", bench.settings), ("f", bench.imports)):
            if wanted(step):
                run()
        served = [("d", bench.threshold_backfill), ("d2", bench.threshold_one_run), ("e", bench.one_shard),
                  ("g", bench.contrast), ("h", bench.sensor)]
        if args.skip_contrast:
            served = [s for s in served if s[0] != "g"]
        if any(wanted(step) for step, _ in served):
            with contextlib.ExitStack() as stack:
                bench.start_dagster(stack)
                for step, run in served:
                    if wanted(step):
                        run()
                print("\nstopping the local deployment", flush=True)
    finally:
        bench.report()
        if args.out is None:  # keep results.json and the logs, not the data
            for bulky in ("sample", "storage"):
                shutil.rmtree(args.work / bulky, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
