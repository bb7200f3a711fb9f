"""``danbooru-assets run`` skips a stage only when nothing it reads changed, and the
tables after a skip are those of a full run."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from danbooru_assets.cli import main
from danbooru_assets.devtools.sample_data import generate_sample_dataset, write_sample_settings
from danbooru_assets_tests.orchestration.test_ui_backfill import _env

# Runs the whole main job several times: a minute or more.
pytestmark = pytest.mark.slow


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


def _run(capsys, *args: str) -> tuple[list[str], list[str], str]:
    assert main(["run", *args]) == 0
    out = capsys.readouterr().out
    return (*_stages(out), out)


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
    assert main(["settings", "set", "clip.keep_fraction=0.6"]) == 0
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

    # A new image re-runs everything (each stage reuses its stored rows).
    shard = sorted(p for p in (summary.root / "original").iterdir() if p.is_dir())[0]
    source = next(p for p in sorted(shard.iterdir()) if p.suffix == ".jpg")
    shutil.copy(source, shard / f"9{source.stem[1:]}{source.suffix}")
    skipped, ran, out = _run(capsys)
    assert skipped == [] and len(ran) == 11 and "the dataset's files changed" in out
    skipped, ran, _ = _run(capsys)
    assert ran == []
