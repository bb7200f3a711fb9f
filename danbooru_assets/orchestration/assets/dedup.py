"""Duplicate removal: one global asset over the CLIP subset of every shard.

``near_duplicates`` groups the images ``clip_subset`` keeps by exact md5, Danbooru
parent/child posts and CLIP-embedding similarity (``danbooru_assets.dedup``), keeps one
per group and records every dropped one; ``pose_subset`` excludes the dropped ones (reason
``duplicate``), so the labeler never sees two copies of one picture.

It covers ``clip_subset``'s kept images, not every embedded one: that is the set that goes
on to pose and labeling, it is ~20% of the collection (a million rows for Danbooru2021,
what the benchmark measures), and the keep rule's portrait_score is only meaningful
within it. Changing ``dedup.threshold`` reads stored embeddings only: no image is opened
except the review sheets' thumbnails.
"""

import time
from typing import TYPE_CHECKING

import dagster as dg
from pydantic import Field

from danbooru_assets.core.tables import ShardTables
from danbooru_assets.orchestration.assets.settings import settings_keys
from danbooru_assets.orchestration.io_manager import COLUMNS
from danbooru_assets.orchestration.settings_guard import with_settings_record
from danbooru_assets.orchestration.resources import (
    ClipModelResource,
    DanbooruDatasetResource,
    LabelStoreResource,
    SettingsResource,
)

if TYPE_CHECKING:
    import pandas as pd

GROUP = "dedup"
NEAR_ON_DEMO = (
    "not used: the demo model (random weights) maps most images within 0.999 of each other, so its "
    "similarities cannot tell a copy from another picture; only md5 and parent/child duplicates are dropped "
    "(review sheets still show the near pairs)"
)


class NearDuplicatesConfig(dg.Config):
    """Override the settings file's threshold for one run."""

    threshold: float | None = Field(None, gt=0, le=1, description="Cosine similarity; absent: dedup.threshold.")
    near_with_demo_model: bool = Field(
        False, description="Link near pairs even with the demo model's meaningless embeddings (tests, demos)."
    )
REVIEW_PAIRS = 12  # per sheet: 24 thumbnails, 3 pairs a row


def _pairs_sheet(dataset, paths: "pd.Series", pairs: "pd.DataFrame", title: str):
    """Thumbnails of near pairs side by side, the similarity under the first of each."""
    from danbooru_assets.core.thumbnails import load_thumbnails
    from danbooru_assets.core.visuals import contact_sheet
    from danbooru_assets.orchestration.ui_metadata import image_markdown

    ids, captions = [], []
    for row in pairs.itertuples():
        ids += [row.image_a, row.image_b]
        captions += [f"{row.image_a} ~ {row.similarity:.3f}", f"{row.image_b}"]
    images = load_thumbnails(
        [dataset.image_path(paths[i]) if i in paths.index else None for i in ids], max_pixels=dataset.max_pixels
    )
    return image_markdown(contact_sheet(images, captions, columns=6, title=title), title)


def _candidates(clip_subset: ShardTables, clip_embeddings: ShardTables, shard_index: ShardTables, log):
    """The kept images of every shard with their metadata, and their embeddings (float16,
    row-aligned): one shard in memory at a time besides the growing matrix."""
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
        rows = subset.merge(emb[["image_id", "embedding"]], on="image_id").merge(meta, on="image_id", how="left")
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
        return pd.DataFrame(columns=["image_id"]), np.zeros((0, 1), np.float16)
    return pd.concat(frames, ignore_index=True), np.concatenate([b for b in blocks if b is not None])


