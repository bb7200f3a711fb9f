"""The CLIP stage's assets end to end on generated sample data, on the CPU."""

import json

import numpy as np
import pytest
from PIL import Image

from danbooru_assets.clip.model import DEMO_WARNING
from danbooru_assets.clip.scoring import prompt_column
from danbooru_assets.core.embeddings import embedding_matrix
from danbooru_assets.devtools.sample_data import read_ground_truth
from danbooru_assets.settings import CurationSettings, save_settings, set_setting

INGEST = ["shard_index", "metadata_prefilter", "clip_embeddings", "image_stats", "clip_scores"]


@pytest.fixture(scope="module")
def ingested(pipeline):
    pipeline.run_through("clip")
    return pipeline


def _forbid_image_reads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an image was opened")

    monkeypatch.setattr(Image, "open", refuse)


def test_embeddings_are_normalised_float16_with_fingerprint_and_demo_warning(ingested):
    shard = ingested.shards[0]
    emb = ingested.table("clip_embeddings", shard)
    ok = emb.loc[emb["status"] == "ok"]
    matrix = embedding_matrix(ok)
    assert ok["embedding"].iloc[0].dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=2e-3)
    assert ok["model_fingerprint_id"].nunique() == 1
    stats = ingested.table("image_stats", shard)
    assert set(stats["image_id"]) == set(emb["image_id"])
    result = ingested.materialize(["clip_scores"], shard)
    assert ingested.metadata(result, "clip_scores")["warning"] == DEMO_WARNING


def test_second_run_encodes_nothing_and_a_new_image_encodes_one(ingested):
    shard = ingested.shards[1]
    result = ingested.materialize(INGEST, shard)
    meta = ingested.metadata(result, "clip_embeddings")
    assert meta["encoded"] == 0 and meta["reused"] == meta["images"] > 0

    source = next(p for p in sorted((ingested.root / "original" / shard).iterdir()) if p.suffix == ".jpg")
    new_id = int(source.stem) + 1000 * 997  # same bucket, unused id
    (source.parent / f"{new_id}.jpg").write_bytes(source.read_bytes())
    try:
        result = ingested.materialize(INGEST, shard)
        meta = ingested.metadata(result, "clip_embeddings")
        assert meta["encoded"] == 1
        assert new_id in set(ingested.table("clip_embeddings", shard)["image_id"])
    finally:  # the module's other tests see the dataset as generated
        (source.parent / f"{new_id}.jpg").unlink()
        ingested.materialize(INGEST, shard)


def test_corrupt_images_get_a_status_not_a_crash(ingested):
    truncated = ingested.summary.broken_ids["truncated"][0]
    shard = f"{truncated % 1000:04d}"
    # The prefilter off for this shard: the truncated file's tags must not keep it from the decoder.
    save_settings(ingested.settings_path, set_setting(CurationSettings(), "prefilter.mode", "off"))
    try:
        ingested.materialize(["metadata_prefilter", "clip_embeddings", "image_stats", "clip_scores", "clip_subset"],
                             shard)
        emb = ingested.table("clip_embeddings", shard).set_index("image_id")
        assert emb.loc[truncated, "status"].startswith("unreadable")
        assert emb.loc[truncated, "embedding"] is None
        assert (emb["status"] == "ok").sum() >= len(emb) - 2
        subset = ingested.table("clip_subset", shard).set_index("image_id")
        assert "unreadable" in subset.loc[truncated, "drop_reasons"]
    finally:
        ingested.settings_path.unlink(missing_ok=True)
        ingested.materialize(["metadata_prefilter", "clip_embeddings", "image_stats", "clip_scores", "clip_subset"],
                             shard)
    # zero-byte and unknown-extension files never reach the decoder
    zero = ingested.summary.broken_ids["zero_bytes"][0]
    assert zero not in set(ingested.table("clip_embeddings", f"{zero % 1000:04d}")["image_id"])


