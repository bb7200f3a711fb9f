"""The metadata prefilter: rules over a shard index's metadata columns, before any decode.

Danbooru's tags say for free much of what the CLIP prompts pay a decode and an encode to
find out (manga pages, several people, text, no person, sketches). :func:`apply_prefilter`
gives every usable row of a shard index the names of the rules it fails:

- ``tag:<name>`` — an entry of ``exclude_tags`` is present (an entry of several tags
  joined by spaces: all present). A tag listed under a category matches that category's
  column, and ``tags_general`` too: metadata that carries only the combined
  ``tag_string`` is stored there (``dataset.metadata``), and Danbooru's tag names are
  unique across categories, so that match is never wrong;
- ``missing_required_tag`` — ``require_tags`` has entries and none is present;
- ``rating``, ``low_score``, ``deleted``, ``banned`` — from the metadata line; a null
  value (a line without it) breaks no rule;
- ``file_type``, ``too_small``, ``aspect_ratio`` — from the index's extension and size
  (the metadata's, else the image header's: never a decode). For an image of the 512px
  folder (every file a 512×512 ``.jpg``, padded) they judge the original instead: the
  metadata's ``file_ext`` and size, where the line has them.
- ``rating`` — the one vocabulary of :mod:`danbooru_assets.dataset.ratings`.

Images without metadata (index status ``no_metadata``) are never excluded by the
metadata rules (tags, rating, score, deleted, banned); they are counted as such.

The mode decides what the reasons do: ``skip`` — excluded rows are never decoded
(``decode`` false) and ``clip_subset`` drops them as ``prefiltered``; ``annotate`` —
everything is decoded, ``clip_subset`` still drops them; ``off`` — nothing is excluded,
the reasons are listed so a rule can be judged before it is switched on.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Iterable

from danbooru_assets.settings import PrefilterSettings

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

CATEGORIES = ("general", "character", "copyright", "artist", "meta")
# Rule names in the order a row's reasons are listed; tag hits are ``tag:<entry>``.
RULES = (
    "tag", "missing_required_tag", "rating", "low_score", "deleted", "banned", "file_type", "too_small",
    "aspect_ratio",
)
METADATA_RULES = frozenset({"tag", "missing_required_tag", "rating", "low_score", "deleted", "banned"})
# What the prefilter reads of shard_index.
INDEX_INPUT_COLUMNS = [
    "image_id", "status", "ext", "width", "height", "rating", "score", "is_deleted", "is_banned",
    *(f"tags_{c}" for c in CATEGORIES), "rel_path", "meta_width", "meta_height", "meta_file_ext",
]
DOWNSCALED_FOLDER = "512px/"
PREFILTER_COLUMNS = ["image_id", "has_metadata", "reasons", "excluded", "decode"]


class PrefilterOutOfDate(RuntimeError):
    """The shard's prefilter table misses usable images of its index: it predates the index."""


def _entries(tag_sets) -> list[tuple[str, tuple[str, ...], str]]:
    """``(category, tags, entry)`` for every entry of a :class:`TagSets`."""
    return [(c, tuple(entry.split()), entry) for c in CATEGORIES for entry in getattr(tag_sets, c)]


def _tag_sets(index: pd.DataFrame, category: str) -> list[frozenset[str]]:
    columns = [f"tags_{category}"] if category == "general" else [f"tags_{category}", "tags_general"]
    texts = [index[c].fillna("").to_numpy() if c in index else [""] * len(index) for c in columns]
    return [frozenset(" ".join(parts).split()) for parts in zip(*texts)]


def _tag_hits(index: pd.DataFrame, entries) -> list[list[str]]:
    """Per row, the entries present."""
    hits: list[list[str]] = [[] for _ in range(len(index))]
    for category in CATEGORIES:
        wanted = [(tags, entry) for c, tags, entry in entries if c == category]
        if not wanted:
            continue
        for row, present in enumerate(_tag_sets(index, category)):
            if present:
                hits[row] += [entry for tags, entry in wanted if all(t in present for t in tags)]
    return hits


def _bool_column(index: pd.DataFrame, name: str) -> np.ndarray:
    import numpy as np

    if name not in index:
        return np.zeros(len(index), dtype=bool)
    return index[name].astype("boolean").fillna(False).to_numpy(dtype=bool)


