"""Prompt scoring from stored CLIP embeddings: the cheap half of the CLIP stage.

Scores are computed from the stored image embeddings and the text embeddings of a prompt
set, never from images, so changing prompts or thresholds rematerializes in milliseconds.

Column scheme: each prompt's cosine similarity is stored in ``prompt_column(prompt)``,
``"sim_" + <slug of the prompt, <= 32 chars> + "_" + <first 6 hex of its sha1>``. The name
depends only on the prompt text, so a column keeps its meaning when prompts are added,
removed or reordered, and an edited prompt gets a new column. :func:`prompt_mapping` gives
the column -> prompt table to put in materialization metadata.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any, Collection, Sequence

import numpy as np
import pandas as pd

from danbooru_assets.settings import DEFAULT_NEGATIVE_PROMPTS, DEFAULT_POSITIVE_PROMPTS

PORTRAIT_SCORE = "portrait_score"
SLUG_MAX = 32


def prompt_column(prompt: str) -> str:
    """Stable short column name for a prompt, e.g. ``sim_a_monochrome_pencil_sketch_1a2b3c``."""
    slug = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:SLUG_MAX].rstrip("_")
    digest = hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:6]
    return f"sim_{slug or 'prompt'}_{digest}"


def prompt_mapping(positive: Sequence[str], negative: Sequence[str]) -> pd.DataFrame:
    """The column -> prompt table (``column``, ``kind``, ``prompt``) for metadata."""
    rows = [(prompt_column(p), "positive", p) for p in positive]
    rows += [(prompt_column(p), "negative", p) for p in negative]
    table = pd.DataFrame(rows, columns=["column", "kind", "prompt"])
    if table["column"].duplicated().any():
        dupes = table.loc[table["column"].duplicated(keep=False), "prompt"].tolist()
        raise ValueError(f"duplicate prompts: {dupes}")
    return table


def _unit_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows scaled to unit length as float32, and a mask of the rows with zero norm."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    zero = norms[:, 0] == 0
    return x / np.where(norms == 0, 1.0, norms), zero


def score_embeddings(
    image_embeddings: np.ndarray,
    positive: np.ndarray,
    negative: np.ndarray,
    logit_scale: float = 100.0,
    positive_prompts: Sequence[str] | None = None,
    negative_prompts: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Per-prompt cosine similarities and the combined ``portrait_score`` in ``[0, 1]``.

    ``portrait_score`` is CLIP's zero-shot probability of the positive prompts: the softmax
    of ``logit_scale * similarity`` over all prompts, summed over the positive ones. With
    the prompt strings given, similarity columns are named by :func:`prompt_column`;
    otherwise ``sim_pos_<i>`` / ``sim_neg_<i>``. Rows with an all-zero embedding (images
    that could not be read) get NaN everywhere.
    """
    images, missing = _unit_rows(np.atleast_2d(image_embeddings))
    pos, _ = _unit_rows(np.atleast_2d(positive))
    neg = np.asarray(negative, dtype=np.float32).reshape(-1, images.shape[1])
    neg, _ = _unit_rows(neg)
    if pos.shape[0] == 0:
        raise ValueError("at least one positive prompt is needed")
    if pos.shape[1] != images.shape[1]:
        raise ValueError(f"prompt dim {pos.shape[1]} != image embedding dim {images.shape[1]}")
    prompts = np.concatenate([pos, neg], axis=0)
    sims = images @ prompts.T  # [N, P+Q]

    logits = float(logit_scale) * sims
    logits -= logits.max(axis=1, keepdims=True)  # stable softmax
    weights = np.exp(logits)
    score = weights[:, : pos.shape[0]].sum(axis=1) / weights.sum(axis=1)

    sims[missing] = np.nan
    score[missing] = np.nan
    if positive_prompts is not None or negative_prompts is not None:
        if len(positive_prompts or []) != pos.shape[0] or len(negative_prompts or []) != neg.shape[0]:
            raise ValueError("prompt strings do not match the prompt embeddings")
        columns = prompt_mapping(positive_prompts or [], negative_prompts or [])["column"].tolist()
    else:
        columns = [f"sim_pos_{i}" for i in range(pos.shape[0])]
        columns += [f"sim_neg_{i}" for i in range(neg.shape[0])]
    frame = pd.DataFrame(sims.astype(np.float32), columns=columns)
    frame[PORTRAIT_SCORE] = np.clip(score, 0.0, 1.0).astype(np.float32)
    return frame


def prompt_embeddings_table(model: Any, positive: Sequence[str], negative: Sequence[str]) -> pd.DataFrame:
    """The ``prompt_embeddings`` table: :func:`prompt_mapping`'s rows with each prompt's
    ``embedding`` (float32: a handful of rows), the ``model_fingerprint_id``, the model's
    ``logit_scale`` and ``demo_model`` (scores from a demo model carry no meaning).
    ``model`` is a :class:`~danbooru_assets.clip.model.ClipModel`."""
    table = prompt_mapping(positive, negative)
    vectors = model.encode_text(table["prompt"].tolist()) if len(table) else np.zeros((0, 0), np.float32)
    table["embedding"] = list(vectors.astype(np.float32))
    table["model_fingerprint_id"] = model.fingerprint_id()
    table["logit_scale"] = model.logit_scale()
    table["demo_model"] = model.is_demo()
    return table