def test_prompt_change_rescores_without_reading_images(ingested, monkeypatch):
    shard = ingested.shards[2]
    before = ingested.table("clip_scores", shard)
    _forbid_image_reads(monkeypatch)
    prompts = {"positive_prompts": ["a knight in leather armour"], "negative_prompts": ["a bowl of fruit"]}
    try:
        result = ingested.materialize(["prompt_embeddings"], run_config={"ops": {"prompt_embeddings": {"config": prompts}}})
        assert ingested.metadata(result, "prompt_embeddings")["settings_source"] == "run config"
        ingested.materialize(["clip_scores"], shard)
        after = ingested.table("clip_scores", shard)
    finally:  # back to the settings file's prompts for the module's other tests
        monkeypatch.undo()
        ingested.materialize(["prompt_embeddings"])
        ingested.materialize(["clip_scores"], shard)
    assert len(after) == len(before)
    sims = [c for c in after.columns if c.startswith("sim_")]
    assert sims == [prompt_column(p) for p in prompts["positive_prompts"] + prompts["negative_prompts"]]
    assert not np.allclose(after["portrait_score"], before["portrait_score"])


def test_threshold_keeps_target_fraction_and_settings_file_change_is_used(ingested, monkeypatch):
    threshold = ingested.table("clip_threshold")
    scored = threshold["scored"].iloc[0]
    assert abs(threshold["kept"].iloc[0] - 0.2 * scored) <= 2
    # The user sets a new target in the durable settings; later runs (sensor, backfill) use it.
    save_settings(ingested.settings_path, set_setting(CurationSettings(), "clip.keep_fraction", "0.5"))
    shard = ingested.shards[0]
    try:
        result = ingested.materialize(["clip_threshold"])
        meta = ingested.metadata(result, "clip_threshold")
        assert meta["settings_source"] == "settings file"
        assert abs(meta["kept"] - 0.5 * scored) <= 2
        for key in ("histogram", "just_above_threshold", "just_below_threshold"):
            assert "data:image/png;base64," in meta[key]
        # Rematerializing a shard's subset after the change touches no image.
        _forbid_image_reads(monkeypatch)
        result = ingested.materialize(["clip_subset"], shard)
        subset = ingested.table("clip_subset", shard)
        new_threshold = ingested.table("clip_threshold")["threshold"].iloc[0]
        kept_by_score = subset["portrait_score"] >= new_threshold
        assert (subset["kept"] <= kept_by_score).all()
        assert ingested.metadata(result, "clip_subset")["threshold"] == pytest.approx(new_threshold)
    finally:  # back to the defaults for the module's other tests
        monkeypatch.undo()
        ingested.settings_path.unlink(missing_ok=True)
        ingested.materialize(["clip_threshold"])
        ingested.materialize(["clip_subset"], shard)


def test_fixed_threshold_from_run_config(ingested):
    try:
        result = ingested.materialize(
            ["clip_threshold"], run_config={"ops": {"clip_threshold": {"config": {"fixed_threshold": 0.0}}}}
        )
        meta = ingested.metadata(result, "clip_threshold")
        assert meta["mode"] == "fixed" and meta["kept"] == meta["scored"]
    finally:
        ingested.materialize(["clip_threshold"])


def test_subset_override_is_validated_and_a_bad_one_fails_the_run(ingested):
    shard = ingested.shards[0]
    before = ingested.table("clip_subset", shard)
    bad = {"ops": {"clip_subset": {"config": {"min_side": -5}}}}
    with pytest.raises(Exception, match="min_side"):
        ingested.materialize(["clip_subset"], shard, run_config=bad)
    assert ingested.table("clip_subset", shard).equals(before)  # nothing written for the bad run
    try:
        big = {"ops": {"clip_subset": {"config": {"min_side": 100_000}}}}
        result = ingested.materialize(["clip_subset"], shard, run_config=big)
        meta = ingested.metadata(result, "clip_subset")
        assert meta["settings_source"] == "run config" and meta["rules"]["min_side"] == 100_000
        subset = ingested.table("clip_subset", shard)
        assert len(subset) and subset["drop_reasons"].str.contains("too_small").all()
    finally:
        ingested.materialize(["clip_subset"], shard)


