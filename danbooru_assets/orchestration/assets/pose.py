"""Pose stage: COCO-17 keypoints for the CLIP subset, their statistics, and the geometric
filter (the seed's 600k → 363k).

Coordinates are stored in one convention everywhere: x to the right, y down, in
original-image pixels.
"""

import json
import time
from typing import TYPE_CHECKING

import dagster as dg

from danbooru_assets.core.incremental import FILE_IDENTITY
from danbooru_assets.core.stage import StageRun
from danbooru_assets.core.shards import SHARD_KEYS, shard_numbers
from danbooru_assets.core.tables import ShardTables, TableLayout, prune_shard_files, read_parquet, write_bytes, write_parquet
from danbooru_assets.orchestration.assets.settings import settings_keys
from danbooru_assets.orchestration.executors import GPU_QUEUE_TAGS
from danbooru_assets.orchestration.io_manager import COLUMNS
from danbooru_assets.orchestration.partitions import CHEAP_BACKFILL, INFERENCE_BACKFILL, INFERENCE_RETRY, shard_partitions
from danbooru_assets.orchestration.resources import (
    DanbooruDatasetResource,
    PoseEstimatorResource,
    SettingsResource,
    StorageResource,
)
from danbooru_assets.orchestration.settings_guard import require_current
from danbooru_assets.orchestration.shard_runs import ShardLoop, set_aside_metadata
from danbooru_assets.settings import PoseRules

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

GROUP = "pose"
PUBLISHED_SHARDS_DIR = "published_keypoints_shards"
# Written last by an import: the backend fingerprint of the files it read. pose_keypoints
# compares it with the files now, so an import that is missing, interrupted or older than
# the files is never taken for the current one.
IMPORT_RECORD = "import.json"


@dg.asset(
    group_name=GROUP,
    kinds={"parquet"},
    description="Published keypoint JSON files (one per image id, a folder or a tarball, as the "
    "seed's author published hers) imported once and split by shard. Empty unless the pose "
    "backend is `keypoint_files`.",
)
def published_keypoints(context: dg.AssetExecutionContext, pose_estimator: PoseEstimatorResource, storage: StorageResource):
    import pandas as pd

    from danbooru_assets.pose.keypoint_files import read_keypoint_files

    out_dir = storage.path(PUBLISHED_SHARDS_DIR)
    if not pose_estimator.uses_files():
        context.add_output_metadata({"note": f"backend is {pose_estimator.backend}: no keypoint files to import"})
        return pd.DataFrame({"shard": pd.Series(dtype=str), "rows": pd.Series(dtype="int64")})
    pose_estimator.check()
    record = out_dir / IMPORT_RECORD
    if record.exists():  # from here until the new record is written, no import is current
        record.unlink()
    # Taken before reading: a file changed during the import makes the record stale, not wrong.
    fingerprint = pose_estimator.files_fingerprint()
    started = time.perf_counter()
    keypoints, report = read_keypoint_files(pose_estimator.keypoint_files, axis_order=pose_estimator.axis_order)
    for name, reason in report.malformed[:50]:
        context.log.warning(f"{pose_estimator.keypoint_files}: {name}: {reason}")
    summary = []
    for number, part in keypoints.groupby(shard_numbers(keypoints["image_id"])):
        shard = SHARD_KEYS[int(number)]
        write_parquet(out_dir / f"{shard}.parquet", part.reset_index(drop=True))
        summary.append((shard, len(part)))
    prune_shard_files(out_dir, {s for s, _ in summary})
    write_bytes(record, json.dumps({"backend_fingerprint": fingerprint}).encode())
    context.add_output_metadata(
        {
            "source": pose_estimator.keypoint_files,
            "backend_fingerprint": fingerprint,
            "files_seen": report.files_seen,
            "files_read": report.files_read,
            "malformed": len(report.malformed),
            "malformed_examples": dg.MetadataValue.md(
                "\n".join(f"- `{n}`: {r}" for n, r in report.malformed[:20]) or "none"
            ),
            "axis_order": report.axis_order,
            "axis_evidence": dg.MetadataValue.json(report.axis_evidence),
            "files_per_s": round(report.files_seen / max(time.perf_counter() - started, 1e-9)),
        }
    )
    return pd.DataFrame(summary, columns=["shard", "rows"])


