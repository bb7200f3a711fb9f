"""The active-learning loop's assets on generated sample data, with the generator's ground
truth as the simulated labeler."""

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from danbooru_assets.export.curated import export_curated, read_webdataset_samples
from danbooru_assets.labels.store import LabelStore
from danbooru_assets.pose.keypoint_files import read_keypoint_files
from danbooru_assets.quality.queue import round_targets
from danbooru_assets.devtools.sample_data import read_ground_truth
from danbooru_assets.orchestration.sensors import build_retrain_sensor
from danbooru_assets.settings import CurationSettings, load_settings, save_settings, set_setting

QUALITY_PER_SHARD = ["quality_predictions"]


@pytest.fixture(scope="module")
def loop(pipeline):
    settings = CurationSettings()
    for key, value in {
        "quality.round_fractions": "[0.25, 0.5, 0.75]",
        "quality.min_round_size": "4",
        "pose.check_midpoint_density": "false",
        "pose.ratio_mad_k": "8",
    }.items():
        settings = set_setting(settings, key, value)
    save_settings(pipeline.settings_path, settings)
    pipeline.run_through("pose", keep_all=True)
    return pipeline


def _refresh(pipeline):
    """What the retrain sensor and eager automation do after labels change."""
    result = pipeline.materialize(["quality_model"])
    pipeline.materialize(QUALITY_PER_SHARD, shards=pipeline.shards)
    pipeline.materialize(["labeling_queue"])
    return pipeline.metadata(result, "quality_model")


def _label_queue(pipeline, store: LabelStore, round_: int) -> pd.DataFrame:
    queue = pipeline.table("labeling_queue")
    truth = read_ground_truth(pipeline.root).set_index("image_id")["quality"]
    for image_id in queue["image_id"]:
        store.add(int(image_id), truth[image_id], labeler="simulated", round=round_)
    return queue


