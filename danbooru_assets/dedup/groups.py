"""Duplicate groups and the one image each keeps, from candidate pairs found once.

Five signals link two images (:data:`SIGNALS`, strongest first):

- ``file_hash``: the same file bytes (BLAKE2b from the decode pass), whatever the metadata
  says: a re-upload under a new id without a metadata line is caught;
- ``md5``: the same md5 in the metadata (the file as uploaded to Danbooru);
- ``phash``: 64-bit perceptual hashes at Hamming distance <= ``phash_max_distance``
  (resized and re-encoded copies, no model needed);
- ``clip``: CLIP embeddings at cosine >= ``threshold`` (crops, colour and text variants,
  when the model is real);
- ``parent_child``: Danbooru's variant sets, a post whose ``parent_id`` is another post of
  the collection; off with ``parent_child=False``.

Two steps, so a threshold change costs seconds: :func:`candidate_pairs` searches once at
the loosest thresholds the settings allow (:data:`PHASH_SEARCH_MAX`,
:data:`CLIP_SEARCH_MIN`) and returns every pair with its signal and value;
:func:`group_pairs` keeps the pairs the current thresholds accept and joins them.

A group is a connected component of the accepted links. Each group keeps one image by
:data:`KEEP_RULE` and drops the rest; every dropped image names the signal that ties it
(``kind``), the signal's value (Hamming distance, cosine; null for the exact signals),
a readable ``detail``, and the image it is tied to (``linked_to``): the kept image when a
link to it exists (the strongest such signal), else the member that brought it in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from danbooru_assets.dedup import CLIP_SEARCH_MIN, PHASH_SEARCH_MAX
from danbooru_assets.dedup.search import hamming_pairs, near_pairs

SIGNALS = ("file_hash", "md5", "phash", "clip", "parent_child")
THRESHOLD_SIGNALS = ("phash", "clip")
KEEP_RULE = "already labeled good > highest portrait_score > most pixels > lowest id"
INPUT_COLUMNS = [
    "image_id", "md5", "parent_id", "file_hash", "phash", "portrait_score", "width", "height", "labeled_good",
]
PAIR_COLUMNS = ["image_a", "image_b", "signal", "value"]
MEMBER_COLUMNS = [
    "image_id", "group_id", "group_size", "kept", "duplicate_of", "kind", "value", "linked_to", "detail",
]


@dataclass
class DedupResult:
    members: pd.DataFrame  # MEMBER_COLUMNS: one row per image of a group of two or more
    review: dict[str, pd.DataFrame]  # "<signal>_inside"/"<signal>_outside": image_a, image_b, value
    counts: dict = field(default_factory=dict)

    @property
    def dropped(self) -> pd.DataFrame:
        return self.members.loc[~self.members["kept"]]


@dataclass
class CandidatePairs:
    pairs: pd.DataFrame  # PAIR_COLUMNS, image_a < image_b
    methods: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def _exact_edges(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Each row with a value another row has, linked to the first row holding it (a star:
    n copies make n-1 links, never n²)."""
    known = values.notna() & (values.astype("string").str.len() > 0)
    rows = np.flatnonzero(known.to_numpy())
    if len(rows) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    codes, _ = pd.factorize(values.iloc[rows])
    first = pd.Series(rows).groupby(codes).transform("first").to_numpy()
    linked = first != rows
    return rows[linked], first[linked]