@dg.asset(
    ins={
        "clip_subset": dg.AssetIn(metadata={COLUMNS: ["image_id", "kept", "portrait_score", "width", "height"]}),
        "clip_embeddings": dg.AssetIn(metadata={COLUMNS: ["image_id", "status", "embedding", "model_fingerprint_id"]}),
        "shard_index": dg.AssetIn(metadata={COLUMNS: ["image_id", "rel_path", "md5", "parent_id"]}),
    },
    deps=settings_keys("dedup"),
    # One at a time across runs (the instance's default pool limit is 1): concurrent
    # new-data runs each re-run it, and the later one must see the earlier one's shards.
    pool="dedup",
    group_name=GROUP,
    kinds={"parquet"},
    description="Duplicate groups among clip_subset's kept images: the same md5, Danbooru parent/child "
    "posts, and CLIP embeddings at or above dedup.threshold (cluster then pairwise). One image per "
    "group is kept (labeled good > portrait_score > pixels > lowest id); each dropped one is recorded "
    "with the image it duplicates and their similarity. pose_subset excludes the dropped ones.",
)
def near_duplicates(
    context: dg.AssetExecutionContext,
    config: NearDuplicatesConfig,
    clip_subset: ShardTables,
    clip_embeddings: ShardTables,
    shard_index: ShardTables,
    settings: SettingsResource,
    dataset: DanbooruDatasetResource,
    label_store: LabelStoreResource,
    clip_model: ClipModelResource,
) -> dg.Output:
    import pandas as pd

    from danbooru_assets.clip.model import DEMO_WARNING
    from danbooru_assets.dedup.groups import KEEP_RULE, KINDS, duplicate_groups

    current = settings.load()
    rules = current.dedup
    if config.threshold is not None:
        rules = rules.model_copy(update={"threshold": config.threshold})
    demo = clip_model.model().is_demo()
    use_near = not demo or config.near_with_demo_model
    started = time.perf_counter()
    images, vectors = _candidates(clip_subset, clip_embeddings, shard_index, context.log)
    # A human "good" outranks every score: such an image is never dropped for its copy.
    labels = label_store.store().latest()
    good = set(labels.loc[labels["label"] == "good", "image_id"].astype("int64")) if len(labels) else set()
    images["labeled_good"] = images["image_id"].isin(good)
    result = duplicate_groups(images, vectors, rules.threshold, parent_child=rules.parent_child, use_near=use_near)
    seconds = time.perf_counter() - started

    review = result.review_pairs
    above = review.loc[review["similarity"] >= rules.threshold].nsmallest(REVIEW_PAIRS, "similarity")
    below = review.loc[review["similarity"] < rules.threshold].nlargest(REVIEW_PAIRS, "similarity")
    paths = images.drop_duplicates("image_id").set_index("image_id")["rel_path"]
    dropped = result.dropped
    examples = dropped.nlargest(20, "group_size")[["image_id", "duplicate_of", "kind", "similarity", "group_size"]]
    metadata = {
        **{k: int(v) for k, v in result.counts.items()},
        "threshold": float(rules.threshold),
        "parent_child": bool(rules.parent_child),
        "settings": dg.MetadataValue.json(rules.model_dump(mode="json")),
        "settings_source": "run config" if config.threshold is not None else settings.source(),
        "near_links": "used" if use_near else NEAR_ON_DEMO,
        "keep_rule": KEEP_RULE,
        "labeled_good": int(images["labeled_good"].sum()),
        "method": result.method,
        "seconds": round(seconds, 2),
        "dropped_examples": dg.MetadataValue.md(
            "| image_id | duplicate_of | kind | similarity | group_size |\n|---|---|---|---|---|\n"
            + "\n".join(
                f"| {r.image_id} | {r.duplicate_of} | {r.kind} | {r.similarity:.3f} | {r.group_size} |"
                for r in examples.itertuples()
            )
            if len(examples)
            else "no duplicates"
        ),
        "just_above_threshold": _pairs_sheet(
            dataset, paths, above, f"just above {rules.threshold:.3f} (duplicates)"
        ),
        "just_below_threshold": _pairs_sheet(
            dataset, paths, below, f"just below {rules.threshold:.3f} (kept apart)"
        ),
    }
    if demo:
        metadata["warning"] = DEMO_WARNING
    context.log.info(
        f"near_duplicates: {result.counts['images']:,} images, {result.counts['groups']:,} groups, "
        f"{len(dropped):,} dropped (" + ", ".join(f"{k} {result.counts['dropped_' + k]}" for k in KINDS) + ")"
    )
    # The file's dedup hash at this run: pose_subset refuses a near_duplicates older than the file.
    return dg.Output(with_settings_record(result.members, current, "dedup"), metadata=metadata)
