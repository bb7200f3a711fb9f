"""What ``danbooru-assets run`` prints after each run: one line per asset (rows and kept),
and the run's warnings as one line per kind with a count, not one line per image."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

# The per-image warnings of the stages: "original/0063/1925063.jpg: no_metadata (why)".
_PER_ITEM = re.compile(r"^(?P<item>\S+): (?P<kind>[a-z][a-z0-9_]*) \((?P<detail>.*)\)$", re.S)
_NUMBER = re.compile(r"\d+")
WARNING_LEVEL = 30  # logging.WARNING


@dataclass
class StageSummary:
    """Per asset of one run: the rows stored, the images kept (where the asset keeps some)
    and its output metadata."""

    rows: dict[str, int | None] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)

    def line(self) -> str:
        parts = []
        for asset, rows in self.rows.items():
            text = asset if rows is None else f"{asset}={rows:,} rows"
            if asset in self.kept:
                text += f" ({self.kept[asset]:,} kept)"
            parts.append(text)
        return ", ".join(parts)


def _plain(metadata) -> dict[str, Any]:
    return {k: getattr(v, "value", v) for k, v in (metadata or {}).items()}


def output_asset_keys(assets) -> dict[tuple[str, str], str]:
    """``(step key, output name) -> asset key`` for the assets definitions of a code location
    (in an asset job a step is named after its op)."""
    keys = {}
    for assets_def in assets:
        if isinstance(assets_def, dg.AssetsDefinition) and assets_def.is_executable:
            for output, key in assets_def.keys_by_output_name.items():
                keys[(assets_def.op.name, output)] = key.to_user_string()
    return keys


def stage_summary(result: dg.ExecuteInProcessResult, keys: dict[tuple[str, str], str]) -> StageSummary:
    """From the step-level events, so a range run counts once (not once per shard): the IO
    manager's ``dagster/row_count`` (every shard of the range) and the asset's ``kept``.
    ``keys``: :func:`output_asset_keys`."""
    summary = StageSummary()
    for event in result.all_events:
        if event.event_type_value == "STEP_OUTPUT":
            data = event.step_output_data
            key = keys.get((event.step_key, data.step_output_handle.output_name), event.step_key)
            meta = _plain(data.metadata)
            summary.metadata[key] = meta
            summary.rows.setdefault(key, None)
            kept = meta.get("kept")
            if isinstance(kept, (int, float)) and not isinstance(kept, bool):
                summary.kept[key] = int(kept)
        elif event.event_type_value == "HANDLED_OUTPUT":
            data = event.event_specific_data
            key = keys.get((event.step_key, data.output_name), event.step_key)
            meta = _plain(data.metadata)
            if "dagster/row_count" in meta:
                summary.rows[key] = int(meta["dagster/row_count"])
    return summary


def warning_lines(instance: dg.DagsterInstance, run_id: str, examples: int = 1) -> list[str]:
    """The run's warnings, one line per (step, kind) with a count and an example; a kind is
    the reason word of a per-item warning (``path: no_metadata (...)``), else the message
    with its numbers blanked."""
    kinds: Counter[tuple[str, str]] = Counter()
    first: dict[tuple[str, str], str] = {}
    for entry in instance.all_logs(run_id):
        if entry.dagster_event is not None or entry.level < WARNING_LEVEL:
            continue
        message = entry.user_message.strip()
        match = _PER_ITEM.match(message)
        kind = match["kind"] if match else _NUMBER.sub("N", message)
        key = (entry.step_key or "run", kind)
        kinds[key] += 1
        first.setdefault(key, message)
    lines = []
    for (step, kind), n in kinds.items():
        example = first[(step, kind)].splitlines()[0][:300]
        if n == 1:
            lines.append(f"WARNING {step}: {example}")
        elif _PER_ITEM.match(first[(step, kind)]):
            lines.append(f"WARNING {step}: {kind} ×{n:,} (e.g. {example})")
        else:
            lines.append(f"WARNING {step}: {n:,} times: {example}")
    return lines


def demo_model_note() -> str | None:
    """A line when the CLIP stage will use the demo model (random weights)."""
    from danbooru_assets import config
    from danbooru_assets.clip.model import DEMO_MODEL_NAME, model_fields

    fields = model_fields(*config.clip_model_env(), sample_data=config.using_sample_data())
    if fields.get("model_name") == DEMO_MODEL_NAME or fields.get("pretrained") == "":
        return (
            f"note: CLIP model {fields.get('model_name')} with random weights (the demo model): its scores carry "
            "no meaning, so clip_subset's cut and near pairs are not real. Set DANBOORU_CLIP_MODEL and "
            "DANBOORU_CLIP_PRETRAINED for a real model (README: Configuration)."
        )
    return None


def curated_note(outputs: dict[str, dict[str, Any]]) -> str | None:
    """Why ``curated_dataset`` holds nothing, when it does not."""
    curated = outputs.get("curated_dataset")
    if curated is None or curated.get("images", 1):
        return None
    labels = (outputs.get("quality_model") or {}).get("labels")
    if not labels:
        return (
            "curated_dataset=0 rows: no labels yet, so no image has a class. Label the queue with "
            "`danbooru-assets label`, then run again (or let the retrain_sensor and the eager automation do it)."
        )
    return (
        f"curated_dataset=0 rows: the quality model learned from {labels} labels but no image is in the kept "
        "classes (settings: quality.keep_classes)."
    )