def _published(layout: TableLayout, shard: str):
    """published_keypoints' side table of ``shard`` (None: the files have no image of it)."""
    path = layout.path(PUBLISHED_SHARDS_DIR, f"{shard}.parquet")
    return read_parquet(path) if path.exists() else None


def check_import_is_current(storage: StorageResource, fingerprint: str, source: str) -> None:
    """Fail unless published_keypoints imported exactly the keypoint files there are now
    (``fingerprint``): keypoints from an older import would be stored under the new
    fingerprint and reused as if current."""
    record = storage.path(PUBLISHED_SHARDS_DIR, IMPORT_RECORD)
    if not record.exists():
        raise dg.Failure(
            f"published_keypoints has not imported the keypoint files {source} (never materialized, "
            "or its import was interrupted): materialize published_keypoints (prepare_job) first",
            allow_retries=False,  # a retry cannot help; only the import can
        )
    imported = json.loads(record.read_bytes())["backend_fingerprint"]
    if imported != fingerprint:
        raise dg.Failure(
            f"the keypoint files {source} changed since published_keypoints imported them "
            f"(imported {imported}, now {fingerprint}): materialize published_keypoints (prepare_job) first",
            allow_retries=False,
        )


@dg.asset(
    partitions_def=shard_partitions,
    backfill_policy=INFERENCE_BACKFILL,
    retry_policy=INFERENCE_RETRY,
    ins={
        "clip_subset": dg.AssetIn(metadata={COLUMNS: ["image_id", "rel_path", "width", "height", "kept"]}),
        # The image files' identity (size, mtime): a replaced image is estimated again.
        "shard_index": dg.AssetIn(metadata={COLUMNS: [*FILE_IDENTITY, "rel_path"]}),
    },
    deps=[published_keypoints],
    pool="gpu",
    # With the celery executor (deploy/) this step waits for a worker on a GPU machine.
    op_tags=GPU_QUEUE_TAGS,
    group_name=GROUP,
    kinds={"pytorch", "parquet"},
    description="17 COCO keypoints (x right, y down, original-image pixels, confidence) and the "
    "person box for each image of clip_subset, from the configured backend. Incremental: rows "
    "of the same image file (size, mtime) with the same backend fingerprint are reused.",
)
def pose_keypoints(
    context: dg.AssetExecutionContext,
    clip_subset: ShardTables,
    shard_index: ShardTables,
    pose_estimator: PoseEstimatorResource,
    dataset: DanbooruDatasetResource,
    storage: StorageResource,
) -> dg.Output:
    from danbooru_assets.pose.stage import PoseKeypointStage

    fingerprint = pose_estimator.fingerprint()  # no model loaded: only a run with work loads one
    if pose_estimator.uses_files():
        check_import_is_current(storage, pose_estimator.files_fingerprint(), pose_estimator.keypoint_files)
    layout = storage.layout()
    stage = PoseKeypointStage(
        clip_subset, shard_index, fingerprint, pose_estimator.backend,
        pose_estimator.estimator if not pose_estimator.uses_files() or pose_estimator.has_fallback() else None,
        dataset.image_path, dataset.max_pixels, pose_estimator.batch_size, pose_estimator.input_size,
        published=lambda shard: _published(layout, shard), keypoint_frame=pose_estimator.keypoint_frame,
        image_folder=dataset.layout().image_folder if pose_estimator.uses_files() else "", warn=context.log.warning,
    )
    run = StageRun(stage, context.partition_keys, layout, log=context.log.debug).plan().compute()
    loop = ShardLoop(context, "pose_keypoints")
    tables = {shard: t[0] for shard, t in loop.run(run.assemble, keep_on_failure=run.keep).items()}
    files_note = {}
    if pose_estimator.uses_files():
        missing = int(loop.totals.get("no_keypoint_file", 0))
        if pose_estimator.has_fallback():
            files_note["fallback_backend"] = pose_estimator.fallback_backend
        elif missing:
            files_note["no_keypoint_file_note"] = (
                f"{missing} kept images have no keypoint file: pose_subset drops them as no_pose until their "
                f"files are imported (published_keypoints), or set DANBOORU_POSE_FALLBACK (e.g. keypoint_rcnn; "
                f"resource pose_estimator.fallback_backend) to estimate them with a model"
            )
            context.log.warning(files_note["no_keypoint_file_note"])
    return dg.Output(
        tables,
        metadata={
            **loop.metadata(),
            **files_note,
            "backend": pose_estimator.backend,
            "backend_fingerprint": fingerprint,
            "images_per_s": run.rate(),
            **set_aside_metadata(run.set_aside),
        },
    )


