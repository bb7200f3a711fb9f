"""Agreement of human labels, from the store's history (library, no Dagster).

Two kinds, reported apart:

* **between labelers**: an image labeled by two or more people keeps every label in the
  history; each labeler's own current label (their newest row that no undo retracted)
  is paired with every other labeler's, and Cohen's kappa is computed over all pairs.
  Images whose labelers disagree are listed for review.
* **self-agreement**: the labeling page re-shows a few already-labeled images on purpose
  (``quality.recheck_fraction``), stored with ``source = "recheck"``; each such label is
  paired with the label the same person gave that image before.
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

import pandas as pd

from danbooru_assets.labels.classes import LABEL_CLASSES

RECHECK_SOURCE = "recheck"


def cohen_kappa(a: Sequence[str], b: Sequence[str], classes: Sequence[str] = LABEL_CLASSES) -> float | None:
    """Cohen's kappa of two equally long label sequences; ``None`` when there are no pairs
    or chance agreement is already certain (both raters used one and the same class)."""
    if len(a) != len(b):
        raise ValueError(f"kappa needs pairs: {len(a)} vs {len(b)} labels")
    n = len(a)
    if n == 0:
        return None
    observed = sum(x == y for x, y in zip(a, b)) / n
    expected = sum((list(a).count(c) / n) * (list(b).count(c) / n) for c in classes)
    if expected >= 1.0:
        return None
    return (observed - expected) / (1.0 - expected)


def open_rows(history: pd.DataFrame) -> pd.DataFrame:
    """Label rows still in force for their writer: not an undo, not retracted, not a clear."""
    retracted = set(history["retracts"].dropna().astype("int64"))
    keep = history["retracts"].isna() & ~history["id"].isin(retracted) & history["label"].notna()
    return history.loc[keep]


def agreement_report(history: pd.DataFrame, max_listed: int = 50) -> dict[str, Any]:
    """Kappa between labelers and self-agreement on re-shown images, with the disagreements.

    ``history`` is :meth:`LabelStore.history`. Returns plain values: ``pairs``/``kappa``/
    ``agreement`` between labelers, ``self_pairs``/``self_kappa``/``self_agreement``, and
    ``disagreements`` / ``self_disagreements`` (lists of dicts, at most ``max_listed``),
    and the same figures by name: ``by_pair`` (each two labelers who labeled the same
    images: pairs, agreement, kappa) and ``by_labeler`` (images labeled, agreement with
    the others, self-agreement).
    """
    rows = open_rows(history).sort_values("id")
    own = rows.groupby(["image_id", "labeler"], sort=False).tail(1)
    a: list[str] = []
    b: list[str] = []
    per_pair: dict[tuple[str, str], tuple[list[str], list[str]]] = {}
    disagreements: list[dict[str, Any]] = []
    for image_id, group in own.sort_values("id").groupby("image_id", sort=True):
        if len(group) < 2:
            continue
        for (_, x), (_, y) in itertools.combinations(group.iterrows(), 2):
            a.append(x["label"])
            b.append(y["label"])
            (p, lp), (q, lq) = sorted([(str(x["labeler"]), x["label"]), (str(y["labeler"]), y["label"])])
            pa, pb = per_pair.setdefault((p, q), ([], []))
            pa.append(lp)
            pb.append(lq)
        if group["label"].nunique() > 1:
            disagreements.append({"image_id": int(image_id),
                                  "labels": {str(r.labeler): str(r.label) for r in group.itertuples()}})
    sa: list[str] = []
    sb: list[str] = []
    self_names: list[str] = []
    self_disagreements: list[dict[str, Any]] = []
    rechecks = rows.loc[rows["source"] == RECHECK_SOURCE]
    for r in rechecks.itertuples():
        before = rows.loc[(rows["image_id"] == r.image_id) & (rows["labeler"] == r.labeler) & (rows["id"] < r.id)
                          & (rows["source"] != RECHECK_SOURCE)]
        if before.empty:
            continue
        first = str(before["label"].iloc[-1])
        sa.append(first)
        sb.append(str(r.label))
        self_names.append(str(r.labeler))
        if first != r.label:
            self_disagreements.append({"image_id": int(r.image_id), "labeler": str(r.labeler),
                                       "first": first, "again": str(r.label)})

    def share(x: list[str], y: list[str]) -> float | None:
        return sum(p == q for p, q in zip(x, y)) / len(x) if x else None

    by_pair = [{"labelers": list(pair), "pairs": len(x), "agreement": share(x, y), "kappa": cohen_kappa(x, y)}
               for pair, (x, y) in sorted(per_pair.items())]
    by_labeler: dict[str, dict[str, Any]] = {}
    for name, mine in rows.groupby("labeler", sort=True):
        name = str(name)
        sx = [f for f, d in zip(sa, self_names) if d == name]
        sy = [g for g, d in zip(sb, self_names) if d == name]
        with_others = [(x, y) for pair, (xs, ys) in per_pair.items() if name in pair for x, y in zip(xs, ys)]
        by_labeler[name] = {
            "labels": int(mine["image_id"].nunique()),
            "pairs_with_others": len(with_others),
            "agreement_with_others": (sum(x == y for x, y in with_others) / len(with_others)) if with_others else None,
            "self_pairs": len(sx), "self_agreement": share(sx, sy), "self_kappa": cohen_kappa(sx, sy),
        }
    return {
        "by_pair": by_pair, "by_labeler": by_labeler,
        "pairs": len(a), "kappa": cohen_kappa(a, b), "agreement": share(a, b),
        "images_with_several_labelers": int((own.groupby("image_id").size() > 1).sum()),
        "disagreements": disagreements[:max_listed], "n_disagreements": len(disagreements),
        "self_pairs": len(sa), "self_kappa": cohen_kappa(sa, sb), "self_agreement": share(sa, sb),
        "self_disagreements": self_disagreements[:max_listed], "n_self_disagreements": len(self_disagreements),
    }


def disagreements_markdown(report: dict[str, Any]) -> str:
    """The disagreements as a Markdown table for the Dagster UI."""
    lines = ["| image | labels |", "|---|---|"]
    lines += [f"| {d['image_id']} | " + ", ".join(f"{k}: {v}" for k, v in sorted(d["labels"].items())) + " |"
              for d in report["disagreements"]]
    lines += [f"| {d['image_id']} | {d['labeler']} (re-shown): {d['first']} → {d['again']} |"
              for d in report["self_disagreements"]]
    if len(lines) == 2:
        lines.append("| – | no disagreements |")
    return "\n".join(lines)


def _figure(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def agreement_by_labeler_markdown(report: dict[str, Any]) -> str:
    """Agreement figures naming the labelers, as Markdown tables for the Dagster UI."""
    lines = ["| labeler | images | pairs with others | agreement with others | re-shown | self-agreement | self kappa |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {name} | {v['labels']} | {v['pairs_with_others']} | {_figure(v['agreement_with_others'])} | "
              f"{v['self_pairs']} | {_figure(v['self_agreement'])} | {_figure(v['self_kappa'])} |"
              for name, v in report["by_labeler"].items()]
    if len(lines) == 2:
        lines.append("| – | no labels | | | | | |")
    lines += ["", "| labelers | images both labeled | agreement | kappa |", "|---|---:|---:|---:|"]
    lines += [f"| {p['labelers'][0]} · {p['labelers'][1]} | {p['pairs']} | {_figure(p['agreement'])} | "
              f"{_figure(p['kappa'])} |" for p in report["by_pair"]]
    if not report["by_pair"]:
        lines.append("| – | no image labeled by two people yet | | |")
    return "\n".join(lines)
