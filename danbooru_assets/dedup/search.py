"""Pairs of embeddings whose cosine similarity reaches a floor, over a whole collection.

Two methods, one result (``i < j``, similarity, sorted by ``(i, j)``):

- :func:`exact_pairs`: every pair, a blocked matrix product (upper triangle only). Exact,
  O(N²·D): the baseline, and what sets up to :data:`EXACT_MAX` vectors use.
- :func:`clustered_pairs`: the SemDeDup way. faiss k-means (spherical) puts each vector
  in its nearest of ~√N clusters; each cluster is compared with itself, and with the
  vectors that have it among their ``probes`` nearest centroids (so a pair split by a
  cluster border is still found when one of them is near the other's cluster). The
  comparisons are dense matrix products (BLAS), about ``probes/√N`` of the exact work.
  Approximate: a pair is missed only when neither vector has the other's cluster among
  its ``probes`` nearest; the benchmark (``python -m danbooru_assets.bench dedup``)
  measures the recall.

Vectors are expected L2-normalised (the stored CLIP embeddings are); they are used in
float32 one block at a time, so a float16 matrix of a million rows is never copied whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Up to this many vectors the exact search is cheap (a 20,000² product is ~1 s on 2 cores).
EXACT_MAX = 20_000
# Rows of one matrix-product block: bounds the similarity block's memory (rows × N × 4 bytes).
BLOCK_ROWS = 1024
DEFAULT_PROBES = 3


@dataclass(frozen=True)
class Pairs:
    """Pairs of row indices ``i < j`` with their cosine similarity."""

    i: np.ndarray
    j: np.ndarray
    similarity: np.ndarray
    method: str

    def __len__(self) -> int:
        return len(self.i)

    def above(self, threshold: float) -> "Pairs":
        keep = self.similarity >= threshold
        return Pairs(self.i[keep], self.j[keep], self.similarity[keep], self.method)


def _f32(block: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(block, dtype=np.float32)


def _finish(parts_i: list, parts_j: list, parts_s: list, n: int, method: str) -> Pairs:
    """Concatenate, order each pair as i < j, drop repeats (a pair two clusters both found)."""
    if not parts_i:
        empty = np.zeros(0, dtype=np.int64)
        return Pairs(empty, empty.copy(), np.zeros(0, dtype=np.float32), method)
    i = np.concatenate(parts_i).astype(np.int64)
    j = np.concatenate(parts_j).astype(np.int64)
    s = np.concatenate(parts_s).astype(np.float32)
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    key = lo * n + hi
    key, first = np.unique(key, return_index=True)
    return Pairs(lo[first], hi[first], s[first], method)


def exact_pairs(vectors: np.ndarray, floor: float, block_rows: int = BLOCK_ROWS) -> Pairs:
    """Every pair with similarity >= ``floor``, by brute force."""
    n = len(vectors)
    vectors = _f32(vectors)  # once: the exact search is for sets that fit twice over
    parts_i, parts_j, parts_s = [], [], []
    for start in range(0, n, block_rows):
        rows = vectors[start : start + block_rows]
        # Only columns from `start` on: the upper triangle, each pair once.
        sims = rows @ vectors[start:].T
        r, c = np.nonzero(sims >= floor)
        c_abs = c + start
        r_abs = r + start
        keep = c_abs > r_abs
        parts_i.append(r_abs[keep])
        parts_j.append(c_abs[keep])
        parts_s.append(sims[r[keep], c[keep]])
    return _finish(parts_i, parts_j, parts_s, n, "exact")


def default_clusters(n: int) -> int:
    return max(1, int(round(math.sqrt(n))))


def _kmeans_centroids(vectors: np.ndarray, n_clusters: int, seed: int, iterations: int) -> np.ndarray:
    import faiss

    n, dim = vectors.shape
    # k-means needs a sample, not every vector: faiss's own guidance is 39-256 per centroid.
    sample_size = min(n, 64 * n_clusters)
    sample = np.sort(np.random.default_rng(seed).choice(n, size=sample_size, replace=False))
    train = _f32(vectors[sample])
    kmeans = faiss.Kmeans(dim, n_clusters, niter=iterations, spherical=True, seed=seed, verbose=False,
                          max_points_per_centroid=64)
    kmeans.train(train)
    return kmeans.centroids


def _nearest_centroids(vectors: np.ndarray, centroids: np.ndarray, probes: int, chunk: int = 65_536) -> np.ndarray:
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(_f32(centroids))
    out = np.empty((len(vectors), probes), dtype=np.int64)
    for start in range(0, len(vectors), chunk):
        _, nearest = index.search(_f32(vectors[start : start + chunk]), probes)
        out[start : start + chunk] = nearest
    return out


def _grouped(labels: np.ndarray, owners: np.ndarray, n_clusters: int) -> list[np.ndarray]:
    """``owners`` split by ``labels`` (cluster ids), one array per cluster."""
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(n_clusters + 1))
    owners = owners[order]
    return [owners[bounds[c] : bounds[c + 1]] for c in range(n_clusters)]


def clustered_pairs(
    vectors: np.ndarray,
    floor: float,
    n_clusters: int | None = None,
    probes: int = DEFAULT_PROBES,
    seed: int = 0,
    iterations: int = 10,
    block_rows: int = BLOCK_ROWS,
) -> Pairs:
    """Pairs with similarity >= ``floor``, cluster then pairwise (see the module doc)."""
    n = len(vectors)
    n_clusters = min(n_clusters or default_clusters(n), n)
    probes = max(1, min(probes, n_clusters))
    centroids = _kmeans_centroids(vectors, n_clusters, seed, iterations)
    nearest = _nearest_centroids(vectors, centroids, probes)
    members = _grouped(nearest[:, 0], np.arange(n), n_clusters)
    # Vectors that probe a cluster other than their own (their 2nd..p-th nearest centroid).
    probe_rows = np.repeat(np.arange(n), probes - 1)
    probers = _grouped(nearest[:, 1:].ravel(), probe_rows, n_clusters) if probes > 1 else [np.zeros(0, int)] * n_clusters
    parts_i, parts_j, parts_s = [], [], []
    for own, extra in zip(members, probers):
        if len(own) == 0:
            continue
        base = _f32(vectors[own])
        # Within the cluster: upper triangle. Then its probers against it: all pairs.
        for start in range(0, len(own), block_rows):
            sims = base[start : start + block_rows] @ base[start:].T
            r, c = np.nonzero(sims >= floor)
            keep = c > r
            parts_i.append(own[r[keep] + start])
            parts_j.append(own[c[keep] + start])
            parts_s.append(sims[r[keep], c[keep]])
        for start in range(0, len(extra), block_rows):
            rows = extra[start : start + block_rows]
            sims = _f32(vectors[rows]) @ base.T
            r, c = np.nonzero(sims >= floor)
            parts_i.append(rows[r])
            parts_j.append(own[c])
            parts_s.append(sims[r, c])
    return _finish(parts_i, parts_j, parts_s, n, f"clustered (k-means {n_clusters} clusters, {probes} probes)")


def near_pairs(vectors: np.ndarray, floor: float, exact_max: int = EXACT_MAX, **clustered) -> Pairs:
    """Exact for up to ``exact_max`` vectors, clustered above."""
    if len(vectors) <= exact_max:
        return exact_pairs(vectors, floor)
    return clustered_pairs(vectors, floor, **clustered)


# --------------------------------------------------------------------------- Hamming


def _chunk_layout(bits: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous (shift, width) bit ranges covering ``bits`` bits."""
    widths = [bits // parts + (1 if k < bits % parts else 0) for k in range(parts)]
    shifts = np.concatenate([[0], np.cumsum(widths)[:-1]]).astype(int)
    return list(zip(shifts.tolist(), widths))


def _flip_masks(width: int, radius: int) -> np.ndarray:
    """Every ``width``-bit mask with at most ``radius`` bits set (0 first)."""
    from itertools import combinations

    masks = [0]
    for r in range(1, radius + 1):
        masks += [sum(1 << b for b in bits) for bits in combinations(range(width), r)]
    return np.array(masks, dtype=np.int64)


def hamming_pairs(codes: np.ndarray, radius: int, parts: int = 3) -> Pairs:
    """Every pair of 64-bit codes (int64) within Hamming distance ``radius``: multi-index
    hashing (Norouzi et al.), exact.

    The codes are cut into ``parts`` chunks; two codes within ``radius`` differ by at most
    ``radius // parts`` bits in at least one chunk (pigeonhole), so each chunk's table is
    probed with every mask of that many bits and the candidates are checked on the whole
    code. Tables are direct (an offset per chunk value: 3 chunks of 21-22 bits), so a probe
    is an array lookup, and the queries go in chunk order so XOR-ed probes stay mostly
    sequential in memory; a pair is probed from one end only. Radius 8 over a million
    spread codes: ~760 vectorised probes of half the million, ~0.3 candidates each. Never quadratic for spread codes; a run of codes
    sharing a chunk (many images hashing alike) costs the square of its size.
    ``similarity`` holds the distance (as float32)."""
    if not 3 <= parts <= 64:
        raise ValueError(f"parts must be 3..64 (chunks of at most 22 bits, a direct table each), got {parts}")
    codes = np.ascontiguousarray(codes, dtype=np.int64)
    n = len(codes)
    u = codes.view(np.uint64)
    per_chunk = radius // parts
    parts_i, parts_j, parts_d = [], [], []
    for shift, width in _chunk_layout(64, parts):
        key = ((u >> np.uint64(shift)) & np.uint64((1 << width) - 1)).astype(np.int32)
        # Everything below works on positions in chunk order (memory stays sequential);
        # only the pairs found are mapped back to rows.
        order = np.argsort(key, kind="stable")
        sorted_key, sorted_u = key[order], u[order]
        del key
        counts = np.bincount(sorted_key, minlength=1 << width).astype(np.int32)
        starts = (np.cumsum(counts, dtype=np.int64) - counts).astype(np.int64)
        # A pair whose chunks differ by mask m is met from both ends; probing only from the
        # end whose chunk has m's highest bit clear meets it once and halves the work.
        clear: dict[int, np.ndarray] = {}
        for mask in _flip_masks(width, per_chunk):
            mask = int(mask)
            if mask == 0:
                pq_all = np.arange(n, dtype=np.int64)
            else:
                high = mask.bit_length() - 1
                if high not in clear:
                    clear[high] = np.flatnonzero((sorted_key >> high) & 1 == 0)
                pq_all = clear[high]
            probe = sorted_key[pq_all] ^ np.int32(mask)
            cnt = counts[probe]
            has = np.flatnonzero(cnt)
            cnt, first, q = cnt[has], starts[probe[has]], pq_all[has]
            # Buckets of one code (most of them) need no expansion.
            single = cnt == 1
            pos_q = [q[single]]
            pos_o = [first[single]]
            multi = ~single
            if multi.any():
                c, f = cnt[multi], first[multi]
                offset = np.arange(int(c.sum()), dtype=np.int64) - np.repeat(np.cumsum(c, dtype=np.int64) - c, c)
                pos_q.append(np.repeat(q[multi], c))
                pos_o.append(np.repeat(f, c) + offset)
            pq, po = np.concatenate(pos_q), np.concatenate(pos_o)
            if mask == 0:  # the same chunk: each pair met from both ends, and each code meets itself
                keep = po > pq
                pq, po = pq[keep], po[keep]
            dist = np.bitwise_count(sorted_u[pq] ^ sorted_u[po])
            ok = dist <= radius
            parts_i.append(order[pq[ok]])
            parts_j.append(order[po[ok]])
            parts_d.append(dist[ok].astype(np.float32))
        del clear
    return _finish(parts_i, parts_j, parts_d, n, f"multi-index hashing ({parts} chunks, radius {radius})")
