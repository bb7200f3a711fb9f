"""A run killed (kill -9) inside a `gpu`-pool step frees its pool slot: the shipped
dagster.yaml turns on run monitoring, so the next pool step runs with no manual cleanup.

Real webserver + daemon on 127.0.0.1 (``LocalDagster``), a tiny code location whose one
asset sits in the `gpu` pool and sleeps on its first run, so the test can kill its run
worker inside the step.
"""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

from danbooru_assets.devtools.local_dagster import LocalDagster, Progress

# Starts a Dagster webserver and daemon: minutes, not seconds.
pytestmark = pytest.mark.slow

POOL_CODE = '''
import os, time
from pathlib import Path
import dagster as dg

MARKERS = Path(os.environ["POOL_TEST_DIR"])

@dg.asset(pool="gpu")
def pool_step(context) -> None:
    (MARKERS / f"pid-{context.run_id}").write_text(str(os.getpid()))
    if not (MARKERS / "killed-once").exists():
        time.sleep(300)  # the test kills this run's worker here

defs = dg.Definitions(assets=[pool_step], executor=dg.in_process_executor)
'''


@pytest.mark.skipif(sys.platform == "win32", reason="kill -9")
def test_a_killed_run_frees_its_gpu_pool_slot(tmp_path: Path):
    code = tmp_path / "pool_location.py"
    code.write_text(textwrap.dedent(POOL_CODE))
    workspace = tmp_path / "workspace.yaml"
    workspace.write_text(
        f"load_from:\n  - python_file:\n      relative_path: {code}\n      location_name: danbooru_assets\n"
    )
    markers = tmp_path / "markers"
    markers.mkdir()
    with LocalDagster(tmp_path / "home", env={"POOL_TEST_DIR": str(markers)}, workspace=workspace) as dagster:
        first = dagster.launch_run("__ASSET_JOB", ["pool_step"])
        pid_file = markers / f"pid-{first}"
        watch, cursor = Progress(), None  # waits while the run advances (queued, starting, …)
        while not pid_file.exists():
            status, cursor = dagster.run_progress(first, cursor)
            watch.update((status, cursor))
            assert not watch.expired(), f"the first run never reached its step ({status})\n{dagster.log_tails()}"
            time.sleep(0.2)
        (markers / "killed-once").write_text("")
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        assert dagster.wait_run(first).status == "FAILURE"

        started = time.monotonic()
        second = dagster.launch_run("__ASSET_JOB", ["pool_step"])
        result = dagster.wait_run(second)
        assert result.status == "SUCCESS", dagster.log_tails()
        print(f"second run succeeded {time.monotonic() - started:.1f}s after launch")
