"""CLIP stage: embeddings and image statistics in one decode pass, prompt scores, a
calibrated threshold and the intermediate subset (the seed's "600k").

Two speeds: ``clip_embeddings``/``image_stats`` decode and encode each image once and
are reused incrementally; everything after reads only stored tables.
"""

import json
import time

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from danbooru_assets.clip_model import DEMO_WARNING, ClipModelResource
from danbooru_assets.clip_scoring import (
    DEFAULT_NEGATIVE_PROMPTS,
    DEFAULT_POSITIVE_PROMPTS,
    prompt_column,
    score_with_model,
    threshold_for_fraction,
)
from danbooru_assets.dataset import DanbooruDatasetResource
from danbooru_assets.embeddings import embedding_column, embedding_matrix
from danbooru_assets.image_loader import ImageDecodeError, ThroughputLogger, open_image_rgb
from danbooru_assets.image_stats import STATS_COLUMNS
from danbooru_assets.io_manager import StorageResource, read_parquet, read_partitions
from danbooru_assets.partitions import shard_partitions
from danbooru_assets.settings import ClipSettings, ImageRules, SettingsResource, settings_at_definition_load, settings_hash
from danbooru_assets.shard_index import USABLE_STATUSES
from danbooru_assets.visuals import contact_sheet, figure_to_image, image_markdown

GROUP = "clip"
# Rows of the previous materialization are reused when these match.
REUSE_KEY = ["image_id", "file_bytes", "mtime"]

# Code versions follow the durable settings, so an edit (then a code-location reload)
# marks exactly the affected assets stale in the UI.
_settings_at_load = settings_at_definition_load().clip


def prompt_settings(clip: ClipSettings) -> tuple[list[str], list[str]]:
    return (
        list(clip.positive_prompts or DEFAULT_POSITIVE_PROMPTS),
        list(clip.negative_prompts or DEFAULT_NEGATIVE_PROMPTS),
    )


def threshold_settings(clip: ClipSettings) -> dict:
    return {"keep_fraction": clip.keep_fraction, "fixed_threshold": clip.fixed_threshold}


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
    ins={"shard_index": dg.AssetIn()},
    partitions_def=shard_partitions,
    pool="gpu",
    group_name=GROUP,
)
def clip_embeddings_and_image_stats(
    context: dg.AssetExecutionContext,
    shard_index: pd.DataFrame,
    clip_model: ClipModelResource,
    dataset: DanbooruDatasetResource,
    storage: StorageResource,
):
    shard = context.partition_key
    fingerprint_id = clip_model.fingerprint_id()
    candidates = shard_index.loc[shard_index["status"].isin(USABLE_STATUSES), REUSE_KEY + ["rel_path"]]

    # Incremental: rows of the previous materialization with the same model and the same
    # file (size, mtime) are kept; only new or changed images are decoded and encoded.
    emb_path = storage.asset_path("clip_embeddings", shard)
    stats_path = storage.asset_path("image_stats", shard)
    reused_emb = reused_stats = None
    if emb_path.exists() and stats_path.exists():
        prev_emb = read_parquet(emb_path)
        prev_stats = read_parquet(stats_path)
        same_model = prev_emb.loc[prev_emb["model_fingerprint_id"] == fingerprint_id]
        reusable = candidates[REUSE_KEY].merge(same_model[REUSE_KEY], on=REUSE_KEY)["image_id"]
        reused_emb = same_model.loc[same_model["image_id"].isin(reusable)]
        reused_stats = prev_stats.loc[prev_stats["image_id"].isin(reusable)]
    todo = candidates.loc[~candidates["image_id"].isin([] if reused_emb is None else reused_emb["image_id"])]

    context.log.info(
        f"shard {shard}: {len(candidates)} readable files, "
        f"{0 if reused_emb is None else len(reused_emb)} reused, {len(todo)} to encode"
    )
    started = time.perf_counter()
    paths = [dataset.image_path(p) for p in todo["rel_path"]]
    progress = ThroughputLogger(context.log.info, label=f"images of shard {shard}")
    embeddings, stats = clip_model.embed_images(paths, todo["image_id"].tolist(), progress=progress)
    seconds = time.perf_counter() - started
    stats = stats.merge(todo[REUSE_KEY], on="image_id", how="left")
    new_emb = stats[REUSE_KEY + ["status"]].copy()
    new_emb["embedding"] = [
        e if status == "ok" else None for e, status in zip(embedding_column(embeddings), stats["status"])
    ]
    new_emb["model_fingerprint_id"] = fingerprint_id
    emb_columns = REUSE_KEY + ["status", "embedding", "model_fingerprint_id"]
    frames_emb = [new_emb[emb_columns]] + ([reused_emb[emb_columns]] if reused_emb is not None else [])
    frames_stats = [stats] + ([reused_stats[stats.columns]] if reused_stats is not None else [])
    clip_embeddings = pd.concat(frames_emb, ignore_index=True).sort_values("image_id").reset_index(drop=True)
    image_stats = pd.concat(frames_stats, ignore_index=True).sort_values("image_id").reset_index(drop=True)

    failed = new_emb.loc[new_emb["status"] != "ok"]
    for row in failed.merge(todo[["image_id", "rel_path"]], on="image_id").head(50).itertuples():
        context.log.warning(f"{row.rel_path}: {row.status}")
    common = {
        "images": len(clip_embeddings),
        "encoded": len(todo),
        "reused": 0 if reused_emb is None else len(reused_emb),
        "unreadable": int((clip_embeddings["status"] != "ok").sum()),
        "encode_images_per_s": round(len(todo) / seconds, 1) if len(todo) else 0.0,
    }
    yield dg.Output(
        clip_embeddings,
        output_name="clip_embeddings",
        metadata={**common, **clip_model.metadata(), "embedding_dim": int(embeddings.shape[1]) if embeddings.ndim == 2 else 0},
    )
    ok_stats = image_stats.loc[image_stats["status"] == "ok"]
    yield dg.Output(
        image_stats,
        output_name="image_stats",
        metadata={
            **common,
            "greyscale_fraction": float(ok_stats["is_greyscale"].mean()) if len(ok_stats) else 0.0,
            "median_content_area_frac": float(ok_stats["content_area_frac"].median()) if len(ok_stats) else 0.0,
            "median_dark_border": float(
                (ok_stats["border_black_rows_frac"] + ok_stats["border_black_cols_frac"]).median()
            )
            if len(ok_stats)
            else 0.0,
        },
    )


