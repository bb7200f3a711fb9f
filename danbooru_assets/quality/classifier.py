"""The active-learning quality classifier: pipeline, training with cross-validated
metrics, predictions with uncertainty, and the model's fingerprint.

Its inputs are built by ``quality.features``; the labeling queue and the round plan are
in ``quality.queue``.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from typing import Any, Sequence

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.exceptions import ConvergenceWarning
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from sklearn.model_selection import StratifiedKFold
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from danbooru_assets.labels.classes import LABEL_CLASSES
from danbooru_assets.quality.kinds import CLASSIFIER_KINDS

CLASSES: tuple[str, ...] = LABEL_CLASSES
PROBA_COLUMNS: tuple[str, ...] = tuple(f"p_{c}" for c in CLASSES)


# ---- model --------------------------------------------------------------------------
def make_pipeline(kind: str = "logreg", seed: int = 0, C: float = 0.1) -> Pipeline:
    """Impute → standardise → classifier (``logreg``: balanced multinomial LR; ``mlp``).

    ``C`` is the logistic regression's inverse L2 strength: small by default because
    early rounds have a few hundred labels for hundreds of CLIP dimensions, where a
    weakly regularised model memorises label noise.
    """
    if kind not in CLASSIFIER_KINDS:
        raise ValueError(f"unknown classifier kind {kind!r}; expected one of {', '.join(CLASSIFIER_KINDS)}")
    if kind == "logreg":
        # lbfgs fits the multinomial (softmax) loss for >2 classes; balanced weights
        # because the seed's pools are imbalanced (40/30/30 or worse).
        clf: Any = LogisticRegression(C=C, class_weight="balanced", max_iter=2000, random_state=seed)
    else:  # mlp
        clf = MLPClassifier(hidden_layer_sizes=(256,), alpha=1e-3, max_iter=400, random_state=seed)
    return Pipeline([
        # keep_empty_features: an all-NaN pose column keeps its slot, so the feature
        # layout (and the fingerprint's feature list) is stable across rounds.
        ("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
        ("scale", StandardScaler()),
        ("clf", clf),
    ])


def _balanced_weights(y: np.ndarray) -> np.ndarray:
    classes, counts = np.unique(y, return_counts=True)
    per_class = {c: len(y) / (len(classes) * n) for c, n in zip(classes, counts)}
    return np.array([per_class[v] for v in y], dtype=np.float64)


def _fit(pipe: Pipeline, X: np.ndarray, y: np.ndarray, kind: str) -> Pipeline:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if kind == "mlp":
            # MLPClassifier has no class_weight: weight samples instead.
            pipe.fit(X, y, clf__sample_weight=_balanced_weights(y))
        else:
            pipe.fit(X, y)
    return pipe


def fit_quality_model(X: np.ndarray | pd.DataFrame, y: Sequence[str], kind: str = "logreg",
                      seed: int = 0, C: float = 0.1) -> Pipeline:
    """Fit the pipeline on all rows, without the cross-validation of ``train_quality_model``."""
    return _fit(make_pipeline(kind, seed, C), np.asarray(X, dtype=np.float32), _labels_array(y), kind)


def _labels_array(y: Sequence[Any]) -> np.ndarray:
    arr = np.asarray([str(v) for v in y], dtype=object)
    bad = sorted(set(arr) - set(CLASSES))
    if bad:
        raise ValueError(f"unknown class(es) {bad}; expected {CLASSES}")
    return arr


def train_quality_model(X: np.ndarray | pd.DataFrame, y: Sequence[str], kind: str = "logreg",
                        seed: int = 0, max_folds: int = 5, C: float = 0.1) -> tuple[Pipeline, dict[str, Any]]:
    """Fit the classifier on all rows; report stratified cross-validated metrics.

    Folds = min(``max_folds``, smallest class count); classes with a single sample are
    kept in every training fold but never scored (they cannot be held out). With fewer
    than two scorable samples per class the metrics carry ``n_splits = 0`` and no scores.
    Metrics: per-class precision/recall/F1/support, a 3×3 confusion matrix in
    ``CLASSES`` order (rows = truth), accuracy, macro F1, class counts.
    """
    X = np.asarray(X, dtype=np.float32)
    y_arr = _labels_array(y)
    if X.shape[0] != len(y_arr):
        raise ValueError(f"X has {X.shape[0]} rows but y has {len(y_arr)} labels")
    present, counts = np.unique(y_arr, return_counts=True)
    if len(present) < 2:
        raise ValueError(f"need labels of at least two classes to train, got {dict(zip(present, counts))}")
    count_of = dict(zip(present.tolist(), counts.tolist()))

    scorable_classes = [c for c in present if count_of[c] >= 2]
    scorable = np.isin(y_arr, scorable_classes)
    n_splits = min(max_folds, min(count_of[c] for c in scorable_classes)) if len(scorable_classes) >= 2 else 0

    metrics: dict[str, Any] = {
        "kind": kind,
        "C": float(C),
        "classes": list(CLASSES),
        "n_samples": int(len(y_arr)),
        "n_features": int(X.shape[1]),
        "class_counts": {c: int(count_of.get(c, 0)) for c in CLASSES},
        "n_splits": int(n_splits),
        "n_scored": 0,
        "per_class": {c: {"precision": None, "recall": None, "f1": None, "support": 0} for c in CLASSES},
        "confusion_matrix": [[0] * len(CLASSES) for _ in CLASSES],
        "accuracy": None,
        "macro_f1": None,
    }
    if n_splits >= 2:
        idx_scored = np.flatnonzero(scorable)
        idx_always = np.flatnonzero(~scorable)  # singleton classes: train-only
        preds = np.empty(len(idx_scored), dtype=object)
        skf = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        for train_pos, test_pos in skf.split(idx_scored, y_arr[idx_scored]):
            train_idx = np.concatenate([idx_scored[train_pos], idx_always])
            fold = _fit(make_pipeline(kind, seed, C), X[train_idx], y_arr[train_idx], kind)
            preds[test_pos] = fold.predict(X[idx_scored[test_pos]])
        truth = y_arr[idx_scored]
        p, r, f, s = precision_recall_fscore_support(truth, preds, labels=list(CLASSES), zero_division=0)
        metrics["per_class"] = {
            c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, c in enumerate(CLASSES)
        }
        metrics["confusion_matrix"] = confusion_matrix(truth, preds, labels=list(CLASSES)).tolist()
        metrics["n_scored"] = int(len(truth))
        metrics["accuracy"] = float(np.mean(truth == preds))
        scored_f1 = [float(f[i]) for i, c in enumerate(CLASSES) if s[i] > 0]
        metrics["macro_f1"] = float(np.mean(scored_f1)) if scored_f1 else None

    model = _fit(make_pipeline(kind, seed, C), X, y_arr, kind)
    return model, metrics


def confusion_matrix_image(metrics: dict[str, Any], title: str = "cross-validated confusion matrix") -> Image.Image:
    """The metrics' confusion matrix as a picture (counts, rows = truth) for the UI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from danbooru_assets.core.visuals import figure_to_image

    classes = list(metrics.get("classes", CLASSES))
    cm = np.asarray(metrics["confusion_matrix"], dtype=float)
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(1.0, cm.max()))
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("human label")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    acc = metrics.get("accuracy")
    ax.set_title(f"{title}\naccuracy {acc:.3f}" if acc is not None else f"{title}\n(too few labels to score)",
                 fontsize=9)
    return figure_to_image(fig)


