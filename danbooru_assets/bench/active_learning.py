"""Does the labeling loop pay off? Simulated rounds on synthetic data.

``python -m danbooru_assets.bench active_learning [--pool N] [--seeds S] ...``

A synthetic pool stands in for CLIP embeddings: three classes (the seed's 40/30/30
good/questionable/bad), each a few Gaussian clusters in 64-D, overlapping, with label
noise on the "human" labels. Each round labels the queue with those labels and retrains
(the same ``select_labeling_queue`` / ``train_quality_model`` the assets use). The
baseline labels the same number of images per round, drawn at random. Held-out
accuracy (against the clean classes) per round is printed side by side.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from danbooru_assets.quality.classifier import CLASSES, fit_quality_model, predict_proba_frame
from danbooru_assets.quality.queue import round_plan, select_labeling_queue


@dataclass
class SyntheticPool:
    """Features, clean classes and noisy "human" labels of a pool and a held-out set."""

    x_pool: np.ndarray
    y_pool_noisy: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def make_synthetic(n_pool: int, n_test: int, dim: int = 64, seed: int = 0,
                   class_fractions: Sequence[float] = (0.4, 0.3, 0.3), clusters_per_class: int = 3,
                   separation: float = 0.5, label_noise: float = 0.08) -> SyntheticPool:
    """Gaussian clusters per class; ``label_noise`` of pool labels flipped at random."""
    rng = np.random.default_rng(seed)
    n = n_pool + n_test
    y = rng.choice(len(CLASSES), size=n, p=np.asarray(class_fractions) / np.sum(class_fractions))
    # each class: a class centre plus sub-cluster offsets (styles/poses within a class)
    class_centres = rng.normal(scale=separation / np.sqrt(2), size=(len(CLASSES), dim))
    sub = class_centres[:, None, :] + rng.normal(scale=separation / 2, size=(len(CLASSES), clusters_per_class, dim)) / np.sqrt(dim) * 4
    which = rng.integers(clusters_per_class, size=n)
    x = sub[y, which] + rng.normal(size=(n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # like L2-normalised CLIP embeddings
    labels = np.asarray(CLASSES, dtype=object)[y]
    noisy = labels.copy()
    flip = rng.random(n) < label_noise
    noisy[flip] = np.asarray(CLASSES, dtype=object)[rng.integers(len(CLASSES), size=int(flip.sum()))]
    return SyntheticPool(x[:n_pool].astype(np.float16), noisy[:n_pool], x[n_pool:].astype(np.float32), labels[n_pool:])


def simulate(pool: SyntheticPool, targets: Sequence[int], strategy: str, seed: int = 0) -> list[float]:
    """Run the rounds (cumulative label ``targets``) and return held-out accuracy per round.

    ``strategy``: ``"uncertainty"`` (cold start by k-means diversity, then uncertainty +
    diversity) or ``"random"`` (uniform draws of the same size).
    """
    rng = np.random.default_rng(seed + 7919)
    emb = pool.x_pool.astype(np.float32)
    ids = np.arange(len(emb), dtype=np.int64)
    labeled: list[int] = []
    model = None
    accuracies: list[float] = []
    for target in targets:
        need = target - len(labeled)
        if need > 0:
            if strategy == "random":
                rest = np.setdiff1d(ids, labeled)
                picked = rng.choice(rest, size=min(need, len(rest)), replace=False).tolist()
            elif strategy == "uncertainty":
                cands = pd.DataFrame({"image_id": ids})
                if model is not None:
                    cands["uncertainty"] = predict_proba_frame(model, emb)["uncertainty"].to_numpy()
                queue = select_labeling_queue(cands, emb, need, set(labeled), seed=seed)
                picked = queue["image_id"].tolist()
            else:
                raise ValueError(f"unknown strategy {strategy!r}")
            labeled += picked
        y = pool.y_pool_noisy[labeled]
        if len(set(y)) < 2:
            accuracies.append(float("nan"))
            continue
        # fit only: the cross-validated metrics of train_quality_model are not needed here
        model = fit_quality_model(emb[labeled], y, seed=seed)
        pred = predict_proba_frame(model, pool.x_test)["predicted_class"].to_numpy(dtype=object)
        accuracies.append(float(np.mean(pred == pool.y_test)))
    return accuracies


def compare(n_pool: int, n_test: int, dim: int, fractions: Sequence[float], seeds: Sequence[int],
            label_noise: float = 0.08) -> pd.DataFrame:
    """Accuracy per round and seed for both strategies (long format)."""
    targets = round_plan(n_pool, fractions)
    rows = []
    for seed in seeds:
        pool = make_synthetic(n_pool, n_test, dim, seed=seed, label_noise=label_noise)
        for strategy in ("uncertainty", "random"):
            for r, (target, acc) in enumerate(zip(targets, simulate(pool, targets, strategy, seed)), start=1):
                rows.append({"seed": seed, "strategy": strategy, "round": r, "labels": target, "accuracy": acc})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m danbooru_assets.bench active_learning",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=int, default=20_000, help="unlabeled pool size")
    parser.add_argument("--test", type=int, default=5_000, help="held-out set size")
    parser.add_argument("--dim", type=int, default=64, help="feature dimension")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.005, 0.01, 0.02, 0.05, 0.1],
                        help="cumulative labeled fractions per round (the seed's plan is 0.01 0.05 0.25)")
    parser.add_argument("--seeds", type=int, default=3, help="repetitions (data + sampling seeds)")
    parser.add_argument("--noise", type=float, default=0.08, help="label noise rate of the simulated labeler")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    df = compare(args.pool, args.test, args.dim, args.fractions, range(args.seeds), args.noise)
    table = df.pivot_table(index=["round", "labels"], columns="strategy", values="accuracy", aggfunc="mean")
    table["gain"] = table["uncertainty"] - table["random"]
    wins = (df.pivot_table(index=["seed", "round"], columns="strategy", values="accuracy")
            .eval("uncertainty >= random").groupby("round").mean())
    table["AL >= random (share of seeds)"] = wins.to_numpy()
    print(f"pool {args.pool}, held-out {args.test}, dim {args.dim}, label noise {args.noise}, "
          f"classes 40/30/30, {args.seeds} seeds; held-out accuracy, mean over seeds")
    with pd.option_context("display.float_format", "{:.4f}".format, "display.width", 120):
        print(table.to_string())
    print(f"total {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
