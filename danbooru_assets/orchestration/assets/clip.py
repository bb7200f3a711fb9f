"""CLIP stage: embeddings and image statistics in one decode pass, the prompts' text
embeddings, prompt scores, a calibrated threshold and the intermediate subset (the
seed's "600k").

Two speeds: ``clip_embeddings``/``image_stats`` decode and encode each image once and
are reused incrementally; ``prompt_embeddings`` encodes the prompt set once; everything
after is numpy over stored tables.
"""

import json
from typing import TYPE_CHECKING

import dagster as dg
from pydantic import Field

from danbooru_assets.orchestration.assets.settings import settings_keys
from danbooru_assets.clip.model import DEMO_WARNING
from danbooru_assets.clip.rules import STATS_INPUT_COLUMNS, SUBSET_REASONS
from danbooru_assets.orchestration.resources import DanbooruDatasetResource
from danbooru_assets.core.incremental import FILE_IDENTITY
from danbooru_assets.core.stage import StageRun
from danbooru_assets.orchestration.executors import GPU_QUEUE_TAGS
from danbooru_assets.orchestration.io_manager import COLUMNS
from danbooru_assets.orchestration.resources import StorageResource
from danbooru_assets.core.tables import ShardTables
from danbooru_assets.orchestration.partitions import CHEAP_BACKFILL, INFERENCE_BACKFILL, INFERENCE_RETRY, shard_partitions
from danbooru_assets.settings import prompt_lists, settings_hash, threshold_settings
from danbooru_assets.orchestration.resources import ClipModelResource, SettingsResource
from danbooru_assets.orchestration.settings_guard import outdated_parts, with_settings_record
from danbooru_assets.orchestration.shard_runs import ShardLoop, set_aside_metadata

if TYPE_CHECKING:
    import pandas as pd

GROUP = "clip"


@dg.multi_asset(
    outs={
        "clip_embeddings": dg.AssetOut(
            kinds={"pytorch", "parquet"},
            description="L2-normalised CLIP image embeddings (float16) with the model fingerprint, "
            "one row per readable image of the shard.",
        ),
        "image_stats": dg.AssetOut(
            kinds={"parquet"},
            description="Cheap pixel statistics from the same decode: border fractions, content "
            "area, saturation/greyscale, edge density, original size.",
        ),
    },
    ins={
        "shard_index": dg.AssetIn(metadata={COLUMNS: [*FILE_IDENTITY, "rel_path", "status"]}),
        # In skip mode the images the metadata rules exclude are never decoded.
        "metadata_prefilter": dg.AssetIn(metadata={COLUMNS: ["image_id", "decode"]}),
    },
    partitions_def=shard_partitions,
    backfill_policy=INFERENCE_BACKFILL,
    retry_policy=INFERENCE_RETRY,
    pool="gpu",
    # With the celery executor (deploy/) this step waits for a worker on a GPU machine.
    op_tags=GPU_QUEUE_TAGS,
    group_name=GROUP,
)
def clip_embeddings_and_image_stats(
    context: dg.AssetExecutionContext,
    shard_index: ShardTables,
    metadata_prefilter: ShardTables,
    clip_model: ClipModelResource,
    dataset: DanbooruDatasetResource,
    storage: StorageResource,
):
    from danbooru_assets.clip.stage import COUNT_KEYS, ClipImageStage

    model = clip_model.model()
    stage = ClipImageStage(model, shard_index, metadata_prefilter, dataset.image_path, dataset.max_pixels,
                           warn=context.log.warning)
    run = StageRun(stage, context.partition_keys, storage.layout(), log=context.log.info).plan().compute()
    loop = ShardLoop(context, "clip_embeddings")
    results = loop.run(run.assemble, keep_on_failure=run.keep)
    speed = {"encode_images_per_s": run.rate(), **set_aside_metadata(run.set_aside)}
    yield dg.Output(
        {shard: tables[0] for shard, tables in results.items()},
        output_name="clip_embeddings",
        metadata={
            **loop.metadata(COUNT_KEYS, asset_key="clip_embeddings", row_count_key="images"),
            **speed,
            **model.metadata(),
            "embedding_dim": int(model.fingerprint()["embed_dim"]),
        },
    )
    yield dg.Output(
        {shard: tables[1] for shard, tables in results.items()},
        output_name="image_stats",
        metadata={
            **loop.metadata(
                COUNT_KEYS, {"greyscale_fraction": ("greyscale", "readable")}, asset_key="image_stats",
                row_count_key="images",
            ),
            **speed,
        },
    )


