import numpy as np
import pytest

from danbooru_assets.bench.dedup import planted_embeddings
from danbooru_assets.dedup.search import clustered_pairs, exact_pairs, near_pairs


def _keys(pairs, n):
    return set((pairs.i * n + pairs.j).tolist())


def test_exact_pairs_find_exactly_the_planted_pairs():
    vectors, planted = planted_embeddings(3000, 64, 0.03, seed=1, sim_range=(0.9, 0.99))
    pairs = exact_pairs(vectors, 0.85, block_rows=500)  # several blocks: the triangle is stitched
    assert len(planted) == 90
    assert _keys(pairs, 3000) == set((planted[:, 0] * 3000 + planted[:, 1]).tolist())
    assert (pairs.i < pairs.j).all()
    # The similarities are the planted ones (float16 storage: ~1e-3).
    assert pairs.similarity.min() >= 0.885 and pairs.similarity.max() <= 1.001


def test_clustered_pairs_agree_with_exact_search():
    vectors, planted = planted_embeddings(6000, 64, 0.02, seed=2, sim_range=(0.95, 0.995))
    exact = exact_pairs(vectors, 0.9)
    clustered = clustered_pairs(vectors, 0.9, n_clusters=40, probes=3)
    assert len(exact) == len(planted) == 120
    found = _keys(clustered, 6000) & _keys(exact, 6000)
    assert len(found) >= 0.95 * len(exact)
    assert _keys(clustered, 6000) <= _keys(exact, 6000)  # nothing below the floor


def test_near_pairs_switches_method_by_size():
    vectors, _ = planted_embeddings(500, 32, 0.02, seed=3)
    assert near_pairs(vectors, 0.95).method == "exact"
    assert near_pairs(vectors, 0.95, exact_max=100, n_clusters=8).method.startswith("clustered")


@pytest.mark.parametrize("n", [0, 1])
def test_empty_and_single_sets(n):
    vectors = np.ones((n, 8), np.float16) / np.sqrt(8)
    assert len(exact_pairs(vectors, 0.5)) == 0


def _random_codes(n, seed):
    return np.random.default_rng(seed).integers(-(2**63), 2**63 - 1, size=n, dtype=np.int64)


@pytest.mark.parametrize("radius,parts", [(8, 3), (6, 3), (7, 4), (2, 3)])
def test_hamming_pairs_are_exactly_the_brute_force_pairs(radius, parts):
    from danbooru_assets.dedup.hashes import hamming
    from danbooru_assets.dedup.search import hamming_pairs

    rng = np.random.default_rng(radius)
    codes = _random_codes(1500, radius)
    # Plant copies at every distance up to radius + 2 (so some fall just outside).
    for k in range(200):
        bits = rng.choice(64, size=k % (radius + 3), replace=False)
        codes[1000 + k % 500] = codes[k] ^ np.int64(np.bitwise_or.reduce(np.uint64(1) << bits.astype(np.uint64), initial=np.uint64(0)).view(np.int64))
    codes[1400:1410] = codes[1399]  # a run of identical codes
    found = hamming_pairs(codes, radius, parts=parts)
    d = hamming(codes[:, None], codes[None, :])
    i, j = np.nonzero(np.triu(d <= radius, 1))
    assert set(zip(found.i.tolist(), found.j.tolist())) == set(zip(i.tolist(), j.tolist()))
    assert (found.similarity == d[found.i, found.j]).all()
    assert found.method.startswith("multi-index hashing")


def test_hamming_pairs_of_nothing():
    from danbooru_assets.dedup.search import hamming_pairs

    assert len(hamming_pairs(np.zeros(0, np.int64), 8)) == 0
    assert len(hamming_pairs(np.zeros(1, np.int64), 8)) == 0
    with pytest.raises(ValueError, match="parts must be"):
        hamming_pairs(np.zeros(3, np.int64), 8, parts=2)