def model_fingerprint(pipeline: Pipeline, feature_names: Sequence[str]) -> str:
    """A short hash of the fitted model: step types, parameters, learned arrays, features.

    Two fits that would predict identically get the same fingerprint; any change of data,
    hyper-parameters or feature layout changes it (used to cache predictions).
    """
    h = hashlib.sha256()
    h.update(("|".join(map(str, feature_names))).encode())
    for name, step in pipeline.steps:
        h.update(f"{name}:{type(step).__module__}.{type(step).__qualname__}".encode())
        h.update(repr(sorted((k, repr(v)) for k, v in step.get_params(deep=False).items())).encode())
        for attr in sorted(vars(step)):
            if not attr.endswith("_") or attr.startswith("_"):
                continue
            value = getattr(step, attr)
            values = value if isinstance(value, (list, tuple)) else [value]
            h.update(attr.encode())
            for v in values:
                if isinstance(v, np.ndarray):
                    h.update(np.ascontiguousarray(v).tobytes() if v.dtype != object else repr(v.tolist()).encode())
                elif isinstance(v, (int, float, str, np.number)):
                    h.update(repr(v).encode())
    return h.hexdigest()[:16]


def predict_proba_frame(pipeline: Pipeline, X: np.ndarray | pd.DataFrame,
                        index: pd.Index | Sequence[Any] | None = None) -> pd.DataFrame:
    """Per-row ``p_good, p_questionable, p_bad, predicted_class, uncertainty``.

    Classes the model never saw get probability 0. ``uncertainty`` is the normalised
    entropy of the three probabilities (0 = certain, 1 = uniform).
    """
    X = np.asarray(X, dtype=np.float32)
    probs = np.zeros((X.shape[0], len(CLASSES)), dtype=np.float64)
    if X.shape[0]:
        raw = pipeline.predict_proba(X)
        for j, cls in enumerate(pipeline.classes_):
            probs[:, CLASSES.index(str(cls))] = raw[:, j]
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(np.where(probs > 0, probs * np.log(probs), 0.0), axis=1) / math.log(len(CLASSES))
    frame = pd.DataFrame(probs.astype(np.float32), columns=list(PROBA_COLUMNS), index=index)
    frame["predicted_class"] = pd.Series(np.asarray(CLASSES, dtype=object)[probs.argmax(axis=1)] if len(probs)
                                         else [], index=frame.index, dtype="string")
    frame["uncertainty"] = np.clip(ent, 0.0, 1.0).astype(np.float32)
    return frame


def no_predictions(n: int) -> pd.DataFrame:
    """``predict_proba_frame``'s columns for ``n`` rows without a model: all missing."""
    frame = pd.DataFrame({c: np.full(n, np.nan, dtype=np.float32) for c in PROBA_COLUMNS})
    frame["predicted_class"] = pd.Series([pd.NA] * n, dtype="string")
    frame["uncertainty"] = np.full(n, np.nan, dtype=np.float32)
    return frame