class PromptConfig(dg.Config):
    """Override the settings file's prompts for one run."""

    positive_prompts: list[str] | None = Field(
        None, description="Prompts for wanted images; absent: the settings file's. An empty list is an error."
    )
    negative_prompts: list[str] | None = Field(
        None, description="Prompts for rejected images; absent: the settings file's. An empty list is an error."
    )


@dg.asset(
    deps=settings_keys("prompts"),
    group_name=GROUP,
    kinds={"pytorch", "parquet"},
    description="The prompt set's CLIP text embeddings with the model fingerprint and logit "
    "scale: encoded once per prompt set, so clip_scores is numpy over stored tables.",
)
def prompt_embeddings(
    context: dg.AssetExecutionContext, config: PromptConfig, clip_model: ClipModelResource, settings: SettingsResource
):
    from danbooru_assets.clip.scoring import prompt_embeddings_table

    read = settings.read()
    # Absent (None) means the settings file's prompts; an empty list is a mistake, never
    # "the defaults": with no positive (or no negative) prompt every score is the same.
    empty = [name for name in ("positive_prompts", "negative_prompts") if getattr(config, name) == []]
    if empty:
        raise dg.Failure(
            f"prompt_embeddings: run config {' and '.join(empty)} is an empty list; give at least one "
            "prompt, or leave the field out to use the settings file's prompts"
        )
    clip, source = settings.resolve(read, read.settings.clip, config.model_dump(exclude_none=True))
    positive, negative = prompt_lists(clip)
    model = clip_model.model()
    table = with_settings_record(prompt_embeddings_table(model, positive, negative), read.settings, "prompts")
    return dg.Output(
        table,
        metadata={
            "prompts": dg.MetadataValue.md(
                "| column | kind | prompt |\n|---|---|---|\n"
                + "\n".join(f"| `{r.column}` | {r.kind} | {r.prompt} |" for r in table.itertuples())
            ),
            "prompt_set": settings_hash({"positive": positive, "negative": negative}),
            "settings_source": source,
            **model.metadata(),
        },
    )


@dg.asset(
    partitions_def=shard_partitions,
    backfill_policy=CHEAP_BACKFILL,
    ins={"clip_embeddings": dg.AssetIn(metadata={COLUMNS: ["image_id", "status", "embedding", "model_fingerprint_id"]})},
    # Read to check that prompt_embeddings is not older than them (settings_guard).
    deps=settings_keys("prompts"),
    group_name=GROUP,
    kinds={"parquet"},
    description="Per-prompt cosine similarities and the combined portrait_score, from stored "
    "image embeddings and prompt_embeddings. Changing prompts never re-reads an image.",
)
def clip_scores(
    context: dg.AssetExecutionContext,
    clip_embeddings: ShardTables,
    prompt_embeddings,
    settings: SettingsResource,
    clip_model: ClipModelResource,
):
    from danbooru_assets.clip.scoring import prompt_embeddings_table, score_stored

    prompts = prompt_embeddings
    # Never the prompts of before a settings change (a one-shard Materialize from the asset
    # page): a few prompts are encoded again here, as prompt_embeddings would encode them.
    read = settings.read()
    current = read.settings
    prompts_note = "stored prompt_embeddings"
    if outdated_parts(prompts, current, "prompts"):
        prompts = prompt_embeddings_table(clip_model.model(), *prompt_lists(current.clip))
        prompts_note = (
            "encoded in this step from the settings file: the stored prompt_embeddings is older than "
            "settings_prompts (materialize prompt_embeddings to store them)"
        )
        context.log.warning(f"clip_scores: prompts {prompts_note}")

    def score_shard(shard: str):
        scores = score_stored(clip_embeddings[shard], prompts)
        return scores, {"images": len(scores), "portrait_score_sum": float(scores["portrait_score"].sum())}

    loop = ShardLoop(context, "clip_scores")
    tables = loop.run(score_shard)
    return dg.Output(
        tables,
        metadata={
            **loop.metadata(["images"], {"mean_portrait_score": ("portrait_score_sum", "images")}),
            "prompt_set": settings_hash({
                kind: prompts.loc[prompts["kind"] == kind, "prompt"].tolist() for kind in ("positive", "negative")
            }),
            "model_fingerprint_id": str(prompts["model_fingerprint_id"].iloc[0]),
            "prompts_used": prompts_note,
            "settings_source": read.source,
            **({"warning": DEMO_WARNING} if bool(prompts["demo_model"].iloc[0]) else {}),
        },
    )


class ClipThresholdConfig(dg.Config):
    """Override the settings file's threshold for one run."""

    # The bounds of the settings file's clip section (ClipSettings): a bad value fails the
    # step at once, naming the field, before anything is read or stored.
    keep_fraction: float | None = Field(None, gt=0, le=1, description="Target fraction of scored images to keep.")
    fixed_threshold: float | None = Field(None, ge=0, le=1, description="A fixed portrait_score threshold (0..1).")


