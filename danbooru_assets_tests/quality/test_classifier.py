"""Quality classifier, labeling queue, round plan, and the simulated active-learning loop."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from danbooru_assets.bench.active_learning import compare, make_synthetic
from danbooru_assets.quality.classifier import (CLASSES, build_features, confusion_matrix_image, current_round,
                                     embedding_matrix, labels_needed, model_fingerprint, predict_proba_frame,
                                     round_plan, rows_with_embeddings, select_labeling_queue,
                                     single_clip_model, train_quality_model)


def _toy(n: int = 240, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three well separated Gaussian blobs (40/30/30)."""
    rng = np.random.default_rng(seed)
    y = rng.choice(3, size=n, p=[0.4, 0.3, 0.3])
    centres = np.eye(3, dim) * 6
    return (centres[y] + rng.normal(size=(n, dim))).astype(np.float16), np.asarray(CLASSES, dtype=object)[y]


def test_features_from_embeddings_and_pose_with_nans() -> None:
    emb = np.ones((4, 3), dtype=np.float16)
    pose = pd.DataFrame({"hip_y": [0.5, np.nan, 0.2, np.nan], "name": list("abcd"), "n": [1, 2, 3, 4]})
    X, names = build_features(emb, pose)
    assert X.shape == (4, 5) and X.dtype == np.float32
    assert names == ["emb_0", "emb_1", "emb_2", "hip_y", "n"]  # non-numeric columns dropped
    with pytest.raises(ValueError, match="row counts"):
        build_features(emb, pose.iloc[:2])
    frame = pd.DataFrame({"image_id": [1, 2], "embedding": [np.zeros(3), np.ones(3)]})
    assert embedding_matrix(frame).shape == (2, 3)
    wide = pd.DataFrame({"emb_10": [1.0], "emb_2": [2.0], "image_id": [5]})
    assert embedding_matrix(wide).tolist() == [[2.0, 1.0]]  # numeric column order


def test_images_without_an_embedding_are_left_out_not_zeroed() -> None:
    stored = pd.DataFrame({
        "image_id": [3, 1, 2, 2],
        "embedding": [np.full(2, 3.0), np.full(2, 1.0), None, np.full(2, 2.0)],  # 2: unreadable copy first
        "model_fingerprint_id": ["m", "m", "m", "m"],
    })
    rows, without = rows_with_embeddings([5, 2, 1, 4, 3], stored)
    assert rows["image_id"].tolist() == [2, 1, 3]  # the asked order, one row each
    assert without.tolist() == [5, 4]
    assert embedding_matrix(rows).tolist() == [[2.0, 2.0], [1.0, 1.0], [3.0, 3.0]]
    none, missing = rows_with_embeddings([7], stored)
    assert none.empty and missing.tolist() == [7]


def test_embeddings_of_two_clip_models_are_an_error_naming_both() -> None:
    rows = pd.DataFrame({"image_id": [1001, 2001, 1002, 3005], "model_fingerprint_id": ["aaa", "aaa", "bbb", "aaa"]})
    assert single_clip_model(rows.iloc[[0, 1, 3]], "test") == "aaa"
    assert single_clip_model(rows.iloc[0:0], "test") is None
    with pytest.raises(ValueError, match="2 CLIP models") as err:
        single_clip_model(rows, "quality_model")
    message = str(err.value)
    assert "aaa (2 shards: 0001, 0005)" in message and "bbb (1 shard: 0002)" in message


def test_metrics_on_separable_toy_set() -> None:
    X, y = _toy()
    X[::7, 0] = np.nan  # imputation keeps NaNs from breaking the fit
    model, metrics = train_quality_model(X, y, seed=0)
    assert metrics["n_splits"] == 5 and metrics["n_scored"] == len(y)
    cm = np.asarray(metrics["confusion_matrix"])
    assert cm.shape == (3, 3) and cm.sum() == len(y)
    assert cm.sum(axis=1).tolist() == [int((y == c).sum()) for c in CLASSES]  # rows = truth
    assert metrics["accuracy"] > 0.97
    for c in CLASSES:
        m = metrics["per_class"][c]
        assert m["precision"] > 0.9 and m["recall"] > 0.9 and 0.9 < m["f1"] <= 1.0
        assert m["support"] == metrics["class_counts"][c]
    probs = predict_proba_frame(model, X)
    assert list(probs.columns) == ["p_good", "p_questionable", "p_bad", "predicted_class", "uncertainty"]
    np.testing.assert_allclose(probs[["p_good", "p_questionable", "p_bad"]].sum(axis=1), 1.0, atol=1e-5)
    assert (probs.predicted_class.to_numpy(dtype=object) == y).mean() > 0.97
    assert probs.uncertainty.between(0, 1).all()
    # a point between the blobs is more uncertain than a blob centre
    centre, middle = np.eye(3, 8)[0] * 6, np.eye(3, 8)[:2].sum(axis=0) * 3
    u = predict_proba_frame(model, np.stack([centre, middle]))["uncertainty"].to_numpy()
    assert u[1] > u[0] + 0.3


def test_tiny_label_sets_and_singleton_classes() -> None:
    X, y = _toy(n=60)
    y = y.copy()
    idx = np.r_[np.flatnonzero(y == "good")[:3], np.flatnonzero(y == "bad")[:2], np.flatnonzero(y == "questionable")[:1]]
    model, metrics = train_quality_model(X[idx], y[idx])
    assert metrics["n_splits"] == 2  # smallest scorable class has 2 samples
    assert metrics["n_scored"] == 5  # the singleton "questionable" is train-only
    assert metrics["per_class"]["questionable"]["support"] == 0
    assert set(model.classes_) == set(CLASSES)
    only_two = np.r_[np.flatnonzero(y == "good")[:1], np.flatnonzero(y == "bad")[:1]]
    model2, metrics2 = train_quality_model(X[only_two], y[only_two])
    assert metrics2["n_splits"] == 0 and metrics2["accuracy"] is None
    probs = predict_proba_frame(model2, X[:3])
    assert (probs.p_questionable == 0).all()  # a class the model never saw
    with pytest.raises(ValueError, match="two classes"):
        train_quality_model(X[:3], ["good"] * 3)
    with pytest.raises(ValueError, match="unknown class"):
        train_quality_model(X[:2], ["good", "meh"])


