"""Why one image was kept or dropped: its row in every stored stage table, in pipeline order.

``danbooru-assets why ID`` prints it; in the Dagster UI the ``why_image`` job (Launchpad:
``image_id``) attaches the same table to its run. Reads only stored Parquet tables (one
shard of each per-shard asset, and the global ``near_duplicates`` and ``clip_threshold``):
no Dagster, no image.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from upath import UPath

from danbooru_assets.core.shards import shard_key
from danbooru_assets.core.tables import TableLayout, read_parquet

# (asset, per-shard?, columns shown when present), in the order an image goes through them.
STAGES: list[tuple[str, bool, list[str]]] = [
    ("shard_index", True, ["rel_path", "status", "width", "height", "rating", "score"]),
    ("metadata_prefilter", True, ["excluded", "decode", "reasons"]),
    ("clip_embeddings", True, ["status", "model_fingerprint_id"]),
    ("clip_scores", True, ["portrait_score"]),
    ("clip_subset", True, ["kept", "drop_reasons", "prefilter_reasons"]),
    ("pose_keypoints", True, ["status", "backend"]),
    ("near_duplicates", False, ["kept", "duplicate_of", "kind", "similarity", "group_size"]),
    ("pose_subset", True, ["keep", "drop_reasons"]),
    ("quality_predictions", True, ["predicted_class", "p_good", "p_questionable", "p_bad", "uncertainty"]),
    ("curated_dataset", True, ["class", "source"]),
]
# Where an image leaves the pipeline: (asset, column meaning "still in", reasons column).
GATES = [
    ("metadata_prefilter", "excluded", "reasons", True),  # excluded=True means out
    ("clip_subset", "kept", "drop_reasons", False),
    ("near_duplicates", "kept", "kind", False),
    ("pose_subset", "keep", "drop_reasons", False),
]


@dataclasses.dataclass
class StageRow:
    asset: str
    state: str  # "row", "no row", "not materialized"
    values: dict[str, Any]


@dataclasses.dataclass
class ImageTrace:
    image_id: int
    shard: str
    stages: list[StageRow]
    threshold: float | None
    verdict: str

    def lines(self) -> list[str]:
        out = [f"image {self.image_id} (shard {self.shard}): {self.verdict}"]
        for stage in self.stages:
            if stage.state != "row":
                out.append(f"  {stage.asset:<20} {stage.state}")
                continue
            shown = ", ".join(f"{k}={_fmt(v)}" for k, v in stage.values.items() if _present(v))
            out.append(f"  {stage.asset:<20} {shown or '(row)'}")
        if self.threshold is not None:
            out.append(f"  {'clip_threshold':<20} threshold={self.threshold:.6g} (stored)")
        return out

    def markdown(self) -> str:
        rows = [f"**{self.verdict}**", "", "| asset | row |", "|---|---|"]
        for stage in self.stages:
            text = stage.state if stage.state != "row" else ", ".join(
                f"`{k}`={_fmt(v)}" for k, v in stage.values.items() if _present(v)
            )
            rows.append(f"| {stage.asset} | {text} |")
        if self.threshold is not None:
            rows.append(f"| clip_threshold | threshold={self.threshold:.6g} |")
        return "\n".join(rows)


def _present(value: Any) -> bool:
    try:
        import pandas as pd

        return not (value is None or (not isinstance(value, (list, dict)) and pd.isna(value)) or value == "")
    except (TypeError, ValueError):
        return True


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def trace_image(storage_base: str | UPath, image_id: int) -> ImageTrace:
    """Every stored stage's row for ``image_id``, and where (and why) it left the pipeline."""
    layout = TableLayout(str(storage_base))
    image_id = int(image_id)
    shard = shard_key(image_id)
    stages: list[StageRow] = []
    for asset, per_shard, columns in STAGES:
        path = layout.table_path(asset, shard if per_shard else None)
        if not path.exists():
            stages.append(StageRow(asset, "not materialized" + (f" for shard {shard}" if per_shard else ""), {}))
            continue
        table = read_parquet(path)
        rows = table.loc[table["image_id"] == image_id] if "image_id" in table.columns else table.iloc[0:0]
        if rows.empty:
            stages.append(StageRow(asset, "no row", {}))
            continue
        row = rows.iloc[0]
        stages.append(StageRow(asset, "row", {c: _plain(row[c]) for c in columns if c in rows.columns}))
    threshold = None
    threshold_path = layout.table_path("clip_threshold")
    if threshold_path.exists():
        threshold = float(read_parquet(threshold_path, ["threshold"])["threshold"].iloc[0])
    return ImageTrace(image_id, shard, stages, threshold, _verdict(stages))


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _verdict(stages: list[StageRow]) -> str:
    by_asset = {s.asset: s for s in stages}
    index = by_asset["shard_index"]
    if index.state != "row":
        return f"not in shard_index ({index.state}): no image file with this id in its bucket folder"
    if index.values.get("status") not in (None, "ok"):
        return f"not usable: shard_index status {index.values['status']}"
    for asset, column, reasons, out_when in GATES:
        stage = by_asset[asset]
        if stage.state != "row":
            if asset == "near_duplicates":  # only images in a duplicate group have a row
                continue
            return f"no decision yet at {asset} ({stage.state})"
        if bool(stage.values.get(column)) == out_when:
            why = stage.values.get(reasons) or "?"
            if asset == "near_duplicates":
                twin = stage.values.get("duplicate_of")
                twin = int(twin) if isinstance(twin, float) and twin == twin else twin  # an id column with NA reads as float
                why = f"duplicate of {twin} ({why})"
            return f"dropped by {asset}: {why}"
    curated = by_asset["curated_dataset"]
    if curated.state == "row":
        return f"kept: in curated_dataset as {curated.values.get('class')} ({curated.values.get('source')})"
    return "passed every filter (pose_subset keeps it); not in curated_dataset (its class is not kept, or not predicted yet)"