def test_subset_sizes_are_the_decodes_displayed_ones(ingested):
    """An EXIF-rotated JPEG: the index (from metadata) has the stored frame, the decode the
    displayed one; clip_subset (and pose after it) get the displayed size."""
    from danbooru_assets.core.tables import read_parquet, write_parquet

    shard = ingested.shards[4]
    stats_path = ingested.storage.asset_path("image_stats", shard)
    stats_before = read_parquet(stats_path)
    index = ingested.table("shard_index", shard).set_index("image_id")
    stats = stats_before.copy()
    oblong = stats["image_id"].map(index["width"]) != stats["image_id"].map(index["height"])
    row = stats.index[(stats["status"] == "ok") & oblong][0]
    image_id = int(stats.loc[row, "image_id"])
    # As the decode reports a 90-degree EXIF turn: the index's sides, swapped.
    stats.loc[row, "orig_width"] = int(index.loc[image_id, "height"])
    stats.loc[row, "orig_height"] = int(index.loc[image_id, "width"])
    write_parquet(stats_path, stats)
    try:
        ingested.materialize(["clip_subset"], shard)
        subset = ingested.table("clip_subset", shard).set_index("image_id")
        assert subset.loc[image_id, ["width", "height"]].tolist() == [
            index.loc[image_id, "height"], index.loc[image_id, "width"]]
        others = subset.drop(index=image_id).join(stats.set_index("image_id")[["status", "orig_width"]])
        readable = others["status"] == "ok"
        assert readable.any() and (others.loc[readable, "width"] == others.loc[readable, "orig_width"]).all()
    finally:
        write_parquet(stats_path, stats_before)
        ingested.materialize(["clip_subset"], shard)


def test_resource_builds_the_library_model_from_its_config_and_the_environment(monkeypatch, tmp_path):
    from danbooru_assets.clip.model import ClipModel
    from danbooru_assets.orchestration.resources import ClipModelResource

    resource = ClipModelResource.demo()
    assert resource.model() == ClipModel.demo() and resource.model().is_demo()
    resized = resource.model_copy(update={"batch_size": 7, "device": "cpu"}).model()
    assert (resized.batch_size, resized.device, resized.model_name) == (7, "cpu", ClipModel.demo().model_name)
    monkeypatch.delenv("DANBOORU_CLIP_MODEL", raising=False)
    monkeypatch.delenv("DANBOORU_CLIP_PRETRAINED", raising=False)
    assert ClipModelResource.from_env(sample_data=True).model().is_demo()
    assert ClipModelResource.from_env(sample_data=False).model() == ClipModel()  # never the demo implicitly
    ckpt = tmp_path / "w.safetensors"
    monkeypatch.setenv("DANBOORU_CLIP_PRETRAINED", str(ckpt))
    configured = ClipModelResource.from_env(sample_data=True, batch_size=8)
    assert (configured.model_name, configured.pretrained, configured.batch_size) == ("ViT-B-32", str(ckpt), 8)


def test_subset_rules_record_every_reason(ingested):
    import pandas as pd

    subset = pd.concat([ingested.table("clip_subset", s) for s in ingested.shards])
    assert set(subset.loc[subset["kept"], "drop_reasons"]) == {""}
    reasons = set("|".join(subset["drop_reasons"]).split("|")) - {""}
    assert {"below_threshold", "dark_border_little_content"} <= reasons
    # The generator's mostly-black images with little content are caught by the image rule.
    truth = read_ground_truth(ingested.root).set_index("image_id")
    # (those the metadata prefilter keeps from the decoder, e.g. no_humans, are judged by it alone)
    black = subset.loc[(subset["image_id"].map(truth["kind"]) == "black_border") & (subset["prefilter_reasons"] == "")]
    assert len(black) and black["drop_reasons"].str.contains("dark_border_little_content").mean() >= 0.8


