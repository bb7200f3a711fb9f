"""What the quality classifier sees: a stored CLIP embedding plus numeric pose features
per image, so training and prediction never touch an image."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from danbooru_assets.core.embeddings import embedding_matrix
from danbooru_assets.core.shards import shard_key
from danbooru_assets.pose.coco import KEYPOINT_COLUMNS
from danbooru_assets.pose.features import pose_features

# Pose feature columns that are not features: the id and the raw image size (the
# classifier sees geometry normalised by them).
NON_FEATURE_COLUMNS = frozenset({"image_id", "width", "height"})


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


def embedded_rows(image_ids: Sequence[int] | np.ndarray, embeddings: pd.DataFrame,
                  what: str) -> tuple[pd.DataFrame, np.ndarray, str | None]:
    """``rows_with_embeddings`` and ``single_clip_model`` together, as every step of the
    loop needs them: (embedding rows, ids without one, the one CLIP model fingerprint).
    Raises ValueError (naming ``what``) when the rows mix CLIP models."""
    rows, without = rows_with_embeddings(image_ids, embeddings)
    return rows, without, single_clip_model(rows, what)


def classifier_features(embeddings: pd.DataFrame, keypoints: pd.DataFrame,
                        image_ids: Sequence[int] | np.ndarray) -> tuple[np.ndarray, list[str]]:
    """CLIP embedding + normalised pose features for ``image_ids`` (rows in that order).

    ``embeddings``: stored embedding rows; ``keypoints``: ``pose_keypoints`` rows (with
    width and height), an id without one gets NaN pose features. Every id must have an
    embedding (``rows_with_embeddings`` picks those that do): a missing one is an error
    here, never a zero vector."""
    ids = np.asarray(image_ids, dtype=np.int64)
    emb_rows, without = rows_with_embeddings(ids, embeddings)
    if len(without):
        raise ValueError(f"{len(without)} images have no CLIP embedding (e.g. {without[:5].tolist()}); leave them out first")
    emb = embedding_matrix(emb_rows)
    rows = pd.DataFrame({"image_id": ids})
    kp = rows.merge(keypoints[["image_id", "width", "height", *KEYPOINT_COLUMNS]], on="image_id", how="left")
    pose = pose_features(kp, kp["width"].to_numpy(dtype=float), kp["height"].to_numpy(dtype=float))
    return build_features(emb, pose.drop(columns=[c for c in NON_FEATURE_COLUMNS if c in pose.columns]))
