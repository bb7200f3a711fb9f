"""Labels per minute of a simulated labeler: single-image mode vs grid mode, per round and queue.

``python -m danbooru_assets.bench labeler [--pool N] [--page-size 24] [--verify-fraction 0.25] [--look-tile 0.3] ...``

SIMULATED: every figure here comes from the cost model below (seconds per look, key,
click), not from people. Until labelers use the page, the grid's speed-up and the 4×
target are simulated; the page records real seconds per label (the ``labels`` observation
shows them per session and mode), which is where the measured figure will come from.

The rounds are real: a synthetic pool (``bench.active_learning.make_synthetic``, with the
class mix of the sample generator's ground truth when it is there) goes through the round
plan (``quality.queue.round_targets``), each round's queue chosen by
``select_labeling_queue`` from the predictions of the classifier the assets train
(``fit_quality_model``) on the labels so far. Each queue is then labeled twice by the
same simulated person:

* **single**: per image a page load, one look that decides the class, one key press;
* **grid**: per page a load, one glance per tile at its pre-set class (the model's
  prediction; in round 1, with no model yet, the class the labeler picks for the page:
  one key), and for each tile whose pre-set differs from their judgment: a decision, the
  moves to reach it (arrow keys, or a click when that is cheaper) and one key; Enter.

The person's judgment is wrong with probability ``--error`` in both modes (a random other
class), so both modes have the same error rate by construction; ``--miss`` adds the grid's
own risk, a wrong pre-set accepted at a glance, and the table shows what it costs.

From round 2 a round is split as ``quality.queue.plan_round`` splits it: the uncertainty
queue (the model's least sure images: slow, the pre-set is often wrong) and, with
``--verify-fraction``, the verify queue (its most confident predictions: fast). Each queue
is labeled on pages of its own and reported on its own row.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from danbooru_assets.bench.active_learning import make_synthetic
from danbooru_assets.quality.classifier import CLASSES, fit_quality_model, predict_proba_frame
from danbooru_assets.quality.queue import plan_round, round_targets, select_round_queue


@dataclass(frozen=True)
class Costs:
    """Seconds per elementary action of the simulated labeler."""

    look_single: float = 1.0  # look at a large image and decide its class
    key: float = 0.2  # one key press
    load_single: float = 0.1  # the next image appears
    look_tile: float = 0.3  # glance at a thumbnail: does its pre-set class hold?
    decide: float = 0.8  # a tile that looks wrong: decide its class
    click: float = 0.7  # aim and click a tile (instead of moving with keys)
    load_page: float = 0.5  # the next page of thumbnails appears
    columns: int = 6  # tiles per row


def label_single(truth: np.ndarray, costs: Costs, error: float, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Labels given and seconds spent in single-image mode."""
    labels = _judge(truth, error, rng)
    return labels, len(truth) * (costs.load_single + costs.look_single + costs.key)