@dg.asset(
    ins={"pose_keypoints": dg.AssetIn()},
    group_name=GROUP,
    kinds={"parquet"},
    description="Distributions of keypoints normalised by image size and torso length over all "
    "shards: the hip-midpoint scatter the seed shows, limb-ratio histograms, and the robust "
    "statistics (median, MAD, density regions) that pose_subset's rules use.",
)
def pose_statistics(context: dg.AssetExecutionContext, pose_keypoints: ShardTables) -> dg.Output:
    import pandas as pd

    from danbooru_assets.pose.features import ok_features, robust_statistics
    from danbooru_assets.pose.plots import feature_histograms, hip_midpoint_scatter
    from danbooru_assets.orchestration.ui_metadata import image_markdown

    parts = pose_keypoints
    keypoints = pose_keypoints.concat()
    if keypoints.empty or not (keypoints["status"] == "ok").any():
        raise ValueError("no keypoints with status ok: materialize pose_keypoints for some shards first")
    features = ok_features(keypoints)
    stats = robust_statistics(features)
    medians = {k: v.get("median") for k, v in stats.get("features", {}).items() if isinstance(v, dict)}
    table = pd.DataFrame(
        [{"images": len(features), "shards": len(parts), "statistics_json": json.dumps(stats)}]
    )
    return dg.Output(
        table,
        metadata={
            "images": len(features),
            "shards": len(parts),
            "hip_midpoint_scatter": image_markdown(
                hip_midpoint_scatter(features, stats, dbscan=True), "hip midpoint (normalised), DBSCAN colours"
            ),
            "feature_histograms": image_markdown(feature_histograms(features, stats), "normalised pose features"),
            "medians": dg.MetadataValue.json({k: v for k, v in medians.items() if v is not None}),
        },
    )


class PoseRulesConfig(dg.Config, PoseRules):
    """The settings' ``PoseRules`` as Dagster run config (same fields and constraints)."""


class PoseSubsetConfig(dg.Config):
    """Override the settings file's pose rules for one run (all fields, as in settings)."""

    rules: PoseRulesConfig | None = None


EXAMPLES_PER_SHEET = 10


