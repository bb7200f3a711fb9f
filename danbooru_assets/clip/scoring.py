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
from typing import Any, Sequence

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


def score_with_model(
    clip: Any,
    image_embeddings: np.ndarray,
    positive_prompts: Sequence[str] = DEFAULT_POSITIVE_PROMPTS,
    negative_prompts: Sequence[str] = DEFAULT_NEGATIVE_PROMPTS,
    logit_scale: float | None = None,
) -> pd.DataFrame:
    """Encode the prompts with ``clip`` (a ``ClipModelResource``) and score the embeddings.

    ``logit_scale=None`` uses the model's own learned temperature.
    """
    scale = clip.logit_scale() if logit_scale is None else logit_scale
    return score_embeddings(
        image_embeddings,
        clip.encode_text(list(positive_prompts)),
        clip.encode_text(list(negative_prompts)),
        logit_scale=scale,
        positive_prompts=positive_prompts,
        negative_prompts=negative_prompts,
    )


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


def kept_fraction(scores: np.ndarray, threshold: float) -> float:
    """Share of non-NaN scores ``>= threshold`` (for metadata next to the threshold)."""
    values = np.asarray(scores, dtype=np.float64).ravel()
    values = values[~np.isnan(values)]
    return float((values >= threshold).mean()) if values.size else 0.0


__all__ = [
    "DEFAULT_NEGATIVE_PROMPTS",
    "DEFAULT_POSITIVE_PROMPTS",
    "PORTRAIT_SCORE",
    "kept_fraction",
    "prompt_column",
    "prompt_mapping",
    "score_embeddings",
    "score_with_model",
    "threshold_for_fraction",
]
