"""Active-learning loop: human labels, the quality classifier, its predictions, the next
labeling round's queue, and the curated dataset (the seed's ~70k best + ~80k
sort-of-complex images).

The loop: ``labeling_queue`` picks images → a person labels them on the labeling page
(``danbooru-assets label``) → ``labels`` changes → the retrain sensor requests
``quality_model`` → ``quality_predictions``, ``labeling_queue`` and ``curated_dataset``
follow (eager automation, or ``danbooru-assets run``).
"""

import json
import pickle
import warnings
from typing import TYPE_CHECKING

import dagster as dg

from danbooru_assets.orchestration.assets.settings import settings_keys
from danbooru_assets.pose.coco import KEYPOINT_COLUMNS
from danbooru_assets.orchestration.io_manager import COLUMNS
from danbooru_assets.core.tables import ShardTables, write_bytes
from danbooru_assets.labels.classes import LABEL_CLASSES
from danbooru_assets.orchestration.resources import (
    DanbooruDatasetResource,
    LabelStoreResource,
    SettingsResource,
    StorageResource,
)
from danbooru_assets.orchestration.partitions import CHEAP_BACKFILL, shard_partitions
from danbooru_assets.orchestration.settings_guard import require_current, with_settings_record
from danbooru_assets.orchestration.shard_runs import ShardLoop

if TYPE_CHECKING:
    import pandas as pd

CLASSES = LABEL_CLASSES
EMBEDDING_IN = dg.AssetIn(metadata={COLUMNS: ["image_id", "embedding", "model_fingerprint_id"]})
KEYPOINTS_IN = dg.AssetIn(metadata={COLUMNS: ["image_id", "width", "height", *KEYPOINT_COLUMNS]})

GROUP = "quality"
# What a trained quality_model follows in the settings (a new round plan changes no model).
MODEL_SETTINGS = ("quality.classifier",)
MODEL_DIR = "quality_model_files"


def labels_observation_metadata(store) -> dict:
    """What an observation of `labels` shows in the UI: counts, the labelers' throughput
    (labels per minute and seconds per label, per mode and per page session) and agreement."""
    from danbooru_assets.labels.agreement import agreement_by_labeler_markdown, agreement_report

    summary = store.summary()
    throughput = store.throughput_summary()
    agreement = agreement_report(store.history(), max_listed=0)
    metadata = {
        "labeled": summary["n_labeled"],
        "per_class": dg.MetadataValue.json(summary["per_class"]),
        "labelers": dg.MetadataValue.json(summary["labelers"]),
        "history_rows": summary["history_rows"],
        "sessions": throughput["sessions"],
        "throughput_by_session": dg.MetadataValue.md(throughput["table_md"]),
        "kappa_between_labelers": _fmt(agreement["kappa"]),
        "disagreements": agreement["n_disagreements"],
        "self_agreement_kappa": _fmt(agreement["self_kappa"]),
        "agreement_by_labeler": dg.MetadataValue.md(agreement_by_labeler_markdown(agreement)),
    }
    for mode in ("single", "grid"):
        if f"{mode}_labels" in throughput:
            metadata[f"{mode}_labels"] = throughput[f"{mode}_labels"]
            metadata[f"{mode}_labels_per_minute"] = _fmt_or_na(throughput[f"{mode}_labels_per_minute"])
            metadata[f"{mode}_seconds_per_label"] = _fmt_or_na(throughput[f"{mode}_seconds_per_label"])
    return metadata


def _observe_labels(label_store: LabelStoreResource) -> dg.ObserveResult:
    store = label_store.store()
    return dg.ObserveResult(data_version=dg.DataVersion(store.version()), metadata=labels_observation_metadata(store))


with warnings.catch_warnings():  # observable source assets are marked beta; this use is plain
    warnings.simplefilter("ignore", dg.BetaWarning)
    labels = dg.observable_source_asset(
        name="labels",
        group_name=GROUP,
        description="Human labels (good / questionable / bad) in the SQLite label store, written by "
        "the labeling page or a CSV import. Its data version changes whenever the store does.",
    )(_observe_labels)


