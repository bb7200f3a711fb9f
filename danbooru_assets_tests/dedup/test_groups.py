import numpy as np
import pandas as pd

from danbooru_assets.dedup.groups import MEMBER_COLUMNS, candidate_pairs, duplicate_groups, group_pairs


def _unit(rng, n, dim=32):
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _images(n, **columns):
    base = {
        "image_id": np.arange(100, 100 + n),
        "md5": [f"{i:032x}" for i in range(n)],
        "parent_id": pd.array([None] * n, dtype="Int64"),
        "file_hash": [f"f{i:031x}" for i in range(n)],
        # Spread codes: 0x5555... shifted by i bits differ by many bits from each other.
        "phash": pd.array([int(np.int64(np.uint64(0x9E3779B97F4A7C15 * (i + 1) % 2**64).view(np.int64)))
                           for i in range(n)], dtype="Int64"),
        "portrait_score": np.linspace(0.5, 0.6, n),
        "width": np.full(n, 500),
        "height": np.full(n, 500),
        "labeled_good": np.zeros(n, bool),
    }
    base.update(columns)
    return pd.DataFrame(base)


def _near_copy(v, sim, rng):
    noise = rng.standard_normal(v.shape).astype(np.float32)
    noise -= (noise @ v) * v
    noise /= np.linalg.norm(noise)
    return sim * v + np.sqrt(1 - sim**2) * noise


def test_each_kind_groups_and_the_keep_rule():
    rng = np.random.default_rng(0)
    vectors = _unit(rng, 10)
    vectors[1] = _near_copy(vectors[0], 0.97, rng)  # near: 100 ~ 101
    vectors[3] = _near_copy(vectors[2], 0.93, rng)  # below the threshold: kept apart
    md5 = [f"{i:032x}" for i in range(10)]
    md5[5] = md5[4]  # the same file under ids 104 and 105
    md5[8] = md5[9] = None  # no metadata: never "the same md5"
    parent = pd.array([None] * 10, dtype="Int64")
    parent[7] = 106  # 107 is a child post of 106
    score = np.full(10, 0.5)
    score[1] = 0.9  # 101 has the best score of its group
    width = np.full(10, 500)
    width[4] = 900  # 104 has more pixels than its copy 105 (same score)
    good = np.zeros(10, bool)
    good[6] = False
    good[7] = True  # a human said good: kept over its parent whatever the score
    score[6] = 0.99
    images = _images(10, md5=md5, parent_id=parent, portrait_score=score, width=width, labeled_good=good)

    result = duplicate_groups(images, vectors, threshold=0.95)

    members = result.members
    assert list(members.columns) == MEMBER_COLUMNS
    dropped = members.loc[~members["kept"]].set_index("image_id")
    assert dropped["duplicate_of"].to_dict() == {100: 101, 105: 104, 106: 107}
    assert dropped["kind"].to_dict() == {100: "clip", 105: "md5", 106: "parent_child"}
    assert abs(dropped.loc[100, "value"] - 0.97) < 1e-3 and dropped.loc[100, "linked_to"] == 101
    assert dropped.loc[100, "detail"] == "clip cosine 0.970"
    assert pd.isna(dropped.loc[105, "value"]) and dropped.loc[105, "detail"].startswith("md5 ")
    assert result.counts["groups"] == 3 and result.counts["dropped"] == 3
    assert result.counts["dropped_clip"] == result.counts["dropped_md5"] == result.counts["dropped_parent_child"] == 1
    # 102 ~ 103 at 0.93: no group, but on the "just outside" review list.
    assert not members["image_id"].isin([102, 103]).any()
    outside = result.review["clip_outside"].set_index(["image_a", "image_b"])["value"]
    assert abs(outside[(102, 103)] - 0.93) < 1e-3
    assert (100, 101) in set(zip(result.review["clip_inside"]["image_a"], result.review["clip_inside"]["image_b"]))