class ClipScoresConfig(dg.Config):
    """Override the settings file's prompts for one run."""

    positive_prompts: list[str] | None = Field(None, description="Prompts for wanted images.")
    negative_prompts: list[str] | None = Field(None, description="Prompts for rejected images.")


@dg.asset(
    partitions_def=shard_partitions,
    group_name=GROUP,
    kinds={"parquet"},
    code_version=settings_hash({"prompts": prompt_settings(_settings_at_load)}),
    description="Per-prompt cosine similarities and the combined portrait_score, from stored "
    "embeddings and the prompt set. Changing prompts never re-reads an image.",
)
def clip_scores(
    context: dg.AssetExecutionContext,
    config: ClipScoresConfig,
    clip_embeddings: pd.DataFrame,
    clip_model: ClipModelResource,
    settings: SettingsResource,
) -> dg.Output[pd.DataFrame]:
    positive, negative = prompt_settings(settings.load().clip)
    positive = config.positive_prompts or positive
    negative = config.negative_prompts or negative
    ok = clip_embeddings.loc[clip_embeddings["status"] == "ok"].reset_index(drop=True)
    stale = ok["model_fingerprint_id"] != clip_model.fingerprint_id()
    if stale.any():
        raise RuntimeError(
            f"{int(stale.sum())} embeddings of shard {context.partition_key} come from another model "
            f"than the configured one ({clip_model.model_name}); rematerialize clip_embeddings first"
        )
    # The prompts' text embeddings are computed once for the run, inside score_with_model.
    matrix = embedding_matrix(ok, dim=clip_model.fingerprint()["embed_dim"])  # (0, D) for an empty shard
    scores = score_with_model(clip_model, matrix, positive, negative)
    scores.insert(0, "image_id", ok["image_id"].to_numpy())
    columns = {prompt_column(p): p for p in positive + negative}
    return dg.Output(
        scores,
        metadata={
            "images": len(scores),
            "mean_portrait_score": float(scores["portrait_score"].mean()) if len(scores) else 0.0,
            "prompts": dg.MetadataValue.md(
                "| column | prompt |\n|---|---|\n" + "\n".join(f"| `{c}` | {p} |" for c, p in columns.items())
            ),
            "prompt_set": settings_hash({"positive": positive, "negative": negative}),
            "settings_source": "run config" if (config.positive_prompts or config.negative_prompts) else "settings file",
            **clip_model.metadata(),
        },
    )