@dg.asset(
    ins={"clip_embeddings": EMBEDDING_IN, "pose_keypoints": KEYPOINTS_IN},
    deps=[labels, *settings_keys("quality")],
    group_name=GROUP,
    kinds={"scikitlearn", "parquet"},
    description="A classifier over CLIP embeddings + pose features, trained on the human labels, "
    "with cross-validated precision/recall per class and a confusion matrix. Before any "
    "labels exist it records that it is untrained, and the first queue is chosen for diversity.",
)
def quality_model(
    context: dg.AssetExecutionContext,
    clip_embeddings: ShardTables,
    pose_keypoints: ShardTables,
    label_store: LabelStoreResource,
    settings: SettingsResource,
    storage: StorageResource,
) -> dg.Output:
    import pandas as pd

    from danbooru_assets.quality.classifier import confusion_matrix_image, model_fingerprint, train_quality_model
    from danbooru_assets.quality.features import classifier_features, embedded_rows
    from danbooru_assets.orchestration.ui_metadata import image_markdown

    read = settings.read()
    current, quality = read.settings, read.settings.quality
    store = label_store.store()
    latest = store.latest()
    labeled = latest.loc[latest["label"].isin(CLASSES)]
    version = store.version()
    base = {"label_version": version, "labels": len(labeled), "classifier": quality.classifier,
            "settings_source": read.source}

    def untrained(note: str, **extra) -> dg.Output:
        table = pd.DataFrame([{**base, "trained": False, "fingerprint": "", "clip_model_fingerprint_id": "",
                               "model_path": "", "metrics_json": "{}"}])
        table = with_settings_record(table, current, *MODEL_SETTINGS)
        return dg.Output(table, metadata={**base, **extra, "trained": False, "note": note})

    if labeled["label"].nunique() < 2:
        context.log.info("fewer than two classes labeled: no model yet (the queue starts from diversity)")
        return untrained("label the first round to train a model")
    # Labeled images without an embedding are left out (and counted), never zero vectors;
    # one CLIP model only: a classifier over two embedding spaces learns nothing that transfers.
    try:
        embedded, without, clip_fingerprint = embedded_rows(
            labeled["image_id"], clip_embeddings.rows(labeled["image_id"]), "quality_model"
        )
    except ValueError as exc:
        raise dg.Failure(str(exc)) from exc
    base["labels_without_embedding"] = len(without)
    if len(without):
        context.log.warning(
            f"{len(without)} labeled images have no CLIP embedding and are left out of training "
            f"(e.g. {without[:10].tolist()}): unreadable, or clip_embeddings not materialized for their shards"
        )
        labeled = labeled.loc[labeled["image_id"].isin(embedded["image_id"])]
    base["labels_used"] = len(labeled)
    if labeled["label"].nunique() < 2:
        return untrained("fewer than two classes among the labeled images that have an embedding")
    X, names = classifier_features(embedded, pose_keypoints.rows(labeled["image_id"]), labeled["image_id"].to_numpy())
    pipeline, metrics = train_quality_model(X, labeled["label"].to_numpy(), kind=quality.classifier)
    fingerprint = model_fingerprint(pipeline, names)
    path = storage.path(MODEL_DIR, f"{fingerprint}.pkl")
    write_bytes(path, pickle.dumps({"pipeline": pipeline, "feature_names": names}))
    per_class = metrics.get("per_class", {})
    md = "| class | precision | recall | f1 | support |\n|---|---|---|---|---|\n" + "\n".join(
        f"| {c} | {_fmt(m.get('precision'))} | {_fmt(m.get('recall'))} | {_fmt(m.get('f1'))} | {m.get('support')} |"
        for c, m in per_class.items()
    )
    table = pd.DataFrame(
        [{**base, "trained": True, "fingerprint": fingerprint, "clip_model_fingerprint_id": clip_fingerprint,
          "model_path": str(path), "metrics_json": json.dumps(metrics, default=_json_default)}]
    )
    table = with_settings_record(table, current, *MODEL_SETTINGS)
    return dg.Output(
        table,
        metadata={
            **base,
            "trained": True,
            "fingerprint": fingerprint,
            "clip_model_fingerprint_id": clip_fingerprint,
            "accuracy_cv": _fmt(metrics.get("accuracy")),
            "macro_f1_cv": _fmt(metrics.get("macro_f1")),
            "cv_folds": metrics.get("n_splits"),
            "per_class_cv": dg.MetadataValue.md(md),
            "confusion_matrix": image_markdown(confusion_matrix_image(metrics), "cross-validated confusion matrix"),
            "class_counts": dg.MetadataValue.json(labeled["label"].value_counts().to_dict()),
        },
    )


