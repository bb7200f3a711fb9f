"""Runs of ``danbooru-assets run`` whose process is gone, and waits on pool slots.

The CLI runs its jobs in its own process (``execute_in_process``) and has no daemon, so
nothing watches its runs: a CLI killed (kill -9, out of memory) inside a ``gpu``-pool step
left its run STARTED and holding the pool slot, and every later CLI run waited for that
slot forever, silently. So:

- every run the CLI launches carries its process as tags (:func:`cli_run_tags`: host, pid
  and the process's start time, which tells a reused pid apart);
- before launching, :func:`recover_dead_runs` marks the unfinished runs of this instance
  whose CLI process is gone as failed (``DagsterInstance.report_run_failed``) and frees
  their pool slots, and frees the slots still held by runs that already ended (the
  daemon's run monitoring does that after a delay; the CLI has no daemon);
- while a step of the CLI's run waits for a pool slot, :func:`reporting_pool_waits` says
  what it waits for and which run holds the slot, and recovers that run if its CLI
  process is gone.

Runs launched by the webserver or daemon (``dg dev``) are left to the daemon's run
monitoring (``dagster.yaml``); a run's process on another host cannot be checked from
here, so its runs are only named, never marked failed.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import uuid
from typing import Callable, Iterator

import dagster as dg

CLI_HOST_TAG = "danbooru/cli_host"
CLI_PID_TAG = "danbooru/cli_pid"
CLI_PROCESS_START_TAG = "danbooru/cli_process_start"
UNFINISHED = [
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]
# How often a waiting step's pool is looked at (a cheap read of the instance's storage).
WAIT_POLL_S = 2.0

Say = Callable[[str], None]


def _proc_stat(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat`` fields after the command name (Linux); None elsewhere or when gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    return text.rpartition(")")[2].split()


def process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot ("" where /proc has none): with
    the pid it names one process, even after the pid is reused."""
    fields = _proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else ""


def cli_run_tags() -> dict[str, str]:
    """Tags naming this process, for every run the CLI launches."""
    pid = os.getpid()
    return {CLI_HOST_TAG: socket.gethostname(), CLI_PID_TAG: str(pid), CLI_PROCESS_START_TAG: process_start(pid)}


def new_run_id() -> str:
    """A run id chosen before the run starts, so its waits can be watched (Dagster's own form)."""
    return str(uuid.uuid4())


