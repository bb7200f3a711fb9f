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
