"""Duplicate groups and the one image each keeps.

Three kinds of link join two images:

- ``md5``: the same file content under two ids (a re-upload);
- ``parent_child``: Danbooru's variant sets, a post whose ``parent_id`` is another post
  of the collection (``has_children`` marks the parent; the child's ``parent_id`` is what
  names the pair, so it alone is read); off with ``parent_child=False``;
- ``near``: CLIP embeddings with cosine similarity >= the threshold (resized copies,
  colour and text variants), from :mod:`danbooru_assets.dedup.search`.

A group is a connected component of these links. Each group keeps one image by
:data:`KEEP_RULE` and drops the rest; every dropped image is recorded with the kept one
(``duplicate_of``), its cosine similarity to it and the kind of their relation: ``md5``
when their md5 is the same, ``parent_child`` when one is the other's parent or both share
a parent, else ``near`` (an image tied in through another member may be below the
threshold to the kept one: its similarity says so).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from danbooru_assets.dedup.search import Pairs, near_pairs

KINDS = ("md5", "parent_child", "near")
KEEP_RULE = "already labeled good > highest portrait_score > most pixels > lowest id"
INPUT_COLUMNS = ["image_id", "md5", "parent_id", "portrait_score", "width", "height", "labeled_good"]
MEMBER_COLUMNS = ["image_id", "group_id", "group_size", "kept", "duplicate_of", "kind", "similarity"]
# Near pairs this far below the threshold are kept for the review sheet "just below".
REVIEW_MARGIN = 0.05


@dataclass
class DedupResult:
    members: pd.DataFrame  # MEMBER_COLUMNS: one row per image of a group of two or more
    review_pairs: pd.DataFrame  # image_a, image_b, similarity: near pairs within REVIEW_MARGIN of the threshold
    method: str
    counts: dict = field(default_factory=dict)

    @property
    def dropped(self) -> pd.DataFrame:
        return self.members.loc[~self.members["kept"]]


def _md5_edges(md5: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Each image with a md5 another image has, linked to the first image holding it."""
    known = md5.notna() & (md5.astype("string").str.len() > 0)
    rows = np.flatnonzero(known.to_numpy())
    if len(rows) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    codes, _ = pd.factorize(md5.iloc[rows])
    first = pd.Series(rows).groupby(codes).transform("first").to_numpy()
    linked = first != rows
    return rows[linked], first[linked]


def _parent_edges(image_ids: np.ndarray, parent_id: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Each image whose parent post is in the set, linked to its parent."""
    position = pd.Series(np.arange(len(image_ids)), index=image_ids)
    parents = pd.to_numeric(parent_id, errors="coerce").to_numpy(dtype="float64")
    has = ~np.isnan(parents)
    rows = np.flatnonzero(has)
    found = position.reindex(parents[has].astype(np.int64)).to_numpy()
    ok = ~np.isnan(found)
    return rows[ok], found[ok].astype(np.int64)


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


def duplicate_groups(
    images: pd.DataFrame,
    vectors: np.ndarray,
    threshold: float,
    parent_child: bool = True,
    review_margin: float = REVIEW_MARGIN,
    pairs: Pairs | None = None,
    use_near: bool = True,
) -> DedupResult:
    """Group ``images`` (:data:`INPUT_COLUMNS`; row-aligned with the unit ``vectors``).
    ``use_near=False``: near pairs are found and returned for review but link nothing
    (embeddings whose similarities mean nothing, such as a random-weights model's)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    images = images.reset_index(drop=True)
    n = len(images)
    ids = images["image_id"].to_numpy(dtype=np.int64)
    if pairs is None:
        pairs = near_pairs(vectors, max(-1.0, threshold - review_margin))
    near = pairs.above(threshold if use_near else np.inf)
    md5_a, md5_b = _md5_edges(images["md5"])
    parent_a, parent_b = _parent_edges(ids, images["parent_id"]) if parent_child else (np.zeros(0, np.int64),) * 2
    a = np.concatenate([near.i, md5_a, parent_a]).astype(np.int64)
    b = np.concatenate([near.j, md5_b, parent_b]).astype(np.int64)
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    sizes = np.bincount(component, minlength=component.max() + 1 if n else 0)
    in_group = np.flatnonzero(sizes[component] >= 2) if n else np.zeros(0, np.int64)

    rank = keep_order(images)
    frame = pd.DataFrame({"row": in_group, "component": component[in_group], "rank": rank[in_group]})
    winner_row = frame.loc[frame.groupby("component")["rank"].idxmin()].set_index("component")["row"]
    kept_row = winner_row.reindex(frame["component"]).to_numpy()
    rows = frame["row"].to_numpy()
    similarity = np.einsum("ij,ij->i", np.asarray(vectors[rows], np.float32), np.asarray(vectors[kept_row], np.float32)) \
        if len(rows) else np.zeros(0, np.float32)

    md5 = images["md5"].fillna("").astype(str).to_numpy()  # no metadata: no md5, never "the same"
    parent = pd.to_numeric(images["parent_id"], errors="coerce")
    same_md5 = (md5[rows] == md5[kept_row]) & (md5[rows] != "")
    p_row, p_kept = parent.iloc[rows].to_numpy(), parent.iloc[kept_row].to_numpy()
    related = (p_row == ids[kept_row]) | (p_kept == ids[rows]) | ((p_row == p_kept) & ~np.isnan(p_row))
    related &= parent_child
    kind = np.where(same_md5, "md5", np.where(related, "parent_child", "near"))
    kept = rows == kept_row
    members = pd.DataFrame({
        "image_id": ids[rows],
        "group_id": ids[kept_row],
        "group_size": sizes[component[rows]].astype(np.int64),
        "kept": kept,
        "duplicate_of": pd.array(np.where(kept, 0, ids[kept_row]), dtype="Int64"),
        "kind": pd.array(np.where(kept, None, kind), dtype="string"),
        "similarity": np.where(kept, 1.0, similarity).astype(np.float32),
    }, columns=MEMBER_COLUMNS)
    members.loc[members["kept"], "duplicate_of"] = pd.NA
    members = members.sort_values(["group_id", "kept", "image_id"], ascending=[True, False, True]).reset_index(drop=True)

    window = (pairs.similarity >= threshold - review_margin) & (pairs.similarity < threshold + review_margin)
    review_pairs = pd.DataFrame({
        "image_a": ids[pairs.i[window]], "image_b": ids[pairs.j[window]], "similarity": pairs.similarity[window],
    })
    dropped = members.loc[~members["kept"]]
    counts = {
        "images": n,
        "groups": int(members["kept"].sum()),
        "dropped": len(dropped),
        **{f"dropped_{k}": int((dropped["kind"] == k).sum()) for k in KINDS},
        "near_pairs": len(near),
        "md5_links": len(md5_a),
        "parent_child_links": len(parent_a),
    }
    return DedupResult(members=members, review_pairs=review_pairs, method=pairs.method, counts=counts)
