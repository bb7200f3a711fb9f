"""``danbooru-assets run`` skips a stage only when nothing it reads changed, and the
tables after a skip are those of a full run."""

from __future__ import annotations

import re
import time
import shutil
from pathlib import Path

import pandas as pd
import pytest

from danbooru_assets.devtools.sample_data import generate_sample_dataset, write_sample_settings
from danbooru_assets_tests.orchestration.test_ui_backfill import _env



def _tables(storage: Path) -> dict[str, pd.DataFrame]:
    return {str(p.relative_to(storage)): pd.read_parquet(p) for p in sorted(storage.rglob("*.parquet"))}


def _assert_same_tables(before: dict[str, pd.DataFrame], after: dict[str, pd.DataFrame]) -> None:
    assert sorted(before) == sorted(after)
    for name, table in before.items():
        pd.testing.assert_frame_equal(table, after[name], obj=name)


def _stages(out: str) -> tuple[list[str], list[str]]:
    """(skipped, run) stage names of one run's output."""
    skipped = re.findall(r"^== (\w+): skipped, ", out, flags=re.M)
    ran = re.findall(r"^== (\w+) \(\d+ runs?\)", out, flags=re.M)
    return skipped, ran


def _cli(*args: str):
    """The CLI in its own process, as users run it: definitions read the environment when
    they are imported, so an in-process call would see an earlier test's dataset."""
    import os
    import sys

    from danbooru_assets.devtools.local_dagster import DEFAULT_STALL_S, run_until_quiet

    done = run_until_quiet([sys.executable, "-m", "danbooru_assets", *args], DEFAULT_STALL_S, env=dict(os.environ))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _run(capsys, *args: str) -> tuple[list[str], list[str], str]:
    out = _cli("run", *args).stdout
    return (*_stages(out), out)


@pytest.mark.slow  # runs the whole main job several times: minutes
def test_a_rerun_skips_what_did_not_change_and_runs_what_did(tmp_path: Path, monkeypatch, capsys) -> None:
    summary = generate_sample_dataset(tmp_path / "sample", n_images=24, n_shards=3, max_side=300)
    for name, value in _env(tmp_path, summary.root).items():
        monkeypatch.setenv(name, value)
    storage = tmp_path / "storage"
    write_sample_settings(tmp_path / "settings.yaml")  # keep_fraction 0.8: a few images per shard pass

    skipped, ran, _ = _run(capsys)
    assert skipped == [] and len(ran) == 11
    first = _tables(storage)

    # Nothing changed: every stage is skipped, and says why.
    skipped, ran, out = _run(capsys)
    assert ran == [] and len(skipped) == 11, out
    assert "inputs, settings and code unchanged" in out and "skipped 11 of 11 stages" in out
    _assert_same_tables(first, _tables(storage))

    # What was skipped equals what a full run computes.
    skipped, ran, _ = _run(capsys, "--force")
    assert skipped == [] and len(ran) == 11
    _assert_same_tables(first, _tables(storage))

    # A settings change re-runs the stage that reads the section and every later one.
    _cli("settings", "set", "clip.keep_fraction=0.6")
    capsys.readouterr()
    skipped, ran, out = _run(capsys)
    assert skipped == ["prepare_job", "ingest_job"], out
    assert ran[0] == "clip_threshold_job" and len(ran) == 9
    assert "settings changed: clip_threshold" in out

    # A deleted table re-runs its stage (and the later ones), not the earlier ones.
    victim = next((storage / "pose_keypoints").glob("*.parquet"))
    victim.unlink()
    skipped, ran, out = _run(capsys)
    assert skipped == ["prepare_job", "ingest_job", "clip_threshold_job"], out
    assert ran[0] == "pose_job" and "deleted" in out
    assert victim.exists()

    # A new image: prepare_job reads no image (skipped), ingest_job runs its shard only,
    # every later stage runs; the tables equal those of a full run.
    shard = sorted(p for p in (summary.root / "original").iterdir() if p.is_dir())[0]
    source = next(p for p in sorted(shard.iterdir()) if p.suffix == ".jpg")
    shutil.copy(source, shard / f"9{source.stem[1:]}{source.suffix}")
    skipped, ran, out = _run(capsys)
    assert skipped == ["prepare_job"] and len(ran) == 10, out
    assert f"the dataset's files changed (in original/{shard.name})" in out
    assert f"shards {shard.name}..{shard.name}: shard_index=" in out
    after_new_image = _tables(storage)
    skipped, ran, _ = _run(capsys)
    assert ran == []
    skipped, ran, _ = _run(capsys, "--force")
    _assert_same_tables(after_new_image, _tables(storage))


# ---------------------------------------------------------------------------- the record itself, without Dagster runs


@pytest.fixture
def world(tmp_path: Path, monkeypatch):
    from danbooru_assets.settings import CurationSettings

    for name, value in {"DANBOORU_LABELS": tmp_path / "labels.sqlite", "DANBOORU_SETTINGS": tmp_path / "settings.yaml"}.items():
        monkeypatch.setenv(name, str(value))
    (tmp_path / "data" / "original" / "0001").mkdir(parents=True)
    (tmp_path / "data" / "original" / "0001" / "1001.jpg").write_bytes(b"x")
    (tmp_path / "storage").mkdir()
    return tmp_path, CurationSettings()


