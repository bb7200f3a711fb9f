"""Duplicate removal: one global asset over the CLIP subset of every shard.

``near_duplicates`` groups the images ``clip_subset`` keeps by every signal
(``danbooru_assets.dedup``): the file's bytes and its perceptual hash (both from the CLIP
stage's one decode, stored in ``image_stats``), the metadata md5, Danbooru parent/child
posts and CLIP-embedding similarity; it keeps one per group and records every dropped
one with the signal and value that tie it; ``pose_subset`` excludes the dropped ones
(reason ``duplicate``), so the labeler never sees two copies of one picture.

It covers ``clip_subset``'s kept images, not every embedded one: that is the set that goes
on to pose and labeling, it is ~20% of the collection (a million rows for Danbooru2021,
what the benchmark measures), and the keep rule's portrait_score is only meaningful
within it.

Candidate pairs are searched at the loosest thresholds the settings accept and stored
under ``near_duplicates_pairs/<fingerprint of the inputs>.parquet``: a run whose inputs
are unchanged (a threshold change) regroups from them in seconds, without a search, and
opens no image except the review sheets' thumbnails.
"""

import time
from typing import TYPE_CHECKING

import dagster as dg
from pydantic import Field

from danbooru_assets.core.tables import ShardTables
from danbooru_assets.dedup import CLIP_SEARCH_MIN, PHASH_SEARCH_MAX
from danbooru_assets.orchestration.assets.settings import settings_keys
from danbooru_assets.orchestration.io_manager import COLUMNS
from danbooru_assets.orchestration.settings_guard import with_settings_record
from danbooru_assets.orchestration.resources import (
    ClipModelResource,
    DanbooruDatasetResource,
    LabelStoreResource,
    SettingsResource,
    StorageResource,
)

if TYPE_CHECKING:
    import pandas as pd

GROUP = "dedup"
NEAR_ON_DEMO = (
    "not used: the demo model (random weights) maps most images within 0.999 of each other, so its "
    "similarities cannot tell a copy from another picture; file hash, md5, perceptual hash and parent/child "
    "duplicates are dropped (review sheets still show the CLIP pairs)"
)


class NearDuplicatesConfig(dg.Config):
    """Override the settings file's thresholds for one run."""

    threshold: float | None = Field(
        None, ge=CLIP_SEARCH_MIN, le=1, description="Cosine similarity; absent: dedup.threshold."
    )
    phash_max_distance: int | None = Field(
        None, ge=0, le=PHASH_SEARCH_MAX, description="Perceptual-hash Hamming distance; absent: dedup.phash_max_distance."
    )
    near_with_demo_model: bool = Field(
        False, description="Link CLIP pairs even with the demo model's meaningless embeddings (tests, demos)."
    )
REVIEW_PAIRS = 12  # per sheet: 24 thumbnails, 3 pairs a row


PAIRS_FOLDER = "near_duplicates_pairs"


def _pairs_sheet(dataset, paths: "pd.Series", pairs: "pd.DataFrame", title: str, fmt: str):
    """Thumbnails of pairs side by side, the signal's value under the first of each."""
    from danbooru_assets.core.thumbnails import load_thumbnails
    from danbooru_assets.core.visuals import contact_sheet
    from danbooru_assets.orchestration.ui_metadata import image_markdown

    ids, captions = [], []
    for row in pairs.itertuples():
        ids += [row.image_a, row.image_b]
        captions += [f"{row.image_a} ~ {fmt.format(row.value)}", f"{row.image_b}"]
    images = load_thumbnails(
        [dataset.image_path(paths[i]) if i in paths.index else None for i in ids], max_pixels=dataset.max_pixels
    )
    return image_markdown(contact_sheet(images, captions, columns=6, title=title), title)