def cli_process_gone(run: dg.DagsterRun) -> bool:
    """Whether ``run`` was launched by a CLI process of this host that no longer runs
    (exited, killed and left a zombie, or its pid now names another process)."""
    tags = run.tags
    if tags.get(CLI_HOST_TAG) != socket.gethostname() or not str(tags.get(CLI_PID_TAG, "")).isdigit():
        return False
    pid = int(tags[CLI_PID_TAG])
    if pid == os.getpid():
        # This very process: its own run is alive; one recorded under a reused pid is not.
        return bool(tags.get(CLI_PROCESS_START_TAG)) and tags[CLI_PROCESS_START_TAG] != process_start(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process of that pid: alive, maybe a reuse
        pass
    fields = _proc_stat(pid)
    if fields is None:
        return False  # no /proc to ask: alive as far as can be told
    if fields[0] in ("Z", "X"):  # killed, not yet reaped by its parent
        return True
    started = tags.get(CLI_PROCESS_START_TAG)
    return bool(started) and len(fields) > 19 and fields[19] != started


def describe_run(instance: dg.DagsterInstance, run_id: str) -> str:
    run = instance.get_run_by_id(run_id)
    if run is None:
        return f"run {run_id} (no longer in the instance)"
    tags = run.tags
    by = (
        f"danbooru-assets run, pid {tags[CLI_PID_TAG]} on {tags[CLI_HOST_TAG]}"
        if CLI_PID_TAG in tags
        else "launched by the webserver/daemon or another tool"
    )
    return f"run {run_id} ({run.job_name}, {run.status.value}, {by})"


def _fail_and_free(instance: dg.DagsterInstance, run: dg.DagsterRun, say: Say) -> None:
    tags = run.tags
    instance.report_run_failed(
        run,
        message=f"The danbooru-assets run process that ran it (pid {tags.get(CLI_PID_TAG)} on "
        f"{tags.get(CLI_HOST_TAG)}) is gone (killed or crashed); marked failed by a later danbooru-assets run, "
        "which freed its pool slots.",
    )
    instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
    say(
        f"  run {run.run_id} ({run.job_name}) was left {run.status.value} by a danbooru-assets run that is gone "
        f"(pid {tags.get(CLI_PID_TAG)}): marked failed, its pool slots freed"
    )


def recover_dead_runs(instance: dg.DagsterInstance, say: Say = print) -> list[str]:
    """Mark this host's unfinished CLI runs whose process is gone as failed and free
    their pool slots; free the slots held by runs that already ended. Returns the run
    ids whose slots were freed."""
    freed: list[str] = []
    runs = instance.get_runs(
        filters=dg.RunsFilter(statuses=UNFINISHED, tags={CLI_HOST_TAG: socket.gethostname()})
    )
    for run in runs:
        if cli_process_gone(run):
            _fail_and_free(instance, run, say)
            freed.append(run.run_id)
    storage = instance.event_log_storage
    for key in sorted(storage.get_concurrency_keys()):
        info = storage.get_concurrency_info(key)
        holders = {s.run_id for s in info.claimed_slots} | {p.run_id for p in info.pending_steps}
        for run_id in sorted(holders - set(freed)):
            run = instance.get_run_by_id(run_id)
            if run is None or run.is_finished:
                storage.free_concurrency_slots_for_run(run_id)
                freed.append(run_id)
                state = "gone from the instance" if run is None else run.status.value
                say(f"  freed the pool {key} slot still held by run {run_id} ({state})")
    return freed


def pool_wait_message(instance: dg.DagsterInstance, run_id: str, say: Say = print) -> str:
    """What ``run_id`` waits for ("" when it waits for no pool slot); a holder whose CLI
    process is gone is recovered on the way."""
    storage = instance.event_log_storage
    lines = []
    for key in sorted(storage.get_concurrency_keys()):
        info = storage.get_concurrency_info(key)
        waiting = [p.step_key for p in info.pending_steps if p.run_id == run_id and p.assigned_timestamp is None]
        if not waiting:
            continue
        holders = []
        for slot in info.claimed_slots:
            run = instance.get_run_by_id(slot.run_id)
            if run is not None and not run.is_finished and cli_process_gone(run):
                _fail_and_free(instance, run, say)
                continue
            if run is None or run.is_finished:
                storage.free_concurrency_slots_for_run(slot.run_id)
                continue
            holders.append(f"step {slot.step_key} of {describe_run(instance, slot.run_id)}")
        held = "; ".join(holders) or "nobody now (it is claimed next)"
        lines.append(
            f"  waiting: {', '.join(waiting)} needs a slot of pool '{key}' (limit {info.limit}), held by {held}"
        )
    return "\n".join(lines)


@contextlib.contextmanager
def reporting_pool_waits(
    instance: dg.DagsterInstance, run_id: str, say: Say = print, poll_s: float = WAIT_POLL_S
) -> Iterator[None]:
    """While the block runs ``run_id``, say whenever what it waits for changes."""
    stop = threading.Event()

    def watch() -> None:
        last = ""
        # Its own instance object: the run's thread keeps the caller's.
        with dg.DagsterInstance.from_ref(instance.get_ref()) as own:
            while not stop.wait(poll_s):
                try:
                    message = pool_wait_message(own, run_id, say)
                except Exception as exc:  # noqa: BLE001 - a report must never break the run
                    message = f"  (could not read the pool slots: {type(exc).__name__}: {exc})"
                if message and message != last:
                    say(message)
                last = message

    thread = threading.Thread(target=watch, name=f"pool-waits-{run_id[:8]}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