def rule_hits(index: pd.DataFrame, rules: PrefilterSettings) -> dict[str, np.ndarray | list[list[str]]]:
    """Per rule, which rows fail it (``tag``: per row, the entries present)."""
    import numpy as np

    from danbooru_assets.dataset.shard_index import STATUS_OK

    n = len(index)
    has_meta = (index["status"] == STATUS_OK).to_numpy()
    hits: dict[str, np.ndarray | list[list[str]]] = {}
    tag_hits = _tag_hits(index, _entries(rules.exclude_tags))
    hits["tag"] = [h if m else [] for h, m in zip(tag_hits, has_meta)]
    if rules.require_tags.is_empty():
        hits["missing_required_tag"] = np.zeros(n, dtype=bool)
    else:
        required = _tag_hits(index, _entries(rules.require_tags))
        hits["missing_required_tag"] = has_meta & np.array([not r for r in required], dtype=bool)
    rating = index["rating"].to_numpy(dtype=object) if "rating" in index else np.full(n, None, dtype=object)
    known_rating = np.array([isinstance(r, str) and r != "" for r in rating], dtype=bool)
    hits["rating"] = has_meta & known_rating & ~np.isin(rating.astype(str), list(rules.ratings))
    if rules.min_score is None or "score" not in index:
        hits["low_score"] = np.zeros(n, dtype=bool)
    else:
        score = index["score"].astype("Float64").to_numpy(dtype=float, na_value=np.nan)
        hits["low_score"] = has_meta & (score < rules.min_score)  # NaN < x is False: no score, no rule
    hits["deleted"] = has_meta & _bool_column(index, "is_deleted") & rules.exclude_deleted
    hits["banned"] = has_meta & _bool_column(index, "is_banned") & rules.exclude_banned
    ext = index["ext"].fillna("").str.lower().to_numpy(dtype=object)
    width = index["width"].fillna(0).to_numpy(dtype=float)
    height = index["height"].fillna(0).to_numpy(dtype=float)
    if "rel_path" in index and "meta_width" in index:
        # The 512px copy is a padded square JPEG of every post: judge the original it stands for.
        small = index["rel_path"].fillna("").str.startswith(DOWNSCALED_FOLDER).to_numpy(dtype=bool)
        meta_ext = index["meta_file_ext"].fillna("").str.lower().to_numpy(dtype=object)
        meta_w = index["meta_width"].astype("Float64").fillna(0).to_numpy(dtype=float)
        meta_h = index["meta_height"].astype("Float64").fillna(0).to_numpy(dtype=float)
        ext = np.where(small & (meta_ext != ""), meta_ext, ext)
        sized = small & (meta_w > 0) & (meta_h > 0)
        width, height = np.where(sized, meta_w, np.where(small, 0, width)), np.where(sized, meta_h, np.where(small, 0, height))
    ext = np.where(ext == "jpeg", "jpg", ext)
    hits["file_type"] = (
        np.zeros(n, dtype=bool) if rules.file_types is None else ~np.isin(ext.astype(str), rules.file_types)
    )
    known_size = (width > 0) & (height > 0)  # 0: the index could not tell; never a reason
    short, long = np.minimum(width, height), np.maximum(width, height)
    hits["too_small"] = known_size & (short < rules.min_side)
    hits["aspect_ratio"] = (
        np.zeros(n, dtype=bool)
        if rules.max_aspect_ratio is None
        else known_size & (long > rules.max_aspect_ratio * np.where(known_size, short, 1))
    )
    return hits


def apply_prefilter(index: pd.DataFrame, rules: PrefilterSettings) -> tuple[pd.DataFrame, dict[str, int]]:
    """One shard's prefilter table (:data:`PREFILTER_COLUMNS`, one row per usable index
    row, sorted by id) and its counts: ``rows``, ``excluded``, ``decoded``,
    ``never_decoded``, ``without_metadata`` (rows the metadata rules cannot judge),
    ``would_exclude`` (rows with a reason, whatever the mode) and ``rule_<name>`` per rule
    (a row counts once under every rule it fails)."""
    import numpy as np
    import pandas as pd

    from danbooru_assets.dataset.shard_index import STATUS_OK, USABLE_STATUSES

    rows = index.loc[index["status"].isin(USABLE_STATUSES)].sort_values("image_id").reset_index(drop=True)
    hits = rule_hits(rows, rules)
    reasons: list[list[str]] = [[f"tag:{e}" for e in tags] for tags in hits["tag"]]
    for rule in RULES[1:]:
        for i in np.flatnonzero(hits[rule]):
            reasons[i].append(rule)
    joined = np.array(["|".join(r) for r in reasons], dtype=object)
    has_reason = joined != ""
    excluded = has_reason & (rules.mode != "off")
    decode = ~(excluded & (rules.mode == "skip"))
    has_meta = (rows["status"] == STATUS_OK).to_numpy()
    table = pd.DataFrame({
        "image_id": rows["image_id"].to_numpy(dtype=np.int64),
        "has_metadata": has_meta,
        "reasons": joined,
        "excluded": excluded,
        "decode": decode,
    })
    counts = {
        "rows": len(table),
        "excluded": int(excluded.sum()),
        "decoded": int(decode.sum()),
        "never_decoded": int((~decode).sum()),
        "without_metadata": int((~has_meta).sum()),
        "would_exclude": int(has_reason.sum()),
        "rule_tag": sum(1 for t in hits["tag"] if t),
        **{f"rule_{r}": int(np.asarray(hits[r]).sum()) for r in RULES[1:]},
    }
    return table, counts


def tag_counts(reasons: Iterable[str]) -> Counter:
    """How many rows each excluded-tag entry hit, over ``reasons`` strings."""
    counter: Counter = Counter()
    for text in reasons:
        counter.update(r[4:] for r in text.split("|") if r.startswith("tag:"))
    return counter


def decode_candidates(index: pd.DataFrame, prefilter: pd.DataFrame, shard: str = "") -> tuple[np.ndarray, int]:
    """Which usable rows of ``index`` the CLIP stage decodes (a mask over ``index``), and
    how many usable rows it skips. Raises :class:`PrefilterOutOfDate` when ``prefilter``
    lacks a usable row (the index changed after the prefilter ran): deciding for it here
    would either decode what a rule excludes or skip what none does."""
    import numpy as np

    from danbooru_assets.dataset.shard_index import USABLE_STATUSES

    usable = index["status"].isin(USABLE_STATUSES).to_numpy()
    ids = index["image_id"].to_numpy()
    known = prefilter["image_id"].to_numpy()
    present = np.isin(ids, known)
    missing = usable & ~present
    if missing.any():
        example = int(ids[np.flatnonzero(missing)[0]])
        raise PrefilterOutOfDate(
            f"metadata_prefilter{' of shard ' + shard if shard else ''} has no row for {int(missing.sum())} usable "
            f"indexed image(s) (e.g. id {example}): it is older than shard_index; materialize metadata_prefilter "
            "for this shard first"
        )
    skipped_ids = known[~prefilter["decode"].to_numpy(dtype=bool)]
    decode = usable & ~np.isin(ids, skipped_ids)
    return decode, int((usable & ~decode).sum())
