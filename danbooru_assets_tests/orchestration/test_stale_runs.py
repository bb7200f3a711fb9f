"""A killed `danbooru-assets run` must not keep its `gpu` pool slot (issue 20, item 1).

The CLI has no daemon: its runs record their process (host, pid, start time), and the
next CLI run marks a run whose process is gone as failed and frees its slots; a run
waiting for a slot says which run holds it. Real SQLite instance with the project's
dagster.yaml (pool `gpu`, limit 1), real processes killed with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import dagster as dg
import pytest

from danbooru_assets.orchestration.stale_runs import (
    CLI_PID_TAG,
    cli_process_gone,
    cli_run_tags,
    new_run_id,
    recover_dead_runs,
    reporting_pool_waits,
)

POOL_JOB = '''
import os, sys, time
from pathlib import Path
import dagster as dg
from danbooru_assets.orchestration.stale_runs import cli_run_tags

@dg.asset(pool="gpu")
def pool_step(context) -> None:
    Path(os.environ["POOL_MARKER"]).write_text(context.run.run_id)
    time.sleep(float(os.environ.get("POOL_SLEEP", "0")))

defs = dg.Definitions(assets=[pool_step], jobs=[dg.define_asset_job("pool_job", [pool_step])])
'''


def _job():
    namespace: dict = {}
    exec(textwrap.dedent(POOL_JOB), namespace)
    return namespace["defs"].resolve_job_def("pool_job")


@pytest.fixture
def instance(tmp_path: Path, monkeypatch):
    from danbooru_assets import config

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    config.ensure_dagster_home()  # the project's dagster.yaml: pool gpu, limit 1
    with dg.DagsterInstance.get() as instance:
        yield instance


def _start_holder(tmp_path: Path) -> tuple[subprocess.Popen, str]:
    """A process running the pool step (as the CLI runs it), asleep inside it."""
    marker = tmp_path / "holder-run-id"
    code = POOL_JOB + (
        "\ndefs.resolve_job_def('pool_job').execute_in_process("
        "instance=dg.DagsterInstance.get(), tags=cli_run_tags())\n"
    )
    env = {**os.environ, "POOL_MARKER": str(marker), "POOL_SLEEP": "600"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    while not marker.exists() or not marker.read_text():
        assert proc.poll() is None, "the holder process ended before its step"
        time.sleep(0.1)
    return proc, marker.read_text()


@pytest.mark.skipif(sys.platform == "win32", reason="kill -9")
def test_a_killed_run_is_marked_failed_and_its_slot_freed_before_the_next(instance, tmp_path: Path, monkeypatch):
    proc, holder = _start_holder(tmp_path)
    assert instance.event_log_storage.get_concurrency_info("gpu").active_run_ids == {holder}
    assert recover_dead_runs(instance, say=lambda line: None) == []  # alive: left alone
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run = instance.get_run_by_id(holder)
    assert run.status == dg.DagsterRunStatus.STARTED and cli_process_gone(run)

    said: list[str] = []
    assert recover_dead_runs(instance, say=said.append) == [holder]
    assert instance.get_run_by_id(holder).status == dg.DagsterRunStatus.FAILURE
    assert instance.event_log_storage.get_concurrency_info("gpu").active_run_ids == set()
    assert f"pid {proc.pid}" in said[0] and "marked failed" in said[0]
    message = next(
        e.message for e in instance.all_logs(holder) if e.dagster_event and e.dagster_event.is_run_failure
    )
    assert "is gone" in message

    # The next run takes the slot at once.
    monkeypatch.setenv("POOL_MARKER", str(tmp_path / "next"))
    result = _job().execute_in_process(instance=instance, tags=cli_run_tags())
    assert result.success


@pytest.mark.skipif(sys.platform == "win32", reason="kill -9")
def test_a_waiting_run_names_the_holder_and_recovers_it_once_its_process_dies(instance, tmp_path: Path, monkeypatch):
    proc, holder = _start_holder(tmp_path)
    monkeypatch.setenv("POOL_MARKER", str(tmp_path / "waiter"))
    said: list[str] = []
    heard = threading.Event()

    def say(line: str) -> None:
        said.append(line)
        heard.set()

    run_id = new_run_id()
    outcome: dict = {}

    def waiter() -> None:
        with reporting_pool_waits(instance, run_id, say=say, poll_s=0.2):
            outcome["result"] = _job().execute_in_process(
                instance=instance, run_id=run_id, tags=cli_run_tags(), raise_on_error=False
            )

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    try:
        while not any(holder in line for line in said):
            assert thread.is_alive(), f"the waiting run ended while the slot was held: {said}"
            heard.wait(1)
            heard.clear()
        waiting = next(line for line in said if holder in line)
        assert "needs a slot of pool 'gpu' (limit 1), held by step pool_step of run" in waiting
        assert f"danbooru-assets run, pid {proc.pid}" in waiting
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    thread.join()  # the watcher sees the holder's process gone, frees the slot: the run goes on
    assert outcome["result"].success
    assert any("marked failed, its pool slots freed" in line and holder in line for line in said)
    assert instance.get_run_by_id(holder).status == dg.DagsterRunStatus.FAILURE


def test_runs_of_another_host_or_a_live_process_are_never_marked(instance):
    run = instance.create_run_for_job(_job(), tags={**cli_run_tags(), CLI_PID_TAG: str(os.getpid())})
    assert not cli_process_gone(run)
    other = instance.create_run_for_job(_job(), tags={**cli_run_tags(), "danbooru/cli_host": "elsewhere"})
    assert not cli_process_gone(other)
    reused = instance.create_run_for_job(
        _job(), tags={**cli_run_tags(), CLI_PID_TAG: str(os.getpid()), "danbooru/cli_process_start": "1"}
    )
    assert cli_process_gone(reused)  # the pid now names another process


def _cli_env(tmp_path: Path) -> dict[str, str]:
    from danbooru_assets.devtools.sample_data import generate_sample_dataset
    from danbooru_assets_tests.orchestration.test_ui_backfill import _env

    root = tmp_path / "dataset"
    generate_sample_dataset(root, n_images=60, n_shards=2, max_side=320)
    return {**os.environ, **_env(tmp_path, root)}


def _kill_cli_when(env: dict, tmp_path: Path, name: str, reached) -> str:
    """Start `danbooru-assets run`, kill -9 it once ``reached(instance, output)`` holds;
    return its output."""
    log = tmp_path / f"{name}.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "danbooru_assets.cli", "run"], env=env, cwd=tmp_path,
                                stdout=out, stderr=subprocess.STDOUT)
    with dg.DagsterInstance.get() as instance:
        while not reached(instance, log.read_text()):
            assert proc.poll() is None, f"the CLI ended before the kill point:\n{log.read_text()}"
            time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return log.read_text()


def _gpu_slot_held(step: str):
    def reached(instance, output: str) -> bool:
        return any(s.step_key == step for s in instance.event_log_storage.get_concurrency_info("gpu").claimed_slots)

    return reached


def _run_started(job_name: str):
    def reached(instance, output: str) -> bool:
        return bool(instance.get_runs(filters=dg.RunsFilter(job_name=job_name, statuses=[dg.DagsterRunStatus.STARTED])))

    return reached


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="kill -9")
def test_cli_killed_at_three_stages_then_the_next_run_completes(tmp_path: Path, monkeypatch):
    env = _cli_env(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    from danbooru_assets import config

    config.ensure_dagster_home()  # what the CLI does first; the test watches the same instance
    # 1. inside the CLIP step, holding the gpu slot
    _kill_cli_when(env, tmp_path, "one", _gpu_slot_held("clip_embeddings_and_image_stats"))
    # 2. in a stage without a pool step: its run STARTED, no slot held
    second = _kill_cli_when(env, tmp_path, "two", _run_started("clip_threshold_job"))
    assert "marked failed, its pool slots freed" in second  # the first run's slot
    # 3. inside the pose step, holding the gpu slot
    third = _kill_cli_when(env, tmp_path, "three", _gpu_slot_held("pose_keypoints"))
    assert "(clip_threshold_job) was left STARTED" in third and "marked failed" in third
    proc = subprocess.run([sys.executable, "-m", "danbooru_assets.cli", "run"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=1800)  # a hang fails, not blocks, the suite
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "(pose_job) was left STARTED" in proc.stdout and "done in" in proc.stdout
    with dg.DagsterInstance.get() as instance:
        unfinished = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
        assert unfinished == []
        assert instance.event_log_storage.get_concurrency_info("gpu").claimed_slots == []