def test_a_kill_between_the_two_tables_writes_loses_no_image(ingested):
    """kill -9 after clip_embeddings was renamed into place, before image_stats was: the
    re-run must give two tables with the same images and drop no readable image."""
    from danbooru_assets.core.tables import read_parquet, write_parquet

    shard = ingested.shards[3]
    stats_path = ingested.storage.asset_path("image_stats", shard)
    stats_before = read_parquet(stats_path)
    folder = ingested.root / "original" / shard
    sources = [p for p in sorted(folder.iterdir()) if p.suffix == ".jpg"][:3]
    new_ids = [int(p.stem) + 1000 * (990 + i) for i, p in enumerate(sources)]  # same bucket, unused ids
    for source, new_id in zip(sources, new_ids):
        (folder / f"{new_id}.jpg").write_bytes(source.read_bytes())
    try:
        ingested.materialize(INGEST, shard)
        # The state the kill leaves: the new images' embeddings stored, their statistics not.
        write_parquet(stats_path, stats_before)
        assert set(new_ids) <= set(ingested.table("clip_embeddings", shard)["image_id"])

        result = ingested.materialize(INGEST, shard)
        meta = ingested.metadata(result, "clip_embeddings")
        assert meta["encoded"] == len(new_ids) and meta["reused"] == meta["images"] - len(new_ids)
        emb = ingested.table("clip_embeddings", shard)
        stats = ingested.table("image_stats", shard)
        assert emb["image_id"].tolist() == stats["image_id"].tolist()
        assert (stats.set_index("image_id").loc[new_ids, "status"] == "ok").all()
        ingested.materialize(["clip_subset"], shard)
        subset = ingested.table("clip_subset", shard).set_index("image_id")
        assert not subset.loc[new_ids, "drop_reasons"].str.contains("unreadable").any()
    finally:
        for new_id in new_ids:
            (folder / f"{new_id}.jpg").unlink()
        ingested.materialize(INGEST, shard)
        ingested.materialize(["clip_subset"], shard)


def test_an_empty_prompt_list_is_an_error_not_the_defaults(ingested):
    before = ingested.table("prompt_embeddings")
    for field in ("positive_prompts", "negative_prompts"):
        config = {"ops": {"prompt_embeddings": {"config": {field: []}}}}
        with pytest.raises(Exception, match=f"{field} is an empty list"):
            ingested.materialize(["prompt_embeddings"], run_config=config)
    assert ingested.table("prompt_embeddings").equals(before)


def test_threshold_says_how_many_indexed_shards_it_covers(ingested):
    import shutil

    result = ingested.materialize(["clip_threshold"])
    meta = ingested.metadata(result, "clip_threshold")
    n = len(ingested.shards)
    assert meta["indexed_shards"] == n and meta["shard_coverage"] == 1.0
    assert "every indexed shard counts" in meta["coverage"]
    # A shard indexed but not scored yet: the threshold says it left that shard out.
    index_folder = ingested.storage.path("shard_index")
    unscored = next(k for k in (f"{i:04d}" for i in range(999, 0, -1)) if k not in ingested.shards)
    extra = index_folder / f"{unscored}.parquet"
    shutil.copy(str(index_folder / f"{ingested.shards[0]}.parquet"), str(extra))
    try:
        result = ingested.materialize(["clip_threshold"])
        meta = ingested.metadata(result, "clip_threshold")
        assert meta["indexed_shards"] == n + 1 and meta["shard_coverage"] == pytest.approx(n / (n + 1))
        assert meta["coverage"].startswith("**Partial:**") and unscored in meta["coverage"]
        table = ingested.table("clip_threshold")
        assert table["indexed_shards"].iloc[0] == n + 1
    finally:
        extra.unlink()
        ingested.materialize(["clip_threshold"])