def _candidates(clip_subset: ShardTables, clip_embeddings: ShardTables, shard_index: ShardTables,
                image_stats: ShardTables, log):
    """The kept images of every shard with their metadata and fingerprints, and their
    embeddings (float16, row-aligned): one shard in memory at a time besides the matrix."""
    import numpy as np
    import pandas as pd

    frames, blocks, fingerprints = [], [], {}
    for shard in clip_subset:
        subset = clip_subset[shard]
        subset = subset.loc[subset["kept"].fillna(False).astype(bool)].drop(columns="kept")
        if subset.empty:
            continue
        emb = clip_embeddings[shard]
        emb = emb.loc[(emb["status"] == "ok") & emb["image_id"].isin(subset["image_id"])]
        for fp in emb["model_fingerprint_id"].unique():
            fingerprints.setdefault(str(fp), []).append(shard)
        meta = shard_index[shard].drop_duplicates("image_id")
        stats = image_stats[shard]
        stats = stats.reindex(columns=["image_id", "status", "file_hash", "phash"])  # older tables: no hashes
        stats = stats.loc[stats["status"] == "ok", ["image_id", "file_hash", "phash"]].drop_duplicates("image_id")
        rows = (subset.merge(emb[["image_id", "embedding"]], on="image_id").merge(meta, on="image_id", how="left")
                .merge(stats, on="image_id", how="left"))
        missing = len(subset) - len(rows)
        if missing:
            log.warning(f"near_duplicates: shard {shard}: {missing} kept images without an embedding are left out")
        frames.append(rows.drop(columns="embedding"))
        blocks.append(np.stack(rows["embedding"].to_numpy()).astype(np.float16) if len(rows) else None)
    if len(fingerprints) > 1:
        raise dg.Failure(
            "near_duplicates: embeddings from more than one CLIP model: "
            + "; ".join(f"{fp} in shards {', '.join(s[:10])}" for fp, s in fingerprints.items())
            + ". Re-materialize clip_embeddings with one model first.",
            allow_retries=False,
        )
    if not frames:
        empty = pd.DataFrame(columns=["image_id", "rel_path", "md5", "parent_id", "file_hash", "phash",
                                      "portrait_score", "width", "height"])
        return empty, np.zeros((0, 1), np.float16)
    return pd.concat(frames, ignore_index=True), np.concatenate([b for b in blocks if b is not None])




def _inputs_fingerprint(images: "pd.DataFrame", vectors) -> str:
    """What the candidate search read: the images' ids, metadata and fingerprints, their
    embeddings, and the search's own floors. Equal fingerprints, equal pairs."""
    import hashlib

    import numpy as np
    import pandas as pd

    digest = hashlib.blake2b(digest_size=12)
    digest.update(f"v1 phash<={PHASH_SEARCH_MAX} clip>={CLIP_SEARCH_MIN}".encode())
    columns = [c for c in ("image_id", "md5", "parent_id", "file_hash", "phash") if c in images]
    digest.update(pd.util.hash_pandas_object(images[columns].astype("string"), index=False).to_numpy().tobytes())
    digest.update(np.ascontiguousarray(vectors).tobytes())
    return digest.hexdigest()


def _stored_pairs(storage, images: "pd.DataFrame", vectors, log) -> tuple["pd.DataFrame", dict]:
    """The candidate pairs of these inputs: read back when a run already searched them,
    else searched now (at the loosest thresholds) and stored, replacing older ones."""
    from danbooru_assets.core.tables import prune_shard_files, read_parquet, write_parquet
    from danbooru_assets.dedup.groups import candidate_pairs

    fingerprint = _inputs_fingerprint(images, vectors)
    path = storage.path(PAIRS_FOLDER, fingerprint + ".parquet")
    if path.exists():
        return read_parquet(path), {"search": "reused stored pairs (inputs unchanged)", "pairs_file": str(path)}
    found = candidate_pairs(images, vectors)
    write_parquet(path, found.pairs)
    prune_shard_files(storage.path(PAIRS_FOLDER), {fingerprint})
    log.info(f"near_duplicates: {len(found.pairs):,} candidate pairs searched and stored in {path}")
    return found.pairs, {
        "search": "; ".join(f"{k}: {v}" for k, v in found.methods.items()),
        "search_seconds": dg.MetadataValue.json({k: round(v, 2) for k, v in found.seconds.items()}),
        "pairs_file": str(path),
    }