def score_stored(embeddings: pd.DataFrame, prompts: pd.DataFrame) -> pd.DataFrame:
    """:func:`score_embeddings` of a shard's stored ``clip_embeddings`` (its readable rows)
    against the stored ``prompts`` (:func:`prompt_embeddings_table`), ``image_id`` first.

    An embedding from another model than the prompts' is an error, never a score.
    """
    from danbooru_assets.core.embeddings import embedding_matrix

    fingerprint = str(prompts["model_fingerprint_id"].iloc[0])
    ok = embeddings.loc[embeddings["status"] == "ok"].reset_index(drop=True)
    other_model = ok["model_fingerprint_id"] != fingerprint
    if other_model.any():
        raise RuntimeError(
            f"{int(other_model.sum())} embeddings come from another model than prompt_embeddings "
            f"({fingerprint}); rematerialize clip_embeddings (or prompt_embeddings) first"
        )
    text = embedding_matrix(prompts)
    positive = (prompts["kind"] == "positive").to_numpy()
    negative = (prompts["kind"] == "negative").to_numpy()
    scores = score_embeddings(
        embedding_matrix(ok, dim=text.shape[1]),  # (0, D) for an empty shard
        text[positive],
        text[negative],
        logit_scale=float(prompts["logit_scale"].iloc[0]),
        positive_prompts=prompts.loc[positive, "prompt"].tolist(),
        negative_prompts=prompts.loc[negative, "prompt"].tolist(),
    )
    scores.insert(0, "image_id", ok["image_id"].to_numpy())
    return scores


def threshold_for_fraction(scores: np.ndarray, keep_fraction: float) -> float:
    """The score ``t`` such that keeping ``scores >= t`` keeps ~``keep_fraction`` of them.

    NaN scores (unreadable images) are ignored and never kept. Exactly
    ``ceil(keep_fraction * n)`` scores are kept unless ties at ``t`` add a few;
    ``keep_fraction <= 0`` returns ``inf`` (keep nothing).
    """
    if not 0.0 <= keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in [0, 1], got {keep_fraction}")
    values = np.asarray(scores, dtype=np.float64).ravel()
    values = values[~np.isnan(values)]
    if values.size == 0 or keep_fraction <= 0.0:
        return math.inf
    k = min(values.size, max(1, math.ceil(keep_fraction * values.size - 1e-9)))
    # The k-th largest value: partition instead of a full sort (5M scores stay fast).
    return float(np.partition(values, values.size - k)[values.size - k])


def threshold_summary(
    scores: np.ndarray,
    keep_fraction: float | None,
    fixed_threshold: float | None,
    scored_shards: Collection[str],
    indexed_shards: Collection[str],
) -> dict[str, Any]:
    """The ``clip_threshold`` row: the threshold (``fixed_threshold`` when given, else the
    one keeping ``keep_fraction`` of ``scores``), what it keeps, and its shard coverage
    (a threshold over part of the dataset is a guess for the rest: how big a part)."""
    values = np.asarray(scores, dtype=np.float64).ravel()
    if fixed_threshold is not None:
        threshold, mode = float(fixed_threshold), "fixed"
    else:
        threshold, mode = float(threshold_for_fraction(values, keep_fraction)), "keep_fraction"
    kept = int((values >= threshold).sum())
    indexed = set(indexed_shards)
    return {
        "threshold": threshold,
        "mode": mode,
        "target_keep_fraction": keep_fraction if mode == "keep_fraction" else None,
        "kept": kept,
        "scored": len(values),
        "kept_fraction": kept / len(values) if len(values) else 0.0,
        "scored_shards": len(set(scored_shards)),
        "indexed_shards": len(indexed),
        "shard_coverage": len(indexed & set(scored_shards)) / len(indexed) if indexed else 0.0,
    }


__all__ = [
    "DEFAULT_NEGATIVE_PROMPTS",
    "DEFAULT_POSITIVE_PROMPTS",
    "PORTRAIT_SCORE",
    "prompt_column",
    "prompt_embeddings_table",
    "prompt_mapping",
    "score_embeddings",
    "score_stored",
    "threshold_for_fraction",
    "threshold_histogram",
    "threshold_summary",
]


def threshold_histogram(values: np.ndarray, threshold: float, kept: int):
    """The portrait_score histogram with the threshold drawn on it (a PIL image), for
    clip_threshold's materialization."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from danbooru_assets.core.visuals import figure_to_image

    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.hist(values, bins=60, color="#4c72b0")
    ax.axvline(threshold, color="#dd4444", lw=2, label=f"threshold {threshold:.4f}")
    ax.set_xlabel("portrait_score")
    ax.set_ylabel("images")
    ax.set_title(f"{len(values):,} scored images, {kept:,} kept ({kept / max(len(values), 1):.1%})")
    ax.legend()
    return figure_to_image(fig)