def test_confusion_image_fingerprint_and_mlp() -> None:
    X, y = _toy(n=120)
    model, metrics = train_quality_model(X, y, kind="mlp", seed=1)
    assert metrics["accuracy"] > 0.9
    img = confusion_matrix_image(metrics)
    assert isinstance(img, Image.Image) and img.width > 100 and img.height > 100
    names = [f"emb_{i}" for i in range(X.shape[1])]
    lr1, _ = train_quality_model(X, y, seed=0)
    lr2, _ = train_quality_model(X, y, seed=0)
    lr3, _ = train_quality_model(X[:-10], y[:-10], seed=0)
    fp = model_fingerprint(lr1, names)
    assert fp == model_fingerprint(lr2, names)  # same data + params → same model
    assert fp != model_fingerprint(lr3, names)  # different training data
    assert fp != model_fingerprint(lr1, names[::-1])  # different feature layout
    assert fp != model_fingerprint(model, names)


def test_queue_size_no_repeats_and_never_labeled() -> None:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(400, 16)).astype(np.float16)
    cands = pd.DataFrame({"image_id": np.arange(1000, 1400), "uncertainty": rng.random(400)})
    labeled = set(range(1000, 1300, 2))
    q = select_labeling_queue(cands, emb, 30, labeled, seed=0)
    assert len(q) == 30 and q.image_id.is_unique
    assert not set(q.image_id) & labeled
    assert q.queue_rank.tolist() == list(range(30))
    assert q.uncertainty.is_monotonic_decreasing  # most uncertain first
    assert q.cluster.nunique() == 30  # one per cluster: diverse
    # every pick is among the 5×size most uncertain unlabeled candidates
    pool = cands[~cands.image_id.isin(labeled)].nlargest(150, "uncertainty")
    assert set(q.image_id) <= set(pool.image_id)
    # "none" = plain top-k uncertainty; cold start = k-means only; asking too much = all
    top = select_labeling_queue(cands, emb, 10, labeled, diversity="none")
    assert set(top.image_id) == set(pool.image_id[:10])
    cold = select_labeling_queue(cands.drop(columns="uncertainty"), emb, 25, labeled, seed=3)
    assert len(cold) == 25 and cold.image_id.is_unique and not set(cold.image_id) & labeled
    everything = select_labeling_queue(cands, emb, 10_000, labeled)
    assert len(everything) == 400 - len(labeled)
    assert select_labeling_queue(cands, emb, 5, set(cands.image_id)).empty


def test_diversity_spreads_over_clusters() -> None:
    # two tight groups; the most uncertain points are all in group A
    rng = np.random.default_rng(1)
    a = rng.normal(0, 0.01, size=(50, 4)) + 5
    b = rng.normal(0, 0.01, size=(50, 4)) - 5
    cands = pd.DataFrame({"image_id": np.arange(100), "uncertainty": np.r_[np.full(50, 0.9), np.full(50, 0.8)]})
    q = select_labeling_queue(cands, np.vstack([a, b]), 2, set(), seed=0, pool_factor=100)
    assert sorted(q.image_id // 50) == [0, 1]  # one from each group
    plain = select_labeling_queue(cands, np.vstack([a, b]), 2, set(), diversity="none")
    assert sorted(plain.image_id // 50) == [0, 0]


def test_round_plan_and_current_round() -> None:
    plan = round_plan(10_000)
    assert plan == [100, 500, 2500]
    assert round_plan(50) == [1, 3, 13]
    assert current_round(0, plan) == 1 and labels_needed(0, plan) == 100
    assert current_round(100, plan) == 2 and labels_needed(120, plan) == 380
    assert current_round(2500, plan) == 3 and labels_needed(2600, plan) == 0
    with pytest.raises(ValueError):
        round_plan(100, (0.5, 0.1))


def test_uncertainty_sampling_not_worse_than_random_at_equal_budget() -> None:
    """Simulated loop on noisy, imbalanced synthetic data, averaged over three seeds."""
    df = compare(n_pool=1500, n_test=1000, dim=64, fractions=(0.02, 0.05, 0.1, 0.2), seeds=range(3))
    acc = df.pivot_table(index="round", columns="strategy", values="accuracy")
    assert len(acc) == 4
    assert (acc > 0.6).all().all()  # both actually learn (chance is ~0.4)
    gain = acc["uncertainty"] - acc["random"]
    assert gain.mean() >= 0.0, acc
    assert gain.iloc[-1] >= 0.01, acc  # at the largest budget AL is clearly ahead
    labels = df.groupby(["strategy", "round"])["labels"].first().unstack(0)
    assert (labels["uncertainty"] == labels["random"]).all()  # equal budgets


def test_synthetic_pool_shape_and_imbalance() -> None:
    pool = make_synthetic(2000, 10, dim=16, seed=0, label_noise=0.0)
    assert pool.x_pool.shape == (2000, 16) and pool.x_pool.dtype == np.float16
    shares = pd.Series(pool.y_pool_noisy).value_counts(normalize=True)
    assert abs(shares["good"] - 0.4) < 0.05 and abs(shares["bad"] - 0.3) < 0.05