def label_grid(truth: np.ndarray, preset: np.ndarray | None, costs: Costs, error: float, miss: float,
               page_size: int, rng: np.random.Generator) -> tuple[np.ndarray, float, int]:
    """Labels given, seconds spent and tiles flipped in grid mode (pages in the given order,
    each sorted by pre-set class as the page shows it). ``preset=None``: no model, the
    labeler sets the whole page to the class most of it shows (one key)."""
    judged = _judge(truth, error, rng)
    final = np.empty_like(judged)
    seconds, flips = 0.0, 0
    for start in range(0, len(truth), page_size):
        idx = np.arange(start, min(start + page_size, len(truth)))
        seconds += costs.load_page + len(idx) * costs.look_tile + costs.key  # glances, then Enter
        if preset is None:
            values, counts = np.unique(judged[idx], return_counts=True)
            page_preset = np.full(len(idx), values[counts.argmax()], dtype=object)
            seconds += costs.key  # shift+1/2/3: the page's class
        else:
            page_preset = preset[idx]
        order = np.argsort([CLASSES.index(c) for c in page_preset], kind="stable")  # the page's layout
        focus = 0
        for pos, k in enumerate(order):
            i = idx[k]
            if judged[i] == page_preset[k] or rng.random() < miss:
                final[i] = page_preset[k]
                continue
            final[i] = judged[i]
            flips += 1
            moves = abs(pos // costs.columns - focus // costs.columns) + abs(pos % costs.columns - focus % costs.columns)
            seconds += costs.decide + min(moves * costs.key, costs.click) + costs.key
            focus = pos
    return final, seconds, flips


def _judge(truth: np.ndarray, error: float, rng: np.random.Generator) -> np.ndarray:
    labels = truth.copy()
    wrong = rng.random(len(truth)) < error
    for i in np.flatnonzero(wrong):
        labels[i] = rng.choice([c for c in CLASSES if c != truth[i]])
    return labels


def sample_class_mix() -> tuple[float, float, float]:
    """good / questionable / bad shares of the sample generator's ground truth (else the seed's 40/30/30)."""
    from danbooru_assets import config
    from danbooru_assets.devtools.sample_data import read_ground_truth

    try:
        quality = read_ground_truth(config.default_sample_root())["quality"].dropna()
    except (OSError, KeyError, ValueError):
        return (0.4, 0.3, 0.3)
    counts = quality.value_counts()
    mix = tuple(float(counts.get(c, 0)) / len(quality) for c in CLASSES)
    return mix if len(quality) and all(m > 0 for m in mix) else (0.4, 0.3, 0.3)


def cost_model(costs: Costs) -> str:
    """The cost model, as the bench prints it."""
    return "\n".join([
        "cost model (seconds per action of a SIMULATED labeler, not measured on people):",
        f"  single: load {costs.load_single} + look and decide {costs.look_single} + key {costs.key}"
        f" = {costs.load_single + costs.look_single + costs.key:.2f} s per image",
        f"  grid:   per page: load {costs.load_page} + Enter {costs.key} (round 1, no model: + one key for the "
        f"page's class); per tile: glance {costs.look_tile}; per wrong pre-set: decide {costs.decide} + move "
        f"({costs.key} per arrow key, at most a {costs.click} click) + key {costs.key}; {costs.columns} tiles a row",
    ])


def run_rounds(n_pool: int, fractions: Sequence[float], min_round_size: int, page_size: int, costs: Costs,
               error: float, miss: float, seed: int, class_mix: Sequence[float],
               verify_fraction: float = 0.0) -> pd.DataFrame:
    """One row per round and queue: queue size, the model's accuracy on it (the grid's
    pre-set) and held-out, and both modes' labels per minute and error rates."""
    data = make_synthetic(n_pool, 2000, seed=seed, class_fractions=class_mix, label_noise=0.0)
    truth_pool = data.y_pool_noisy  # noise 0: the clean classes
    rng = np.random.default_rng(seed)
    labeled: dict[int, str] = {}
    model = None
    rows = []
    ids = np.arange(n_pool)
    for r, target in enumerate(round_targets(n_pool, fractions, min_round_size), start=1):
        size = target - len(labeled)
        if size <= 0:
            continue
        cands = pd.DataFrame({"image_id": ids})
        if model is not None:
            pred = predict_proba_frame(model, data.x_pool)
            cands = pd.concat([cands, pred.reset_index(drop=True)], axis=1)
        plan = plan_round(r, size, verify_fraction, has_model=model is not None)
        queue, plan = select_round_queue(cands, data.x_pool, plan, set(labeled), seed=seed)
        held_out = (np.nan if model is None else
                    float((predict_proba_frame(model, data.x_test)["predicted_class"].to_numpy() == data.y_test).mean()))
        for kind, part in queue.groupby("queue", sort=False):
            q = part["image_id"].to_numpy()
            truth = truth_pool[q].astype(object)
            preset = None if model is None else pred["predicted_class"].to_numpy(dtype=object)[q]
            single, t_single = label_single(truth, costs, error, rng)
            grid, t_grid, flips = label_grid(truth, preset, costs, error, miss, page_size, rng)
            rows.append({
                "round": r, "queue": kind, "labels": len(q),
                "preset_accuracy": float(np.mean(preset == truth)) if preset is not None else np.nan,
                "held_out_accuracy": held_out,
                "single_per_min": 60 * len(q) / t_single, "grid_per_min": 60 * len(q) / t_grid,
                "single_error": float(np.mean(single != truth)), "grid_error": float(np.mean(grid != truth)),
                "flips": flips,
            })
            labeled.update(zip(q.tolist(), grid.tolist()))  # the next model learns from what was labeled
        keys = np.fromiter(labeled, dtype=np.int64)
        y = np.asarray([labeled[k] for k in keys], dtype=object)
        model = fit_quality_model(data.x_pool[keys], y) if len(set(y)) > 1 else None
    df = pd.DataFrame(rows)
    df["speedup"] = df["grid_per_min"] / df["single_per_min"]
    return df


def _totals(part: pd.DataFrame) -> tuple[int, float, float, float, float]:
    """Labels, single and grid labels/min, single and grid error over rows of ``run_rounds``."""
    n = int(part["labels"].sum())
    single_s = float((60 * part["labels"] / part["single_per_min"]).sum())
    grid_s = float((60 * part["labels"] / part["grid_per_min"]).sum())
    err_single = float((part["single_error"] * part["labels"]).sum() / n) if n else float("nan")
    err_grid = float((part["grid_error"] * part["labels"]).sum() / n) if n else float("nan")
    return n, 60 * n / single_s, 60 * n / grid_s, err_single, err_grid


def sensitivity(costs: Costs, page_size: int, error: float, seed: int) -> pd.DataFrame:
    """Grid / single speed-up for pre-set accuracies × tile glance costs (a balanced class mix)."""
    rng = np.random.default_rng(seed)
    truth = rng.choice(np.asarray(CLASSES, dtype=object), size=2400)
    rows = []
    for accuracy in (0.6, 0.7, 0.8, 0.9, 0.95):
        wrong = rng.random(len(truth)) >= accuracy
        preset = truth.copy()
        for i in np.flatnonzero(wrong):
            preset[i] = rng.choice([c for c in CLASSES if c != truth[i]])
        row = {"preset_accuracy": accuracy}
        for look in (0.2, 0.3, 0.45):
            c = Costs(**{**costs.__dict__, "look_tile": look})
            _, t_single = label_single(truth, c, error, rng)
            _, t_grid, _ = label_grid(truth, preset, c, error, 0.0, page_size, rng)
            row[f"look_tile={look}s"] = round(t_single / t_grid, 2)
        rows.append(row)
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m danbooru_assets.bench labeler",
                                     description=__doc__.splitlines()[0])
    d = Costs()
    parser.add_argument("--pool", type=int, default=20_000, help="pool size (the seed's is 363k)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.05, 0.25])
    parser.add_argument("--min-round-size", type=int, default=20)
    parser.add_argument("--page-size", type=int, default=24)
    parser.add_argument("--error", type=float, default=0.03, help="the person's error rate per judgment")
    parser.add_argument("--miss", type=float, default=0.0, help="grid only: a wrong pre-set accepted at a glance")
    parser.add_argument("--verify-fraction", type=float, default=0.25,
                        help="share of each round (once a model exists) from the verify queue (0 = uncertainty only)")
    parser.add_argument("--seed", type=int, default=0)
    for name, value in d.__dict__.items():
        if name != "columns":
            parser.add_argument("--" + name.replace("_", "-"), type=float, default=value, help=f"seconds (default {value})")
    args = parser.parse_args(argv)
    costs = Costs(**{name: getattr(args, name) for name in d.__dict__ if name != "columns"})
    t0 = time.perf_counter()
    mix = sample_class_mix()
    df = run_rounds(args.pool, args.fractions, args.min_round_size, args.page_size, costs, args.error, args.miss,
                    args.seed, mix, verify_fraction=args.verify_fraction)
    pd.set_option("display.width", 160)
    print(f"pool {args.pool}, class mix good/questionable/bad = {', '.join(f'{m:.2f}' for m in mix)}, "
          f"page {args.page_size} tiles, error {args.error}, miss {args.miss}, verify fraction {args.verify_fraction}")
    print(cost_model(costs))
    print(df.round(3).to_string(index=False))
    print("\nper queue (all rounds; SIMULATED):")
    for kind in list(dict.fromkeys(df["queue"])) + ["all"]:
        n, single, grid, e_single, e_grid = _totals(df if kind == "all" else df.loc[df["queue"] == kind])
        print(f"  {kind:<12} {n:>7} labels: single {single:6.1f}/min (error {e_single:.1%}), "
              f"grid {grid:6.1f}/min (error {e_grid:.1%}): {grid / single:.2f}x")
    print("\ngrid speed-up by the pre-set's accuracy and the glance per tile:")
    print(sensitivity(costs, args.page_size, args.error, args.seed).to_string(index=False))
    print(f"({time.perf_counter() - t0:.1f} s)")
    return 0
