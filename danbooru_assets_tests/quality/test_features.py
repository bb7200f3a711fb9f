"""What the classifier sees: embeddings + pose features, images without an embedding
left out, one CLIP model only."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from danbooru_assets.pose.coco import KEYPOINT_COLUMNS
from danbooru_assets.pose.features import keypoint_frame
from danbooru_assets.pose.synthetic import CANONICAL_POSE
from danbooru_assets.quality.features import (
    build_features,
    classifier_features,
    embedded_rows,
    embedding_matrix,
    rows_with_embeddings,
    single_clip_model,
)


def test_features_from_embeddings_and_pose_with_nans() -> None:
    emb = np.ones((4, 3), dtype=np.float16)
    pose = pd.DataFrame({"hip_y": [0.5, np.nan, 0.2, np.nan], "name": list("abcd"), "n": [1, 2, 3, 4]})
    X, names = build_features(emb, pose)
    assert X.shape == (4, 5) and X.dtype == np.float32
    assert names == ["emb_0", "emb_1", "emb_2", "hip_y", "n"]  # non-numeric columns dropped
    with pytest.raises(ValueError, match="row counts"):
        build_features(emb, pose.iloc[:2])
    frame = pd.DataFrame({"image_id": [1, 2], "embedding": [np.zeros(3), np.ones(3)]})
    assert embedding_matrix(frame).shape == (2, 3)
    wide = pd.DataFrame({"emb_10": [1.0], "emb_2": [2.0], "image_id": [5]})
    assert embedding_matrix(wide).tolist() == [[2.0, 1.0]]  # numeric column order


def test_images_without_an_embedding_are_left_out_not_zeroed() -> None:
    stored = pd.DataFrame({
        "image_id": [3, 1, 2, 2],
        "embedding": [np.full(2, 3.0), np.full(2, 1.0), None, np.full(2, 2.0)],  # 2: unreadable copy first
        "model_fingerprint_id": ["m", "m", "m", "m"],
    })
    rows, without = rows_with_embeddings([5, 2, 1, 4, 3], stored)
    assert rows["image_id"].tolist() == [2, 1, 3]  # the asked order, one row each
    assert without.tolist() == [5, 4]
    assert embedding_matrix(rows).tolist() == [[2.0, 2.0], [1.0, 1.0], [3.0, 3.0]]
    none, missing = rows_with_embeddings([7], stored)
    assert none.empty and missing.tolist() == [7]


def test_embeddings_of_two_clip_models_are_an_error_naming_both() -> None:
    rows = pd.DataFrame({"image_id": [1001, 2001, 1002, 3005], "model_fingerprint_id": ["aaa", "aaa", "bbb", "aaa"]})
    assert single_clip_model(rows.iloc[[0, 1, 3]], "test") == "aaa"
    assert single_clip_model(rows.iloc[0:0], "test") is None
    with pytest.raises(ValueError, match="2 CLIP models") as err:
        single_clip_model(rows, "quality_model")
    message = str(err.value)
    assert "aaa (2 shards: 0001, 0005)" in message and "bbb (1 shard: 0002)" in message


def test_classifier_features_in_the_asked_order_with_nan_pose_for_an_id_without_keypoints() -> None:
    embeddings = pd.DataFrame({
        "image_id": [7, 8, 9],
        "embedding": [np.full(4, 7.0), np.full(4, 8.0), np.full(4, 9.0)],
        "model_fingerprint_id": ["m"] * 3,
    })
    kps = np.concatenate([CANONICAL_POSE * 100 + 200, np.full((17, 1), 0.9)], axis=1)
    keypoints = keypoint_frame([9, 7], np.stack([kps, kps]))[["image_id", *KEYPOINT_COLUMNS]]
    keypoints["width"], keypoints["height"] = 400, 600
    X, names = classifier_features(embeddings, keypoints, [9, 8, 7])
    assert X.shape[0] == 3 and names[:4] == ["emb_0", "emb_1", "emb_2", "emb_3"]
    assert X[:, 0].tolist() == [9.0, 8.0, 7.0]  # rows in the asked order
    assert not {"image_id", "width", "height"} & set(names)  # the raw size is not a feature
    hip = names.index("hip_mid_x")
    assert X[0, hip] == pytest.approx(0.5) and np.isnan(X[1, hip])  # 8 has no keypoints
    with pytest.raises(ValueError, match="no CLIP embedding"):
        classifier_features(embeddings, keypoints, [7, 10])


def test_embedded_rows_leaves_out_and_checks_the_model_together() -> None:
    stored = pd.DataFrame({"image_id": [1, 2], "embedding": [np.ones(2), np.ones(2)],
                           "model_fingerprint_id": ["a", "a"]})
    rows, without, model = embedded_rows([1, 2, 3], stored, "test")
    assert rows["image_id"].tolist() == [1, 2] and without.tolist() == [3] and model == "a"
    mixed = stored.assign(model_fingerprint_id=["a", "b"])
    with pytest.raises(ValueError, match="test: the embeddings come from 2 CLIP models"):
        embedded_rows([1, 2], mixed, "test")