def _fmt(value) -> str:
    return "n/a" if value is None else f"{float(value):.3f}"


def _fmt_or_na(value) -> str:
    return "n/a" if value is None else f"{float(value):.1f}"


def _json_default(value):
    return value.tolist() if hasattr(value, "tolist") else str(value)


def load_model(quality_model_table: "pd.DataFrame", storage: StorageResource):
    row = quality_model_table.iloc[0]
    if not bool(row["trained"]):
        return None
    from upath import UPath

    with UPath(row["model_path"]).open("rb") as f:
        return pickle.load(f)["pipeline"]


@dg.asset(
    partitions_def=shard_partitions,
    backfill_policy=CHEAP_BACKFILL,
    ins={
        "pose_subset": dg.AssetIn(metadata={COLUMNS: ["image_id", "keep", "rel_path", "width", "height", "portrait_score"]}),
        "clip_embeddings": EMBEDDING_IN,
        "pose_keypoints": KEYPOINTS_IN,
    },
    group_name=GROUP,
    kinds={"parquet"},
    automation_condition=dg.AutomationCondition.eager(),
    description="Class probabilities (good / questionable / bad), the predicted class and the "
    "uncertainty for every image of pose_subset.",
)
def quality_predictions(
    context: dg.AssetExecutionContext,
    pose_subset: ShardTables,
    clip_embeddings: ShardTables,
    pose_keypoints: ShardTables,
    quality_model,
    storage: StorageResource,
    settings: SettingsResource,
) -> dg.Output:
    import pandas as pd

    from danbooru_assets.quality.classifier import no_predictions, predict_proba_frame
    from danbooru_assets.quality.features import classifier_features, embedded_rows

    read = settings.read()
    if bool(quality_model["trained"].iloc[0]):  # an untrained model predicts nothing under any setting
        require_current(
            "quality_predictions", "quality_model", quality_model, read.settings, MODEL_SETTINGS,
            launch="quality_model_job (retrains on the stored labels), then quality_predictions for these shards",
        )

    pipeline = load_model(quality_model, storage)
    fingerprint = str(quality_model["fingerprint"].iloc[0])
    # The CLIP model the classifier was trained on ("" for a table written before it was recorded).
    trained_on = ""
    if "clip_model_fingerprint_id" in quality_model.columns and pd.notna(quality_model["clip_model_fingerprint_id"].iloc[0]):
        trained_on = str(quality_model["clip_model_fingerprint_id"].iloc[0])

    def predict_shard(shard: str):
        subset = pose_subset[shard]
        kept = subset.loc[subset["keep"].fillna(False).astype(bool), ["image_id", "rel_path", "width", "height", "portrait_score"]]
        # Images without an embedding are left out and counted: no prediction, no queue place.
        embeddings = clip_embeddings[shard]
        embedded, without, clip_fingerprint = embedded_rows(
            kept["image_id"], embeddings, f"quality_predictions, shard {shard}"
        )
        kept = kept.loc[kept["image_id"].isin(embedded["image_id"])].reset_index(drop=True)
        if pipeline is not None and trained_on and clip_fingerprint not in (None, trained_on):
            raise ValueError(
                f"the embeddings of shard {shard} come from CLIP model {clip_fingerprint}, the classifier "
                f"was trained on {trained_on}: rematerialize quality_model (or clip_embeddings) first"
            )
        if pipeline is None or kept.empty:
            probs = no_predictions(len(kept))
        else:
            X, _ = classifier_features(embedded, pose_keypoints[shard], kept["image_id"])
            probs = predict_proba_frame(pipeline, X)
        table = pd.concat([kept, probs.reset_index(drop=True)], axis=1)
        table["model_fingerprint"] = fingerprint
        predicted = table["predicted_class"].value_counts().to_dict()
        counts = {"images": len(table), "without_embedding": len(without),
                  **{f"predicted_{c}": int(predicted.get(c, 0)) for c in CLASSES}}
        counts["uncertainty_sum"] = float(table["uncertainty"].sum()) if table["uncertainty"].notna().any() else 0.0
        return table, counts

    loop = ShardLoop(context, "quality_predictions")
    tables = loop.run(predict_shard)
    images = loop.totals.get("images", 0)
    without = int(loop.totals.get("without_embedding", 0))
    if without:
        context.log.warning(
            f"{without} images of pose_subset have no CLIP embedding: left out of the predictions "
            "(and so of the queue and the curated dataset)"
        )
    return dg.Output(
        tables,
        metadata={
            **loop.metadata(["images", "without_embedding", *(f"predicted_{c}" for c in CLASSES)]),
            "model_trained": pipeline is not None,
            "model_fingerprint": fingerprint,
            "mean_uncertainty": loop.totals.get("uncertainty_sum", 0.0) / images if images and pipeline else 0.0,
            "settings_source": read.source,
        },
    )


