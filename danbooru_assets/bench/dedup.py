"""Duplicate search by every signal, side by side in one run.

``python -m danbooru_assets.bench dedup [--images 1000] [--n 1000000] [--dup-fraction 0.02]``

1. **Hashes on real pixels.** ``--images`` images drawn by the sample generator (every
   kind: figures on flat and busy backgrounds, manga and text pages, patterns), encoded
   as JPEG, each with four real copies: the same bytes, resized 0.5-0.9x (JPEG q85-95),
   re-encoded at JPEG q60-95, and cropped by 2-8% per side. Every file goes through the
   CLIP pass's decode (the loader's dataset, 224 px draft decode, <= 256 px copy) and gets
   its file hash, pHash and dHash. Recall per copy kind and signal, precision per signal
   over every pair of the whole set (a pair is right when both come from one drawing).
2. **Search at a million.** Generating a million real images is too slow here, so the
   codes are sampled to match: 1,000,000 pHash codes whose bits follow the per-bit
   frequencies of the real codes of step 1, 2% of them planted copies whose distance to
   their source is drawn from the real distances step 1 measured for each copy kind.
   The multi-index search at the loosest distance the settings allow, then grouping at two
   thresholds from the stored pairs (a threshold change), each timed; peak memory is the
   process's own (a fresh process per contender).
3. **CLIP at a million.** Random unit vectors (float16) with a planted share of near
   duplicates (cosine 0.96-0.995): the clustered search over the million against exact
   brute force on ``--subset`` rows. The CLIP signal itself (which copies a real model
   puts above the threshold) needs real weights, which this machine does not have.
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


COPY_KINDS = ("bytes", "resized", "reencoded", "crop")


def _jpeg(img, quality: int) -> bytes:
    import io

    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=int(quality))
    return buf.getvalue()


def _draw_set(folder, n: int, seed: int) -> list[dict]:
    """``n`` drawn images and their four copies as files under ``folder``: one row each."""
    from PIL import Image

    from danbooru_assets.devtools import sample_data as sd

    rng = np.random.default_rng(seed)
    kinds = sd._quota(sd.KIND_WEIGHTS, n)
    rows = []
    for k, kind in enumerate(kinds):
        w, h = sd._image_size(rng, kind, 320, 1000)
        img = sd._render(sd._sample_spec(seed, k, kind, w, h), seed).convert("RGB")
        data = _jpeg(img, rng.integers(85, 96))
        f = rng.uniform(0.5, 0.9)
        c = rng.uniform(0.02, 0.08, 4)
        crop = img.crop((int(c[0] * w), int(c[1] * h), w - int(c[2] * w), h - int(c[3] * h)))
        decoded = Image.open(__import__("io").BytesIO(data))
        files = {
            "source": data,
            "bytes": data,
            "resized": _jpeg(img.resize((max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.LANCZOS),
                             rng.integers(85, 96)),
            "reencoded": _jpeg(decoded, rng.integers(60, 96)),
            "crop": _jpeg(crop, rng.integers(85, 96)),
        }
        for copy, blob in files.items():
            path = folder / f"{k}_{copy}.jpg"
            path.write_bytes(blob)
            rows.append({"group": k, "image_kind": kind, "copy": copy, "path": str(path)})
    return rows


def _hash_set(n: int, seed: int) -> dict:
    """Step 1 (in its own process): draw, decode, hash, measure."""
    import tempfile
    from pathlib import Path

    import pandas as pd

    from danbooru_assets.clip.loader import ShardImageDataset
    from danbooru_assets.dedup.hashes import dhash
    from danbooru_assets.dedup.search import hamming_pairs

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-dedup-") as tmp:
        rows = pd.DataFrame(_draw_set(Path(tmp), n, seed))
        drawn_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ds = ShardImageDataset(rows["path"].tolist(), list(range(len(rows))), transform=lambda im: None,
                               target_short_side=224)
        file_hash, phash, dh = [], [], []
        from danbooru_assets.clip.loader import stats_array
        from danbooru_assets.core.images import open_image_rgb

        from danbooru_assets.dedup.hashes import image_hashes

        hashes_alone = 0.0
        for i in range(len(rows)):
            stats = ds[i].stats
            file_hash.append(stats["file_hash"])
            phash.append(stats["phash"])
            # dHash of the same small copy, for the comparison only (not stored); and the
            # hashes alone timed on it: what they add to the decode pass.
            img, _ = open_image_rgb(rows["path"].iloc[i], 224)
            small = stats_array(img)
            dh.append(dhash(small))
            t1 = time.perf_counter()
            image_hashes(rows["path"].iloc[i], small)
            hashes_alone += time.perf_counter() - t1
        hash_s = time.perf_counter() - t0
    rows["file_hash"], rows["phash"], rows["dhash"] = file_hash, phash, dh
    out = {"rows": len(rows), "sources": n, "draw_s": drawn_s, "hash_s": hash_s, "flat": int(rows["phash"].isna().sum()),
           "hashes_ms": 1000 * hashes_alone / max(1, len(rows))}
    group = rows["group"].to_numpy()
    source_of = rows.loc[rows["copy"] == "source"].set_index("group")
    for signal in ("phash", "dhash"):
        codes = rows[signal].fillna(0).astype("int64").to_numpy()
        src = source_of[signal].reindex(group).fillna(0).astype("int64").to_numpy()
        rows[f"{signal}_d"] = np.bitwise_count((codes ^ src).view(np.uint64)).astype(int)
        rows.loc[rows[signal].isna(), f"{signal}_d"] = 99
        pairs = hamming_pairs(rows[signal].fillna(0).astype("int64").to_numpy(), 10)
        known = rows[signal].notna().to_numpy()
        ok = known[pairs.i] & known[pairs.j]
        out[f"{signal}_pairs"] = {
            "d": pairs.similarity[ok].astype(int),
            "true": group[pairs.i[ok]] == group[pairs.j[ok]],
            "kinds": rows["image_kind"].to_numpy()[pairs.i[ok]] + "~" + rows["image_kind"].to_numpy()[pairs.j[ok]],
        }
    same_bytes = rows["file_hash"].to_numpy() == source_of["file_hash"].reindex(group).to_numpy()
    rows["file_hash_hit"] = same_bytes
    out["file_hash_false"] = int(rows.groupby("file_hash")["group"].nunique().gt(1).sum())
    out["copies"] = rows.loc[rows["copy"] != "source", ["copy", "image_kind", "phash_d", "dhash_d", "file_hash_hit"]]
    out["bit_freq"] = np.array([(rows.loc[rows["copy"] == "source", "phash"].dropna().astype("int64").to_numpy()
                                 .view(np.uint64) >> np.uint64(b) & np.uint64(1)).mean() for b in range(64)])
    return out


def _million_codes(n: int, dup_fraction: float, bit_freq: np.ndarray, distances: dict, seed: int):
    """1M codes with per-bit frequencies ``bit_freq``; planted copies at distances drawn
    from ``distances[kind]`` (the real ones), kinds in equal shares."""
    rng = np.random.default_rng(seed)
    bits = (rng.random((n, 64), dtype=np.float32) < bit_freq[None, :].astype(np.float32))
    codes = np.packbits(bits, axis=1, bitorder="little").view(np.int64).ravel().copy()
    del bits
    n_dups = int(round(n * dup_fraction))
    chosen = rng.choice(n, size=2 * n_dups, replace=False)
    sources, dups = chosen[:n_dups], chosen[n_dups:]
    kinds = np.array(list(distances))[np.arange(n_dups) % len(distances)]
    flips = np.zeros(n_dups, dtype=np.int64)
    for kind, d in distances.items():
        where = np.flatnonzero(kinds == kind)
        flips[where] = rng.choice(np.asarray(d), size=len(where))
    masks = np.zeros(n_dups, dtype=np.uint64)
    for k in range(n_dups):
        for b in rng.choice(64, size=min(64, int(flips[k])), replace=False):
            masks[k] |= np.uint64(1) << np.uint64(b)
    codes[dups] = (codes[sources].view(np.uint64) ^ masks).view(np.int64)
    return codes, sources, dups, kinds, flips


def _million_search(n: int, dup_fraction: float, bit_freq, distances, threshold: int, seed: int) -> dict:
    """Step 2 (in its own process): search, then regroup at two thresholds."""
    import pandas as pd

    from danbooru_assets.dedup import CLIP_SEARCH_MIN, PHASH_SEARCH_MAX
    from danbooru_assets.dedup.groups import group_pairs
    from danbooru_assets.dedup.search import hamming_pairs

    codes, sources, dups, kinds, flips = _million_codes(n, dup_fraction, bit_freq, distances, seed)
    rss_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    pairs = hamming_pairs(codes, PHASH_SEARCH_MAX)
    search_s = time.perf_counter() - t0
    search_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    found = pd.Series(pairs.similarity, index=pairs.i * n + pairs.j)
    truth = np.minimum(sources, dups) * n + np.maximum(sources, dups)
    out = {"n": n, "planted": len(truth), "pairs": len(pairs), "search_s": search_s, "method": pairs.method,
           "peak_mb": search_peak, "data_mb": rss_data, "by_kind": {}}
    at = found.loc[found <= threshold]
    planted_set = pd.Index(truth)
    for kind in distances:
        mine = truth[kinds == kind]
        out["by_kind"][kind] = float(np.isin(mine, at.index).mean()) if len(mine) else 1.0
    true_found = np.isin(at.index.to_numpy(), truth)
    out["precision"] = float(true_found.mean()) if len(at) else 1.0
    out["false_pairs"] = int((~true_found).sum())
    del planted_set
    # A threshold change: regroup the million from the stored pairs, twice.
    images = pd.DataFrame({
        "image_id": np.arange(n, dtype=np.int64), "md5": None, "parent_id": pd.array([None] * n, dtype="Int64"),
        "file_hash": None, "phash": codes, "portrait_score": 0.5, "width": 512, "height": 512, "labeled_good": False,
    })
    stored = pd.DataFrame({"image_a": pairs.i, "image_b": pairs.j, "signal": pd.array(["phash"] * len(pairs), dtype="string"),
                           "value": pairs.similarity})
    regroup = []
    for t in (threshold, PHASH_SEARCH_MAX):
        t0 = time.perf_counter()
        result = group_pairs(images, stored, t, CLIP_SEARCH_MIN)
        regroup.append((t, time.perf_counter() - t0, result.counts["dropped"]))
    out["regroup"] = regroup
    out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _fresh(fn, *args):
    # fork: the child shares nothing it must re-import; one child per contender, so each
    # ru_maxrss is that contender's own peak.
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        return pool.submit(fn, *args).result()


def _report_hashes(h: dict, threshold: int) -> dict:
    copies = h["copies"]
    print(f"\n## 1. Hashes on {h['sources']:,} drawn images and 4 copies each ({h['rows']:,} files): "
          f"drawing {h['draw_s']:.0f} s, decode + hashes {h['hash_s']:.0f} s "
          f"({1000 * h['hash_s'] / h['rows']:.1f} ms a file, decoded twice for the dHash comparison; the file hash "
          f"and pHash alone {h['hashes_ms']:.2f} ms a file); {h['flat']} too flat to hash")
    print("\nRecall (copy linked to its source), per copy kind and signal:\n")
    print("| copy kind | file hash | pHash <= " + " | pHash <= ".join(str(t) for t in (4, 6, 8))
          + " | dHash <= " + " | dHash <= ".join(str(t) for t in (4, 6, 8)) + " | pHash distance p50/p90/p98 |")
    print("| --- | ---: " + "| ---: " * 6 + "| --- |")
    for kind in COPY_KINDS:
        c = copies.loc[copies["copy"] == kind]
        ph = " | ".join(f"{(c['phash_d'] <= t).mean():.3f}" for t in (4, 6, 8))
        dh = " | ".join(f"{(c['dhash_d'] <= t).mean():.3f}" for t in (4, 6, 8))
        pct = "/".join(str(int(v)) for v in np.percentile(c["phash_d"], [50, 90, 98]))
        print(f"| {kind} | {c['file_hash_hit'].mean():.3f} | {ph} | {dh} | {pct} |")
    print("\nPrecision over every pair of the set (right: both files from one drawing):\n")
    print("| signal | threshold | pairs found | right | precision | wrong pairs by image kind (top 3) |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    print(f"| file hash | same bytes | - | - | {'1.000' if h['file_hash_false'] == 0 else 'NOT 1'} | - |")
    for signal in ("phash", "dhash"):
        p = h[f"{signal}_pairs"]
        for t in (4, 6, 8):
            sel = p["d"] <= t
            right = int(p["true"][sel].sum())
            wrong = pd_top(p["kinds"][sel & ~p["true"]])
            print(f"| {signal} | {t} | {int(sel.sum()):,} | {right:,} | {right / max(1, int(sel.sum())):.4f} | {wrong} |")
    return {kind: copies.loc[copies["copy"] == kind, "phash_d"].to_numpy() for kind in COPY_KINDS}


def pd_top(labels: np.ndarray, k: int = 3) -> str:
    if len(labels) == 0:
        return "none"
    names, counts = np.unique(labels, return_counts=True)
    order = np.argsort(-counts)[:k]
    return ", ".join(f"{names[i]} {counts[i]}" for i in order)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m danbooru_assets.bench dedup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="embeddings (default 1,000,000)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dup-fraction", type=float, default=0.02, help="planted near-duplicates (default 0.02)")
    parser.add_argument("--subset", type=int, default=50_000, help="rows of the brute-force comparison (default 50,000)")
    parser.add_argument("--threshold", type=float, default=0.95, help="cosine similarity (default 0.95)")
    parser.add_argument("--probes", type=int, default=None, help="clusters each vector is compared with (default: the library's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=1000, help="drawn images of step 1, 4 copies each (default 1,000)")
    parser.add_argument("--phash-threshold", type=int, default=None, help="default: dedup.phash_max_distance's default")
    parser.add_argument("--skip-clip", action="store_true", help="steps 1-2 only")
    args = parser.parse_args(argv)
    from danbooru_assets.dedup.search import DEFAULT_PROBES
    from danbooru_assets.settings import DedupSettings

    threshold = args.phash_threshold if args.phash_threshold is not None else DedupSettings().phash_max_distance
    started = time.perf_counter()
    hashes = _fresh(_hash_set, args.images, args.seed)
    distances = _report_hashes(hashes, threshold)
    big = _fresh(_million_search, args.n, args.dup_fraction, hashes["bit_freq"], distances, threshold, args.seed)
    print(f"\n## 2. pHash search over {big['n']:,} sampled codes, {big['planted']:,} planted copies "
          f"({', '.join(distances)} in equal shares, at their measured distances)\n")
    print(f"{big['method']}: {big['search_s']:.1f} s, {big['pairs']:,} pairs stored; peak RSS {big['peak_mb']:,.0f} MB "
          f"(codes alone {big['data_mb']:,.0f} MB)")
    print(f"at distance <= {threshold}: recall " + ", ".join(f"{k} {v:.4f}" for k, v in big["by_kind"].items())
          + f"; precision {big['precision']:.4f} ({big['false_pairs']:,} pairs of unrelated codes)")
    for t, seconds, dropped in big["regroup"]:
        print(f"regroup from the stored pairs at distance <= {t}: {seconds:.1f} s ({dropped:,} dropped)")
    ok = (big["search_s"] <= 60 and big["peak_mb"] <= 2048 and big["precision"] >= 0.99
          and min(big["by_kind"].get(k, 0) for k in ("bytes", "resized", "reencoded")) >= 0.98
          and max(s for _, s, _ in big["regroup"]) <= 5)
    print(f"targets (recall >= 0.98 for bytes/resized/re-encoded, precision >= 0.99, search <= 60 s, <= 2 GB, "
          f"regroup <= 5 s): {'met' if ok else 'NOT met'}")
    if args.skip_clip:
        print(f"\ntotal {time.perf_counter() - started:.0f} s")
        return 0
    print("\n## 3. CLIP embeddings")

    probes = args.probes or DEFAULT_PROBES
    common = (args.dim, args.dup_fraction, args.threshold, args.seed, probes)
    print(f"{args.n:,} × {args.dim} float16 embeddings, {args.dup_fraction:.1%} planted near-duplicates "
          f"(cosine 0.96–0.995), threshold {args.threshold}", flush=True)
    runs = []
    for method, n in (("exact", args.subset), ("clustered", args.subset), ("clustered", args.n)):
        result = _fresh(_contender, method, n, *common)
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
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0