def test_rounds_queue_label_retrain(loop):
    store = LabelStore(loop.resources["label_store"].path)
    # Round 1: no labels yet → no model, a diversity queue.
    meta = _refresh(loop)
    assert meta["trained"] is False
    predictions = pd.concat([loop.table("quality_predictions", s) for s in loop.shards])
    pool = len(predictions)
    assert pool >= 12 and predictions["p_good"].isna().all()
    first = _label_queue(loop, store, 1)
    plan = round_targets(pool, [0.25, 0.5, 0.75], 4)
    assert len(first) == plan[0]
    assert first["image_id"].is_unique

    # Round 2: a model trained on round 1's labels, a queue of new images only.
    meta = _refresh(loop)
    assert meta["trained"] is True and meta["labels"] == len(first)
    assert "data:image/png;base64," in meta["confusion_matrix"]
    predictions = pd.concat([loop.table("quality_predictions", s) for s in loop.shards])
    probs = predictions[["p_good", "p_questionable", "p_bad"]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    second = _label_queue(loop, store, 2)
    assert second["round"].iloc[0] == 2
    assert not set(second["image_id"]) & set(first["image_id"])  # never an image already labeled
    assert len(second) == plan[1] - plan[0] and len(second) > len(first)  # a real second round, larger
    assert len(set(first["image_id"]) | set(second["image_id"])) <= pool

    # Human labels override predictions in the curated dataset.
    _refresh(loop)
    loop.materialize(["curated_dataset"], shards=loop.shards)
    curated = pd.concat([loop.table("curated_dataset", s) for s in loop.shards])
    truth = read_ground_truth(loop.root).set_index("image_id")["quality"]
    human = curated.loc[curated["source"] == "human"]
    assert len(human) and (human["class"].to_numpy() == truth[human["image_id"]].to_numpy()).all()
    assert set(curated["class"]) <= {"good", "questionable"}

    # The export re-imports exactly: keypoint JSON (seed format) and WebDataset samples.
    out = loop.root.parent / "export"
    counts = export_curated(loop.storage, loop.root, out, samples_per_shard=5)
    assert counts["images"] == len(curated) and counts["shards"] == -(-len(curated) // 5)
    keypoints = pd.concat([loop.table("pose_keypoints", s) for s in loop.shards])
    exported = keypoints.loc[keypoints["image_id"].isin(curated["image_id"]) & (keypoints["status"] == "ok")]
    for source in (out / "keypoints", out / "keypoints.tar.gz"):
        reimported, report = read_keypoint_files(source, axis_order="yx")
        assert report.malformed == []
        expected = exported.set_index("image_id").sort_index()[reimported.columns[1:]]
        pd.testing.assert_frame_equal(reimported.set_index("image_id").sort_index(), expected, check_dtype=False)
    samples = read_webdataset_samples(sorted((out / "webdataset").glob("shard-*.tar")))
    assert sorted(int(s["__key__"]) for s in samples) == sorted(curated["image_id"])
    assert all(len(s) == 3 for s in samples)  # key, image bytes, json

    # A second labeler disagrees on one image, agrees on another; the first labeler re-sees
    # one image (a recheck) and changes their mind: the queue reports both kinds of agreement.
    a, b, c = (int(i) for i in first["image_id"][:3])
    truth = read_ground_truth(loop.root).set_index("image_id")["quality"]
    other = {"good": "bad", "bad": "questionable", "questionable": "good"}
    store.add(a, other[truth[a]], labeler="second")
    store.add(b, truth[b], labeler="second")
    store.add(c, other[truth[c]], labeler="simulated", source="recheck")
    queue_meta = loop.metadata(loop.materialize(["labeling_queue"]), "labeling_queue")
    assert queue_meta["images_with_several_labelers"] == 2 and queue_meta["disagreements"] == 2
    assert queue_meta["self_agreement_pairs"] == 1 and queue_meta["self_agreement_kappa"] == "0.000"
    assert f"| {a} | second: {other[truth[a]]}, simulated: {truth[a]} |" in queue_meta["disagreements_to_review"]
    assert f"| {c} | simulated (re-shown): {truth[c]} → {other[truth[c]]} |" in queue_meta["disagreements_to_review"]
    # the figures name the labelers
    assert "| second · simulated | 2 | 0.50 |" in queue_meta["agreement_by_labeler"]
    assert "| simulated |" in queue_meta["agreement_by_labeler"] and "| second | 2 |" in queue_meta["agreement_by_labeler"]

    # A verify part of the round: the model's most confident predictions beside the uncertain ones.
    assert queue_meta["queue_verify"] == 0 and "off: quality.verify_fraction = 0" in queue_meta["round_plan"]
    save_settings(loop.settings_path, set_setting(load_settings(loop.settings_path), "quality.verify_fraction", "0.5"))
    queue_meta = loop.metadata(loop.materialize(["labeling_queue"]), "labeling_queue")
    queue = loop.table("labeling_queue")
    n_verify = int((queue["queue"] == "verify").sum())
    assert n_verify == queue_meta["queue_verify"] > 0 and queue_meta["queue_uncertainty"] == len(queue) - n_verify
    assert f"{n_verify} verify (quality.verify_fraction = 0.5" in queue_meta["round_plan"]
    assert queue["queue_rank"].tolist() == list(range(len(queue)))


def test_retrain_sensor_waits_for_enough_new_labels(tmp_path):
    from danbooru_assets.orchestration.resources import LabelStoreResource
    from danbooru_assets.orchestration.resources import SettingsResource

    job = dg.define_asset_job("quality_model_job", selection=["quality_model"])
    sensor = build_retrain_sensor(job)
    settings_path = tmp_path / "s.yaml"
    save_settings(settings_path, set_setting(CurationSettings(), "quality.retrain_min_new_labels", "3"))
    resources = {
        "label_store": LabelStoreResource(path=str(tmp_path / "labels.sqlite")),
        "settings": SettingsResource(path=str(settings_path)),
    }
    store = resources["label_store"].store()

    def tick(cursor):
        ctx = dg.build_sensor_context(cursor=cursor, resources=resources)
        result = sensor.evaluate_tick(ctx)
        observed = [e.tags["dagster/data_version"] for e in result.asset_events if e.asset_key.path == ["labels"]]
        return result.run_requests or [], result.cursor, result.skip_message, observed

    store.add(1, "good", "a")
    store.add(2, "bad", "a")
    requests, cursor, _, observed = tick(None)
    assert requests == [] and observed == [store.version()]  # labels observed: automation can start
    event = next(e for e in sensor.evaluate_tick(dg.build_sensor_context(cursor=None, resources=resources)).asset_events)
    assert event.metadata["labeled"].value == 2 and "kappa_between_labelers" in event.metadata
    requests, cursor, skip, observed = tick(cursor)
    assert requests == [] and observed == [] and "2 new labels" in skip
    store.add(3, "questionable", "a")
    requests, cursor, _, observed = tick(cursor)
    assert len(requests) == 1 and observed == [store.version()]
    requests, cursor, skip, _ = tick(cursor)
    assert requests == [] and "0 new labels" in skip


def test_missing_embeddings_are_left_out_and_a_clip_model_mix_is_an_error(loop):
    from danbooru_assets.core.tables import write_parquet
    from danbooru_assets.orchestration.partitions import shard_key

    store = LabelStore(loop.resources["label_store"].path)
    subset = pd.concat([loop.table("pose_subset", s) for s in loop.shards])
    kept = subset.loc[subset["keep"].fillna(False).astype(bool), "image_id"]
    truth = read_ground_truth(loop.root).set_index("image_id")["quality"]
    if truth[list(store.labeled_ids())].nunique() < 2:  # run on its own: label every other kept image
        for image_id in kept.iloc[::2]:
            store.add(int(image_id), truth[image_id], labeler="simulated", round=1)
    labeled = set(store.labeled_ids())
    by_shard = kept.groupby(kept.map(shard_key))
    # a shard holding labeled and unlabeled kept images
    shard = max(by_shard.groups, key=lambda s: min(len(set(by_shard.get_group(s)) & labeled),
                                                   len(set(by_shard.get_group(s)) - labeled)))
    assert len({shard_key(i) for i in labeled}) >= 2
    in_shard = by_shard.get_group(shard)
    labeled_id = next(int(i) for i in in_shard if i in labeled)
    unlabeled_id = next(int(i) for i in in_shard if i not in labeled)
    path = loop.storage.asset_path("clip_embeddings", shard)
    stored = loop.table("clip_embeddings", shard)
    try:
        # Two images lost their embedding (unreadable now): left out and counted, never zeros.
        gone = stored["image_id"].isin([labeled_id, unlabeled_id])
        lost = stored.copy()
        lost.loc[gone, "embedding"] = None
        lost.loc[gone, "status"] = "unreadable: test"
        write_parquet(path, lost)
        meta = loop.metadata(loop.materialize(["quality_model"]), "quality_model")
        assert meta["trained"] is True
        assert meta["labels_without_embedding"] == 1 and meta["labels_used"] == meta["labels"] - 1
        meta = loop.metadata(loop.materialize(["quality_predictions"], shard), "quality_predictions")
        assert meta["without_embedding"] == 2
        predictions = loop.table("quality_predictions", shard)
        assert len(predictions) and not predictions["image_id"].isin([labeled_id, unlabeled_id]).any()

        # One shard encoded by another CLIP model: training on the mix is refused, naming both.
        write_parquet(path, stored.assign(model_fingerprint_id="another-clip-model"))
        with pytest.raises(Exception, match="2 CLIP models") as err:
            loop.materialize(["quality_model"])
        assert "another-clip-model" in str(err.value) and shard in str(err.value)
    finally:
        write_parquet(path, stored)
        _refresh(loop)


def test_predictions_refuse_a_model_older_than_the_classifier_setting(loop):
    """quality_predictions never predicts with a quality_model trained before
    quality.classifier changed: the run fails naming quality_model_job."""
    from danbooru_assets.settings import load_settings

    shard = loop.shards[0]
    assert bool(loop.table("quality_model")["trained"].iloc[0])  # the rounds above trained one
    before_bytes = loop.settings_path.read_bytes()
    before = loop.table("quality_predictions", shard)
    save_settings(loop.settings_path, set_setting(load_settings(loop.settings_path), "quality.classifier", "mlp"))
    try:
        with pytest.raises(Exception, match="quality_model_job"):
            loop.materialize(["quality_predictions"], shard)
        assert loop.table("quality_predictions", shard).equals(before)
        # a new round plan changes no model: predictions run
        save_settings(loop.settings_path, set_setting(load_settings(loop.settings_path), "quality.classifier", "logreg"))
        save_settings(loop.settings_path, set_setting(load_settings(loop.settings_path), "quality.min_round_size", "5"))
        loop.materialize(["quality_predictions"], shard)
    finally:
        loop.settings_path.write_bytes(before_bytes)