def test_one_shard_after_a_threshold_change_uses_the_new_threshold_without_clip_threshold(ingested, monkeypatch):
    """Issue 17: `settings set clip.keep_fraction=0.5`, then Materialize one shard of
    clip_subset (clip_threshold not rematerialized): the shard is stored at the new
    threshold, the one clip_threshold then stores, and no image is opened."""
    import pandas as pd

    from danbooru_assets.clip.scoring import threshold_summary

    shard = ingested.shards[0]
    old_threshold = float(ingested.table("clip_threshold")["threshold"].iloc[0])
    scores = pd.concat([ingested.table("clip_scores", s) for s in ingested.shards])
    expected = threshold_summary(scores["portrait_score"].to_numpy(), 0.5, None, ingested.shards, ingested.shards)
    assert expected["threshold"] < old_threshold  # 50% kept against the default 20%
    save_settings(ingested.settings_path, set_setting(CurationSettings(), "clip.keep_fraction", "0.5"))
    try:
        _forbid_image_reads(monkeypatch)
        result = ingested.materialize(["clip_subset"], shard)
        meta = ingested.metadata(result, "clip_subset")
        assert meta["threshold"] == pytest.approx(expected["threshold"])
        assert meta["threshold_source"].startswith("computed in this step")
        subset = ingested.table("clip_subset", shard)
        assert subset["kept"].any()
        assert (subset["kept"] <= (subset["portrait_score"] >= expected["threshold"])).all()
        between = (subset["portrait_score"] >= expected["threshold"]) & (subset["portrait_score"] < old_threshold)
        assert subset.loc[between, "drop_reasons"].str.contains("below_threshold").sum() == 0
        # clip_threshold then stores the same value (its review sheets open images), and
        # clip_subset uses the stored one again.
        monkeypatch.undo()
        ingested.materialize(["clip_threshold"])
        assert float(ingested.table("clip_threshold")["threshold"].iloc[0]) == pytest.approx(expected["threshold"])
        meta = ingested.metadata(ingested.materialize(["clip_subset"], shard), "clip_subset")
        assert meta["threshold_source"] == "stored clip_threshold"
        assert ingested.table("clip_subset", shard).equals(subset)
    finally:
        monkeypatch.undo()
        ingested.settings_path.unlink(missing_ok=True)
        ingested.materialize(["clip_threshold"])
        ingested.materialize(["clip_subset"], shard)


def test_a_run_config_threshold_stands_until_the_settings_file_changes(ingested):
    shard = ingested.shards[1]
    try:
        result = ingested.materialize(["clip_threshold"], run_config={"ops": {"clip_threshold": {"config": {"fixed_threshold": 0.0}}}})
        assert ingested.metadata(result, "clip_threshold")["settings_source"] == "run config"
        meta = ingested.metadata(ingested.materialize(["clip_subset"], shard), "clip_subset")
        assert meta["threshold"] == 0.0 and meta["threshold_source"] == "stored clip_threshold"
    finally:
        ingested.materialize(["clip_threshold"])


@pytest.mark.parametrize("bad", [{"fixed_threshold": -1.0}, {"fixed_threshold": 1.5}, {"keep_fraction": 0.0},
                                 {"keep_fraction": 2.0}])
def test_run_config_threshold_has_the_settings_files_bounds(ingested, bad):
    """Issue 19: ClipThresholdConfig refused nothing; now the bounds of ClipSettings."""
    before = ingested.table("clip_threshold")
    with pytest.raises(Exception, match=f"ClipThresholdConfig\\n{next(iter(bad))}"):
        ingested.materialize(["clip_threshold"], run_config={"ops": {"clip_threshold": {"config": bad}}})
    assert ingested.table("clip_threshold").equals(before)



def test_one_shard_of_clip_scores_after_a_prompt_change_uses_the_new_prompts(ingested):
    shard = ingested.shards[2]
    prompts = ["a knight in leather armour"]
    settings = set_setting(CurationSettings(), "clip.positive_prompts", json.dumps(prompts))
    save_settings(ingested.settings_path, settings)
    try:
        meta = ingested.metadata(ingested.materialize(["clip_scores"], shard), "clip_scores")
        assert meta["prompts_used"].startswith("encoded in this step")
        assert prompt_column(prompts[0]) in ingested.table("clip_scores", shard).columns
    finally:
        ingested.settings_path.unlink(missing_ok=True)
        ingested.materialize(["clip_scores"], shard)


