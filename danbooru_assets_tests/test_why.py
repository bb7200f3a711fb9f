"""`danbooru-assets why ID`, the why_image job, `danbooru-assets shards` and `python -m danbooru_assets`,
over hand-made stored tables (the stage tables' columns, a few rows)."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from danbooru_assets.cli import main
from danbooru_assets.core.tables import write_parquet
from danbooru_assets.orchestration.partitions import partition_selection, shard_selection
from danbooru_assets.orchestration.resources import StorageResource
from danbooru_assets.orchestration.why import why_image
from danbooru_assets.why import trace_image

KEPT, BELOW, COPY, EXCLUDED = 1042, 2042, 3042, 4042


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    base = tmp_path / "storage"
    ids = [KEPT, BELOW, COPY, EXCLUDED]
    table = lambda asset, frame: write_parquet(base / asset / "0042.parquet", pd.DataFrame(frame))  # noqa: E731
    table("shard_index", {"image_id": ids, "rel_path": [f"original/0042/{i}.jpg" for i in ids], "status": ["ok"] * 4})
    table("metadata_prefilter", {"image_id": ids, "excluded": [False, False, False, True], "decode": [True, True, True, False],
                                 "reasons": ["", "", "", "tag:comic"]})
    table("clip_scores", {"image_id": ids[:3], "portrait_score": [0.31, 0.12, 0.30]})
    table("clip_subset", {"image_id": ids, "kept": [True, False, True, False],
                          "drop_reasons": ["", "below_threshold", "", "prefiltered"], "prefilter_reasons": ["", "", "", "tag:comic"]})
    table("pose_subset", {"image_id": [KEPT, COPY], "keep": [True, False], "drop_reasons": ["", "duplicate"]})
    table("curated_dataset", {"image_id": [KEPT], "class": ["good"], "source": ["label"]})
    write_parquet(base / "near_duplicates.parquet", pd.DataFrame(
        {"image_id": [KEPT, COPY], "kept": [True, False], "duplicate_of": [pd.NA, KEPT], "kind": ["", "md5"],
         "similarity": [1.0, 1.0], "group_size": [2, 2]}))
    write_parquet(base / "clip_threshold.parquet", pd.DataFrame({"threshold": [0.25]}))
    return base


def test_each_image_says_where_and_why_it_left(storage: Path):
    assert trace_image(storage, KEPT).verdict == "kept: in curated_dataset as good (label)"
    assert trace_image(storage, BELOW).verdict == "dropped by clip_subset: below_threshold"
    assert trace_image(storage, COPY).verdict == f"dropped by near_duplicates: duplicate of {KEPT} (md5)"
    assert trace_image(storage, EXCLUDED).verdict == "dropped by metadata_prefilter: tag:comic"
    missing = trace_image(storage, 5042)
    assert missing.verdict.startswith("not in shard_index (no row)")
    lines = trace_image(storage, BELOW).lines()
    assert "portrait_score=0.12" in "\n".join(lines) and "threshold=0.25" in lines[-1]
    assert "pose_keypoints" in "\n".join(lines) and "not materialized for shard 0042" in "\n".join(lines)


def test_the_cli_and_the_ui_job_answer_the_same(storage: Path, monkeypatch, capsys):
    monkeypatch.setenv("DANBOORU_STORAGE", str(storage))
    assert main(["why", str(BELOW)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"image {BELOW} (shard 0042): dropped by clip_subset: below_threshold")
    result = why_image.execute_in_process(
        run_config={"ops": {"why_image_op": {"config": {"image_id": BELOW}}}},
        resources={"storage": StorageResource(base_path=str(storage))},
    )
    output = next(e for e in result.all_events if e.event_type_value == "STEP_OUTPUT")
    metadata = output.event_specific_data.metadata
    assert metadata["verdict"].value == "dropped by clip_subset: below_threshold"
    assert "| clip_subset |" in metadata["trace"].value


def test_shards_prints_the_exact_selection(tmp_path: Path, monkeypatch, capsys):
    for shard in ("0063", "0064", "0065", "0070"):
        (tmp_path / "data" / "original" / shard).mkdir(parents=True)
    monkeypatch.setenv("DANBOORU_ROOT", str(tmp_path / "data"))
    assert main(["shards", "--asset", "clip_subset"]) == 0
    out = capsys.readouterr().out
    assert "4 shards have images, in 2 contiguous ranges." in out
    assert "dg launch --assets clip_subset --partition-range 0063...0065" in out
    assert "dg launch --assets clip_subset --partition-range 0070...0070" in out
    assert partition_selection(["0063", "0064", "0065", "0070"]) == "[0063...0065], 0070"
    assert shard_selection(["0001"])[0] == "1 shards have images, in 1 contiguous range."


def test_python_m_runs_the_cli():
    proc = subprocess.run([sys.executable, "-m", "danbooru_assets", "--help"], capture_output=True, text=True,
                          env={**os.environ}, timeout=120)
    assert proc.returncode == 0 and "usage: danbooru-assets" in proc.stdout and "why" in proc.stdout