QUEUE_SHEET_SIZE = 25


@dg.asset(
    ins={"clip_embeddings": EMBEDDING_IN, "pose_keypoints": dg.AssetIn(metadata={COLUMNS: ["image_id", *KEYPOINT_COLUMNS]})},
    deps=[labels, *settings_keys("quality")],
    group_name=GROUP,
    kinds={"parquet"},
    automation_condition=dg.AutomationCondition.eager(),
    description="The next labeling round's images: sized by the round plan (1% → 5% → 25% of "
    "pose_subset by default), the most uncertain predictions spread over k-means clusters of "
    "their embeddings, never an image already labeled. Served by `danbooru-assets label`.",
)
def labeling_queue(
    context: dg.AssetExecutionContext,
    quality_predictions: ShardTables,
    clip_embeddings: ShardTables,
    pose_keypoints: ShardTables,
    label_store: LabelStoreResource,
    settings: SettingsResource,
    dataset: DanbooruDatasetResource,
) -> dg.Output:
    import pandas as pd

    from danbooru_assets.core.embeddings import embedding_matrix
    from danbooru_assets.core.thumbnails import load_thumbnails
    from danbooru_assets.quality.features import embedded_rows
    from danbooru_assets.quality.queue import current_round, labels_needed, plan_round, round_targets, select_round_queue
    from danbooru_assets.core.visuals import contact_sheet
    from danbooru_assets.orchestration.ui_metadata import image_markdown

    read = settings.read()
    quality = read.settings.quality
    candidates = quality_predictions.concat()
    labeled = set(label_store.store().labeled_ids())
    plan = round_targets(len(candidates), quality.round_fractions, quality.min_round_size)
    n_labeled = len(labeled & set(candidates.get("image_id", pd.Series(dtype="int64"))))
    round_ = current_round(n_labeled, plan)
    size = labels_needed(n_labeled, plan) if len(candidates) else 0
    without: list = []
    has_model = "uncertainty" in candidates.columns and bool(candidates["uncertainty"].notna().any())
    split = plan_round(round_, 0, quality.verify_fraction, has_model)
    if size and len(candidates):
        pool = candidates.loc[~candidates["image_id"].isin(labeled)].reset_index(drop=True)
        # Clustering needs real embeddings: images without one are left out and counted.
        try:
            embedded, without, _ = embedded_rows(pool["image_id"], clip_embeddings.rows(pool["image_id"]), "labeling_queue")
        except ValueError as exc:
            raise dg.Failure(str(exc)) from exc
        if len(without):
            context.log.warning(f"{len(without)} candidates have no CLIP embedding and cannot be queued")
            pool = pool.loc[pool["image_id"].isin(embedded["image_id"])].reset_index(drop=True)
        embeddings = embedding_matrix(pool[["image_id"]].merge(embedded.drop_duplicates("image_id"), on="image_id"))
        split = plan_round(round_, min(size, len(pool)), quality.verify_fraction, has_model)
        queue, split = select_round_queue(pool, embeddings, split, already_labeled=labeled)
    else:
        queue = candidates.head(0).assign(queue_rank=pd.Series(dtype="int64"))
    # The page draws the skeleton: carry the keypoints along.
    if len(queue):
        queue = queue.merge(pose_keypoints.rows(queue["image_id"]), on="image_id", how="left")
    queue["round"] = round_
    queue = queue.sort_values("queue_rank").reset_index(drop=True)
    from danbooru_assets.labels.agreement import agreement_by_labeler_markdown, agreement_report, disagreements_markdown

    store = label_store.store()
    agreement = agreement_report(store.history())
    throughput = store.throughput_summary()
    metadata = {
        "round": round_,
        "queue_size": len(queue),
        "round_plan": split.describe(),
        "queue_uncertainty": split.uncertainty,
        "queue_verify": split.verify,
        "agreement_by_labeler": dg.MetadataValue.md(agreement_by_labeler_markdown(agreement)),
        # two labelers on one image: both labels kept; kappa over every such pair
        "kappa_between_labelers": _fmt(agreement["kappa"]),
        "images_with_several_labelers": agreement["images_with_several_labelers"],
        # images re-shown on purpose (quality.recheck_fraction): a labeler against themself
        "self_agreement_kappa": _fmt(agreement["self_kappa"]),
        "self_agreement_pairs": agreement["self_pairs"],
        "disagreements": agreement["n_disagreements"] + agreement["n_self_disagreements"],
        "disagreements_to_review": dg.MetadataValue.md(disagreements_markdown(agreement)),
        "throughput_by_session": dg.MetadataValue.md(throughput["table_md"]),
        "labeled": n_labeled,
        "pool": len(candidates),
        "without_embedding": len(without),
        "round_plan_cumulative": dg.MetadataValue.json(plan),
        "settings_source": read.source,
        "next_step": f"danbooru-assets label  (serves these {len(queue)} images)"
        if len(queue)
        else "all planned rounds are labeled",
    }
    if len(queue):
        head = queue.head(QUEUE_SHEET_SIZE)
        images = load_thumbnails([dataset.image_path(p) for p in head["rel_path"]], max_pixels=dataset.max_pixels)
        captions = [
            f"{i} u={u:.2f}" if pd.notna(u) else str(i) for i, u in zip(head["image_id"], head["uncertainty"])
        ]
        metadata["queue_head"] = image_markdown(contact_sheet(images, captions, title=f"round {round_}"), "queue")
    return dg.Output(queue, metadata=metadata)


