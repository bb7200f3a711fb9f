"""The production layout of deploy/, run for real on one machine (run it as deploy/smoke).

Starts Debian's postgresql and redis-server on 127.0.0.1 (free ports, a temporary data
folder), a code server, the webserver and daemon on deploy/dagster.yaml, and Celery
workers started by deploy/worker; then, through GraphQL:

1. a backfill of the whole graph over the sample shards with one `cpu` and one `gpu`
   worker: it must succeed, every step must have run on a Celery worker, the inference
   steps on the `gpu` one and nothing else there (the worker each step ran on is in the
   run's event log: dagster-celery's "Executing steps … in celery worker" event carries the
   worker's name), and the tables must equal a single-machine `danbooru-assets run` on the
   same data (same files, same ids, same kept sets);
2. the same backfill on fresh storage with ONE worker serving both queues, for the
   one-worker-vs-two wall times;
3. a run of clip_embeddings/image_stats whose step process on the `gpu` worker is killed
   with SIGKILL mid-step: the run must fail naming the lost worker, every stored table
   must still read whole, and after a new `gpu` worker joins, the same run must complete.

Every service it started is stopped on exit (also on Ctrl-C or an error). Exit status 0
when everything held; the figures are printed last.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
sys.path.insert(0, str(REPO))

from danbooru_assets.devtools.local_dagster import LocalDagster, free_port, tail  # noqa: E402

# Debian's postgresql: /usr/lib/postgresql/<major>/bin (15 on bookworm); PG_BIN overrides.
PG_BIN = Path(os.environ.get("PG_BIN") or max(Path("/usr/lib/postgresql").glob("*/bin"),
                                              key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
                                              default=Path("/usr/lib/postgresql/15/bin")))
INFERENCE_STEPS = {"clip_embeddings_and_image_stats", "pose_keypoints"}
TIMEOUT_S = float(os.environ.get("SMOKE_BACKFILL_TIMEOUT_S", "900"))
VENV_BIN = Path(sys.executable).parent


def log(message: str) -> None:
    print(f"[smoke {time.strftime('%H:%M:%S')}] {message}", flush=True)


class Failed(Exception):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise Failed(message)
    log("ok: " + message)


class Services:
    """Processes started here, each in a session of its own; stop() ends their groups."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str], env: dict, cwd: Path, user: str | None = None) -> subprocess.Popen:
        if user:
            cmd = ["runuser", "-u", user, "--", *cmd]
        out = open(self.logs / f"{name}.log", "ab")
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        self.procs[name] = proc
        return proc

    def stop(self, name: str, sig: int = signal.SIGTERM, grace_s: float = 15) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=grace_s)
        except (ProcessLookupError, PermissionError):
            pass
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever is left of the group (pool children, loader processes)
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)

    def log_tail(self, name: str, lines: int = 30) -> str:
        return f"--- {name}.log\n{tail(self.logs / f'{name}.log', lines)}"