REVIEW_SHEET_SIZE = 25
STORED_THRESHOLD = "stored clip_threshold"


def _review_sheet(dataset, paths: "pd.Series", rows: "pd.DataFrame", title: str):
    """Thumbnails of ``rows`` (image_id, portrait_score) with their scores."""
    from danbooru_assets.core.thumbnails import load_thumbnails
    from danbooru_assets.core.visuals import contact_sheet
    from danbooru_assets.orchestration.ui_metadata import image_markdown

    images = load_thumbnails(
        [dataset.image_path(paths[i]) if i in paths.index else None for i in rows["image_id"]],
        max_pixels=dataset.max_pixels,
    )
    captions = [f"{row.image_id} {row.portrait_score:.3f}" for row in rows.itertuples()]
    return image_markdown(contact_sheet(images, captions, columns=5, title=title), title)


@dg.asset(
    ins={
        "clip_scores": dg.AssetIn(metadata={COLUMNS: ["image_id", "portrait_score"]}),
        "shard_index": dg.AssetIn(metadata={COLUMNS: ["image_id", "rel_path"]}),
    },
    deps=settings_keys("clip_threshold"),
    group_name=GROUP,
    kinds={"parquet"},
    description="The portrait_score threshold over all scored shards: fixed, or the one that "
    "keeps the target fraction (the seed kept ~20%). Review sheets of images just above and "
    "just below it let a person judge it.",
)
def clip_threshold(
    context: dg.AssetExecutionContext,
    config: ClipThresholdConfig,
    clip_scores: ShardTables,
    shard_index: ShardTables,
    settings: SettingsResource,
    dataset: DanbooruDatasetResource,
    clip_model: ClipModelResource,
) -> dg.Output:
    import pandas as pd

    from danbooru_assets.clip.scoring import threshold_histogram
    from danbooru_assets.orchestration.ui_metadata import image_markdown

    read = settings.read()
    current = read.settings
    overrides = config.model_dump(exclude_none=True)
    if "keep_fraction" in overrides:  # a fraction asked for is used, even where the file fixes a threshold
        overrides.setdefault("fixed_threshold", None)
    clip, source = settings.resolve(read, current.clip, overrides)
    wanted = threshold_settings(clip)
    scores = clip_scores.concat()
    summary = _threshold_summary(scores, wanted, clip_scores, shard_index)
    values = scores["portrait_score"].to_numpy()
    threshold, kept = summary["threshold"], summary["kept"]
    unscored = sorted(set(shard_index) - set(clip_scores))
    coverage = f"{summary['indexed_shards'] - len(unscored)} of {summary['indexed_shards']} indexed shards scored"
    coverage_note = (
        f"{coverage}: the threshold ignores the {len(unscored)} unscored shards ("
        + ", ".join(unscored[:20]) + (" …" if len(unscored) > 20 else "")
        + "); materialize clip_scores for them, then clip_threshold again"
        if unscored
        else f"{coverage}: every indexed shard counts"
    )
    if unscored:
        context.log.warning(f"clip_threshold: {coverage_note}")

    above = scores.loc[values >= threshold].nsmallest(REVIEW_SHEET_SIZE, "portrait_score")
    below = scores.loc[values < threshold].nlargest(REVIEW_SHEET_SIZE, "portrait_score")
    # Only the shards of the ~50 review images are read for their paths.
    paths = shard_index.rows(pd.concat([above, below])["image_id"]).set_index("image_id")["rel_path"]
    table = with_settings_record(pd.DataFrame([{**summary, "settings": json.dumps(wanted)}]), current, "clip_threshold")
    return dg.Output(
        table,
        metadata={
            **{k: v for k, v in summary.items() if k != "target_keep_fraction"},
            "coverage": dg.MetadataValue.md(("**Partial:** " if unscored else "") + coverage_note),
            "settings": dg.MetadataValue.json(wanted),
            "settings_source": source,
            "histogram": image_markdown(threshold_histogram(values, threshold, kept), "portrait_score histogram"),
            "just_above_threshold": _review_sheet(dataset, paths, above, f"just above {threshold:.4f} (kept)"),
            "just_below_threshold": _review_sheet(dataset, paths, below, f"just below {threshold:.4f} (dropped)"),
            **({"warning": DEMO_WARNING} if clip_model.model().is_demo() else {}),
        },
    )