def test_parent_child_off_and_near_off():
    rng = np.random.default_rng(1)
    vectors = _unit(rng, 4)
    vectors[1] = _near_copy(vectors[0], 0.99, rng)
    parent = pd.array([None, None, None, 102], dtype="Int64")
    images = _images(4, parent_id=parent)
    assert set(duplicate_groups(images, vectors, 0.95, parent_child=False).members["image_id"]) == {100, 101}
    # CLIP pairs off (a random-weights model): only the parent/child pair groups.
    result = duplicate_groups(images, vectors, 0.95, use_clip=False)
    assert set(result.members["image_id"]) == {102, 103}
    assert len(result.review["clip_inside"]) == 1  # still shown for review


def test_a_chain_is_one_group_and_names_the_link_that_brought_each_in():
    rng = np.random.default_rng(2)
    vectors = _unit(rng, 3)
    vectors[1] = _near_copy(vectors[0], 0.96, rng)
    vectors[2] = _near_copy(vectors[1], 0.96, rng)
    score = np.array([0.9, 0.1, 0.1])
    result = duplicate_groups(_images(3, portrait_score=score), vectors, 0.95)
    dropped = result.dropped.set_index("image_id")
    assert set(dropped.index) == {101, 102} and (dropped["duplicate_of"] == 100).all()
    # 102 joined through 101 (its own similarity to 100 is below the threshold): its link is to 101.
    assert dropped.loc[101, "linked_to"] == 100 and dropped.loc[102, "linked_to"] == 101
    assert dropped.loc[102, "value"] >= 0.95


def test_no_duplicates_gives_an_empty_table_with_the_columns():
    rng = np.random.default_rng(3)
    result = duplicate_groups(_images(5), _unit(rng, 5), 0.95)
    assert result.members.empty and list(result.members.columns) == MEMBER_COLUMNS
    assert result.counts["groups"] == 0 and result.counts["images"] == 5


def test_file_hash_and_phash_link_without_metadata_and_name_their_value():
    rng = np.random.default_rng(4)
    images = _images(6, md5=[None] * 6)  # no metadata line for any of them
    file_hash = images["file_hash"].tolist()
    file_hash[1] = file_hash[0]  # 101: the same bytes as 100
    phash = images["phash"].tolist()
    phash[3] = phash[2] ^ 0b1011  # 103: a resized copy of 102, 3 bits apart
    phash[5] = phash[4] ^ 0b1111111  # 105 ~ 104 at 7 bits: outside 6, inside 8
    images["file_hash"], images["phash"] = file_hash, pd.array(phash, dtype="Int64")
    result = duplicate_groups(images, _unit(rng, 6), 0.95, phash_max=6)
    dropped = result.dropped.set_index("image_id")
    assert set(dropped.index) == {100, 102}  # the higher portrait_score of each pair is kept
    assert dropped.loc[100, "kind"] == "file_hash" and dropped.loc[102, "kind"] == "phash"
    assert dropped.loc[102, "value"] == 3 and dropped.loc[102, "detail"] == "phash distance 3"
    assert result.review["phash_outside"][["image_a", "image_b", "value"]].values.tolist() == [[104, 105, 7]]


def test_a_threshold_change_regroups_from_the_stored_pairs():
    rng = np.random.default_rng(5)
    images = _images(4)
    phash = images["phash"].tolist()
    phash[1] = phash[0] ^ 0b1111111  # 7 bits apart
    images["phash"] = pd.array(phash, dtype="Int64")
    vectors = _unit(rng, 4)
    vectors[3] = _near_copy(vectors[2], 0.9, rng)
    stored = candidate_pairs(images, vectors).pairs  # searched once, at the loosest thresholds
    assert set(stored["signal"]) == {"phash", "clip"}
    strict = group_pairs(images, stored, phash_max=6, clip_threshold=0.95)
    loose = group_pairs(images, stored, phash_max=8, clip_threshold=0.88)
    assert strict.members.empty
    assert set(loose.dropped["kind"]) == {"phash", "clip"} and loose.counts["dropped"] == 2


def test_images_without_a_hash_link_by_nothing_they_lack():
    images = _images(3, file_hash=[None, None, None], phash=pd.array([None, None, None], dtype="Int64"))
    result = duplicate_groups(images, _unit(np.random.default_rng(6), 3), 0.95)
    assert result.members.empty and result.counts["candidate_pairs"] == 0
