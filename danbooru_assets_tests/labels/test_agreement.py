"""Agreement between labelers (Cohen's kappa) and self-agreement on re-shown images."""

from __future__ import annotations

from pathlib import Path

import pytest

from danbooru_assets.labels.agreement import (
    agreement_by_labeler_markdown,
    agreement_report,
    cohen_kappa,
    disagreements_markdown,
)
from danbooru_assets.labels.store import LabelStore


def test_cohen_kappa_known_values() -> None:
    assert cohen_kappa(["good", "bad"] * 5, ["good", "bad"] * 5) == pytest.approx(1.0)
    # 2x2 textbook example: 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no → kappa 0.4
    a = ["good"] * 25 + ["bad"] * 25
    b = ["good"] * 20 + ["bad"] * 5 + ["good"] * 10 + ["bad"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa([], []) is None
    assert cohen_kappa(["good"] * 3, ["good"] * 3) is None  # chance agreement is certain: undefined
    with pytest.raises(ValueError):
        cohen_kappa(["good"], [])


def test_report_pairs_labelers_and_rechecks_and_ignores_undone_labels(tmp_path: Path) -> None:
    store = LabelStore(tmp_path / "l.sqlite")
    store.add(1, "good", "ann")
    store.add(1, "bad", "bob")  # disagreement: both kept
    store.add(2, "bad", "ann")
    store.add(2, "bad", "bob")  # agreement
    undone = store.add(3, "good", "bob")
    store.add(3, "bad", "ann")
    store.retract(undone, "bob")  # bob's label on 3 was undone: no pair
    store.add(4, "questionable", "ann")
    store.add(4, "good", "ann", source="recheck")  # ann changes her mind on a re-shown image
    store.add(5, "bad", "ann", source="recheck")  # a recheck without an earlier own label: no pair
    report = agreement_report(store.history())
    assert report["pairs"] == 2 and report["agreement"] == 0.5
    assert report["images_with_several_labelers"] == 2
    assert report["disagreements"] == [{"image_id": 1, "labels": {"ann": "good", "bob": "bad"}}]
    assert report["self_pairs"] == 1 and report["self_agreement"] == 0.0
    assert report["self_disagreements"] == [{"image_id": 4, "labeler": "ann", "first": "questionable", "again": "good"}]
    md = disagreements_markdown(report)
    assert "| 1 | ann: good, bob: bad |" in md and "| 4 | ann (re-shown): questionable → good |" in md
    # the same figures, naming the labelers
    assert report["by_pair"] == [{"labelers": ["ann", "bob"], "pairs": 2, "agreement": 0.5, "kappa": 0.0}]
    assert report["by_labeler"]["ann"] == {"labels": 5, "pairs_with_others": 2, "agreement_with_others": 0.5,
                                           "self_pairs": 1, "self_agreement": 0.0, "self_kappa": 0.0}
    assert report["by_labeler"]["bob"]["labels"] == 2 and report["by_labeler"]["bob"]["self_pairs"] == 0
    by_name = agreement_by_labeler_markdown(report)
    assert "| ann | 5 | 2 | 0.50 | 1 | 0.00 | 0.00 |" in by_name and "| ann · bob | 2 | 0.50 | 0.00 |" in by_name


def test_three_labelers_each_pair_named(tmp_path: Path) -> None:
    store = LabelStore(tmp_path / "l.sqlite")
    for image_id in range(1, 5):
        store.add(image_id, "good", "ann")
        store.add(image_id, "good" if image_id < 4 else "bad", "bob")
        store.add(image_id, "bad", "cy")
    pairs = {tuple(p["labelers"]): (p["pairs"], p["agreement"]) for p in agreement_report(store.history())["by_pair"]}
    assert pairs == {("ann", "bob"): (4, 0.75), ("ann", "cy"): (4, 0.0), ("bob", "cy"): (4, 0.25)}


def test_report_on_an_empty_store(tmp_path: Path) -> None:
    report = agreement_report(LabelStore(tmp_path / "l.sqlite").history())
    assert report["pairs"] == 0 and report["kappa"] is None and report["self_kappa"] is None
    assert "no disagreements" in disagreements_markdown(report)
    assert report["by_pair"] == [] and report["by_labeler"] == {}
    assert "no image labeled by two people yet" in agreement_by_labeler_markdown(report)