def _parent_edges(image_ids: np.ndarray, parent_id: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Each image whose parent post is in the set, linked to its parent."""
    position = pd.Series(np.arange(len(image_ids)), index=image_ids)
    parents = pd.to_numeric(parent_id, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
    has = ~np.isnan(parents)
    rows = np.flatnonzero(has)
    found = position.reindex(parents[has].astype(np.int64)).to_numpy()
    ok = ~np.isnan(found)
    return rows[ok], found[ok].astype(np.int64)


def _frame(ids: np.ndarray, a: np.ndarray, b: np.ndarray, signal: str, value) -> pd.DataFrame:
    ia, ib = ids[a], ids[b]
    return pd.DataFrame({
        "image_a": np.minimum(ia, ib), "image_b": np.maximum(ia, ib),
        "signal": signal, "value": np.broadcast_to(np.asarray(value, np.float32), len(a)).copy(),
    })


def candidate_pairs(
    images: pd.DataFrame,
    vectors: np.ndarray | None,
    phash_max: int = PHASH_SEARCH_MAX,
    clip_floor: float = CLIP_SEARCH_MIN,
) -> CandidatePairs:
    """Every pair any signal links at the given (loosest) thresholds: ``images`` has
    :data:`INPUT_COLUMNS` (the keep-rule ones are not needed here), ``vectors`` the unit
    embeddings row-aligned with it (None: no CLIP pairs). Perceptual hashes are searched
    by multi-index hashing, embeddings by :func:`~danbooru_assets.dedup.search.near_pairs`:
    neither is quadratic at a million images."""
    import time

    images = images.reset_index(drop=True)
    ids = images["image_id"].to_numpy(dtype=np.int64)
    frames, methods, seconds = [], {}, {}
    for signal in ("file_hash", "md5"):
        a, b = _exact_edges(images[signal]) if signal in images else (np.zeros(0, np.int64),) * 2
        frames.append(_frame(ids, a, b, signal, np.nan))
    a, b = _parent_edges(ids, images["parent_id"])
    frames.append(_frame(ids, a, b, "parent_child", np.nan))

    codes = pd.to_numeric(images["phash"], errors="coerce") if "phash" in images else pd.Series(dtype="Int64")
    hashed = np.flatnonzero(codes.notna().to_numpy())
    started = time.perf_counter()
    found = hamming_pairs(codes.iloc[hashed].to_numpy(dtype=np.int64), phash_max)
    seconds["phash"] = time.perf_counter() - started
    methods["phash"] = found.method
    frames.append(_frame(ids, hashed[found.i], hashed[found.j], "phash", found.similarity))

    if vectors is not None and len(vectors):
        started = time.perf_counter()
        near = near_pairs(vectors, clip_floor)
        seconds["clip"] = time.perf_counter() - started
        methods["clip"] = near.method
        frames.append(_frame(ids, near.i, near.j, "clip", near.similarity))
    pairs = pd.concat(frames, ignore_index=True)
    pairs["signal"] = pairs["signal"].astype("string")
    pairs = pairs.loc[pairs["image_a"] != pairs["image_b"], PAIR_COLUMNS].reset_index(drop=True)
    return CandidatePairs(pairs, methods, seconds)


def keep_order(images: pd.DataFrame) -> np.ndarray:
    """Rank of each row under :data:`KEEP_RULE` (0 = kept first)."""
    good = images["labeled_good"].fillna(False).to_numpy(dtype=bool)
    score = pd.to_numeric(images["portrait_score"], errors="coerce").fillna(-np.inf).to_numpy(dtype=float)
    pixels = (pd.to_numeric(images["width"], errors="coerce").fillna(0)
              * pd.to_numeric(images["height"], errors="coerce").fillna(0)).to_numpy(dtype=float)
    order = np.lexsort((images["image_id"].to_numpy(), -pixels, -score, ~good))  # last key first
    rank = np.empty(len(images), dtype=np.int64)
    rank[order] = np.arange(len(images))
    return rank


def accepted(pairs: pd.DataFrame, phash_max: int, clip_threshold: float, parent_child: bool = True,
             use_clip: bool = True) -> pd.DataFrame:
    """The pairs the current thresholds link."""
    signal, value = pairs["signal"], pairs["value"]
    keep = signal.isin(["file_hash", "md5"])
    keep |= (signal == "phash") & (value <= phash_max)
    if use_clip:
        keep |= (signal == "clip") & (value >= clip_threshold)
    if parent_child:
        keep |= signal == "parent_child"
    return pairs.loc[keep.to_numpy(dtype=bool)]


def _detail(signal: str, value: float, images: pd.DataFrame, row: int) -> str:
    if signal == "phash":
        return f"phash distance {int(value)}"
    if signal == "clip":
        return f"clip cosine {value:.3f}"
    if signal == "parent_child":
        return "parent/child posts"
    return f"{signal} {str(images.at[row, signal])[:12]}…"


def review_pairs(pairs: pd.DataFrame, phash_max: int, clip_threshold: float, n: int) -> dict[str, pd.DataFrame]:
    """For each threshold signal, the ``n`` pairs just inside and just outside it."""
    cols = ["image_a", "image_b", "value"]
    ph = pairs.loc[pairs["signal"] == "phash", cols]
    cl = pairs.loc[pairs["signal"] == "clip", cols]
    return {
        "phash_inside": ph.loc[ph["value"] <= phash_max].nlargest(n, "value"),
        "phash_outside": ph.loc[ph["value"] > phash_max].nsmallest(n, "value"),
        "clip_inside": cl.loc[cl["value"] >= clip_threshold].nsmallest(n, "value"),
        "clip_outside": cl.loc[cl["value"] < clip_threshold].nlargest(n, "value"),
    }


def group_pairs(
    images: pd.DataFrame,
    pairs: pd.DataFrame,
    phash_max: int,
    clip_threshold: float,
    parent_child: bool = True,
    use_clip: bool = True,
    review: int = 12,
) -> DedupResult:
    """Group ``images`` (:data:`INPUT_COLUMNS`) by the stored ``pairs`` the thresholds
    accept. Pairs naming an image not in ``images`` are ignored. ``use_clip=False``: CLIP
    pairs link nothing (a random-weights model's similarities mean nothing) but are still
    reviewed."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    images = images.reset_index(drop=True)
    n = len(images)
    ids = images["image_id"].to_numpy(dtype=np.int64)
    position = pd.Series(np.arange(n), index=ids)
    pairs = pairs.loc[pairs["image_a"].isin(ids) & pairs["image_b"].isin(ids)]
    links = accepted(pairs, phash_max, clip_threshold, parent_child, use_clip)
    a = position.reindex(links["image_a"]).to_numpy(dtype=np.int64)
    b = position.reindex(links["image_b"]).to_numpy(dtype=np.int64)
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    sizes = np.bincount(component, minlength=component.max() + 1 if n else 0)
    in_group = np.flatnonzero(sizes[component] >= 2) if n else np.zeros(0, np.int64)

    rank = keep_order(images)
    frame = pd.DataFrame({"row": in_group, "component": component[in_group], "rank": rank[in_group]})
    winner_row = frame.loc[frame.groupby("component")["rank"].idxmin()].set_index("component")["row"]
    kept_row = winner_row.reindex(frame["component"]).to_numpy()
    rows = frame["row"].to_numpy()

    # The link each dropped row is named by: to the kept image if there is one, else to
    # any member; the strongest signal first, then the closest value.
    both = pd.DataFrame({
        "row": np.concatenate([a, b]), "other": np.concatenate([b, a]),
        "signal": np.concatenate([links["signal"].to_numpy(), links["signal"].to_numpy()]),
        "value": np.concatenate([links["value"].to_numpy(), links["value"].to_numpy()]),
    })
    kept_of = pd.Series(kept_row, index=rows)
    both = both.loc[both["row"].isin(rows)]
    both["to_kept"] = both["other"].to_numpy() == kept_of.reindex(both["row"]).to_numpy()
    both["strength"] = both["signal"].map({s: k for k, s in enumerate(SIGNALS)})
    # Closest first: a small distance, a high cosine.
    both["closeness"] = np.where(both["signal"] == "clip", -both["value"], both["value"].fillna(0))
    best = (both.sort_values(["row", "to_kept", "strength", "closeness"], ascending=[True, False, True, True])
            .drop_duplicates("row").set_index("row"))
    best = best.reindex(rows)

    kept = rows == kept_row
    kinds = best["signal"].to_numpy(dtype=object)
    values = best["value"].to_numpy(dtype=np.float64)
    others = best["other"].to_numpy(dtype=np.float64)
    details = [None if k else _detail(s, v, images, r) for k, s, v, r in zip(kept, kinds, values, rows)]
    members = pd.DataFrame({
        "image_id": ids[rows],
        "group_id": ids[kept_row],
        "group_size": sizes[component[rows]].astype(np.int64),
        "kept": kept,
        "duplicate_of": pd.array(np.where(kept, 0, ids[kept_row]), dtype="Int64"),
        "kind": pd.array(np.where(kept, None, kinds), dtype="string"),
        "value": pd.array(np.where(kept, np.nan, values), dtype="Float32"),
        "linked_to": pd.array([None if k or np.isnan(o) else int(ids[int(o)]) for k, o in zip(kept, others)],
                              dtype="Int64"),
        "detail": pd.array(details, dtype="string"),
    }, columns=MEMBER_COLUMNS)
    members.loc[members["kept"], "duplicate_of"] = pd.NA
    members = members.sort_values(["group_id", "kept", "image_id"], ascending=[True, False, True]).reset_index(drop=True)

    dropped = members.loc[~members["kept"]]
    counts = {
        "images": n,
        "groups": int(members["kept"].sum()),
        "dropped": len(dropped),
        **{f"dropped_{s}": int((dropped["kind"] == s).sum()) for s in SIGNALS},
        **{f"links_{s}": int((links["signal"] == s).sum()) for s in SIGNALS},
        "candidate_pairs": len(pairs),
    }
    return DedupResult(members=members, review=review_pairs(pairs, phash_max, clip_threshold, review), counts=counts)


def duplicate_groups(
    images: pd.DataFrame,
    vectors: np.ndarray | None,
    threshold: float,
    phash_max: int = 6,
    parent_child: bool = True,
    use_clip: bool = True,
) -> DedupResult:
    """Search and group in one call (tests, benchmarks): :func:`candidate_pairs` at the
    loosest thresholds, then :func:`group_pairs` at these."""
    found = candidate_pairs(images, vectors)
    return group_pairs(images, found.pairs, phash_max, threshold, parent_child, use_clip)