def _fingerprints(base: Path, settings):
    from danbooru_assets.orchestration.stage_fingerprints import StageFingerprints

    return StageFingerprints(base / "home", str(base / "storage"), base / "data", settings, ["0001"])


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _run_stages(base: Path, settings, stages, writes: dict[str, list[str]]) -> list[str]:
    """Runs (writes the files of) every stage that is not skipped; the names run."""
    fp = _fingerprints(base, settings)
    ran = []
    for i, stage in enumerate(stages):
        earlier = [s.name for s in stages[:i]]
        if fp.check(stage, earlier).skip:
            continue
        previous, before = fp.read(stage.name), fp.storage_files()
        fp.forget(stage.name)
        for rel in writes[stage.name]:
            _write(base / "storage" / rel, f"{stage.name} {time.perf_counter_ns()}")
        fp.record(stage, earlier, before, previous, {"line": ""})
        ran.append(stage.name)
    return ran


def test_a_stage_is_skipped_only_when_nothing_it_reads_changed(world) -> None:
    from danbooru_assets.orchestration.stage_fingerprints import Stage

    base, settings = world
    stages = [
        Stage("a_job", ["a"], ["prompts"], False),
        Stage("b_job", ["b"], ["clip_threshold"], False),
        Stage("c_job", ["c"], [], False),
    ]
    writes = {"a_job": ["a/0001.parquet"], "b_job": ["b.parquet"], "c_job": ["c/0001.parquet"]}
    assert _run_stages(base, settings, stages, writes) == ["a_job", "b_job", "c_job"]
    assert _run_stages(base, settings, stages, writes) == []

    # A settings section: its reader and every later stage (through its rewritten tables).
    changed = settings.model_copy(update={"clip": settings.clip.model_copy(update={"keep_fraction": 0.5})})
    assert _run_stages(base, changed, stages, writes) == ["b_job", "c_job"]
    assert _run_stages(base, changed, stages, writes) == []

    # A deleted table: its stage and the later ones.
    (base / "storage" / "b.parquet").unlink()
    assert _run_stages(base, changed, stages, writes) == ["b_job", "c_job"]

    # A table rewritten behind the CLI's back: its stage (its own output) and the later ones.
    _write(base / "storage" / "a" / "0001.parquet", "changed elsewhere")
    assert _run_stages(base, changed, stages, writes) == ["a_job", "b_job", "c_job"]

    # A new image: everything (the dataset is part of every stage's fingerprint).
    (base / "data" / "original" / "0001" / "2001.jpg").write_bytes(b"y")
    assert _fingerprints(base, changed).check(stages[2], ["a_job", "b_job"]).reason == (
        "the dataset's files changed (in original/0001)"
    )
    assert _run_stages(base, changed, stages, writes) == ["a_job", "b_job", "c_job"]
    assert _run_stages(base, changed, stages, writes) == []

    # Another set of shards, or an unreadable record: run.
    fp = _fingerprints(base, changed)
    fp.scope = "other"
    assert fp.check(stages[0], []).reason == "another set of shards"
    (base / "home" / "run_fingerprints" / "a_job.json").write_text("{not json")
    assert _run_stages(base, changed, stages, writes) == ["a_job", "b_job", "c_job"]


def test_labels_are_part_of_the_fingerprint_of_their_readers(world) -> None:
    from danbooru_assets.orchestration.stage_fingerprints import Stage

    base, settings = world
    stages = [Stage("q_job", ["q"], [], True)]
    writes = {"q_job": ["q.parquet"]}
    (base / "labels.sqlite").write_bytes(b"0")
    assert _run_stages(base, settings, stages, writes) == ["q_job"]
    assert _run_stages(base, settings, stages, writes) == []
    (base / "labels.sqlite").write_bytes(b"01")
    assert _run_stages(base, settings, stages, writes) == ["q_job"]


def test_each_stage_watches_the_settings_sections_and_labels_its_assets_read() -> None:
    from danbooru_assets.definitions import JOB_ASSETS, RUN_STAGES
    from danbooru_assets.orchestration.stage_fingerprints import Stage
    from danbooru_assets.settings import SECTIONS

    stages = {job.name: Stage.of(job.name, JOB_ASSETS[job.name]) for job in RUN_STAGES}
    assert stages["clip_threshold_job"].sections == ["clip_threshold"]
    assert stages["ingest_job"].sections == ["prompts", "prefilter"]
    assert set(stages["pose_subset_job"].sections) == {"pose_rules", "dedup"}
    # Reads the settings file without declaring a section: every section counts.
    assert stages["quality_predictions_job"].sections == list(SECTIONS)
    assert stages["pose_statistics_job"].sections == []
    assert stages["quality_model_job"].reads_labels and not stages["pose_job"].reads_labels
    assert "clip_embeddings" in stages["ingest_job"].asset_keys
