"""A real local Dagster deployment (webserver + daemon) for benchmarks and end-to-end tests.

:class:`LocalDagster` starts the webserver (``python -m dagster_webserver``) and the
daemon (this environment's ``dagster-daemon`` script, run by ``sys.executable``: it has no
public ``-m`` entry point) for this project's ``workspace.yaml`` as subprocesses, so the
same venv serves them; waits until the ``danbooru_assets`` code location is loaded and
the sensor, backfill and run-queue daemons are healthy; and gives small helpers over the
webserver's GraphQL API — the same API the UI calls when a person clicks "Materialize",
starts a sensor or opens a run::

    with LocalDagster(tmp / "dagster_home", env={"DANBOORU_ROOT": str(root), ...}) as dagster:
        backfill_id = dagster.launch_backfill(["clip_threshold", "clip_subset"], all_partitions=True)
        result = dagster.wait_backfill(backfill_id)  # as long as it advances
        print(result.status, result.seconds, result.n_runs)

It writes nothing into the repository: the instance (SQLite storage, run and compute
logs) lives in ``home`` (``DAGSTER_HOME``), into which the project's top-level
``dagster.yaml`` is copied unless one is already there, and the two servers' logs go to
``home/harness_logs/webserver.log`` and ``home/harness_logs/daemon.log`` (not ``home/logs/``,
which Dagster's telemetry uploader empties). On exit both process groups
(the servers and the code servers and run workers they spawn) get SIGTERM, then
SIGKILL after a grace period.

No dependency beyond the standard library: GraphQL is a plain ``urllib`` POST. The
queries follow the schema ``dagster_graphql`` serves (introspect a live server with
``{ __schema { types { name } } }`` to check a field).

Things worth knowing when reading timings taken through it:

- Runs go through the instance's run queue (``QueuedRunCoordinator``, the default), which
  the daemon's queue loop dequeues, and each run starts a fresh Python process that
  loads the code location: a run has seconds of fixed cost before its first step.
- Asset backfills are planned by the daemon's backfill loop, which wakes up every 30
  seconds (a constant in Dagster, not a setting), so "launch → first run" of a backfill
  includes up to that wait, every further wave of runs (e.g. the partitioned asset
  after its unpartitioned parent) waits for the next iteration, and so does marking the
  backfill completed after its last run. ``forceSynchronousSubmission`` is refused for
  asset backfills. A run launched directly (:meth:`LocalDagster.launch_run`, also over a
  partition range) skips that loop.
- Launching a run over N partitions first writes N ASSET_MATERIALIZATION_PLANNED events,
  and the run writes N materialization events: with SQLite storage, ~10–15 ms each.
- A sensor is evaluated no more often than its ``minimum_interval_seconds``, and the
  sensor daemon checks sensors every few seconds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Mapping

PROJECT_ROOT = Path(__file__).resolve().parents[2]
WORKSPACE_YAML = PROJECT_ROOT / "workspace.yaml"
PROJECT_DAGSTER_YAML = PROJECT_ROOT / "dagster.yaml"

LOCATION_NAME = "danbooru_assets"
REPOSITORY_NAME = "__repository__"
ASSET_JOB = "__ASSET_JOB"  # the implicit job that any asset selection can run in

FINISHED_RUN_STATUSES = frozenset({"SUCCESS", "FAILURE", "CANCELED"})
UNFINISHED_RUN_STATUSES = frozenset({"QUEUED", "NOT_STARTED", "STARTING", "STARTED", "CANCELING"})
FINISHED_BACKFILL_STATUSES = frozenset({"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"})
# The daemons this harness needs: sensors, backfills, and the run queue.
NEEDED_DAEMONS = ("SENSOR", "BACKFILL", "QUEUED_RUN_COORDINATOR")


class DagsterHarnessError(RuntimeError):
    """The deployment did not start, a GraphQL call failed, or a wait timed out."""


class GraphQLError(DagsterHarnessError):
    """A GraphQL response with ``errors`` or an error union member (PythonError, …)."""


# How long a wait goes on with nothing advancing (a status, a run's event log, a server's
# log, a command's output) before it gives up. Waits end on a stall, not on a deadline: a
# busy machine makes everything slower but keeps it moving, and a wait must not fail then.
DEFAULT_STALL_S = 300.0


class Progress:
    """The clock of a wait that ends on a stall: :meth:`update` with what is watched at each
    poll; :meth:`expired` says why to stop (``stall_s`` seconds since it last changed, or
    ``timeout`` seconds in all when a cap is given), else ``None``."""

    def __init__(self, stall_s: float = DEFAULT_STALL_S, timeout: float | None = None):
        self.stall_s = stall_s
        self.timeout = timeout
        self.started = self.changed = time.monotonic()
        self._last: Any = object()

    def update(self, state: Any) -> None:
        if state != self._last:
            self._last = state
            self.changed = time.monotonic()

    def expired(self) -> str | None:
        now = time.monotonic()
        if now - self.changed > self.stall_s:
            return f"no progress for {now - self.changed:.0f}s"
        if self.timeout is not None and now - self.started > self.timeout:
            return f"not done after {self.timeout:.0f}s"
        return None


def run_until_quiet(
    cmd: list[str], stall_s: float = DEFAULT_STALL_S, **popen: Any
) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` that waits as long as the
    command keeps printing (the CLI prints progress every few seconds) and kills it after
    ``stall_s`` seconds of silence, saying so at the end of its stderr."""
    import threading

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    out: dict[str, list[str]] = {"stdout": [], "stderr": []}
    last = [time.monotonic()]

    def pump(name: str, stream) -> None:
        for line in stream:
            out[name].append(line)
            last[0] = time.monotonic()

    threads = [threading.Thread(target=pump, args=(n, getattr(proc, n)), daemon=True) for n in out]
    for thread in threads:
        thread.start()
    killed = ""
    while proc.poll() is None:
        if time.monotonic() - last[0] > stall_s:
            proc.kill()
            killed = f"\n[run_until_quiet: killed after {stall_s:.0f}s without output]\n"
            break
        time.sleep(0.5)
    proc.wait()
    for thread in threads:
        thread.join(timeout=10)
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(out["stdout"]), "".join(out["stderr"]) + killed)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the OS picks it; a race is possible but rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def tail(path: Path, lines: int = 40, width: int = 400) -> str:
    """The last ``lines`` lines of a text file, each cut at ``width`` characters ('' when
    the file does not exist)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(line if len(line) <= width else line[:width] + " …" for line in text.splitlines()[-lines:])


def _console_script(name: str) -> Path:
    """A console script of this Python's environment (the venv's ``bin/``), run with
    ``sys.executable``. ``dagster-daemon`` has no public ``python -m`` entry point."""
    for folder in (Path(sysconfig.get_path("scripts")), Path(sys.executable).parent):
        if (folder / name).exists():
            return folder / name
    found = shutil.which(name)
    if found is None:
        raise DagsterHarnessError(f"{name} is not installed next to {sys.executable} (pip install dagster)")
    return Path(found)


def _asset_key(key: str | Iterable[str]) -> dict[str, list[str]]:
    """``"clip_subset"`` or ``"a/b"`` or ``["a", "b"]`` → ``AssetKeyInput``."""
    path = key.split("/") if isinstance(key, str) else list(key)
    return {"path": path}


def _tags(tags: Mapping[str, str] | None) -> list[dict[str, str]]:
    return [{"key": str(k), "value": str(v)} for k, v in (tags or {}).items()]


def _ms(value: str | float | None) -> float | None:
    """An event timestamp (milliseconds since the epoch, as a string) → seconds."""
    return None if value in (None, "") else float(value) / 1000.0


@dataclasses.dataclass(frozen=True)
class RunResult:
    """A finished (or timed-out) run. Times are seconds since the epoch; ``wall_s`` is
    from the moment :meth:`LocalDagster.wait_run` was called (or ``since``) to the end."""

    run_id: str
    status: str
    creation_time: float | None
    start_time: float | None
    end_time: float | None
    wall_s: float

    @property
    def success(self) -> bool:
        return self.status == "SUCCESS"


@dataclasses.dataclass(frozen=True)
class BackfillResult:
    """A finished (or timed-out) backfill: its status, when it was created and ended
    (seconds since the epoch), ``seconds`` from ``since`` to the end as seen by polling,
    and the runs it launched (``run_statuses``: status → count)."""

    backfill_id: str
    status: str
    created: float | None
    ended: float | None
    seconds: float
    n_runs: int
    run_statuses: dict[str, int]
    asset_statuses: list[dict[str, Any]]
    error: str | None = None

    @property
    def success(self) -> bool:
        # COMPLETED is the pre-1.8 name of COMPLETED_SUCCESS for asset backfills.
        return self.status in {"COMPLETED_SUCCESS", "COMPLETED"} and not self.run_statuses.keys() - {"SUCCESS"}


class LocalDagster:
    """``dagster-webserver`` + ``dagster-daemon`` for this project's workspace, as a context manager.

    ``home``: the ``DAGSTER_HOME`` (created; the project's ``dagster.yaml`` is copied in
    unless present). ``env``: extra environment for both servers, laid over
    ``os.environ`` (the DANBOORU_* variables pointing at a dataset, storage, settings…).
    ``workspace``: a workspace.yaml (default: the project's). ``cwd``: the servers'
    working directory (default ``home``), which is also where the code location's
    relative default paths (``data/…``) would resolve. ``daemon=False`` starts only the
    webserver (no sensors, backfills or queued runs then). ``startup_timeout``: seconds
    without progress (what is still missing, the servers' logs) after which starting
    gives up. ``grace_s``: SIGTERM → SIGKILL delay.
    """

    def __init__(
        self,
        home: Path,
        env: Mapping[str, str] | None = None,
        workspace: Path | None = None,
        *,
        cwd: Path | None = None,
        daemon: bool = True,
        startup_timeout: float = DEFAULT_STALL_S,
        grace_s: float = 10.0,
        host: str = "127.0.0.1",
        port: int | None = None,
    ):
        self.home = Path(home).resolve()
        self.env = dict(env or {})
        self.workspace = Path(workspace or WORKSPACE_YAML).resolve()
        self.cwd = Path(cwd).resolve() if cwd is not None else self.home
        self.daemon = daemon
        self.startup_timeout = startup_timeout
        self.grace_s = grace_s
        self.host = host
        self.port = port
        self.log_dir = self.home / "harness_logs"  # not logs/: Dagster's telemetry empties that folder
        self.webserver_log = self.log_dir / "webserver.log"
        self.daemon_log = self.log_dir / "daemon.log"
        self._procs: dict[str, subprocess.Popen] = {}
        self._log_files: list[Any] = []
        self.started_in_s: float | None = None  # seconds from start() to ready

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        if self.port is None:
            raise DagsterHarnessError("not started")
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "LocalDagster":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def process_env(self) -> dict[str, str]:
        env = {**os.environ, **self.env, "DAGSTER_HOME": str(self.home)}
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def start(self) -> "LocalDagster":
        """Start both servers and wait until the code location is loaded (and the daemons are healthy)."""
        if self._procs:
            raise DagsterHarnessError("already started")
        if not self.workspace.exists():
            raise DagsterHarnessError(f"workspace file {self.workspace} does not exist")
        t0 = time.perf_counter()
        self.home.mkdir(parents=True, exist_ok=True)
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if not (self.home / "dagster.yaml").exists() and PROJECT_DAGSTER_YAML.exists():
            shutil.copyfile(PROJECT_DAGSTER_YAML, self.home / "dagster.yaml")
        if self.port is None:
            self.port = free_port(self.host)
        env = self.process_env()
        # Create the instance's SQLite databases once, before the webserver, the daemon and
        # the code server all open a fresh home at the same moment and race on the schema
        # migration ("alembic_version has more than one head").
        subprocess.run(
            [sys.executable, "-c", "import dagster; dagster.DagsterInstance.get().dispose()"],
            cwd=self.cwd, env=env, check=True, capture_output=True, timeout=120,
        )
        commands = {
            "webserver": (
                [sys.executable, "-m", "dagster_webserver", "-h", self.host, "-p", str(self.port),
                 "-w", str(self.workspace)],
                self.webserver_log,
            ),
        }
        if self.daemon:
            commands["daemon"] = (
                [sys.executable, str(_console_script("dagster-daemon")), "run", "-w", str(self.workspace)],
                self.daemon_log,
            )
        try:
            for name, (cmd, log_path) in commands.items():
                log = open(log_path, "ab")
                self._log_files.append(log)
                log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
                log.flush()
                # A session of its own: stop() signals the whole group (code servers, run workers).
                self._procs[name] = subprocess.Popen(
                    cmd, cwd=self.cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True,
                )
            self.wait_ready(self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        self.started_in_s = time.perf_counter() - t0
        return self

    def stop(self) -> None:
        """SIGTERM both process groups, SIGKILL whatever is left after ``grace_s``."""
        procs = list(self._procs.values())
        for proc in procs:
            self._signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in procs:
            # The group leader may have exited while children (code servers) linger.
            self._signal_group(proc, signal.SIGKILL)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self._procs.clear()
        for log in self._log_files:
            log.close()
        self._log_files.clear()

    @staticmethod
    def _signal_group(proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)  # pgid == pid: started with start_new_session
        except (ProcessLookupError, PermissionError):
            pass

    def log_tails(self, lines: int = 40) -> str:
        """The end of both servers' logs, for error messages."""
        parts = [f"--- {self.webserver_log} (last {lines} lines)\n{tail(self.webserver_log, lines)}"]
        if self.daemon:
            parts.append(f"--- {self.daemon_log} (last {lines} lines)\n{tail(self.daemon_log, lines)}")
        return "\n".join(parts)

    def _check_alive(self) -> None:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise DagsterHarnessError(
                    f"dagster {name} exited with code {proc.returncode} (DAGSTER_HOME={self.home})\n"
                    + self.log_tails()
                )

    def wait_ready(self, stall_s: float) -> None:
        """Poll until GraphQL answers, the location is LOADED without a load error, and
        (with the daemon) the sensor, backfill and run-queue daemons are healthy. Gives up
        after ``stall_s`` seconds in which neither what is missing nor the servers' logs
        changed."""
        watch = Progress(stall_s)
        last = "the webserver did not answer yet"
        while True:
            self._check_alive()
            try:
                last = self._readiness()
                if not last:
                    return
            except (OSError, urllib.error.URLError, GraphQLError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            watch.update((last, self._log_sizes()))
            why = watch.expired()
            if why:
                raise DagsterHarnessError(
                    f"Dagster was not ready at {self.url}: {why} ({last}); "
                    f"DAGSTER_HOME={self.home}\n" + self.log_tails()
                )
            time.sleep(0.5)

    def _log_sizes(self) -> tuple[int, ...]:
        sizes = []
        for path in (self.webserver_log, self.daemon_log):
            try:
                sizes.append(path.stat().st_size)
            except OSError:
                sizes.append(-1)
        return tuple(sizes)

    def _readiness(self) -> str:
        """'' when ready, else what is still missing. A location load error raises at once."""
        data = self.graphql(
            """{ workspaceOrError { __typename
                  ... on Workspace { locationEntries { name loadStatus
                      locationOrLoadError { __typename ... on PythonError { message stack } } } }
                  ... on PythonError { message } } }""",
            timeout=10,
        )
        ws = data["workspaceOrError"]
        if ws["__typename"] != "Workspace":
            return f"workspace: {ws.get('message')}"
        entries = {e["name"]: e for e in ws["locationEntries"]}
        entry = entries.get(LOCATION_NAME)
        if entry is None:
            return f"no location {LOCATION_NAME!r} yet (have {sorted(entries)})"
        if entry["loadStatus"] != "LOADED":
            return f"location {LOCATION_NAME} is {entry['loadStatus']}"
        loaded = entry["locationOrLoadError"] or {}
        if loaded.get("__typename") == "PythonError":
            raise DagsterHarnessError(
                f"code location {LOCATION_NAME} failed to load: {loaded['message']}\n"
                + "".join(loaded.get("stack") or [])
                + "\n"
                + self.log_tails()
            )
        if self.daemon:
            statuses = self.daemon_statuses()
            sick = [d for d in NEEDED_DAEMONS if not statuses.get(d, {}).get("healthy")]
            if sick:
                return f"daemons not healthy yet: {sick}"
        return ""

    # ------------------------------------------------------------------ GraphQL
    def graphql(self, query: str, variables: Mapping[str, Any] | None = None, timeout: float = 60) -> dict:
        """POST a query; its ``data``, or :class:`GraphQLError` listing ``errors``."""
        body = json.dumps({"query": query, "variables": dict(variables or {})}).encode()
        req = urllib.request.Request(
            self.url + "/graphql", data=body, method="POST",
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                payload = json.loads(resp.read())
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")
            try:  # the server answers a failing resolver with HTTP 500 and a GraphQL body
                detail = "; ".join(e.get("message", str(e)) for e in json.loads(detail)["errors"])
            except (ValueError, KeyError, TypeError):
                detail = detail[:2000]
            raise GraphQLError(f"HTTP {err.code} from {self.url}/graphql: {detail}") from err
        if payload.get("errors"):
            raise GraphQLError("; ".join(e.get("message", str(e)) for e in payload["errors"]))
        return payload["data"]

    @staticmethod
    def _ok(result: dict, expected: str, what: str) -> dict:
        """An ``…OrError`` union member, or :class:`GraphQLError` with its message."""
        if result.get("__typename") != expected:
            message = result.get("message") or json.dumps(result)[:2000]
            stack = "".join(result.get("stack") or [])
            raise GraphQLError(f"{what}: {result.get('__typename')}: {message}\n{stack}".rstrip())
        return result

    def daemon_statuses(self) -> dict[str, dict]:
        """``{daemonType: {"healthy": …, "required": …, "lastHeartbeatTime": …}}``."""
        data = self.graphql(
            "{ instance { daemonHealth { allDaemonStatuses { daemonType required healthy lastHeartbeatTime } } } }",
            timeout=10,
        )
        return {d["daemonType"]: d for d in data["instance"]["daemonHealth"]["allDaemonStatuses"]}

    def dismiss_onboarding(self) -> None:
        """Mark the UI's first-visit "Join the Dagster community" dialog as seen (a browser
        opening the UI would otherwise find it covering the page)."""
        self.graphql("mutation { setNuxSeen }")

    def reload_location(self) -> None:
        """Reload the code location (after a settings change: code versions derive from it)."""
        data = self.graphql(
            """mutation($name: String!) { reloadRepositoryLocation(repositoryLocationName: $name) {
                 __typename ... on WorkspaceLocationEntry { loadStatus }
                 ... on PythonError { message stack } ... on UnauthorizedError { message }
                 ... on ReloadNotSupported { message } ... on RepositoryLocationNotFound { message } } }""",
            {"name": LOCATION_NAME},
        )
        self._ok(data["reloadRepositoryLocation"], "WorkspaceLocationEntry", "reloadRepositoryLocation")
        self.wait_ready(self.startup_timeout)

    # ------------------------------------------------------------------ backfills
    def launch_backfill(
        self,
        asset_keys: list[str],
        partition_names: list[str] | None = None,
        all_partitions: bool = False,
        tags: Mapping[str, str] | None = None,
        title: str | None = None,
    ) -> str:
        """Launch an asset backfill; returns the backfill id. Give ``partition_names`` or
        ``all_partitions``. The UI's Materialize dialog sends ``partitionNames`` (all 1,000
        keys when "All" is chosen) with the tag ``dagster/from_ui=true``; pass the keys
        from :meth:`partition_keys` to do exactly what it does."""
        if (partition_names is None) == (not all_partitions):
            raise ValueError("give either partition_names or all_partitions=True")
        params: dict[str, Any] = {"assetSelection": [_asset_key(k) for k in asset_keys], "tags": _tags(tags)}
        if all_partitions:
            params["allPartitions"] = True
        else:
            params["partitionNames"] = list(partition_names or [])
        if title:
            params["title"] = title
        data = self.graphql(
            """mutation($params: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $params) {
                 __typename ... on LaunchBackfillSuccess { backfillId launchedRunIds }
                 ... on Error { message } ... on PythonError { stack } } }""",
            {"params": params},
        )
        return self._ok(data["launchPartitionBackfill"], "LaunchBackfillSuccess", "launchPartitionBackfill")[
            "backfillId"
        ]

    def cancel_backfill(self, backfill_id: str, terminate_runs: bool = True, timeout: float = 120.0) -> int:
        """Cancel a backfill (no further runs) and, with ``terminate_runs``, terminate its
        unfinished runs until none is left or ``timeout`` passes (the daemon may still be
        submitting a batch when the cancel lands; queued runs are canceled at once).
        Returns how many runs were terminated."""
        data = self.graphql(
            """mutation($id: String!) { cancelPartitionBackfill(backfillId: $id) { __typename
                 ... on CancelBackfillSuccess { backfillId } ... on Error { message } ... on PythonError { stack } } }""",
            {"id": backfill_id},
        )
        self._ok(data["cancelPartitionBackfill"], "CancelBackfillSuccess", f"cancel backfill {backfill_id}")
        if not terminate_runs:
            return 0
        terminated = 0
        deadline = time.monotonic() + timeout
        while True:
            unfinished = self.runs({"tags": [{"key": "dagster/backfill", "value": backfill_id}],
                                    "statuses": sorted(UNFINISHED_RUN_STATUSES - {"CANCELING"})}, limit=10000)
            status = self.backfill_status(backfill_id)["status"]
            if (not unfinished and status in FINISHED_BACKFILL_STATUSES) or time.monotonic() > deadline:
                return terminated
            terminated += self.terminate_runs([r["runId"] for r in unfinished])
            time.sleep(1.0)

    _BACKFILL_FIELDS = """
        __typename
        ... on PartitionBackfill {
          id status numPartitions timestamp endTimestamp title
          error { message stack }
          runs { runId status startTime endTime }
          assetBackfillData { assetBackfillStatuses { __typename
            ... on AssetPartitionsStatusCounts { assetKey { path } numPartitionsTargeted
                numPartitionsInProgress numPartitionsMaterialized numPartitionsFailed }
            ... on UnpartitionedAssetStatus { assetKey { path } inProgress materialized failed } } }
        }
        ... on Error { message }
        ... on PythonError { stack }
    """

    def backfill_status(self, backfill_id: str) -> dict[str, Any]:
        """The backfill as GraphQL returns it: ``status`` (BulkActionStatus), ``timestamp``,
        ``endTimestamp``, ``runs`` (id, status, times), per-asset ``assetBackfillData``."""
        data = self.graphql(
            "query($id: String!) { partitionBackfillOrError(backfillId: $id) { %s } }" % self._BACKFILL_FIELDS,
            {"id": backfill_id},
        )
        return self._ok(data["partitionBackfillOrError"], "PartitionBackfill", f"backfill {backfill_id}")

    def wait_backfill(
        self,
        backfill_id: str,
        timeout: float | None = None,
        poll_s: float = 1.0,
        since: float | None = None,
        stall_s: float = DEFAULT_STALL_S,
    ) -> BackfillResult:
        """Poll until the backfill finishes (COMPLETED_SUCCESS, COMPLETED_FAILED, FAILED,
        CANCELED) and all its runs have ended, as long as it advances: it gives up after
        ``stall_s`` seconds in which neither the backfill, nor its runs' statuses, nor any
        unfinished run's event log changed (or after ``timeout`` seconds in all, when a cap
        is given). The result then has the status seen last (``STALLED (…)``/``TIMEOUT
        (…)``; check ``.success``). ``since``: ``time.time()`` of the launch, for
        ``seconds`` (default: now)."""
        since = time.time() if since is None else since
        watch = Progress(stall_s, timeout)
        cursors: dict[str, str | None] = {}
        while True:
            self._check_alive()
            state = self.backfill_status(backfill_id)
            runs = state.get("runs") or []
            done = state["status"] in FINISHED_BACKFILL_STATUSES and all(
                r["status"] in FINISHED_RUN_STATUSES for r in runs
            )
            for r in runs:
                if r["status"] not in FINISHED_RUN_STATUSES:
                    cursors[r["runId"]] = self._event_cursor(r["runId"], cursors.get(r["runId"]))
            watch.update((
                state["status"],
                sorted((r["runId"], r["status"]) for r in runs),
                json.dumps(state.get("assetBackfillData"), sort_keys=True, default=str),
                sorted(cursors.items()),
            ))
            why = None if done else watch.expired()
            if done or why:
                counts: dict[str, int] = {}
                for r in runs:
                    counts[r["status"]] = counts.get(r["status"], 0) + 1
                ended = state.get("endTimestamp")
                return BackfillResult(
                    backfill_id=backfill_id,
                    status=state["status"] if done else f"{_stopped(why)} ({state['status']})",
                    created=state.get("timestamp"),
                    ended=ended,
                    seconds=(ended if done and ended else time.time()) - since,
                    n_runs=len(runs),
                    run_statuses=counts,
                    asset_statuses=(state.get("assetBackfillData") or {}).get("assetBackfillStatuses") or [],
                    error=(state.get("error") or {}).get("message") or (None if done else why),
                )
            time.sleep(poll_s)

    # ------------------------------------------------------------------ runs
    def launch_run(
        self,
        job_name: str,
        asset_keys: list[str] | None = None,
        partition_key: str | None = None,
        tags: Mapping[str, str] | None = None,
        run_config: Mapping[str, Any] | None = None,
        partition_range: tuple[str, str] | None = None,
    ) -> str:
        """Launch (enqueue) a run of ``job_name`` (``__ASSET_JOB`` runs any asset selection),
        optionally for one partition (tag ``dagster/partition``) or one range of partitions
        ``(first, last)`` in a single run (tags ``dagster/asset_partition_range_start``/``_end``,
        what a single-run backfill sets); returns the run id."""
        if partition_key is not None and partition_range is not None:
            raise ValueError("give partition_key or partition_range, not both")
        all_tags = dict(tags or {})
        if partition_key is not None:
            all_tags["dagster/partition"] = partition_key
        if partition_range is not None:
            all_tags["dagster/asset_partition_range_start"], all_tags["dagster/asset_partition_range_end"] = (
                partition_range
            )
        selector: dict[str, Any] = {
            "repositoryLocationName": LOCATION_NAME,
            "repositoryName": REPOSITORY_NAME,
            "jobName": job_name,
        }
        if asset_keys:
            selector["assetSelection"] = [_asset_key(k) for k in asset_keys]
        params: dict[str, Any] = {"selector": selector, "executionMetadata": {"tags": _tags(all_tags)}}
        if run_config:
            params["runConfigData"] = dict(run_config)
        data = self.graphql(
            """mutation($params: ExecutionParams!) { launchRun(executionParams: $params) {
                 __typename ... on LaunchRunSuccess { run { runId status } }
                 ... on Error { message } ... on PythonError { stack }
                 ... on RunConfigValidationInvalid { errors { message } } } }""",
            {"params": params},
        )
        result = data["launchRun"]
        if result.get("__typename") == "RunConfigValidationInvalid":
            raise GraphQLError("launchRun: invalid run config: " + "; ".join(e["message"] for e in result["errors"]))
        return self._ok(result, "LaunchRunSuccess", f"launchRun {job_name}")["run"]["runId"]

    def terminate_runs(self, run_ids: list[str], chunk: int = 200) -> int:
        """Terminate runs (queued ones become CANCELED at once); returns how many the
        server reported as terminated."""
        done = 0
        for i in range(0, len(run_ids), chunk):
            data = self.graphql(
                """mutation($ids: [String!]!) { terminateRuns(runIds: $ids) { __typename
                     ... on TerminateRunsResult { terminateRunResults { __typename } }
                     ... on PythonError { message stack } } }""",
                {"ids": run_ids[i : i + chunk]},
            )
            result = self._ok(data["terminateRuns"], "TerminateRunsResult", "terminateRuns")
            done += sum(r["__typename"] == "TerminateRunSuccess" for r in result["terminateRunResults"])
        return done

    _RUN_FIELDS = "runId status jobName creationTime startTime endTime tags { key value }"

    def run_status(self, run_id: str) -> dict[str, Any]:
        """``{"runId", "status", "jobName", "creationTime", "startTime", "endTime", "tags"}``."""
        data = self.graphql(
            "query($id: ID!) { runOrError(runId: $id) { __typename ... on Run { %s } ... on Error { message } "
            "... on PythonError { stack } } }" % self._RUN_FIELDS,
            {"id": run_id},
        )
        return self._ok(data["runOrError"], "Run", f"run {run_id}")

    def wait_run(
        self,
        run_id: str,
        timeout: float | None = None,
        poll_s: float = 0.25,
        since: float | None = None,
        stall_s: float = DEFAULT_STALL_S,
    ) -> RunResult:
        """Poll until the run ends (SUCCESS, FAILURE, CANCELED), as long as it advances: it
        gives up after ``stall_s`` seconds in which neither its status nor its event log
        changed (status ``STALLED (…)``), or after ``timeout`` seconds in all when a cap is
        given (``TIMEOUT (…)``). ``wall_s`` counts from ``since`` (default: now)."""
        since = time.time() if since is None else since
        watch = Progress(stall_s, timeout)
        cursor = None
        while True:
            self._check_alive()
            run = self.run_status(run_id)
            done = run["status"] in FINISHED_RUN_STATUSES
            if not done:
                cursor = self._event_cursor(run_id, cursor)
            watch.update((run["status"], cursor))
            why = None if done else watch.expired()
            if done or why:
                end = run.get("endTime")
                return RunResult(
                    run_id=run_id,
                    status=run["status"] if done else f"{_stopped(why)} ({run['status']})",
                    creation_time=run.get("creationTime"),
                    start_time=run.get("startTime"),
                    end_time=end,
                    wall_s=(end if done and end else time.time()) - since,
                )
            time.sleep(poll_s)

    def _event_cursor(self, run_id: str, after: str | None) -> str | None:
        """The cursor of the run's last event (``after`` when nothing new): a cheap way to
        see that a run is still writing events (progress lines every few seconds)."""
        data = self.graphql(
            """query($id: ID!, $after: String) { logsForRun(runId: $id, afterCursor: $after, limit: 1000) {
                 __typename ... on EventConnection { cursor } ... on Error { message } ... on PythonError { stack } } }""",
            {"id": run_id, "after": after},
        )
        conn = data["logsForRun"]
        return conn.get("cursor") or after if conn.get("__typename") == "EventConnection" else after

    def run_progress(self, run_id: str, after: str | None = None) -> tuple[str, str | None]:
        """``(status, event cursor)``: what :class:`Progress` watches for one run."""
        return self.run_status(run_id)["status"], self._event_cursor(run_id, after)

    def runs(self, filter: Mapping[str, Any] | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Runs matching a ``RunsFilter`` (e.g. ``{"statuses": ["FAILURE"]}``,
        ``{"tags": [{"key": "dagster/backfill", "value": id}]}``), newest first."""
        data = self.graphql(
            "query($f: RunsFilter, $n: Int) { runsOrError(filter: $f, limit: $n) { __typename "
            "... on Runs { results { %s } } ... on Error { message } ... on PythonError { stack } } }"
            % self._RUN_FIELDS,
            {"f": dict(filter) if filter else None, "n": limit},
        )
        return self._ok(data["runsOrError"], "Runs", "runsOrError")["results"]

    def run_events(self, run_id: str, limit: int = 1000) -> list[dict[str, Any]]:
        """Every event of a run: ``{"eventType", "timestamp" (s), "stepKey", "message"}``, and
        ``"error": {"message"}`` (or None) on failure and engine events, ``"assetKey"`` and
        ``"partition"`` on materializations."""
        events: list[dict[str, Any]] = []
        cursor = None
        while True:
            data = self.graphql(
                """query($id: ID!, $after: String, $n: Int) { logsForRun(runId: $id, afterCursor: $after, limit: $n) {
                     __typename ... on EventConnection { cursor hasMore
                       events { __typename ... on MessageEvent { eventType timestamp stepKey message }
                                ... on ErrorEvent { error { message } }
                                ... on MaterializationEvent { assetKey { path } partition } } }
                     ... on Error { message } ... on PythonError { stack } } }""",
                {"id": run_id, "after": cursor, "n": limit},
            )
            conn = self._ok(data["logsForRun"], "EventConnection", f"logsForRun {run_id}")
            for e in conn["events"]:
                if "timestamp" in e:
                    events.append({**e, "timestamp": _ms(e["timestamp"])})
            if not conn["hasMore"] or not conn["events"]:
                return events
            cursor = conn["cursor"]

    def run_errors(self, run_id: str) -> list[str]:
        """Why a run failed: the error messages of its step-failure and run-failure events."""
        return [
            f"{e.get('stepKey') or 'run'}: {e['message']} {(e.get('error') or {}).get('message', '')}".strip()
            for e in self.run_events(run_id)
            if e.get("eventType") in {"STEP_FAILURE", "RUN_FAILURE"}
        ]

    def run_events_times(self, run_id: str) -> dict[str, float | None]:
        """Seconds since the epoch of a run's milestones, for overhead breakdowns:
        ``created`` (the run record), ``RUN_ENQUEUED``, ``RUN_DEQUEUED``, ``RUN_STARTING``,
        ``RUN_START`` (the run worker process is up and has loaded the code),
        ``first_STEP_WORKER_STARTING`` (the multiprocess executor starts a process per step;
        None with the in-process executor), ``first_STEP_START``,
        ``first_/last_ASSET_MATERIALIZATION`` (of a partition), ``last_STEP_SUCCESS``,
        ``RUN_SUCCESS`` / ``RUN_FAILURE``; and ``n_materializations`` (partitions
        materialized, a count). Between ``created`` and
        ``RUN_ENQUEUED`` the launcher writes one ASSET_MATERIALIZATION_PLANNED event per
        asset partition, and every partition's materialization is an event too: with
        SQLite storage those writes are a large part of a run over many partitions."""
        times: dict[str, float | None] = {"created": self.run_status(run_id).get("creationTime")}
        for name in ("RUN_ENQUEUED", "RUN_DEQUEUED", "RUN_STARTING", "RUN_START", "first_STEP_WORKER_STARTING",
                     "first_STEP_START", "first_ASSET_MATERIALIZATION", "last_ASSET_MATERIALIZATION",
                     "last_STEP_SUCCESS", "RUN_SUCCESS", "RUN_FAILURE"):
            times[name] = None
        n_materializations = 0
        for e in self.run_events(run_id):
            kind, ts = e.get("eventType"), e["timestamp"]
            if kind == "ASSET_MATERIALIZATION" and e.get("partition") is not None:
                n_materializations += 1
                times["last_ASSET_MATERIALIZATION"] = ts
                if times["first_ASSET_MATERIALIZATION"] is None:
                    times["first_ASSET_MATERIALIZATION"] = ts
            elif kind == "STEP_WORKER_STARTING" and times["first_STEP_WORKER_STARTING"] is None:
                times["first_STEP_WORKER_STARTING"] = ts
            elif kind == "STEP_START" and times["first_STEP_START"] is None:
                times["first_STEP_START"] = ts
            elif kind == "STEP_SUCCESS":
                times["last_STEP_SUCCESS"] = ts
            elif kind in times and times[kind] is None:
                times[kind] = ts
        times["n_materializations"] = float(n_materializations)
        return times

    # ------------------------------------------------------------------ assets
    def materializations(
        self, asset_key: str, partitions: list[str] | None = None, after: float | None = None, limit: int = 10000
    ) -> list[dict[str, Any]]:
        """Materializations of an asset (optionally only those partitions, only after
        ``after`` seconds since the epoch): ``{"partition", "runId", "timestamp" (s)}``,
        newest first; the server returns at most 10,000 per call."""
        data = self.graphql(
            """query($key: AssetKeyInput!, $parts: [String!], $after: String, $n: Int) {
                 assetOrError(assetKey: $key) { __typename
                   ... on Asset { assetMaterializations(partitions: $parts, afterTimestampMillis: $after, limit: $n) {
                       partition runId timestamp } }
                   ... on AssetNotFoundError { message } } }""",
            {"key": _asset_key(asset_key), "parts": partitions,
             "after": None if after is None else str(int(after * 1000)), "n": limit},
        )
        result = data["assetOrError"]
        if result["__typename"] == "AssetNotFoundError":
            return []  # never materialized
        return [{**m, "timestamp": _ms(m["timestamp"])} for m in result["assetMaterializations"]]

    def partition_keys(self, asset_key: str) -> list[str]:
        """Every partition key of a partitioned asset ([] for an unpartitioned one), in order."""
        data = self.graphql(
            """query($key: AssetKeyInput!) { assetNodeOrError(assetKey: $key) { __typename
                 ... on AssetNode { partitionKeys } ... on Error { message } } }""",
            {"key": _asset_key(asset_key)},
        )
        return self._ok(data["assetNodeOrError"], "AssetNode", f"asset {asset_key}")["partitionKeys"]

    # ------------------------------------------------------------------ sensors
    @staticmethod
    def _sensor_selector(name: str) -> dict[str, str]:
        return {"repositoryLocationName": LOCATION_NAME, "repositoryName": REPOSITORY_NAME, "sensorName": name}

    def sensor(self, name: str) -> dict[str, Any]:
        """The sensor: ``minIntervalSeconds``, ``sensorState { id status }``."""
        data = self.graphql(
            """query($s: SensorSelector!) { sensorOrError(sensorSelector: $s) { __typename
                 ... on Sensor { id name minIntervalSeconds sensorState { id selectorId status } }
                 ... on Error { message } ... on PythonError { stack } } }""",
            {"s": self._sensor_selector(name)},
        )
        return self._ok(data["sensorOrError"], "Sensor", f"sensor {name}")

    def start_sensor(self, name: str) -> dict[str, Any]:
        """Turn a sensor on (the UI's toggle); returns its state ``{"id", "status"}``."""
        data = self.graphql(
            """mutation($s: SensorSelector!) { startSensor(sensorSelector: $s) { __typename
                 ... on Sensor { sensorState { id selectorId status } }
                 ... on Error { message } ... on PythonError { stack } } }""",
            {"s": self._sensor_selector(name)},
        )
        return self._ok(data["startSensor"], "Sensor", f"startSensor {name}")["sensorState"]

    def stop_sensor(self, name: str) -> dict[str, Any]:
        """Turn a sensor off; returns its state ``{"id", "status"}``."""
        state = self.sensor(name)["sensorState"]
        data = self.graphql(
            """mutation($id: String) { stopSensor(id: $id) { __typename
                 ... on StopSensorMutationResult { instigationState { id status } }
                 ... on UnauthorizedError { message } ... on PythonError { message stack } } }""",
            {"id": state["id"]},
        )
        return self._ok(data["stopSensor"], "StopSensorMutationResult", f"stopSensor {name}")["instigationState"]

    def sensor_ticks(self, name: str, limit: int = 50) -> list[dict[str, Any]]:
        """The sensor's recent ticks, newest first: ``{"tickId", "status" (STARTED, SKIPPED,
        SUCCESS, FAILURE), "timestamp", "endTimestamp", "runIds", "runKeys", "skipReason", "error"}``."""
        data = self.graphql(
            """query($s: SensorSelector!, $n: Int) { sensorOrError(sensorSelector: $s) { __typename
                 ... on Sensor { sensorState { ticks(limit: $n) {
                     tickId status timestamp endTimestamp runIds runKeys skipReason error { message } } } }
                 ... on Error { message } ... on PythonError { stack } } }""",
            {"s": self._sensor_selector(name), "n": limit},
        )
        return self._ok(data["sensorOrError"], "Sensor", f"sensor {name}")["sensorState"]["ticks"]


def _stopped(why: str | None) -> str:
    return "TIMEOUT" if why and why.startswith("not done") else "STALLED"


__all__ = [
    "ASSET_JOB",
    "DEFAULT_STALL_S",
    "Progress",
    "run_until_quiet",
    "BackfillResult",
    "DagsterHarnessError",
    "GraphQLError",
    "LOCATION_NAME",
    "LocalDagster",
    "REPOSITORY_NAME",
    "RunResult",
    "free_port",
    "tail",
]
