"""The labeling queue (uncertain, diverse, never labeled twice) and the round plan."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from danbooru_assets.quality.queue import (
    current_round,
    labels_needed,
    round_plan,
    round_targets,
    select_labeling_queue,
)


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


def test_round_targets_ask_a_minimum_per_round_within_the_pool() -> None:
    assert round_targets(10_000, (0.01, 0.05, 0.25), 20) == [100, 500, 2500]
    assert round_targets(363_000, (0.01, 0.05, 0.25), 20) == [3630, 18150, 90750]  # the seed's plan
    # round r adds at least r × 20: 20, then 40 more, then 60 more
    assert round_targets(1000, (0.01, 0.05, 0.25), 20) == [20, 60, 250]
    assert round_targets(200, (0.01, 0.05, 0.25), 20) == [20, 60, 120]
    assert round_targets(0, (0.01,), 20) == [0]


@pytest.mark.parametrize("pool", [3, 6, 19, 30, 60, 119])
def test_a_small_pool_still_has_every_round_each_larger(pool: int) -> None:
    plan = round_targets(pool, (0.01, 0.05, 0.25), 20)
    sizes = [b - a for a, b in zip([0] + plan, plan)]
    assert plan[-1] == pool and all(s >= 1 for s in sizes)  # the whole pool, never beyond, no empty round
    if pool >= 6:
        assert sizes[0] < sizes[1] <= sizes[2]  # round 2 queues more than round 1


# ---- the verify queue and the round plan -------------------------------------------------------

def _predicted(n: int, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    from danbooru_assets.labels.classes import LABEL_CLASSES

    rng = np.random.default_rng(seed)
    probs = rng.dirichlet([1.0, 1.0, 1.0], size=n)
    frame = pd.DataFrame({"image_id": np.arange(1, n + 1) * 7,
                          **{f"p_{c}": probs[:, k] for k, c in enumerate(LABEL_CLASSES)}})
    frame["predicted_class"] = np.asarray(LABEL_CLASSES, dtype=object)[probs.argmax(axis=1)]
    frame["uncertainty"] = -(probs * np.log(probs)).sum(axis=1) / np.log(3)
    return frame, rng.normal(size=(n, 8)).astype(np.float32)


def test_plan_round_splits_and_says_why() -> None:
    from danbooru_assets.quality.queue import plan_round

    plan = plan_round(2, 40, verify_fraction=0.25)
    assert (plan.uncertainty, plan.verify) == (30, 10)
    text = plan.describe()
    assert "40 labels = 30 uncertainty" in text and "10 verify" in text and "most confident" in text
    cold = plan_round(1, 20, verify_fraction=0.25, has_model=False)
    assert (cold.uncertainty, cold.verify) == (20, 0) and "no model yet" in cold.describe()
    off = plan_round(2, 40)
    assert off.verify == 0 and "off: quality.verify_fraction = 0" in off.describe()
    with pytest.raises(ValueError):
        plan_round(2, 40, verify_fraction=0.9)


def test_verify_queue_takes_the_most_confident_per_predicted_class() -> None:
    from danbooru_assets.quality.queue import select_verify_queue

    frame, _ = _predicted(600)
    picked = select_verify_queue(frame, 60, exclude=set(frame["image_id"].head(5)))
    assert len(picked) == 60 and not set(picked["image_id"]) & set(frame["image_id"].head(5))
    conf = picked.apply(lambda r: r[f"p_{r['predicted_class']}"], axis=1)
    for c, part in picked.groupby("predicted_class"):
        rest = frame.loc[(frame["predicted_class"] == c) & ~frame["image_id"].isin(picked["image_id"])
                         & ~frame["image_id"].isin(frame["image_id"].head(5))]
        assert part[f"p_{c}"].min() >= rest[f"p_{c}"].max()  # nothing more confident left behind
    shares = frame["predicted_class"].value_counts(normalize=True)
    counts = picked["predicted_class"].value_counts()
    assert all(abs(counts.get(c, 0) - 60 * shares[c]) <= 1.01 for c in shares.index)
    assert list(conf) == sorted(conf, reverse=True)  # most confident first
    unpredicted = frame.assign(predicted_class=None)
    assert select_verify_queue(unpredicted, 10).empty


def test_round_queue_holds_both_parts_with_one_rank() -> None:
    from danbooru_assets.quality.queue import plan_round, select_round_queue

    frame, emb = _predicted(400, seed=1)
    labeled = set(frame["image_id"].head(20))
    queue, plan = select_round_queue(frame, emb, plan_round(2, 40, 0.25), already_labeled=labeled)
    assert (plan.uncertainty, plan.verify) == (30, 10) and len(queue) == 40
    assert queue["queue"].tolist() == ["uncertainty"] * 30 + ["verify"] * 10
    assert queue["queue_rank"].tolist() == list(range(40)) and queue["image_id"].is_unique
    assert not set(queue["image_id"]) & labeled
    unc = queue.loc[queue["queue"] == "uncertainty", "uncertainty"]
    ver = queue.loc[queue["queue"] == "verify", "uncertainty"]
    assert ver.max() < unc.min()  # verify: sure predictions; uncertainty: unsure ones
    # fewer predicted images than asked: the uncertainty part takes the rest
    few = frame.assign(predicted_class=[None] * 395 + list(frame["predicted_class"].tail(5)))
    queue, plan = select_round_queue(few, emb, plan_round(2, 40, 0.25))
    assert (plan.uncertainty, plan.verify) == (35, 5) and "only 5 predicted images" in plan.describe()


def test_labeling_bench_reports_each_queue_with_its_cost_model(capsys: pytest.CaptureFixture[str]) -> None:
    from danbooru_assets.bench.labeler import Costs, cost_model, run_rounds

    df = run_rounds(600, [0.05, 0.2, 0.4], 10, 24, Costs(), error=0.03, miss=0.0, seed=0,
                    class_mix=(0.4, 0.3, 0.3), verify_fraction=0.25)
    assert df.loc[df["round"] == 1, "queue"].tolist() == ["uncertainty"]  # no model: nothing to verify
    later = df.loc[df["round"] > 1]
    assert set(later["queue"]) == {"uncertainty", "verify"}
    for _, part in later.groupby("round"):
        sizes = part.set_index("queue")["labels"]
        assert sizes["verify"] == round(0.25 * sizes.sum())
    verify, unsure = later.loc[later["queue"] == "verify"], later.loc[later["queue"] == "uncertainty"]
    # confident pre-sets are right more often, so their pages go faster (the simulation, not people)
    assert verify["preset_accuracy"].mean() > unsure["preset_accuracy"].mean()
    assert verify["grid_per_min"].mean() > unsure["grid_per_min"].mean()
    text = cost_model(Costs())
    assert "SIMULATED" in text and "glance 0.3" in text and "1.30 s per image" in text