class ClipThresholdConfig(dg.Config):
    """Override the settings file's threshold for one run."""

    keep_fraction: float | None = Field(None, description="Target fraction of scored images to keep.")
    fixed_threshold: float | None = Field(None, description="A fixed portrait_score threshold.")


REVIEW_SHEET_SIZE = 25


def _review_sheet(dataset, storage, rows: pd.DataFrame, title: str):
    """Thumbnails of ``rows`` (image_id, shard, portrait_score) with their scores."""
    paths = {}
    for shard, group in rows.groupby("shard"):
        index = read_parquet(storage.asset_path("shard_index", shard), ["image_id", "rel_path"])
        paths.update(index.loc[index["image_id"].isin(group["image_id"])].set_index("image_id")["rel_path"])
    images, captions = [], []
    for row in rows.itertuples():
        try:
            image, _ = open_image_rgb(dataset.image_path(paths[row.image_id]), 160)
        except (ImageDecodeError, KeyError):  # the sheet shows what it can; the cell is grey
            image = None
        images.append(image)
        captions.append(f"{row.image_id} {row.portrait_score:.3f}")
    return image_markdown(contact_sheet(images, captions, columns=5, title=title), title)


@dg.asset(
    deps=["clip_scores"],
    group_name=GROUP,
    kinds={"parquet"},
    code_version=settings_hash(threshold_settings(_settings_at_load)),
    description="The portrait_score threshold over all scored shards: fixed, or the one that "
    "keeps the target fraction (the seed kept ~20%). Review sheets of images just above and "
    "just below it let a person judge it.",
)
def clip_threshold(
    context: dg.AssetExecutionContext,
    config: ClipThresholdConfig,
    settings: SettingsResource,
    dataset: DanbooruDatasetResource,
    storage: StorageResource,
    clip_model: ClipModelResource,
) -> dg.Output[pd.DataFrame]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wanted = threshold_settings(settings.load().clip)
    overridden = config.keep_fraction is not None or config.fixed_threshold is not None
    if config.keep_fraction is not None:
        wanted = {"keep_fraction": config.keep_fraction, "fixed_threshold": None}
    if config.fixed_threshold is not None:
        wanted["fixed_threshold"] = config.fixed_threshold
    parts = read_partitions(storage, "clip_scores", ["image_id", "portrait_score"])
    scores = pd.concat(
        [df.assign(shard=shard) for shard, df in parts.items()] or [pd.DataFrame(columns=["image_id", "portrait_score", "shard"])],
        ignore_index=True,
    )
    if scores.empty:
        raise ValueError(
            f"no scored images in the {len(parts)} materialized clip_scores partitions: "
            "materialize clip_scores for shards that have images first"
        )
    values = scores["portrait_score"].to_numpy()
    if wanted["fixed_threshold"] is not None:
        threshold, mode = float(wanted["fixed_threshold"]), "fixed"
    else:
        threshold, mode = float(threshold_for_fraction(values, wanted["keep_fraction"])), "keep_fraction"
    kept = int((values >= threshold).sum())

    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.hist(values, bins=60, color="#4c72b0")
    ax.axvline(threshold, color="#dd4444", lw=2, label=f"threshold {threshold:.4f}")
    ax.set_xlabel("portrait_score")
    ax.set_ylabel("images")
    ax.set_title(f"{len(values):,} scored images, {kept:,} kept ({kept / len(values):.1%})")
    ax.legend()
    above = scores.loc[values >= threshold].nsmallest(REVIEW_SHEET_SIZE, "portrait_score")
    below = scores.loc[values < threshold].nlargest(REVIEW_SHEET_SIZE, "portrait_score")
    table = pd.DataFrame(
        [{
            "threshold": threshold,
            "mode": mode,
            "target_keep_fraction": wanted["keep_fraction"] if mode == "keep_fraction" else None,
            "kept": kept,
            "scored": len(values),
            "kept_fraction": kept / len(values),
            "scored_shards": len(parts),
            "settings": json.dumps(wanted),
        }]
    )
    return dg.Output(
        table,
        metadata={
            "threshold": threshold,
            "mode": mode,
            "kept": kept,
            "scored": len(values),
            "kept_fraction": kept / len(values),
            "scored_shards": len(parts),
            "settings": dg.MetadataValue.json(wanted),
            "settings_source": "run config" if overridden else "settings file",
            "histogram": image_markdown(figure_to_image(fig), "portrait_score histogram"),
            "just_above_threshold": _review_sheet(dataset, storage, above, f"just above {threshold:.4f} (kept)"),
            "just_below_threshold": _review_sheet(dataset, storage, below, f"just below {threshold:.4f} (dropped)"),
            **({"warning": DEMO_WARNING} if clip_model.is_demo() else {}),
        },
    )