def _threshold_summary(scores: "pd.DataFrame", wanted: dict, scored: ShardTables, indexed: ShardTables) -> dict:
    """The clip_threshold row over every stored shard's portrait_score (``scores``)."""
    from danbooru_assets.clip.scoring import threshold_summary

    if scores.empty:
        raise ValueError(
            f"no scored images in the {len(scored)} materialized clip_scores partitions: "
            "materialize clip_scores for shards that have images first"
        )
    return threshold_summary(
        scores["portrait_score"].to_numpy(), wanted["keep_fraction"], wanted["fixed_threshold"], set(scored), set(indexed)
    )


def current_threshold(stored: "pd.DataFrame", settings, storage: StorageResource) -> tuple[float, str]:
    """The threshold clip_subset applies, and where it came from: the stored clip_threshold,
    unless it is older than the settings file's ``clip_threshold`` section; then the one
    clip_threshold would store now, computed here from every stored shard's scores (the
    cheap speed: one column of stored tables, no image)."""
    if not outdated_parts(stored, settings, "clip_threshold"):
        return float(stored["threshold"].iloc[0]), STORED_THRESHOLD
    scored = storage.shard_tables("clip_scores", ["portrait_score"])
    summary = _threshold_summary(
        scored.concat(), threshold_settings(settings.clip), scored, storage.shard_tables("shard_index")
    )
    return float(summary["threshold"]), (
        "computed in this step from the settings file and the stored scores of "
        f"{summary['scored_shards']} shards: the stored clip_threshold is older than settings_clip_threshold "
        "(materialize clip_threshold to store it and its review sheets)"
    )


class ClipSubsetConfig(dg.Config):
    """Override the settings file's image rules for one run."""

    min_side: int | None = None
    max_dark_border_frac: float | None = None
    min_content_area_frac: float | None = None


@dg.asset(
    partitions_def=shard_partitions,
    backfill_policy=CHEAP_BACKFILL,
    ins={
        "shard_index": dg.AssetIn(metadata={COLUMNS: ["image_id", "rel_path", "width", "height", "status"]}),
        "image_stats": dg.AssetIn(metadata={COLUMNS: STATS_INPUT_COLUMNS}),
        "clip_scores": dg.AssetIn(metadata={COLUMNS: ["image_id", "portrait_score"]}),
        "metadata_prefilter": dg.AssetIn(metadata={COLUMNS: ["image_id", "reasons", "excluded", "decode"]}),
    },
    # The threshold section too: a new threshold changes the subset, so the UI marks it
    # stale at once (Dagster's staleness follows direct dependencies only).
    deps=settings_keys("image_rules", "clip_threshold"),
    group_name=GROUP,
    kinds={"parquet"},
    description="The intermediate subset (the seed's 600k): images the metadata prefilter admits, at or "
    "above the threshold, that pass the image-statistic rules. Dropped rows keep their reasons (an image "
    "the prefilter excludes: prefiltered, with its prefilter_reasons). Touches no image.",
)
def clip_subset(
    context: dg.AssetExecutionContext,
    config: ClipSubsetConfig,
    shard_index: ShardTables,
    image_stats: ShardTables,
    clip_scores: ShardTables,
    metadata_prefilter: ShardTables,
    clip_threshold,
    settings: SettingsResource,
    storage: StorageResource,
) -> dg.Output:
    from danbooru_assets.clip.rules import apply_clip_rules

    read = settings.read()
    current = read.settings
    rules, source = settings.resolve(read, current.clip.image_rules, config.model_dump(exclude_none=True))
    threshold, threshold_source = current_threshold(clip_threshold, current, storage)
    if threshold_source != STORED_THRESHOLD:
        context.log.warning(f"clip_subset: threshold {threshold:.6f} {threshold_source}")

    def subset_shard(shard: str):
        prefilter = metadata_prefilter[shard]
        subset, dropped = apply_clip_rules(
            shard_index[shard], image_stats[shard], clip_scores[shard], threshold, rules, prefilter
        )
        never_decoded = int((~prefilter["decode"].astype(bool)).sum())
        counts = {"rows": len(subset), "kept": int(subset["kept"].sum()), **dropped}
        return subset, {**counts, "never_decoded_prefiltered": never_decoded}

    loop = ShardLoop(context, "clip_subset", images_key="rows")
    tables = loop.run(subset_shard)
    return dg.Output(
        tables,
        metadata={
            **loop.metadata(
                ["rows", "kept", *(f"dropped_{n}" for n in SUBSET_REASONS), "never_decoded_prefiltered"],
                {"kept_fraction": ("kept", "rows")},
            ),
            "threshold": threshold,
            "threshold_source": threshold_source,
            "rules": dg.MetadataValue.json(rules.model_dump()),
            "settings_source": source,
        },
    )