def wait_for(what: str, ready, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise Failed(f"{what} not ready after {timeout:.0f}s")
        time.sleep(0.2)


def port_open(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


# ---------------------------------------------------------------------------- tables
def table_files(storage: Path) -> dict[str, Path]:
    return {
        str(p.relative_to(storage)): p
        for p in storage.rglob("*.parquet")
        if ".scratch" not in p.parts and not p.name.startswith(".")
    }


def kept_ids(table) -> tuple[list[int], list[int] | None]:
    if "image_id" not in table.column_names:  # a summary table: its row count stands for it
        return [table.num_rows], None
    ids = sorted(table.column("image_id").to_pylist())
    for flag in ("kept", "keep"):
        if flag in table.column_names:
            pairs = zip(table.column("image_id").to_pylist(), table.column(flag).to_pylist())
            return ids, sorted(i for i, k in pairs if k)
    return ids, None


def compare_tables(reference: Path, candidate: Path, only: tuple[str, ...] = ()) -> int:
    """Same files, same ids and kept sets in every table; returns how many were compared."""
    import pyarrow.parquet as pq

    ref, got = table_files(reference), table_files(candidate)
    if only:
        ref = {k: v for k, v in ref.items() if k.split("/")[0] in only}
        got = {k: v for k, v in got.items() if k.split("/")[0] in only}
    check(bool(ref), f"the reference has tables to compare ({len(ref)} files)")
    check(sorted(ref) == sorted(got), f"the same {len(ref)} table files as the single-machine run"
          + ("" if sorted(ref) == sorted(got) else f" (only reference: {sorted(set(ref) - set(got))[:5]}, "
             f"only here: {sorted(set(got) - set(ref))[:5]})"))
    differing = []
    for name in sorted(ref):
        a, b = kept_ids(pq.read_table(ref[name])), kept_ids(pq.read_table(got[name]))
        if a != b:
            differing.append(name)
    check(not differing, f"same ids and kept sets in all {len(ref)} tables" + (f"; differ: {differing[:8]}" if differing else ""))
    return len(ref)


def all_tables_read_whole(storage: Path) -> tuple[int, list[str]]:
    import pyarrow.parquet as pq

    broken = []
    files = table_files(storage)
    for name, path in files.items():
        try:
            pq.read_table(path)
        except Exception as exc:  # noqa: BLE001 - any unreadable table is the finding
            broken.append(f"{name}: {exc}")
    return len(files), broken


# ---------------------------------------------------------------------------- the cluster
class Cluster:
    def __init__(self, tmp: Path, services: Services):
        self.tmp = tmp
        self.services = services
        self.home = tmp / "dagster_home"
        self.storage = tmp / "storage"
        self.env: dict[str, str] = {}
        self.dagster: LocalDagster | None = None

    def start_postgres(self) -> str:
        data = Path(tempfile.mkdtemp(prefix="danbooru-smoke-pg-"))
        self.pg_dir = data
        user = None
        if os.geteuid() == 0:  # postgres refuses to run as root: Debian's postgres user runs it
            user = "postgres"
            shutil.chown(data, user)
        port = free_port()
        subprocess.run(
            (["runuser", "-u", user, "--"] if user else [])
            + [str(PG_BIN / "initdb"), "-D", str(data / "db"), "-U", "dagster", "--auth=trust", "-E", "UTF8", "--no-sync"],
            check=True, capture_output=True,
        )
        self.services.start(
            "postgres",
            [str(PG_BIN / "postgres"), "-D", str(data / "db"), "-h", "127.0.0.1", "-p", str(port), "-k", str(data),
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
            env=dict(os.environ), cwd=data, user=user,
        )
        wait_for("postgres", lambda: subprocess.run(
            [str(PG_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)], capture_output=True).returncode == 0)
        subprocess.run([str(PG_BIN.parent / "bin" / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "dagster", "dagster"],
                       check=True, capture_output=True)
        # psycopg2 (dagster-postgres's driver) named explicitly: SQLAlchemy 2.1 means psycopg 3 by "postgresql://".
        return f"postgresql+psycopg2://dagster@127.0.0.1:{port}/dagster"

    def start_redis(self) -> str:
        port = free_port()
        self.services.start(
            "redis", ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
            env=dict(os.environ), cwd=self.tmp,
        )
        wait_for("redis", lambda: port_open(port))
        return f"redis://127.0.0.1:{port}/0"

    def start(self, sample_root: Path) -> None:
        self.home.mkdir(parents=True)
        shutil.copyfile(DEPLOY / "dagster.yaml", self.home / "dagster.yaml")
        pg_url = self.start_postgres()
        broker = self.start_redis()
        log(f"postgres at {pg_url}, redis at {broker}")
        self.env = {
            **os.environ,
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "DAGSTER_HOME": str(self.home),
            "DAGSTER_PG_URL": pg_url,
            "DANBOORU_EXECUTOR": "celery",
            "DANBOORU_CELERY_BROKER": broker,
            "DANBOORU_CELERY_BACKEND": broker,
            "DANBOORU_SAMPLE_ROOT": str(sample_root),
            "DANBOORU_STORAGE": str(self.storage),
            # The settings the single-machine run used (on the sample it writes demo settings),
            # so both sides curate by the same rules.
            "DANBOORU_SETTINGS": str(self.tmp / "reference_settings.yaml"),
            "DANBOORU_LABELS": str(self.tmp / "labels.sqlite"),
            "DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS": "true",
            "CELERY_WORKER_CONCURRENCY": "1",
            "PYTHONUNBUFFERED": "1",
        }
        for name in ("DANBOORU_ROOT",):
            self.env.pop(name, None)
        # Create the instance's schema once, before the servers race on it.
        out = subprocess.run([sys.executable, "-c", "import dagster; dagster.DagsterInstance.get().dispose()"],
                             env=self.env, cwd=self.tmp, capture_output=True, text=True)
        if out.returncode != 0:
            raise Failed(f"the instance on deploy/dagster.yaml did not open:\n{out.stderr[-3000:]}")
        code_port = free_port()
        self.services.start(
            "code-server",
            [sys.executable, str(VENV_BIN / "dagster"), "code-server", "start", "-m", "danbooru_assets.definitions",
             "-a", "defs", "--location-name", "danbooru_assets", "-h", "127.0.0.1", "-p", str(code_port)],
            env=self.env, cwd=self.tmp,
        )
        workspace = self.tmp / "workspace.yaml"
        workspace.write_text(
            "load_from:\n  - grpc_server:\n      host: 127.0.0.1\n"
            f"      port: {code_port}\n      location_name: danbooru_assets\n"
        )
        wait_for("code server", lambda: port_open(code_port), timeout=120)
        self.dagster = LocalDagster(self.home, env=self.env, workspace=workspace, cwd=self.tmp, startup_timeout=180)
        self.dagster.start()
        log(f"webserver at {self.dagster.url}, daemon running (started in {self.dagster.started_in_s:.0f}s)")

    def start_worker(self, kind: str, name: str | None = None) -> None:
        name = name or kind
        env = {**self.env, "CELERY_WORKER_NAME": name}
        self.services.start(f"worker-{name}", ["bash", str(DEPLOY / "worker"), kind], env=env, cwd=self.tmp)
        log_path = self.services.logs / f"worker-{name}.log"
        wait_for(f"celery worker {name}", lambda: b" ready." in (log_path.read_bytes() if log_path.exists() else b""),
                 timeout=120)

    def stop_worker(self, name: str) -> None:
        self.services.stop(f"worker-{name}")

    def stop(self) -> None:
        if self.dagster is not None:
            self.dagster.stop()
        self.services.stop_all()
        if getattr(self, "pg_dir", None):
            shutil.rmtree(self.pg_dir, ignore_errors=True)

    # ------------------------------------------------------------------------ GraphQL
    def whole_graph(self) -> list[str]:
        data = self.dagster.graphql("{ assetNodes { assetKey { path } isMaterializable } }")
        return sorted("/".join(n["assetKey"]["path"]) for n in data["assetNodes"] if n["isMaterializable"])

    def step_workers(self, run_id: str) -> dict[str, str]:
        """step key → the Celery worker that executed it, from the run's event log."""
        found: dict[str, str] = {}
        cursor = None
        while True:
            data = self.dagster.graphql(
                """query($id: ID!, $after: String) { logsForRun(runId: $id, afterCursor: $after, limit: 1000) {
                     ... on EventConnection { cursor hasMore events { __typename
                       ... on EngineEvent { stepKey message metadataEntries { label
                           ... on TextMetadataEntry { text } } } } } } }""",
                {"id": run_id, "after": cursor},
            )["logsForRun"]
            for e in data["events"]:
                if e.get("__typename") == "EngineEvent" and "in celery worker" in (e.get("message") or ""):
                    for m in e["metadataEntries"]:
                        if m["label"] == "Celery worker":
                            found[e["stepKey"]] = m["text"]
            if not data["hasMore"] or not data["events"]:
                return found
            cursor = data["cursor"]

    def executed_steps(self, run_id: str) -> set[str]:
        return {e["stepKey"] for e in self.dagster.run_events(run_id) if e.get("eventType") == "STEP_START"}

    def backfill(self, assets: list[str], shards: list[str], label: str):
        started = time.time()
        backfill_id = self.dagster.launch_backfill(assets, partition_names=shards, title=label)
        result = self.dagster.wait_backfill(backfill_id, timeout=TIMEOUT_S, since=started)
        runs = self.dagster.backfill_status(backfill_id)["runs"]
        if not result.success:
            errors = [err for r in runs if r["status"] != "SUCCESS" for err in self.dagster.run_errors(r["runId"])]
            raise Failed(f"{label}: backfill {result.status} {result.run_statuses}; {result.error or ''}\n"
                         + "\n".join(errors[:10]))
        log(f"{label}: backfill succeeded in {result.seconds:.1f}s, {result.n_runs} runs")
        return result, [r["runId"] for r in runs]


def assert_routing(cluster: Cluster, run_ids: list[str], gpu_name: str, cpu_name: str) -> dict[str, int]:
    counts = {"gpu": 0, "cpu": 0}
    for run_id in run_ids:
        executed = cluster.executed_steps(run_id)
        workers = cluster.step_workers(run_id)
        missing = executed - set(workers)
        check(not missing, f"run {run_id[:8]}: every step ran on a Celery worker" + (f" (not: {sorted(missing)})" if missing else ""))
        for step, worker in workers.items():
            expected = gpu_name if step in INFERENCE_STEPS else cpu_name
            if not worker.startswith(expected + "@"):
                raise Failed(f"run {run_id[:8]}: step {step} ran on {worker}, expected the {expected} worker")
            counts["gpu" if step in INFERENCE_STEPS else "cpu"] += 1
    return counts


def reference_run(tmp: Path, sample_root: Path) -> Path:
    """`danbooru-assets run` on one machine (in-process executor, SQLite instance)."""
    storage = tmp / "reference_storage"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DANBOORU_", "DAGSTER_"))}
    env.update(DAGSTER_HOME=str(tmp / "reference_home"), DANBOORU_SAMPLE_ROOT=str(sample_root),
               DANBOORU_STORAGE=str(storage), DANBOORU_SETTINGS=str(tmp / "reference_settings.yaml"),
               DANBOORU_LABELS=str(tmp / "reference_labels.sqlite"))
    started = time.perf_counter()
    out = subprocess.run([str(VENV_BIN / "danbooru-assets"), "run"], env=env, cwd=tmp, capture_output=True, text=True)
    if out.returncode != 0:
        raise Failed(f"danbooru-assets run failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    log(f"single-machine `danbooru-assets run`: {time.perf_counter() - started:.1f}s")
    return storage


def kill_gpu_step(cluster: Cluster, shards: list[str]) -> dict[str, object]:
    """Kill the gpu worker's step process mid-step; the run must fail clearly, nothing be
    half-written; a new gpu worker joins and the same run completes."""
    dagster = cluster.dagster
    for asset in ("clip_embeddings", "image_stats"):  # so the step has every image to encode
        shutil.rmtree(cluster.storage / asset, ignore_errors=True)
    selection = ["clip_embeddings", "image_stats"]
    run_id = dagster.launch_run("__ASSET_JOB", asset_keys=selection, partition_range=(shards[0], shards[-1]))
    deadline = time.monotonic() + 300
    while "clip_embeddings_and_image_stats" not in cluster.executed_steps(run_id):
        if time.monotonic() > deadline or dagster.run_status(run_id)["status"] in {"SUCCESS", "FAILURE", "CANCELED"}:
            raise Failed(f"the gpu step of run {run_id[:8]} never started: {dagster.run_status(run_id)['status']}")
        time.sleep(0.2)
    worker = cluster.services.procs["worker-gpu"]
    celery_main = [c for c in children(worker.pid) if "celery" in cmdline(c)] or [worker.pid]
    step_processes = [c for main in celery_main for c in children(main)]
    check(bool(step_processes), f"found the gpu worker's step process(es) {step_processes}")
    for pid in step_processes:
        os.kill(pid, signal.SIGKILL)
    killed_at = time.time()
    log(f"SIGKILL to the gpu worker's step process {step_processes} while clip_embeddings_and_image_stats ran")
    result = dagster.wait_run(run_id, timeout=300)
    failed_after_s = time.time() - killed_at
    errors = " ".join(dagster.run_errors(run_id))
    check(result.status == "FAILURE", f"the run failed ({result.status}) {failed_after_s:.1f}s after the kill")
    check("WorkerLostError" in errors or "exited prematurely" in errors,
          f"its failure names the lost worker: {errors[:300]!r}")
    cluster.stop_worker("gpu")  # the machine is gone
    n_tables, broken = all_tables_read_whole(cluster.storage)
    temps = sorted(str(p.relative_to(cluster.storage)) for p in cluster.storage.rglob(".*.tmp-*"))
    check(not broken, f"all {n_tables} stored tables read whole after the kill" + (f"; broken: {broken}" if broken else "")
          + (f" (left-over temporaries, never read as tables: {temps})" if temps else ""))
    cluster.start_worker("gpu")  # a new gpu machine joins
    rerun = dagster.launch_run("__ASSET_JOB", asset_keys=selection, partition_range=(shards[0], shards[-1]))
    again = dagster.wait_run(rerun, timeout=600)
    check(again.success, f"the same run, launched again with a new gpu worker, succeeded in {again.wall_s:.1f}s")
    return {"failed_after_s": round(failed_after_s, 1), "rerun_s": round(again.wall_s, 1), "temporaries": len(temps)}


def main() -> int:
    for binary in (PG_BIN / "initdb", PG_BIN / "postgres"):
        if not binary.exists():
            print(f"deploy/smoke: {binary} missing: apt-get install postgresql", file=sys.stderr)
            return 2
    if shutil.which("redis-server") is None:
        print("deploy/smoke: redis-server missing: apt-get install redis-server", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="danbooru-smoke-"))
    (tmp / "logs").mkdir()
    services = Services(tmp / "logs")
    cluster = Cluster(tmp, services)
    figures: dict[str, object] = {}

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    ok = False
    try:
        sample_root = tmp / "sample"
        reference = reference_run(tmp, sample_root)
        shards = sorted(p.stem for p in (reference / "shard_index").glob("*.parquet"))
        check(bool(shards), f"the sample has shards: {shards[0]}…{shards[-1]} ({len(shards)})")
        cluster.start(sample_root)
        cluster.start_worker("cpu")
        cluster.start_worker("gpu")
        assets = cluster.whole_graph()

        # 1. two workers: routing and equality with the single-machine run
        two, run_ids = cluster.backfill(assets, shards, "two workers (cpu + gpu)")
        counts = assert_routing(cluster, run_ids, gpu_name="gpu", cpu_name="cpu")
        check(counts["gpu"] > 0 and counts["cpu"] > 0,
              f"{counts['gpu']} inference steps ran on the gpu worker, {counts['cpu']} other steps on the cpu worker")
        figures["tables compared"] = compare_tables(reference, cluster.storage)

        # 2. one worker serving both queues, same work on fresh storage
        cluster.stop_worker("cpu")
        cluster.stop_worker("gpu")
        shutil.rmtree(cluster.storage)
        cluster.start_worker("all")
        one, run_ids_one = cluster.backfill(assets, shards, "one worker (both queues)")
        assert_routing(cluster, run_ids_one, gpu_name="all", cpu_name="all")
        compare_tables(reference, cluster.storage)
        cluster.stop_worker("all")

        # 3. the gpu worker killed mid-step
        cluster.start_worker("cpu")
        cluster.start_worker("gpu")
        figures.update(kill_gpu_step(cluster, shards))
        compare_tables(reference, cluster.storage, only=("clip_embeddings", "image_stats"))
        figures.update(one_worker_s=round(one.seconds, 1), two_workers_s=round(two.seconds, 1),
                       one_worker_runs=one.n_runs, two_workers_runs=two.n_runs)
        ok = True
    except (Failed, Exception, KeyboardInterrupt) as exc:
        print(f"\nFAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        for name in ("code-server", "worker-cpu", "worker-gpu", "worker-all"):
            if (services.logs / f"{name}.log").exists():
                print(services.log_tail(name, 20), file=sys.stderr)
        if cluster.dagster is not None:
            print(cluster.dagster.log_tails(20), file=sys.stderr)
    finally:
        cluster.stop()
        if ok and not os.environ.get("SMOKE_KEEP"):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"logs and data kept in {tmp}", file=sys.stderr)
    if not ok:
        return 1
    print("\n=== deploy/smoke: everything held ===")
    print(f"whole-graph backfill over {len(shards)} sample shards, Postgres instance, Celery on Redis, this machine ({os.cpu_count()} cores):")
    print(f"  one worker (both queues)      : {figures['one_worker_s']:>6} s  ({figures['one_worker_runs']} runs)")
    print(f"  two workers (cpu + gpu queue) : {figures['two_workers_s']:>6} s  ({figures['two_workers_runs']} runs)")
    print(f"tables equal to the single-machine run: {figures['tables compared']} files")
    print(f"gpu step killed: run failed {figures['failed_after_s']} s after the kill; re-run with a new gpu worker {figures['rerun_s']} s")
    print(f"smoke total: {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
