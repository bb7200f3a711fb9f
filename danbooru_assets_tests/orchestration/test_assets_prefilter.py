"""metadata_prefilter end to end on generated sample data: what the CLIP stage decodes,
clip_subset's reasons, and a rule change that touches no image."""

import pandas as pd
import pytest
from PIL import Image

from danbooru_assets.devtools.sample_data import read_ground_truth
from danbooru_assets.settings import CurationSettings, save_settings, set_setting


@pytest.fixture(scope="module")
def clipped(pipeline):
    pipeline.run_through("clip")
    return pipeline


def _concat(p, asset: str) -> pd.DataFrame:
    return pd.concat([p.table(asset, s) for s in p.shards], ignore_index=True)


def test_excluded_images_are_never_decoded_and_counted_everywhere(clipped):
    prefilter = _concat(clipped, "metadata_prefilter").set_index("image_id")
    truth = read_ground_truth(clipped.root).set_index("image_id")
    skipped = set(prefilter.index[~prefilter["decode"]])
    assert skipped == set(prefilter.index[prefilter["excluded"]]) and len(skipped) >= 10
    embedded = set(_concat(clipped, "clip_embeddings")["image_id"])
    assert embedded == set(prefilter.index[prefilter["decode"]])
    # The generator's manga pages with metadata are all among them.
    manga = truth.index[(truth["kind"] == "manga_page") & truth["has_metadata"] & truth["has_file"]]
    assert len(manga) and set(manga) <= skipped

    result = clipped.materialize(["metadata_prefilter"], shards=clipped.shards)
    meta = clipped.metadata(result, "metadata_prefilter")
    assert meta["mode"] == "skip" and meta["range_never_decoded"] == len(skipped)  # a range: its totals
    assert meta["range_kept_fraction"] == pytest.approx(1 - len(skipped) / len(prefilter), abs=1e-4)
    assert "| no_humans |" not in meta["reasons"] and "`comic`" in meta["excluded_tags"]
    result = clipped.materialize(["clip_subset"], shards=clipped.shards)
    sub_meta = clipped.metadata(result, "clip_subset")
    assert sub_meta["range_dropped_prefiltered"] == sub_meta["range_never_decoded_prefiltered"] == len(skipped)

    subset = _concat(clipped, "clip_subset").set_index("image_id")
    dropped = subset.loc[sorted(skipped)]
    assert not dropped["kept"].any()
    assert dropped["drop_reasons"].str.startswith("prefiltered").all()
    assert not dropped["drop_reasons"].str.contains("unreadable|not_encoded|below_threshold").any()
    assert (dropped["prefilter_reasons"] == prefilter.loc[dropped.index, "reasons"]).all()


def test_a_rule_change_reads_no_image_and_the_next_ingest_encodes_only_the_newly_admitted(clipped, monkeypatch):
    shards = clipped.shards
    before = _concat(clipped, "metadata_prefilter").set_index("image_id")
    # Excluded by tags alone, none of them no_humans: the new rule (no_humans only) admits them.
    reasons = before["reasons"].str.split("|")
    newly_admitted = {i for i, r in reasons.items()
                      if r != [""] and all(x.startswith("tag:") for x in r) and "tag:no_humans" not in r}
    assert len(newly_admitted) >= 5
    settings = set_setting(CurationSettings(), "prefilter.exclude_tags.general", "[no_humans]")
    save_settings(clipped.settings_path, settings)

    def refuse(*args, **kwargs):
        raise AssertionError("an image was opened")

    try:
        monkeypatch.setattr(Image, "open", refuse)
        clipped.materialize(["metadata_prefilter", "clip_subset"], shards=shards)
        monkeypatch.undo()
        after = _concat(clipped, "metadata_prefilter").set_index("image_id")
        admitted_now = set(after.index[after["decode"]]) - set(before.index[before["decode"]])
        assert admitted_now == newly_admitted
        subset = _concat(clipped, "clip_subset").set_index("image_id")
        assert (subset.loc[sorted(admitted_now), "drop_reasons"].str.split("|").str[0] == "not_encoded").all()

        result = clipped.materialize(["clip_embeddings", "image_stats"], shards=shards)
        meta = clipped.metadata(result, "clip_embeddings")
        assert meta["range_encoded"] == len(admitted_now)
        assert meta["range_reused"] == int(before["decode"].sum()) - int((before["decode"] & ~after["decode"]).sum())
        assert meta["range_never_decoded_prefiltered"] == int((~after["decode"]).sum())
    finally:
        monkeypatch.undo()
        clipped.settings_path.unlink(missing_ok=True)
        clipped.materialize(["metadata_prefilter", "clip_embeddings", "image_stats", "clip_scores"], shards=shards)
        clipped.materialize(["clip_subset"], shards=shards)


def test_annotate_mode_decodes_everything_and_still_drops_the_excluded(clipped):
    shards = clipped.shards
    save_settings(clipped.settings_path, set_setting(CurationSettings(), "prefilter.mode", "annotate"))
    try:
        result = clipped.materialize(["metadata_prefilter"], shards=shards)
        assert clipped.metadata(result, "metadata_prefilter")["never_decoded"] == 0
        result = clipped.materialize(["clip_embeddings", "image_stats", "clip_scores"], shards=shards)
        assert clipped.metadata(result, "clip_embeddings")["never_decoded_prefiltered"] == 0
        prefilter = _concat(clipped, "metadata_prefilter").set_index("image_id")
        assert set(_concat(clipped, "clip_embeddings")["image_id"]) == set(prefilter.index)
        clipped.materialize(["clip_subset"], shards=shards)
        subset = _concat(clipped, "clip_subset").set_index("image_id")
        excluded = prefilter.index[prefilter["excluded"]]
        assert len(excluded) and subset.loc[excluded, "drop_reasons"].str.contains("prefiltered").all()
    finally:
        clipped.settings_path.unlink(missing_ok=True)
        clipped.materialize(["metadata_prefilter", "clip_embeddings", "image_stats", "clip_scores"], shards=shards)
        clipped.materialize(["clip_subset"], shards=shards)


def test_an_index_newer_than_the_prefilter_stops_the_decode(clipped):
    shard = clipped.shards[0]
    folder = clipped.root / "original" / shard
    source = next(p for p in sorted(folder.iterdir()) if p.suffix == ".jpg")
    new = folder / f"{int(source.stem) + 1000 * 996}.jpg"
    new.write_bytes(source.read_bytes())
    try:
        clipped.materialize(["shard_index"], shard)
        with pytest.raises(Exception, match="older than shard_index"):
            clipped.materialize(["clip_embeddings", "image_stats"], shard)
    finally:
        new.unlink()
        clipped.materialize(["shard_index", "metadata_prefilter", "clip_embeddings", "image_stats"], shard)
