"""Agreement between labelers (Cohen's kappa) and self-agreement on re-shown images."""

from __future__ import annotations

from pathlib import Path

import pytest

from danbooru_assets.labels.agreement import agreement_report, cohen_kappa, disagreements_markdown
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


def test_report_on_an_empty_store(tmp_path: Path) -> None:
    report = agreement_report(LabelStore(tmp_path / "l.sqlite").history())
    assert report["pairs"] == 0 and report["kappa"] is None and report["self_kappa"] is None
    assert "no disagreements" in disagreements_markdown(report)
