"""The quality classifier: metrics, tiny label sets, fingerprints, kinds, and the
simulated active-learning loop."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from danbooru_assets.bench.active_learning import compare, make_synthetic
from danbooru_assets.quality.classifier import (
    CLASSES,
    PROBA_COLUMNS,
    confusion_matrix_image,
    make_pipeline,
    model_fingerprint,
    no_predictions,
    predict_proba_frame,
    train_quality_model,
)
from danbooru_assets.quality.kinds import CLASSIFIER_KINDS


def _toy(n: int = 240, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three well separated Gaussian blobs (40/30/30)."""
    rng = np.random.default_rng(seed)
    y = rng.choice(3, size=n, p=[0.4, 0.3, 0.3])
    centres = np.eye(3, dim) * 6
    return (centres[y] + rng.normal(size=(n, dim))).astype(np.float16), np.asarray(CLASSES, dtype=object)[y]


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


@pytest.mark.parametrize("kind", CLASSIFIER_KINDS)
def test_every_kind_settings_accept_builds_a_classifier(kind) -> None:
    X, y = _toy(n=90)
    model, _ = train_quality_model(X, y, kind=kind, max_folds=2)
    predicted = predict_proba_frame(model, X)["predicted_class"]
    assert len(predicted) == len(X) and set(predicted) <= set(CLASSES)


def test_an_unknown_kind_names_the_kinds() -> None:
    with pytest.raises(ValueError, match="logreg, mlp"):
        make_pipeline("xgboost")


def test_no_predictions_has_the_prediction_columns_all_missing() -> None:
    frame = no_predictions(3)
    X, y = _toy(n=60)
    model, _ = train_quality_model(X, y, max_folds=2)
    assert list(frame.columns) == list(predict_proba_frame(model, X[:3]).columns)
    assert frame[list(PROBA_COLUMNS)].isna().all().all() and frame["uncertainty"].isna().all()
    assert frame["predicted_class"].isna().all() and str(frame["predicted_class"].dtype) == "string"
    assert no_predictions(0).empty