@dg.asset(
    partitions_def=shard_partitions,
    backfill_policy=CHEAP_BACKFILL,
    ins={
        "clip_subset": dg.AssetIn(metadata={COLUMNS: ["image_id", "rel_path", "width", "height", "portrait_score"]}),
        # Every column: its settings record too (settings_guard).
        "near_duplicates": dg.AssetIn(),
    },
    # The dedup section too: a new threshold changes the subset, and Dagster's staleness
    # follows direct dependencies only.
    deps=settings_keys("pose_rules", "dedup"),
    group_name=GROUP,
    kinds={"parquet"},
    description="Images whose keypoints pass the geometric rules (the seed's 363k), less the copies "
    "near_duplicates drops (reason `duplicate`). Every dropped row keeps every reason; kept and "
    "dropped examples are drawn with skeletons.",
)
def pose_subset(
    context: dg.AssetExecutionContext,
    config: PoseSubsetConfig,
    pose_keypoints: ShardTables,
    pose_statistics,
    clip_subset: ShardTables,
    near_duplicates,
    settings: SettingsResource,
    dataset: DanbooruDatasetResource,
) -> dg.Output:
    from danbooru_assets.pose.plots import select_examples
    from danbooru_assets.pose.rules import SUBSET_REASONS, density_rule_status, pose_subset_shard
    from danbooru_assets.orchestration.ui_metadata import image_markdown

    read = settings.read()
    current = read.settings
    require_current(
        "pose_subset", "near_duplicates", near_duplicates, current, ("dedup",),
        launch="near_duplicates_job (duplicates over every shard's clip_subset), then pose_subset for these shards",
    )
    rules, source = settings.resolve(read, current.pose, config.rules.model_dump() if config.rules else None)
    stats = json.loads(pose_statistics["statistics_json"].iloc[0])
    density_rule = density_rule_status(rules, stats)
    if density_rule.startswith("skipped"):
        context.log.warning(f"pose_subset: midpoint density rule {density_rule}")
    examples: dict[str, list] = {"kept": [], "dropped": []}  # (keypoint row, decision row, subset)
    duplicates = near_duplicates.loc[~near_duplicates["kept"].astype(bool), "image_id"].to_numpy()

    def filter_shard(shard: str):
        keypoints, subset_rows = pose_keypoints[shard], clip_subset[shard]
        subset, decisions, counts = pose_subset_shard(keypoints, subset_rows, rules, stats, duplicates)
        if len(decisions):  # examples for the sheets, at most EXAMPLES_PER_SHEET of each overall
            ok = keypoints.loc[keypoints["status"] == "ok"].reset_index(drop=True)
            for label, rows in zip(("kept", "dropped"), select_examples(decisions, n=EXAMPLES_PER_SHEET)):
                room = EXAMPLES_PER_SHEET - len(examples[label])
                examples[label].extend((ok.iloc[[r]], decisions.iloc[[r]], subset_rows) for r in rows[:room])
        return subset, counts

    loop = ShardLoop(context, "pose_subset", images_key="rows")
    tables = loop.run(filter_shard)
    metadata = {
        **loop.metadata(
            ["rows", "kept", *(f"dropped_{name}" for name in SUBSET_REASONS)],
            {"kept_fraction": ("kept", "rows")},
        ),
        "rules": dg.MetadataValue.json(rules.model_dump()),
        "density_rule": density_rule,
        "settings_source": source,
    }
    for label, picked in examples.items():
        if picked:
            metadata[f"{label}_examples"] = image_markdown(_sheet(dataset, picked, label), f"{label} examples")
    return dg.Output(tables, metadata=metadata)


def _sheet(dataset, picked: list, label: str):
    """A skeleton contact sheet of (keypoint row, decision row, clip_subset rows) examples."""
    import pandas as pd

    from danbooru_assets.core.thumbnails import load_thumbnails
    from danbooru_assets.pose.draw import skeleton_sheet
    from danbooru_assets.pose.features import keypoint_array

    keypoints = pd.concat([k for k, _, _ in picked], ignore_index=True)
    decisions = pd.concat([d for _, d, _ in picked], ignore_index=True)
    paths = []
    for (_, _, subset_rows), row in zip(picked, keypoints.itertuples()):
        rel_paths = subset_rows.set_index("image_id")["rel_path"]
        paths.append(dataset.image_path(rel_paths[row.image_id]) if row.image_id in rel_paths.index else None)
    images = load_thumbnails(paths, max_pixels=dataset.max_pixels)
    # Keypoints are in full-size pixels: skeleton_sheet scales them to each thumbnail.
    sizes = [(int(w), int(h)) for w, h in zip(keypoints["width"], keypoints["height"])]
    captions = [
        f"{i} {r or 'kept'}"[:40] for i, r in zip(decisions["image_id"], decisions["drop_reasons"])
    ]
    return skeleton_sheet(images, keypoint_array(keypoints), captions, sizes=sizes, columns=5, title=f"{label} examples")
