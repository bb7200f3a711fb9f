"""Prompt scoring from embeddings and the keep-fraction threshold."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from danbooru_assets.clip.model import ClipModel
from danbooru_assets.clip.scoring import (
    DEFAULT_NEGATIVE_PROMPTS,
    DEFAULT_POSITIVE_PROMPTS,
    PORTRAIT_SCORE,
    prompt_column,
    prompt_embeddings_table,
    prompt_mapping,
    score_embeddings,
    score_stored,
    threshold_for_fraction,
    threshold_summary,
)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_prompt_column_scheme() -> None:
    col = prompt_column("A manga page with several panels")
    assert col == prompt_column("A manga page with several panels")  # stable
    assert col.startswith("sim_a_manga_page_with_several_pan")
    assert col.isidentifier() and len(col) <= 4 + 32 + 7
    # Case or a trailing word changes the prompt, so the column changes too.
    assert col != prompt_column("a manga page with several panels")
    all_prompts = DEFAULT_POSITIVE_PROMPTS + DEFAULT_NEGATIVE_PROMPTS
    assert len({prompt_column(p) for p in all_prompts}) == len(all_prompts)
    assert prompt_column("!!!").startswith("sim_prompt_")


def test_prompt_mapping_and_duplicates() -> None:
    table = prompt_mapping(["a", "b"], ["c"])
    assert table["kind"].tolist() == ["positive", "positive", "negative"]
    assert table["column"].tolist() == [prompt_column(p) for p in "abc"]
    with pytest.raises(ValueError):
        prompt_mapping(["a"], ["a"])


def test_scores_shape_range_and_direction() -> None:
    rng = np.random.default_rng(0)
    pos = _unit(rng.normal(size=(2, 16)))
    neg = _unit(rng.normal(size=(3, 16)))
    images = _unit(rng.normal(size=(500, 16))).astype(np.float16)
    images[0] = pos[0]  # an image that *is* a positive prompt
    images[1] = neg[2]  # and one that is a negative prompt
    frame = score_embeddings(images, pos, neg)
    assert frame.shape == (500, 6)
    assert list(frame.columns[:5]) == ["sim_pos_0", "sim_pos_1", "sim_neg_0", "sim_neg_1", "sim_neg_2"]
    score = frame[PORTRAIT_SCORE].to_numpy()
    assert ((score >= 0) & (score <= 1)).all()
    assert score[0] > 0.9 and score[1] < 0.1
    assert frame.loc[0, "sim_pos_0"] == pytest.approx(1.0, abs=1e-3)
    sims = frame.iloc[:, :5].to_numpy()
    assert (np.abs(sims) <= 1.0 + 1e-3).all()
    # A lower temperature pulls every score towards the prompt prior 2/5.
    flat = score_embeddings(images, pos, neg, logit_scale=1e-6)[PORTRAIT_SCORE]
    np.testing.assert_allclose(flat, 0.4, atol=1e-4)


def test_scores_match_explicit_softmax() -> None:
    rng = np.random.default_rng(1)
    pos, neg = _unit(rng.normal(size=(1, 8))), _unit(rng.normal(size=(2, 8)))
    img = _unit(rng.normal(size=(1, 8)))
    logits = 50.0 * np.concatenate([img @ pos.T, img @ neg.T], axis=1)[0]
    expected = math.exp(logits[0]) / np.exp(logits).sum()
    got = score_embeddings(img, pos, neg, logit_scale=50.0)[PORTRAIT_SCORE][0]
    assert got == pytest.approx(expected, rel=1e-4)


def test_zero_embeddings_score_nan_and_named_columns() -> None:
    rng = np.random.default_rng(2)
    pos, neg = _unit(rng.normal(size=(1, 8))), _unit(rng.normal(size=(1, 8)))
    images = np.vstack([_unit(rng.normal(size=(1, 8))), np.zeros((1, 8))])
    frame = score_embeddings(images, pos, neg, positive_prompts=["p"], negative_prompts=["n"])
    assert list(frame.columns) == [prompt_column("p"), prompt_column("n"), PORTRAIT_SCORE]
    assert not frame.iloc[0].isna().any()
    assert frame.iloc[1].isna().all()
    with pytest.raises(ValueError):
        score_embeddings(images, pos, neg, positive_prompts=["p", "q"], negative_prompts=["n"])


def test_score_stored_scores_readable_rows_of_the_prompts_model() -> None:
    model = ClipModel.demo()
    prompts = prompt_embeddings_table(model, ["a portrait"], ["a landscape", "text"])
    assert prompts["model_fingerprint_id"].nunique() == 1 and prompts["demo_model"].all()
    assert prompts["logit_scale"].iloc[0] == pytest.approx(model.logit_scale())
    rng = np.random.default_rng(5)
    vectors = list(_unit(rng.normal(size=(3, 64))).astype(np.float16))
    stored = pd.DataFrame({
        "image_id": [7, 8, 9],
        "status": ["ok", "unreadable: truncated", "ok"],
        "embedding": [vectors[0], None, vectors[2]],
        "model_fingerprint_id": model.fingerprint_id(),
    })
    scores = score_stored(stored, prompts)
    assert scores["image_id"].tolist() == [7, 9]  # the unreadable row has nothing to score
    assert list(scores.columns) == ["image_id", *prompts["column"], PORTRAIT_SCORE]
    assert scores[PORTRAIT_SCORE].between(0, 1).all()
    # An embedding of another model is an error, not a meaningless score.
    stored.loc[2, "model_fingerprint_id"] = "another-model"
    with pytest.raises(RuntimeError, match="1 embeddings come from another model"):
        score_stored(stored, prompts)
    assert len(score_stored(stored.iloc[0:0], prompts)) == 0


@pytest.mark.parametrize("fraction", [0.2, 0.05, 0.5, 1.0])
def test_threshold_keeps_the_fraction(fraction: float) -> None:
    scores = np.random.default_rng(4).random(5000)
    t = threshold_for_fraction(scores, fraction)
    assert (scores >= t).sum() == round(fraction * 5000)


def test_threshold_edge_cases() -> None:
    scores = np.array([0.1, np.nan, 0.5, 0.5, 0.9])
    assert threshold_for_fraction(scores, 0.25) == 0.9  # NaN ignored: 1 of 4
    assert threshold_for_fraction(scores, 0.5) == 0.5
    assert threshold_for_fraction(scores, 0.6) == 0.5  # ties keep 3 of 4
    assert threshold_for_fraction(scores, 0.0) == math.inf
    assert threshold_for_fraction(np.array([np.nan]), 0.5) == math.inf
    assert threshold_for_fraction(scores, 1.0) == 0.1
    with pytest.raises(ValueError):
        threshold_for_fraction(scores, 1.5)


def test_threshold_summary_fixed_or_fraction_and_coverage() -> None:
    scores = np.arange(10, dtype=float) / 10
    row = threshold_summary(scores, 0.3, None, ["0001", "0002"], ["0001", "0002", "0003", "0004"])
    assert (row["mode"], row["threshold"], row["kept"], row["scored"]) == ("keep_fraction", 0.7, 3, 10)
    assert row["target_keep_fraction"] == 0.3 and row["kept_fraction"] == pytest.approx(0.3)
    assert (row["scored_shards"], row["indexed_shards"], row["shard_coverage"]) == (2, 4, 0.5)
    fixed = threshold_summary(scores, 0.3, 0.05, ["0001"], [])
    assert (fixed["mode"], fixed["kept"], fixed["target_keep_fraction"], fixed["shard_coverage"]) == (
        "fixed", 9, None, 0.0)



def test_threshold_histogram_is_a_picture() -> None:
    from danbooru_assets.clip.scoring import threshold_histogram

    image = threshold_histogram(np.random.default_rng(0).random(500), 0.8, 100)
    assert image.mode == "RGB" and image.width > 300 and len(set(image.getdata())) > 2
