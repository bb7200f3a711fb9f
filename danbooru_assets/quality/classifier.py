"""The active-learning quality classifier and the labeling queue.

The seed's plan, made repeatable: label 1% of the pool, train, predict the rest, label
the next 5% chosen where the model is least sure (and diverse, so a round is not 500
near-duplicates of one confusing pose), retrain, then 25%. Features are the stored CLIP
embeddings plus numeric pose features, so training never touches an image.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from typing import Any, Sequence

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from sklearn.model_selection import StratifiedKFold
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from danbooru_assets.core.embeddings import embedding_matrix  # noqa: F401 (part of this module's API)
from danbooru_assets.labels.store import LABEL_CLASSES

CLASSES: tuple[str, ...] = LABEL_CLASSES
PROBA_COLUMNS: tuple[str, ...] = tuple(f"p_{c}" for c in CLASSES)


# ---- features ---------------------------------------------------------------------
def build_features(embeddings: np.ndarray | None, pose: pd.DataFrame | None = None) -> tuple[np.ndarray, list[str]]:
    """Concatenate embeddings [N, D] and numeric pose columns into X with feature names.

    Pose NaNs stay NaN here; the model pipeline imputes them (median of training rows),
    so missing keypoints never crash training or prediction.
    """
    blocks: list[np.ndarray] = []
    names: list[str] = []
    if embeddings is not None:
        emb = np.asarray(embeddings, dtype=np.float32)
        if emb.ndim != 2:
            raise ValueError(f"embeddings must be 2-D [N, D], got shape {emb.shape}")
        blocks.append(emb)
        names += [f"emb_{i}" for i in range(emb.shape[1])]
    if pose is not None:
        numeric = pose.select_dtypes(include=[np.number, "boolean"]).astype("float32")
        blocks.append(numeric.to_numpy(dtype=np.float32, na_value=np.nan))
        names += [str(c) for c in numeric.columns]
    if not blocks:
        raise ValueError("need embeddings and/or pose features")
    n = {b.shape[0] for b in blocks}
    if len(n) != 1:
        raise ValueError(f"embeddings and pose features have different row counts: {sorted(n)}")
    return np.concatenate(blocks, axis=1), names


def rows_with_embeddings(image_ids: Sequence[int] | np.ndarray, embeddings: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """The stored embedding row of each of ``image_ids`` that has one (in ``image_ids``'
    order, first row of an id stored twice), and the ids without one.

    Images without an embedding (unreadable, or not encoded yet) are left out, never
    given a zero vector: zeros would train the classifier and form a cluster of their own
    in the queue. Callers count and report the ids left out.
    """
    ids = pd.Series(np.asarray(image_ids, dtype=np.int64), name="image_id")
    stored = embeddings.loc[embeddings["embedding"].notna()].drop_duplicates("image_id")
    rows = ids.to_frame().merge(stored, on="image_id", how="left", sort=False)
    has = rows["embedding"].notna().to_numpy()
    return rows.loc[has].reset_index(drop=True), ids.to_numpy()[~has]


def single_clip_model(rows: pd.DataFrame, what: str) -> str | None:
    """The one CLIP model fingerprint of embedding ``rows`` (``image_id``,
    ``model_fingerprint_id``), None for no rows. Embeddings of two models live in two
    unrelated spaces: a mix raises, naming each fingerprint and the shards holding it."""
    from danbooru_assets.orchestration.partitions import shard_key

    fingerprints = rows["model_fingerprint_id"].dropna().astype(str)
    found = sorted(fingerprints.unique())
    if len(found) <= 1:
        return found[0] if found else None
    shards = rows.loc[fingerprints.index, "image_id"].map(shard_key)
    listed = []
    for fp in found:
        its = sorted(set(shards[fingerprints == fp]))
        listed.append(f"{fp} ({len(its)} shard{'s' if len(its) != 1 else ''}: "
                      f"{', '.join(its[:10])}{' …' if len(its) > 10 else ''})")
    raise ValueError(
        f"{what}: the embeddings come from {len(found)} CLIP models: " + "; ".join(listed)
        + ". Rematerialize clip_embeddings for those shards with one model first"
    )


# ---- model --------------------------------------------------------------------------
def make_pipeline(kind: str = "logreg", seed: int = 0, C: float = 0.1) -> Pipeline:
    """Impute → standardise → classifier (``logreg``: balanced multinomial LR; ``mlp``).

    ``C`` is the logistic regression's inverse L2 strength: small by default because
    early rounds have a few hundred labels for hundreds of CLIP dimensions, where a
    weakly regularised model memorises label noise.
    """
    if kind == "logreg":
        # lbfgs fits the multinomial (softmax) loss for >2 classes; balanced weights
        # because the seed's pools are imbalanced (40/30/30 or worse).
        clf: Any = LogisticRegression(C=C, class_weight="balanced", max_iter=2000, random_state=seed)
    elif kind == "mlp":
        clf = MLPClassifier(hidden_layer_sizes=(256,), alpha=1e-3, max_iter=400, random_state=seed)
    else:
        raise ValueError(f"unknown classifier kind {kind!r}; expected 'logreg' or 'mlp'")
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


# ---- queue --------------------------------------------------------------------------
def _cluster(points: np.ndarray, k: int, seed: int, max_dims: int = 64) -> np.ndarray:
    """Cluster labels for ``points`` into ``k`` groups.

    Diversity only needs coarse neighbourhoods, so wide embeddings are first projected to
    ``max_dims`` principal components, and large problems use mini-batch k-means with a
    single k-means++ initialisation: together ~10-30× cheaper on 512-D CLIP features.
    """
    if k <= 1 or len(points) <= 1:
        return np.zeros(len(points), dtype=np.int64)
    points = np.asarray(points, dtype=np.float32)
    if points.shape[1] > max_dims and len(points) > max_dims:
        points = PCA(n_components=max_dims, svd_solver="randomized", random_state=seed).fit_transform(points)
    with warnings.catch_warnings():
        # duplicate embeddings can leave fewer distinct points than clusters: harmless
        warnings.simplefilter("ignore", ConvergenceWarning)
        if len(points) > 20_000 or k > 512:
            km: Any = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=1, batch_size=4096)
        else:
            km = KMeans(n_clusters=k, random_state=seed, n_init=3)
        return km.fit_predict(points)


def select_labeling_queue(candidates: pd.DataFrame, embeddings: np.ndarray, size: int,
                          already_labeled: set[int] | Sequence[int] = (), seed: int = 0,
                          diversity: str = "kmeans", pool_factor: int = 5,
                          max_clusters: int = 2048, cold_sample: int = 50_000) -> pd.DataFrame:
    """The next ``size`` images to label, never one already labeled.

    ``candidates`` has ``image_id`` and (once a model exists) ``uncertainty``; row i of
    ``embeddings`` belongs to row i of ``candidates``. With uncertainty: the
    ``pool_factor × size`` most uncertain images are k-means clustered into ``size``
    clusters and the most uncertain image of each cluster is taken (uncertainty with
    diversity). Cold start (no/NaN uncertainty): clusters over all candidates and the
    image nearest each centroid. ``diversity="none"`` takes the top-uncertainty images.
    Above ``max_clusters`` clusters, picks go round-robin over clusters by uncertainty
    rank to keep k-means affordable. Returns the candidate rows plus ``queue_rank``
    (0 = label first) and ``cluster``.
    """
    if diversity not in ("kmeans", "none"):
        raise ValueError(f"unknown diversity {diversity!r}; expected 'kmeans' or 'none'")
    emb = np.asarray(embeddings, dtype=np.float32)
    if len(emb) != len(candidates):
        raise ValueError(f"{len(candidates)} candidates but {len(emb)} embedding rows")
    labeled = {int(i) for i in already_labeled}
    ids = candidates["image_id"].to_numpy(dtype=np.int64)
    keep = ~np.isin(ids, np.fromiter(labeled, dtype=np.int64, count=len(labeled)))
    # duplicated image ids in the candidates would be labeled twice: keep the first
    keep &= ~pd.Series(ids).duplicated().to_numpy()
    pos = np.flatnonzero(keep)
    size = int(min(max(size, 0), len(pos)))
    out_cols = list(candidates.columns) + ["queue_rank", "cluster"]
    if size == 0:
        return candidates.iloc[[]].assign(queue_rank=pd.Series(dtype="int64"),
                                          cluster=pd.Series(dtype="int64"))[out_cols]

    unc = (candidates["uncertainty"].to_numpy(dtype=np.float64)[pos]
           if "uncertainty" in candidates.columns else np.full(len(pos), np.nan))
    cold = bool(np.all(np.isnan(unc)))
    rng = np.random.default_rng(seed)

    if cold:
        if diversity == "none":
            chosen = rng.choice(len(pos), size=size, replace=False)
            clusters = np.full(size, -1, dtype=np.int64)
        else:
            # k-means over the pool (a random sample of at most cold_sample rows, to bound
            # the cost), then the point nearest each centroid: typical images of each mode
            sample = rng.choice(len(pos), size=min(len(pos), max(pool_factor * size, cold_sample)),
                                replace=False)
            chosen, clusters = _diverse_pick(emb[pos[sample]], np.zeros(len(sample)), size, seed,
                                             max_clusters, central=True)
            chosen = sample[chosen]
    else:
        unc = np.nan_to_num(unc, nan=-1.0)  # rows without a prediction go last
        order = np.lexsort((ids[pos], -unc))  # most uncertain first, ties by id
        if diversity == "none":
            chosen = order[:size]
            clusters = np.full(size, -1, dtype=np.int64)
        else:
            top = order[: min(len(order), pool_factor * size)]
            chosen, clusters = _diverse_pick(emb[pos[top]], unc[top], size, seed, max_clusters, central=False)
            chosen = top[chosen]

    result = candidates.iloc[pos[chosen]].copy()
    result["cluster"] = np.asarray(clusters, dtype=np.int64)
    if not cold:
        result = result.assign(_u=unc[chosen]).sort_values(["_u", "image_id"], ascending=[False, True]).drop(columns="_u")
    result["queue_rank"] = np.arange(len(result), dtype=np.int64)
    return result[out_cols].reset_index(drop=True)


def _diverse_pick(points: np.ndarray, score: np.ndarray, size: int, seed: int, max_clusters: int,
                  central: bool) -> tuple[np.ndarray, np.ndarray]:
    """Pick ``size`` rows spread over k-means clusters: per cluster the highest ``score``
    (or, with ``central``, the row nearest its centroid), round-robin when size > k."""
    k = min(size, max_clusters, len(points))
    labels = _cluster(points, k, seed)
    if central:
        centroids = np.stack([points[labels == c].mean(axis=0) if np.any(labels == c) else points[0]
                              for c in range(k)])
        score = -np.linalg.norm(points - centroids[labels], axis=1)
    # rank inside each cluster by score; round r takes every cluster's r-th best
    order = np.lexsort((-score, labels))
    rank_in_cluster = np.empty(len(points), dtype=np.int64)
    sorted_labels = labels[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_labels)) + 1]
    run_start = np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    rank_in_cluster[order] = np.arange(len(order)) - run_start
    # fill by (round, -score): empty clusters simply contribute nothing, other rows fill in
    pick_order = np.lexsort((-score, rank_in_cluster))[:size]
    return pick_order, labels[pick_order]


def round_plan(n_pool: int, fractions: Sequence[float] = (0.01, 0.05, 0.25)) -> list[int]:
    """Cumulative label targets per round: round r ends when ``plan[r-1]`` images are labeled.

    The seed's 1% → 5% → 25% of the pool; each target at least 1 and at most ``n_pool``,
    non-decreasing. The queue for a round is ``labels_needed(n_labeled, plan)`` long.
    """
    if n_pool < 0:
        raise ValueError("n_pool must be >= 0")
    if any(not 0 < f <= 1 for f in fractions) or list(fractions) != sorted(fractions):
        raise ValueError(f"fractions must be increasing values in (0, 1], got {fractions}")
    plan: list[int] = []
    for f in fractions:
        target = min(n_pool, max(1, math.ceil(f * n_pool)))
        plan.append(max(target, plan[-1] if plan else 0))
    return plan


def current_round(n_labeled: int, plan: Sequence[int]) -> int:
    """The 1-based round in progress: the first round whose target is not reached yet
    (the last round once every target is reached)."""
    for r, target in enumerate(plan, start=1):
        if n_labeled < target:
            return r
    return max(1, len(plan))


def labels_needed(n_labeled: int, plan: Sequence[int]) -> int:
    """Labels still missing to finish the current round (0 when the plan is done)."""
    if not plan:
        return 0
    return max(0, plan[current_round(n_labeled, plan) - 1] - n_labeled)
