"""The labeling queue and the round plan of the active-learning loop.

The seed's plan, made repeatable: label 1% of the pool, train, predict the rest, label
the next 5% chosen where the model is least sure (and diverse, so a round is not 500
near-duplicates of one confusing pose), retrain, then 25%.

Once a model exists a round may also hold a "verify" part (``quality.verify_fraction``):
the model's most confident predictions, fast to confirm; ``plan_round`` says how many of
each and why.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning

from danbooru_assets.labels.classes import LABEL_CLASSES


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


def round_targets(n_pool: int, fractions: Sequence[float], min_round_size: int) -> list[int]:
    """``round_plan`` with minimums: round r adds at least ``r × min_round_size`` labels
    (cumulative ``min_round_size × r(r+1)/2``), so every round is larger than the one
    before and the first has a few labels per class.

    When the pool cannot hold those minimums, the targets are scaled down in the same
    proportions (the last one = the whole pool), so a small pool (the sample data) still
    goes through every round, each larger than the one before, instead of queueing the
    whole pool in round 1.
    """
    if n_pool <= 0:
        return [0 for _ in fractions]
    wanted = []
    for i, target in enumerate(round_plan(n_pool, fractions)):
        r = i + 1
        wanted.append(max(target, min_round_size * r * (r + 1) // 2, wanted[-1] if wanted else 0))
    if wanted[-1] <= n_pool:
        return wanted
    scale = n_pool / wanted[-1]
    scaled: list[int] = []
    for i, target in enumerate(wanted):
        # at least one new image per round while the pool lasts, never beyond the pool
        floor = (scaled[-1] + 1) if scaled else 1
        scaled.append(min(n_pool, max(floor, math.ceil(target * scale - 1e-9))))
    return scaled


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


QUEUE_KINDS = ("uncertainty", "verify")


@dataclass(frozen=True)
class RoundPlan:
    """How many labels a round asks for from each queue, and why (shown on ``labeling_queue``).

    * ``uncertainty``: the images the model is least sure of, spread over clusters: the
      labels that teach it most, and the slow ones (the pre-set is often wrong).
    * ``verify``: the model's most confident predictions (per predicted class), confirmed
      at a glance in grid mode: fast labels, and a measure of how often a confident
      prediction is wrong, which is what ``curated_dataset`` trusts for every unlabeled image.
    """

    round: int
    size: int
    uncertainty: int
    verify: int
    verify_fraction: float
    has_model: bool

    def describe(self) -> str:
        if self.size == 0:
            return f"round {self.round}: nothing to label (every planned round is labeled)"
        text = (f"round {self.round}: {self.size} labels = {self.uncertainty} uncertainty (the model's least sure "
                "images, spread over clusters: they teach it most)")
        if not self.has_model:
            return text + " + 0 verify: no model yet, so nothing to verify (cold start: images typical of each cluster)"
        if self.verify_fraction <= 0:
            return text + " + 0 verify (off: quality.verify_fraction = 0)"
        text += (f" + {self.verify} verify (quality.verify_fraction = {self.verify_fraction:g}: the model's most "
                 "confident predictions, per predicted class, confirmed at a glance in grid mode; they measure how "
                 "often a confident prediction is wrong, which curated_dataset trusts for every unlabeled image, "
                 "and keep the pace up)")
        if self.verify < round(self.verify_fraction * self.size):
            text += f"; fewer verify than asked: only {self.verify} predicted images were left"
        return text


def plan_round(round_: int, size: int, verify_fraction: float = 0.0, has_model: bool = True) -> RoundPlan:
    """Split a round's ``size`` labels: ``verify_fraction`` of them (once a model exists) to
    the verify queue, the rest to the uncertainty queue."""
    if not 0.0 <= verify_fraction <= 0.5:
        raise ValueError(f"verify_fraction must be in [0, 0.5], got {verify_fraction}")
    size = max(0, int(size))
    verify = int(round(verify_fraction * size)) if has_model else 0
    return RoundPlan(int(round_), size, size - verify, verify, float(verify_fraction), bool(has_model))


def select_verify_queue(candidates: pd.DataFrame, size: int, exclude: set[int] | Sequence[int] = ()) -> pd.DataFrame:
    """The ``size`` most confident predictions among ``candidates`` (``image_id``,
    ``predicted_class``, ``p_<class>``), shared over the predicted classes in proportion to
    how often each is predicted (so each class's precision gets measured), most confident
    first; ties by id. Rows without a prediction or in ``exclude`` are never picked."""
    excluded = {int(i) for i in exclude}
    if size <= 0 or "predicted_class" not in candidates.columns or candidates.empty:
        return candidates.iloc[[]]
    pool = candidates.loc[candidates["predicted_class"].isin(list(LABEL_CLASSES))
                          & ~candidates["image_id"].isin(excluded)].drop_duplicates("image_id")
    if pool.empty:
        return pool
    confidence = np.zeros(len(pool))
    for c in LABEL_CLASSES:
        column = f"p_{c}"
        if column in pool.columns:
            mask = (pool["predicted_class"] == c).to_numpy()
            confidence[mask] = pool.loc[mask, column].astype("float64").fillna(0.0).to_numpy()
    pool = pool.assign(_conf=confidence).sort_values(["_conf", "image_id"], ascending=[False, True])
    size = min(int(size), len(pool))
    shares = pool["predicted_class"].value_counts(normalize=True)
    quota = {c: int(math.floor(shares.get(c, 0.0) * size)) for c in LABEL_CLASSES}
    picked = pd.concat([pool.loc[pool["predicted_class"] == c].head(quota[c]) for c in LABEL_CLASSES])
    if len(picked) < size:  # the rounding remainder: the most confident of the rest
        picked = pd.concat([picked, pool.loc[~pool.index.isin(picked.index)].head(size - len(picked))])
    return picked.sort_values(["_conf", "image_id"], ascending=[False, True]).drop(columns="_conf")


def select_round_queue(pool: pd.DataFrame, embeddings: np.ndarray, plan: RoundPlan,
                       already_labeled: set[int] | Sequence[int] = (), seed: int = 0) -> tuple[pd.DataFrame, RoundPlan]:
    """A round's queue as ``plan`` splits it: the uncertainty queue (``select_labeling_queue``)
    then the verify queue (``select_verify_queue``), with a ``queue`` column naming each
    row's and one ``queue_rank`` over both. Returns the queue and the plan as carried out
    (fewer verify when fewer predicted images are left; the uncertainty part takes the rest)."""
    labeled = {int(i) for i in already_labeled}
    verify = select_verify_queue(pool, plan.verify, exclude=labeled) if plan.verify else pool.iloc[[]]
    rest = ~pool["image_id"].isin(set(verify["image_id"].astype("int64")))
    uncertain = select_labeling_queue(pool.loc[rest].reset_index(drop=True), np.asarray(embeddings)[rest.to_numpy()],
                                      plan.size - len(verify), already_labeled=labeled, seed=seed)
    uncertain = uncertain.assign(queue="uncertainty")
    verify = verify.assign(queue="verify", cluster=-1).reindex(columns=uncertain.columns)
    queue = pd.concat([uncertain, verify], ignore_index=True) if len(verify) else uncertain
    queue["queue_rank"] = np.arange(len(queue), dtype=np.int64)
    done = RoundPlan(plan.round, len(queue), len(uncertain), len(verify), plan.verify_fraction, plan.has_model)
    return queue.reset_index(drop=True), done