class ClipSubsetConfig(dg.Config):
    """Override the settings file's image rules for one run."""

    min_side: int | None = None
    max_dark_border_frac: float | None = None
    min_content_area_frac: float | None = None


# Drop reasons of clip_subset; a row keeps every reason that applies.
SUBSET_REASONS = ("unreadable", "below_threshold", "too_small", "dark_border_little_content")


def apply_clip_rules(
    index: pd.DataFrame, stats: pd.DataFrame, scores: pd.DataFrame, threshold: float, rules: ImageRules
) -> pd.DataFrame:
    """Every usable row of the shard with ``kept`` and its ``drop_reasons`` ("|"-joined)."""
    rows = (
        index.loc[index["status"].isin(USABLE_STATUSES), ["image_id", "rel_path", "width", "height"]]
        .merge(stats[["image_id", "status", *STATS_COLUMNS]], on="image_id", how="left")
        .merge(scores[["image_id", "portrait_score"]], on="image_id", how="left")
    )
    dark = rows["border_black_rows_frac"].fillna(0) + rows["border_black_cols_frac"].fillna(0)
    failed = {
        "unreadable": (rows["status"] != "ok").to_numpy(),
        "below_threshold": ~(rows["portrait_score"] >= threshold).to_numpy(),
        "too_small": (np.minimum(rows["width"], rows["height"]) < rules.min_side).to_numpy(),
        "dark_border_little_content": (
            (dark > rules.max_dark_border_frac) & (rows["content_area_frac"].fillna(1) < rules.min_content_area_frac)
        ).to_numpy(),
    }
    reasons = np.full(len(rows), "", dtype=object)
    for name in SUBSET_REASONS:
        hit = failed[name]
        reasons[hit] = np.where(reasons[hit] == "", name, reasons[hit] + "|" + name)
    out = rows[["image_id", "rel_path", "width", "height", "portrait_score"]].copy()
    out["kept"] = reasons == ""
    out["drop_reasons"] = reasons
    return out


@dg.asset(
    partitions_def=shard_partitions,
    group_name=GROUP,
    kinds={"parquet"},
    code_version=settings_hash(_settings_at_load.image_rules),
    description="The intermediate subset (the seed's 600k): images at or above the threshold that "
    "pass the image-statistic rules. Dropped rows keep their reasons. Touches no image.",
)
def clip_subset(
    context: dg.AssetExecutionContext,
    config: ClipSubsetConfig,
    shard_index: pd.DataFrame,
    image_stats: pd.DataFrame,
    clip_scores: pd.DataFrame,
    clip_threshold: pd.DataFrame,
    settings: SettingsResource,
) -> dg.Output[pd.DataFrame]:
    rules = settings.load().clip.image_rules
    overrides = config.model_dump(exclude_none=True)
    rules = rules.model_copy(update=overrides)
    threshold = float(clip_threshold["threshold"].iloc[0])
    subset = apply_clip_rules(shard_index, image_stats, clip_scores, threshold, rules)
    kept = int(subset["kept"].sum())
    per_reason = {
        name: int(subset["drop_reasons"].str.contains(name, regex=False).sum()) for name in SUBSET_REASONS
    }
    return dg.Output(
        subset,
        metadata={
            "rows": len(subset),
            "kept": kept,
            "kept_fraction": kept / len(subset) if len(subset) else 0.0,
            "threshold": threshold,
            "rules": dg.MetadataValue.json(rules.model_dump()),
            "settings_source": "run config" if overrides else "settings file",
            **{f"dropped_{name}": n for name, n in per_reason.items()},
        },
    )
