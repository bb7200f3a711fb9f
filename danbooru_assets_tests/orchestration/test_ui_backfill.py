"""The Dagster UI end to end: a person opens ``clip_subset``'s asset page, clicks
"Materialize…", chooses all partitions and launches the backfill; every shard's
``clip_subset`` is materialized again.

A real local deployment (:class:`danbooru_assets.devtools.local_dagster.LocalDagster`: webserver
+ daemon, instance under ``tmp_path``) over a tiny sample dataset that the main job
(``danbooru-assets run``) has materialized first, driven in headless Chromium through
Playwright. It skips with a reason where Chromium or Playwright is missing. It waits on
progress, not on a deadline: as long as the backfill or its runs advance.

Screenshots of the asset page, the dialog, the page after the launch and the partitions
view after the backfill go to ``tmp_path`` and, when ``DANBOORU_UI_SCREENSHOTS=DIR`` is
set, are copied to ``DIR`` for a person to look at. It takes a minute or two: the main
job runs first, and Dagster's backfill daemon plans a backfill's runs only every 30 s.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from danbooru_assets.devtools.local_dagster import DEFAULT_STALL_S, LocalDagster, run_until_quiet
from danbooru_assets.devtools.sample_data import KEYPOINTS_TARBALL, generate_sample_dataset

# Starts a Dagster webserver, daemon and Chromium: minutes, not seconds.
pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
# Every wait here lasts as long as something advances (the backfill, its runs' event logs,
# the main job's output) and gives up only after this long with no progress at all: a
# loaded CI box makes the test slower, never failed (it once timed out at a fixed 240 s).
STALL_S = DEFAULT_STALL_S


def _browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"chromium not installed at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")
    return sync_api


def _env(base: Path, root: Path) -> dict[str, str]:
    """Everything inside ``base``; DANBOORU_ROOT set means a real dataset, so the demo
    CLIP model and the sample's published keypoints are asked for explicitly."""
    return {
        "DANBOORU_ROOT": str(root),
        "DANBOORU_STORAGE": str(base / "storage"),
        "DANBOORU_SETTINGS": str(base / "settings.yaml"),
        "DANBOORU_LABELS": str(base / "labels.sqlite"),
        "DAGSTER_HOME": str(base / "dagster_home"),
        "DANBOORU_CLIP_MODEL": "danbooru-demo-tiny",
        "DANBOORU_CLIP_PRETRAINED": "",
        "DANBOORU_KEYPOINTS": str(root / KEYPOINTS_TARBALL),
    }


def _failed_runs_explained(dagster: LocalDagster, backfill_id: str, limit: int = 3) -> str:
    failed = dagster.runs({"tags": [{"key": "dagster/backfill", "value": backfill_id}], "statuses": ["FAILURE"]})
    lines = [f"{len(failed)} failed runs"]
    for run in failed[:limit]:
        tags = {t["key"]: t["value"] for t in run["tags"]}
        partitions = tags.get("dagster/partition") or "{}..{}".format(
            tags.get("dagster/asset_partition_range_start"), tags.get("dagster/asset_partition_range_end"))
        lines.append(f"run {run['runId']} (partitions {partitions}): {' | '.join(dagster.run_errors(run['runId']))[:1500]}")
    return "\n".join(lines)


def test_materialize_all_partitions_from_the_asset_page(tmp_path: Path) -> None:
    sync_api = _browser()
    summary = generate_sample_dataset(tmp_path / "sample", n_images=40, n_shards=4, max_side=300)
    env = _env(tmp_path, summary.root)
    work = tmp_path / "work"  # the processes' working directory: relative defaults land here
    work.mkdir()
    main = run_until_quiet(
        [sys.executable, "-m", "danbooru_assets.cli", "run"], STALL_S, cwd=work, env={**os.environ, **env}
    )
    assert main.returncode == 0, f"danbooru-assets run failed:\n{main.stdout[-3000:]}\n{main.stderr[-3000:]}"

    shots: list[Path] = []

    def shoot(page, name: str) -> None:
        shots.append(tmp_path / name)
        page.screenshot(path=str(shots[-1]))

    try:
        with LocalDagster(tmp_path / "dagster_home", env, cwd=work) as dagster, sync_api.sync_playwright() as pw:
            dagster.dismiss_onboarding()  # the first-visit dialog would cover the page
            partition_keys = dagster.partition_keys("clip_subset")
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(STALL_S * 1000)  # an action waits as long as a stall would
            try:
                page.goto(dagster.url + "/assets/clip_subset")
                materialize = page.get_by_role("button", name="Materialize")  # "Materialize…" here
                materialize.first.wait_for()
                page.get_by_text("Latest materialization").first.wait_for()
                shoot(page, "ui_asset_page.png")

                clicked = time.time()
                materialize.first.click()
                dialog = page.get_by_role("dialog")
                dialog.get_by_text("Launch runs to materialize").wait_for()
                dialog.get_by_role("button", name="All", exact=True).click()
                dialog.get_by_text(f"{len(partition_keys):,} partitions").wait_for()
                shoot(page, "ui_materialize_dialog.png")

                def is_launch(response) -> bool:
                    body = response.request.post_data or ""
                    return "/graphql" in response.url and "launchPartitionBackfill" in body

                with page.expect_response(is_launch) as launched:
                    dialog.get_by_role("button", name="Launch backfill").click()
                request = json.loads(launched.value.request.post_data)["variables"]["backfillParams"]
                answer = launched.value.json()["data"]["launchPartitionBackfill"]
                page.wait_for_timeout(1500)  # let the page show the launch
                shoot(page, "ui_after_launch.png")

                assert answer["__typename"] == "LaunchBackfillSuccess", answer
                # the dialog asked for every partition of clip_subset (and nothing else)
                assert request["assetSelection"] == [{"path": ["clip_subset"]}]
                assert request.get("allPartitions") or sorted(request["partitionNames"]) == sorted(partition_keys)
                backfill_id = answer["backfillId"]

                result = dagster.wait_backfill(backfill_id, since=clicked, stall_s=STALL_S)
                page.goto(f"{dagster.url}/assets/clip_subset?view=partitions")
                page.wait_for_timeout(3000)
                shoot(page, "ui_partitions_after_backfill.png")
            except Exception:
                shoot(page, "ui_failure.png")  # what the page showed when it went wrong
                raise
            finally:
                browser.close()

            assert result.success, (
                f"backfill {backfill_id}: {result.status} after {result.seconds:.0f}s, {result.n_runs} runs "
                f"{result.run_statuses}, {result.asset_statuses}, error {result.error}\n"
                + _failed_runs_explained(dagster, backfill_id) + "\n" + dagster.log_tails(20)
            )
            fresh = {m["partition"] for m in dagster.materializations("clip_subset", after=clicked)}
            assert set(summary.shards) <= fresh, f"not materialized after the click: {set(summary.shards) - fresh}"
            print(f"backfill {backfill_id}: {result.status} {result.seconds:.1f}s after the click, "
                  f"{result.n_runs} runs; {len(fresh)} partitions materialized")
    finally:
        copy_to = os.environ.get("DANBOORU_UI_SCREENSHOTS")
        if copy_to:
            Path(copy_to).mkdir(parents=True, exist_ok=True)
            for shot in shots:
                if shot.exists():
                    shutil.copy(shot, Path(copy_to) / shot.name)
