"""The metadata prefilter: which indexed images the CLIP stage decodes, from the metadata
alone (``dataset.prefilter``). Cheap: stored tables in, a stored table out, no image read."""

import dagster as dg

from danbooru_assets.orchestration.assets.settings import settings_keys
from danbooru_assets.orchestration.io_manager import COLUMNS
from danbooru_assets.orchestration.partitions import CHEAP_BACKFILL, shard_partitions
from danbooru_assets.orchestration.resources import SettingsResource
from danbooru_assets.orchestration.shard_runs import ShardLoop
from danbooru_assets.core.tables import ShardTables
from danbooru_assets.dataset.prefilter import INDEX_INPUT_COLUMNS, RULES

TOP_TAGS = 15


@dg.asset(
    partitions_def=shard_partitions,
    backfill_policy=CHEAP_BACKFILL,
    ins={"shard_index": dg.AssetIn(metadata={COLUMNS: INDEX_INPUT_COLUMNS})},
    deps=settings_keys("prefilter"),
    group_name="raw",
    kinds={"parquet"},
    description="The metadata prefilter, before any decode: one row per usable indexed image with the "
    "rules it fails (excluded tags per category, required tags, rating, score, deleted, banned, file type, "
    "size, aspect ratio) and whether the CLIP stage decodes it. Images without metadata are never "
    "excluded by the metadata rules. Touches no image: a rule change re-runs in seconds.",
)
def metadata_prefilter(
    context: dg.AssetExecutionContext, shard_index: ShardTables, settings: SettingsResource
) -> dg.Output:
    from collections import Counter

    from danbooru_assets.dataset.prefilter import apply_prefilter, tag_counts

    read = settings.read()
    rules = read.settings.prefilter
    excluded_tags: Counter = Counter()

    def prefilter_shard(shard: str):
        table, counts = apply_prefilter(shard_index[shard], rules)
        excluded_tags.update(tag_counts(table["reasons"]))
        return table, counts

    loop = ShardLoop(context, "metadata_prefilter", images_key="rows")
    tables = loop.run(prefilter_shard)
    rule_keys = [f"rule_{r}" for r in RULES]
    top = excluded_tags.most_common(TOP_TAGS)
    return dg.Output(
        tables,
        metadata={
            **loop.metadata(
                ["rows", "excluded", "decoded", "never_decoded", "without_metadata", "would_exclude"],
                {"decoded_fraction": ("decoded", "rows")},
            ),
            "mode": rules.mode,
            ("range_kept_fraction" if len(loop.shards) > 1 else "kept_fraction"): round(1 - loop.ratio("excluded", "rows"), 4),
            "reasons": dg.MetadataValue.md(
                "| rule | images |\n|---|---|\n"
                + "\n".join(f"| {k.removeprefix('rule_')} | {int(loop.totals.get(k, 0))} |" for k in rule_keys)
                + "\n\nAn image counts under every rule it fails. Images without metadata "
                f"({int(loop.totals.get('without_metadata', 0))}) are judged by file type and size only."
            ),
            "excluded_tags": dg.MetadataValue.md(
                "| tag entry | images |\n|---|---|\n" + "\n".join(f"| `{t}` | {n} |" for t, n in top)
                if top
                else "none"
            ),
            "rules": dg.MetadataValue.json(rules.model_dump(mode="json")),
            "settings_source": read.source,
        },
    )