@dg.asset(
    ins={
        "clip_subset": dg.AssetIn(metadata={COLUMNS: ["image_id", "kept", "portrait_score", "width", "height"]}),
        "clip_embeddings": dg.AssetIn(metadata={COLUMNS: ["image_id", "status", "embedding", "model_fingerprint_id"]}),
        "shard_index": dg.AssetIn(metadata={COLUMNS: ["image_id", "rel_path", "md5", "parent_id"]}),
        # No column list: tables stored before the hashes existed lack them (counted below).
        "image_stats": dg.AssetIn(),
    },
    # The labels too: the keep rule prefers an image labeled good, so a new label can change
    # which copy is kept (and the UI marks near_duplicates stale).
    deps=[dg.AssetKey("labels"), *settings_keys("dedup")],
    # One at a time across runs (the instance's default pool limit is 1): concurrent
    # new-data runs each re-run it, and the later one must see the earlier one's shards.
    pool="dedup",
    group_name=GROUP,
    kinds={"parquet"},
    description="Duplicate groups among clip_subset's kept images, by every signal: the same file bytes "
    "(file_hash), the same metadata md5, perceptual hashes within dedup.phash_max_distance, CLIP "
    "embeddings at or above dedup.threshold, Danbooru parent/child posts. One image per group is kept "
    "(labeled good > portrait_score > pixels > lowest id); each dropped one names the image it duplicates "
    "and the signal and value that tie them. Candidate pairs are stored at the loosest thresholds, so a "
    "threshold change regroups without a search. pose_subset excludes the dropped ones.",
)
def near_duplicates(
    context: dg.AssetExecutionContext,
    config: NearDuplicatesConfig,
    clip_subset: ShardTables,
    clip_embeddings: ShardTables,
    shard_index: ShardTables,
    image_stats: ShardTables,
    settings: SettingsResource,
    dataset: DanbooruDatasetResource,
    label_store: LabelStoreResource,
    clip_model: ClipModelResource,
    storage: StorageResource,
) -> dg.Output:
    from danbooru_assets.clip.model import DEMO_WARNING
    from danbooru_assets.dedup.groups import KEEP_RULE, SIGNALS, group_pairs

    read = settings.read()
    current = read.settings
    overrides = {k: v for k, v in (("threshold", config.threshold), ("phash_max_distance", config.phash_max_distance))
                 if v is not None}
    rules, source = settings.resolve(read, current.dedup, overrides)
    demo = clip_model.model().is_demo()
    use_clip = not demo or config.near_with_demo_model
    started = time.perf_counter()
    images, vectors = _candidates(clip_subset, clip_embeddings, shard_index, image_stats, context.log)
    without_hash = int(images["file_hash"].isna().sum()) if len(images) else 0
    if without_hash:
        context.log.warning(
            f"near_duplicates: {without_hash:,} images have no file/perceptual hash in image_stats "
            "(decoded before hashes existed): re-materialize clip_embeddings_and_image_stats to add them"
        )
    pairs, search_meta = _stored_pairs(storage, images, vectors, context.log)
    # A human "good" outranks every score: such an image is never dropped for its copy.
    labels = label_store.store().latest()
    good = set(labels.loc[labels["label"] == "good", "image_id"].astype("int64")) if len(labels) else set()
    images["labeled_good"] = images["image_id"].isin(good)
    grouped = time.perf_counter()
    result = group_pairs(images, pairs, rules.phash_max_distance, rules.threshold, rules.parent_child,
                         use_clip, review=REVIEW_PAIRS)
    group_seconds = time.perf_counter() - grouped
    seconds = time.perf_counter() - started

    paths = images.drop_duplicates("image_id").set_index("image_id")["rel_path"] if len(images) else None
    dropped = result.dropped
    examples = dropped.nlargest(20, "group_size")[["image_id", "duplicate_of", "kind", "detail", "group_size"]]
    review = result.review
    sheets = {
        "phash_just_inside": (review["phash_inside"], f"perceptual hash: distance <= {rules.phash_max_distance} (copies)",
                              "d={:.0f}"),
        "phash_just_outside": (review["phash_outside"], f"perceptual hash: distance > {rules.phash_max_distance} "
                               "(kept apart)", "d={:.0f}"),
        "clip_just_inside": (review["clip_inside"], f"CLIP: cosine >= {rules.threshold:.3f} (duplicates)", "{:.3f}"),
        "clip_just_outside": (review["clip_outside"], f"CLIP: cosine < {rules.threshold:.3f} (kept apart)", "{:.3f}"),
    }
    metadata = {
        **{k: int(v) for k, v in result.counts.items()},
        "images_without_hash": without_hash,
        "images_without_phash_flat": int((images["file_hash"].notna() & images["phash"].isna()).sum()) if len(images) else 0,
        "threshold": float(rules.threshold),
        "phash_max_distance": int(rules.phash_max_distance),
        "parent_child": bool(rules.parent_child),
        "settings": dg.MetadataValue.json(rules.model_dump(mode="json")),
        "settings_source": source,
        "clip_links": "used" if use_clip else NEAR_ON_DEMO,
        "keep_rule": KEEP_RULE,
        "labeled_good": int(images["labeled_good"].sum()),
        **search_meta,
        "group_seconds": round(group_seconds, 2),
        "seconds": round(seconds, 2),
        "dropped_examples": dg.MetadataValue.md(
            "| image_id | duplicate_of | kind | detail | group_size |\n|---|---|---|---|---|\n"
            + "\n".join(
                f"| {r.image_id} | {r.duplicate_of} | {r.kind} | {r.detail} | {r.group_size} |"
                for r in examples.itertuples()
            )
            if len(examples)
            else "no duplicates"
        ),
        **{name: _pairs_sheet(dataset, paths, frame, title, fmt) for name, (frame, title, fmt) in sheets.items()
           if paths is not None and len(frame)},
    }
    if demo:
        metadata["warning"] = DEMO_WARNING
    context.log.info(
        f"near_duplicates: {result.counts['images']:,} images, {result.counts['groups']:,} groups, "
        f"{len(dropped):,} dropped (" + ", ".join(f"{k} {result.counts['dropped_' + k]}" for k in SIGNALS) + ")"
    )
    # The file's dedup hash at this run: pose_subset refuses a near_duplicates older than the file.
    return dg.Output(with_settings_record(result.members, current, "dedup"), metadata=metadata)