def test_duplicate_files_odd_entries_and_truncated_bodies_leave_the_shard_complete(ingested):
    """Issue 20 (2, 3, 4, 10): 90036063.jpg + .png + 090036063.jpg, a link loop, a folder
    named like an image, a dangling link and half a JPEG: one row per id, every entry a
    status, the shard stored, the unique_ids check's warning recorded."""
    import io
    import os

    shard = ingested.shards[4]
    folder = ingested.root / "original" / shard
    source = next(p for p in sorted(folder.iterdir()) if p.suffix == ".jpg")
    image_id = int(source.stem)
    png = io.BytesIO()
    Image.open(source).save(png, format="PNG")
    added = [folder / f"{image_id}.png", folder / f"0{image_id}.jpg"]
    added[0].write_bytes(png.getvalue())
    added[1].write_bytes(source.read_bytes())
    base = int(shard) + 1000 * 980  # unused ids of this bucket
    loop, dangling, directory, half = (folder / f"{base + 1000 * k}.jpg" for k in range(4))
    os.symlink(loop, loop)
    os.symlink(folder / "nothing-here.jpg", dangling)
    directory.mkdir()
    data = source.read_bytes()
    half.write_bytes(data[: len(data) // 2] + b"\xff\xd9")
    save_settings(ingested.settings_path, set_setting(CurationSettings(), "prefilter.mode", "off"))
    try:
        result = ingested.materialize(INGEST, shard)
        index = ingested.table("shard_index", shard).set_index("rel_path")
        rel = f"original/{shard}/"
        assert index.loc[rel + source.name, "status"] in ("ok", "no_metadata")
        assert index.loc[rel + added[0].name, "status"] == "duplicate_file"
        assert index.loc[rel + added[1].name, "problem"].endswith(f"{rel}{source.name} is read")
        assert index.loc[rel + loop.name, "status"] == "link_loop"
        assert index.loc[rel + dangling.name, "status"] == "broken_link"
        assert index.loc[rel + directory.name, "status"] == "not_a_file"
        meta = ingested.metadata(result, "shard_index")
        assert (meta["status_duplicate_file"], meta["status_link_loop"], meta["status_broken_link"],
                meta["status_not_a_file"]) == (2, 1, 1, 1)
        emb = ingested.table("clip_embeddings", shard)
        assert not emb["image_id"].duplicated().any()
        assert emb.set_index("image_id").loc[image_id, "status"] == "ok"
        assert emb.set_index("image_id").loc[base + 3000, "status"].startswith("unreadable: truncated")
        assert ingested.metadata(result, "clip_embeddings")["truncated"] == 1
        checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
        assert not checks["unique_ids"].passed and checks["unique_ids"].severity.value == "WARN"

        from danbooru_assets.cli import failed_check_lines

        assert any("shard_index:unique_ids failed (warn)" in line for line in failed_check_lines(result))
    finally:
        ingested.settings_path.unlink(missing_ok=True)
        for path in [*added, loop, dangling, half]:
            path.unlink()
        directory.rmdir()
        ingested.materialize(INGEST, shard)


def test_a_truncated_stored_table_is_set_aside_and_recomputed_from_the_images(ingested):
    """Issue 20 (5): a truncated clip_embeddings/<shard>.parquet failed every run, naming
    the shard but not the file. Now: moved aside, named, recomputed; a damaged cheap
    table read as an input names its file and how it is mended."""
    shard = ingested.shards[5]
    emb_path = ingested.storage.asset_path("clip_embeddings", shard)
    before = ingested.table("clip_embeddings", shard)
    emb_path.write_bytes(emb_path.read_bytes()[: emb_path.stat().st_size // 2])
    try:
        result = ingested.materialize(INGEST, shard)
        meta = ingested.metadata(result, "clip_embeddings")
        assert meta["damaged_tables_set_aside"] == 1 and str(emb_path) in meta["damaged_tables"]
        assert meta["reused"] == 0 and meta["encoded"] == meta["images"] == len(before)
        after = ingested.table("clip_embeddings", shard)
        assert after["image_id"].tolist() == before["image_id"].tolist()
        assert after["status"].tolist() == before["status"].tolist()
        assert ingested.table("image_stats", shard)["image_id"].tolist() == before["image_id"].tolist()
        # A cheap table, damaged, read by the next asset: the file is named with the cure.
        scores = ingested.storage.asset_path("clip_scores", shard)
        scores.write_bytes(b"")
        failed = ingested.materialize(["clip_subset"], shard, raise_on_error=False)
        assert not failed.success
        message = next(e for e in failed.all_events if e.is_step_failure).step_failure_data.error.message
        assert str(scores) in message and "materialize clip_scores for shard" in message
        ingested.materialize(["clip_scores", "clip_subset"], shard)  # the cure
        assert len(ingested.table("clip_scores", shard)) > 0
    finally:
        for moved in emb_path.parent.glob(f"{emb_path.name}.damaged-*"):
            moved.unlink()
