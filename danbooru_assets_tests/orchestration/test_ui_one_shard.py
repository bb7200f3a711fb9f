"""Issue 17's worst defect, end to end: `danbooru-assets settings set clip.keep_fraction=0.5`,
then on ``clip_subset``'s asset page "Materialize…" → Custom → one shard → "Launch 1 run",
with ``clip_threshold`` not rematerialized. The stored table of that shard must be the one
the new threshold produces, not the old one byte for byte; the shard's materialization
carries its own figures and says where its threshold came from; the asset's
``settings_current`` check counts the shards still stale.

A real webserver and daemon (``LocalDagster``) over a tiny sample the main job has
materialized, driven in headless Chromium. Skips where Chromium or Playwright is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

from danbooru_assets.clip.rules import apply_clip_rules
from danbooru_assets.clip.scoring import threshold_summary
from danbooru_assets.core.tables import read_parquet
from danbooru_assets.devtools.local_dagster import LocalDagster, run_until_quiet
from danbooru_assets.devtools.sample_data import generate_sample_dataset
from danbooru_assets.settings import load_settings
from danbooru_assets_tests.orchestration.test_ui_backfill import CHROMIUM, STALL_S, _browser, _env

pytestmark = pytest.mark.slow

CHECK_QUERY = """query($key: AssetKeyInput!) { assetCheckExecutions(assetKey: $key, checkName: "settings_current", limit: 1) {
    status evaluation { success metadataEntries { label ... on IntMetadataEntry { intValue } } } } }"""
META_QUERY = """query($key: AssetKeyInput!, $parts: [String!]) { assetOrError(assetKey: $key) { ... on Asset {
    assetMaterializations(partitions: $parts, limit: 1) { partition metadataEntries { label
      ... on IntMetadataEntry { intValue } ... on TextMetadataEntry { text } } } } } }"""


def _expected_subset(storage: Path, settings_path: Path, shard: str) -> pd.DataFrame:
    """What the settings file's threshold (over every stored shard's scores) makes of the shard."""
    settings = load_settings(settings_path)
    scores = {p.stem: read_parquet(p, ["portrait_score"]) for p in (storage / "clip_scores").glob("*.parquet")}
    indexed = {p.stem for p in (storage / "shard_index").glob("*.parquet")}
    values = pd.concat(scores.values())["portrait_score"].to_numpy()
    threshold = threshold_summary(values, settings.clip.keep_fraction, settings.clip.fixed_threshold, set(scores), indexed)
    table = lambda asset: read_parquet(storage / asset / f"{shard}.parquet")  # noqa: E731
    subset, _ = apply_clip_rules(
        table("shard_index"), table("image_stats"), table("clip_scores"), threshold["threshold"],
        settings.clip.image_rules, table("metadata_prefilter"),
    )
    return subset


def _check(dagster: LocalDagster) -> dict:
    execution = dagster.graphql(CHECK_QUERY, {"key": {"path": ["clip_subset"]}})["assetCheckExecutions"][0]
    entries = {e["label"]: e.get("intValue") for e in execution["evaluation"]["metadataEntries"]}
    return {"success": execution["evaluation"]["success"], **entries}


def test_one_stale_shard_from_the_asset_page_is_stored_at_the_new_threshold(tmp_path: Path) -> None:
    sync_api = _browser()
    summary = generate_sample_dataset(tmp_path / "sample", n_images=40, n_shards=4, max_side=300)
    env = _env(tmp_path, summary.root)
    work = tmp_path / "work"
    work.mkdir()
    # Waits as long as the CLI keeps printing progress: a loaded machine is slow, not broken.
    main = run_until_quiet([sys.executable, "-m", "danbooru_assets", "run"], STALL_S, cwd=work,
                           env={**os.environ, **env})
    assert main.returncode == 0, f"danbooru-assets run failed:\n{main.stdout[-3000:]}\n{main.stderr[-3000:]}"
    storage, settings_path = tmp_path / "storage", tmp_path / "settings.yaml"

    done = run_until_quiet([sys.executable, "-m", "danbooru_assets", "settings", "set", "clip.keep_fraction=0.5"],
                           STALL_S, cwd=work, env={**os.environ, **env})
    assert done.returncode == 0, done.stdout + done.stderr
    # The shard whose subset the new threshold changes most (the default keeps 20%, now 50%).
    before = {s: read_parquet(storage / "clip_subset" / f"{s}.parquet") for s in summary.shards}
    expected = {s: _expected_subset(storage, settings_path, s) for s in summary.shards}
    shard = max(summary.shards, key=lambda s: int(expected[s]["kept"].sum()) - int(before[s]["kept"].sum()))
    assert expected[shard]["kept"].sum() > before[shard]["kept"].sum()  # the test can fail: the change shows
    old_bytes = (storage / "clip_subset" / f"{shard}.parquet").read_bytes()
    old_threshold = read_parquet(storage / "clip_threshold.parquet")

    shots: list[Path] = []
    with LocalDagster(tmp_path / "dagster_home", env, cwd=work) as dagster, sync_api.sync_playwright() as pw:
        dagster.dismiss_onboarding()
        stale = _check(dagster)  # recorded by `settings set`: every shard is stale
        assert stale["success"] is False and stale["stale_shards"] == len(summary.shards), stale
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(120_000)
        try:
            page.goto(dagster.url + "/assets/clip_subset")
            page.get_by_role("button", name="Materialize").first.wait_for()
            page.get_by_text("Latest materialization").first.wait_for()
            page.get_by_role("button", name="Materialize").first.click()
            dialog = page.get_by_role("dialog").first
            dialog.get_by_text("Launch runs to materialize").wait_for()
            dialog.get_by_text("Partition selection").wait_for()
            page.wait_for_timeout(1000)  # the dialog settles on its default selection mode
            picker = dialog.get_by_text("Select a partition or create one")
            if not picker.is_visible():  # Custom is the default here; choose it where it is not
                dialog.get_by_role("button", name="Custom").click()
            picker.click()
            page.keyboard.type(shard)
            page.get_by_role("dialog").nth(1).get_by_text(shard, exact=True).first.click()
            dialog.get_by_text("Launch runs to materialize").click()  # closes the partition list
            shots.append(tmp_path / "ui_one_shard_dialog.png")
            page.screenshot(path=str(shots[-1]))

            def is_launch(response) -> bool:
                return "/graphql" in response.url and "LaunchPipelineExecution" in (response.request.post_data or "")

            with page.expect_response(is_launch) as launched:
                dialog.get_by_role("button", name="Launch 1 run").click()
            params = json.loads(launched.value.request.post_data)["variables"]["executionParams"]
            answer = launched.value.json()["data"]["launchPipelineExecution"]
            assert answer["__typename"] == "LaunchRunSuccess", answer
            assert {"key": "dagster/partition", "value": shard} in params["executionMetadata"]["tags"]
            assert params["selector"]["assetSelection"] == [{"path": ["clip_subset"]}]
            result = dagster.wait_run(answer["run"]["id"])  # as long as the run advances
            assert result.success, f"{result.status}: {dagster.run_errors(result.run_id)}\n{dagster.log_tails(20)}"
            page.goto(f"{dagster.url}/assets/clip_subset?view=partitions&partition={shard}")
            page.get_by_text("threshold_source").first.wait_for()
            shots.append(tmp_path / "ui_one_shard_partition.png")
            page.screenshot(path=str(shots[-1]))
        except Exception:
            shots.append(tmp_path / "ui_one_shard_failure.png")
            page.screenshot(path=str(shots[-1]))
            raise
        finally:
            browser.close()
            copy_to = os.environ.get("DANBOORU_UI_SCREENSHOTS")
            if copy_to:
                Path(copy_to).mkdir(parents=True, exist_ok=True)
                for shot in shots:
                    shutil.copy(shot, Path(copy_to) / shot.name)

        # The stored table is the new threshold's, not the old one.
        stored = read_parquet(storage / "clip_subset" / f"{shard}.parquet")
        assert (storage / "clip_subset" / f"{shard}.parquet").read_bytes() != old_bytes
        columns = ["image_id", "kept", "drop_reasons"]
        pd.testing.assert_frame_equal(stored[columns].reset_index(drop=True), expected[shard][columns].reset_index(drop=True))
        assert read_parquet(storage / "clip_threshold.parquet").equals(old_threshold)  # clip_threshold untouched
        # The partition's own figures and where its threshold came from.
        mats = dagster.graphql(META_QUERY, {"key": {"path": ["clip_subset"]}, "parts": [shard]})
        meta = {e["label"]: e.get("intValue", e.get("text")) for e in mats["assetOrError"]["assetMaterializations"][0]["metadataEntries"]}
        assert meta["rows"] == meta["dagster/row_count"] == len(stored) and meta["kept"] == int(stored["kept"].sum())
        assert meta["threshold_source"].startswith("computed in this step")
        # The check ran with the materialization: the other shards are still stale.
        after = _check(dagster)
        assert after["success"] is False and after["stale_shards"] == len(summary.shards) - 1, after