@dg.asset(
    partitions_def=shard_partitions,
    backfill_policy=CHEAP_BACKFILL,
    ins={"shard_index": dg.AssetIn(metadata={COLUMNS: ["image_id", "md5", "tags_general"]})},
    deps=[labels, *settings_keys("quality")],
    group_name=GROUP,
    kinds={"parquet"},
    automation_condition=dg.AutomationCondition.eager(),
    description="The final subset with its class: human labels override predictions; the "
    "classes kept are a setting (default good + questionable). Export it with "
    "`danbooru-assets export`.",
)
def curated_dataset(
    context: dg.AssetExecutionContext,
    quality_predictions: ShardTables,
    shard_index: ShardTables,
    label_store: LabelStoreResource,
    settings: SettingsResource,
) -> dg.Output:
    from danbooru_assets.export.curated import build_manifest

    read = settings.read()
    keep_classes = read.settings.quality.keep_classes
    latest_labels = label_store.store().latest()
    by_class: dict[tuple, int] = {}

    def curate_shard(shard: str):
        predictions = quality_predictions[shard]
        images = predictions[["image_id", "rel_path"]].merge(
            shard_index[shard].rename(columns={"tags_general": "tags"}), on="image_id", how="left"
        )
        all_rows = build_manifest(images, latest_labels, predictions)
        curated = all_rows.loc[all_rows["class"].isin(keep_classes).fillna(False)].reset_index(drop=True)
        for key, n in all_rows.groupby(["class", "source"], dropna=False).size().items():
            by_class[key] = by_class.get(key, 0) + int(n)
        return curated, {
            "images": len(curated),
            "candidates": len(all_rows),
            "unlabeled_and_unpredicted": int((all_rows["source"] == "unlabeled").sum()),
        }

    loop = ShardLoop(context, "curated_dataset")
    tables = loop.run(curate_shard)
    return dg.Output(
        tables,
        metadata={
            **loop.metadata(["images", "candidates", "unlabeled_and_unpredicted"]),
            "keep_classes": dg.MetadataValue.json(keep_classes),
            "settings_source": read.source,
            "by_class_and_source": dg.MetadataValue.md(
                "| class | source | images |\n|---|---|---|\n"
                + "\n".join(f"| {c} | {s} | {n} |" for (c, s), n in by_class.items())
            ),
        },
    )
