"""Near-duplicate search: the clustered search over a million embeddings against exact
brute force on a 50,000 subset.

``python -m danbooru_assets.bench dedup [--n 1000000] [--dim 512] [--dup-fraction 0.02]``

Random unit vectors (float16, as ``clip_embeddings`` stores them) with a planted share of
near-duplicates: each planted vector has cosine similarity uniform in ``--sim-range`` to a
distinct source vector. Random 512-d vectors are nearly orthogonal (cosine ~N(0, 1/512)),
so the only pairs above the threshold are the planted ones: recall and precision are
measured against them. Each contender runs in a fresh process (its data generated there,
deterministically), so its peak resident memory (``ru_maxrss``) is its own: data plus
search. The subset is generated with the same parameters at ``--subset`` rows.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import resource
import time

import numpy as np


def planted_embeddings(
    n: int, dim: int, dup_fraction: float, seed: int = 0, sim_range: tuple[float, float] = (0.96, 0.995)
) -> tuple[np.ndarray, np.ndarray]:
    """``(float16 [n, dim] unit vectors, planted [(source, duplicate)] pairs)``."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float16)
    chunk = 100_000  # bounds the float32 scratch (chunk × dim × 4 bytes)
    for start in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - start), dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start : start + len(block)] = block
    n_dups = int(round(n * dup_fraction))
    chosen = rng.choice(n, size=2 * n_dups, replace=False)
    sources, dups = chosen[:n_dups], chosen[n_dups:]
    sims = rng.uniform(*sim_range, size=n_dups).astype(np.float32)
    for start in range(0, n_dups, chunk):
        src = out[sources[start : start + chunk]].astype(np.float32)
        src /= np.linalg.norm(src, axis=1, keepdims=True)
        noise = rng.standard_normal(src.shape, dtype=np.float32)
        noise -= (noise * src).sum(1, keepdims=True) * src  # orthogonal to the source
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        s = sims[start : start + chunk, None]
        out[dups[start : start + chunk]] = s * src + np.sqrt(1 - s * s) * noise
    planted = np.stack([np.minimum(sources, dups), np.maximum(sources, dups)], axis=1).astype(np.int64)
    return out, planted


def _contender(method: str, n: int, dim: int, dup_fraction: float, threshold: float, seed: int, probes: int) -> dict:
    from danbooru_assets.dedup.search import clustered_pairs, exact_pairs

    t0 = time.perf_counter()
    vectors, planted = planted_embeddings(n, dim, dup_fraction, seed)
    generated_s = time.perf_counter() - t0
    rss_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    if method == "exact":
        pairs = exact_pairs(vectors, threshold)
    else:
        pairs = clustered_pairs(vectors, threshold, probes=probes, seed=seed)
    seconds = time.perf_counter() - t0
    found = pairs.i * n + pairs.j
    truth = planted[:, 0] * n + planted[:, 1]
    hits = int(np.isin(truth, found).sum())
    return {
        "method": pairs.method,
        "n": n,
        "planted": len(truth),
        "found": len(found),
        "recall": hits / len(truth) if len(truth) else 1.0,
        "precision": hits / len(found) if len(found) else 1.0,
        "seconds": seconds,
        "generate_s": generated_s,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "data_peak_mb": rss_data,
        "found_keys": found if n <= 100_000 else None,
    }


def _in_fresh_process(*args) -> dict:
    # fork: the child shares nothing it must re-import; one child per contender, so each
    # ru_maxrss is that contender's own peak.
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        return pool.submit(_contender, *args).result()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m danbooru_assets.bench dedup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="embeddings (default 1,000,000)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dup-fraction", type=float, default=0.02, help="planted near-duplicates (default 0.02)")
    parser.add_argument("--subset", type=int, default=50_000, help="rows of the brute-force comparison (default 50,000)")
    parser.add_argument("--threshold", type=float, default=0.95, help="cosine similarity (default 0.95)")
    parser.add_argument("--probes", type=int, default=None, help="clusters each vector is compared with (default: the library's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from danbooru_assets.dedup.search import DEFAULT_PROBES

    probes = args.probes or DEFAULT_PROBES
    common = (args.dim, args.dup_fraction, args.threshold, args.seed, probes)
    print(f"{args.n:,} × {args.dim} float16 embeddings, {args.dup_fraction:.1%} planted near-duplicates "
          f"(cosine 0.96–0.995), threshold {args.threshold}", flush=True)
    runs = []
    for method, n in (("exact", args.subset), ("clustered", args.subset), ("clustered", args.n)):
        result = _in_fresh_process(method, n, *common)
        print(f"  {result['method']} over {n:,}: {result['seconds']:.1f} s, recall {result['recall']:.4f}", flush=True)
        runs.append(result)
    exact, small, big = runs
    agreement = float(np.isin(exact["found_keys"], small["found_keys"]).mean()) if len(exact["found_keys"]) else 1.0
    print()
    print("| contender | vectors | search s | peak RSS MB (data alone) | planted pairs | found | recall | precision |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in runs:
        print(f"| {r['method']} | {r['n']:,} | {r['seconds']:.1f} | {r['peak_mb']:,.0f} ({r['data_peak_mb']:,.0f}) "
              f"| {r['planted']:,} | {r['found']:,} | {r['recall']:.4f} | {r['precision']:.4f} |")
    scale = (args.n / args.subset) ** 2
    print()
    print(f"clustered on the {args.subset:,} subset finds {agreement:.4f} of the pairs exact search finds; "
          f"exact over {args.n:,} would take ~{exact['seconds'] * scale / 60:.0f} min (O(N²) from the subset), "
          f"clustered took {big['seconds'] / 60:.1f} min")
    ok = big["seconds"] <= 300 and big["peak_mb"] <= 6 * 1024 and big["recall"] >= 0.95
    print(f"targets (≤ 5 min, ≤ 6 GB, recall ≥ 0.95 at {args.n:,}): {'met' if ok else 'NOT met'}")
    return 0
