"""Which stored rows an inference stage reuses."""

import pandas as pd

from danbooru_assets.core.incremental import plan_reuse


def _index():
    return pd.DataFrame(
        {"image_id": [1, 2, 3, 4], "file_bytes": [10, 20, 30, 40], "mtime": [1.0, 2.0, 3.0, 4.0], "rel_path": list("abcd")}
    )


def test_reuses_only_what_every_table_holds_for_the_same_file():
    embeddings = pd.DataFrame(
        {"image_id": [1, 2, 3], "file_bytes": [10, 20, 31], "mtime": [1.0, 2.0, 3.0], "embedding": ["e1", "e2", "e3"]}
    )
    # a kill between the two writes: the stats table lacks 2, which embeddings hold
    stats = pd.DataFrame({"image_id": [1, 3], "file_bytes": [10, 31], "mtime": [1.0, 3.0], "border": [0.1, 0.3]})
    plan = plan_reuse(_index(), [embeddings, stats])
    # 1: both hold the same file; 2: only one table; 3: another file (size 31 != 30); 4: new
    assert plan.todo["image_id"].tolist() == [2, 3, 4]
    assert [t["image_id"].tolist() for t in plan.reused] == [[1], [1]]
    assert list(plan.reused[0].columns) == list(embeddings.columns)  # rows as stored


def test_a_replaced_file_is_computed_again():
    keypoints = _index()[["image_id", "file_bytes", "mtime"]].assign(nose_x=[1.0, 2.0, 3.0, 4.0])
    index = _index()
    index.loc[index["image_id"] == 3, ["file_bytes", "mtime"]] = [33, 9.0]
    plan = plan_reuse(index, [keypoints])
    assert plan.todo["image_id"].tolist() == [3]
    assert plan.reused[0]["image_id"].tolist() == [1, 2, 4]


def test_nothing_stored_or_stored_without_identity_reuses_nothing():
    index = _index()
    plan = plan_reuse(index, [None])
    assert plan.todo.equals(index) and plan.reused == [None]
    old_format = pd.DataFrame({"image_id": [1, 2], "nose_x": [1.0, 2.0]})  # no file identity columns
    plan = plan_reuse(index, [old_format])
    assert len(plan.todo) == 4 and plan.reused[0].empty
    plan = plan_reuse(index.iloc[0:0], [old_format.assign(file_bytes=10, mtime=1.0)])
    assert plan.todo.empty and plan.reused[0].empty
