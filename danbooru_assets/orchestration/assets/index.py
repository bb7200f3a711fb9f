"""Raw data: the metadata dump split by shard, and one index table per shard."""

from collections import Counter
from typing import TYPE_CHECKING

import dagster as dg

from danbooru_assets.core.shards import shard_key
from danbooru_assets.core.tables import read_arrow
from danbooru_assets.orchestration.partitions import CHEAP_BACKFILL, shard_partitions
from danbooru_assets.orchestration.resources import DanbooruDatasetResource, StorageResource
from danbooru_assets.orchestration.shard_runs import ShardLoop

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

METADATA_SHARDS_DIR = "danbooru_metadata_shards"


@dg.asset(
    group_name="raw",
    kinds={"parquet"},
    description="The dataset's post metadata (every release's layout and form, plain or compressed, "
    "found by content; companion tables listed, never read as posts) converted once to Parquet and "
    "split by shard, so each shard's index reads only its own slice. Bad lines are skipped and bad "
    "values nulled, each reported as file:line; for a duplicate id the last line wins.",
)
def danbooru_metadata(context: dg.AssetExecutionContext, dataset: DanbooruDatasetResource, storage: StorageResource):
    from danbooru_assets.dataset.metadata import convert_metadata_to_shards
    from danbooru_assets.dataset.metadata_discovery import COMPANION_KINDS, KIND_POSTS, KIND_UNKNOWN, read_tag_categories

    layout = dataset.layout()
    layout.check_root()
    folder = layout.metadata_dir
    # Taken before reading: a file that changes during the conversion makes the
    # new_data_sensor convert again.
    fingerprint = layout.metadata_fingerprint()
    found = layout.discover_metadata()
    posts = [f for f in found if f.kind == KIND_POSTS]
    companions = [f for f in found if f.kind in COMPANION_KINDS]
    unknown = [f for f in found if f.kind == KIND_UNKNOWN]
    if not posts:
        context.log.warning(f"no post metadata files under {folder} (JSON lines, plain or .gz/.xz/.bz2, any name)")
    for f in unknown:
        context.log.warning(f"metadata/{f.name} not read: {f.why}")
    tag_categories, bad_tag_lines = read_tag_categories(found)
    if bad_tag_lines:
        context.log.warning(f"{bad_tag_lines} line(s) of the tags table could not be used (no name or category)")
    summary, report = convert_metadata_to_shards(
        [f.path for f in posts],
        storage.path(METADATA_SHARDS_DIR),
        names=[f.name for f in posts],
        tag_categories=tag_categories or None,
    )
    for file in report.files:
        if file.error:
            context.log.warning(f"metadata file cut short: {file}")
    for problem in report.problems[:50]:
        context.log.warning(f"metadata line skipped: {problem}")
    for problem in report.value_problems[:20]:
        context.log.warning(f"metadata value nulled: {problem}")
    if report.duplicates:
        context.log.warning(
            f"{report.duplicates} metadata line(s) repeat an earlier line's id; the later line wins, e.g. "
            + "; ".join(report.duplicate_examples[:5])
        )

    def md_list(lines) -> dg.MetadataValue:
        return dg.MetadataValue.md("\n".join(f"- {line}" for line in lines) or "none")

    context.add_output_metadata(
        {
            "files": md_list(f"`{file}`" for file in report.files),
            "post_files": len(posts),
            "companion_tables": md_list(f"`{f.name}`: {f.kind} table, not read as posts" for f in companions),
            "companion_tables_skipped": sum(1 for f in companions if f.kind != "tags"),
            "tag_categories_from_tags_table": len(tag_categories),
            "tags_table_bad_lines": bad_tag_lines,
            "unknown_files": len(unknown),
            "ignored_files": md_list(f"`{f.name}`: {f.why}" for f in unknown),
            "metadata_fingerprint": fingerprint,
            "lines": report.lines,
            "records": report.records,
            "bad_lines": report.bad_lines,
            "bad_line_examples": md_list(f"`{p}`" for p in report.problems[:20]),
            "bad_values": report.bad_values,
            "bad_value_examples": md_list(f"`{p}`" for p in report.value_problems[:20]),
            "duplicate_ids": report.duplicates,
            "duplicate_id_examples": md_list(f"`{e}`" for e in report.duplicate_examples[:10]),
            "shards_with_metadata": len(summary),
        }
    )
    return summary


def load_shard_metadata(storage: StorageResource, shard: str) -> "pa.Table | None":
    path = storage.path(METADATA_SHARDS_DIR, f"{shard}.parquet")
    return read_arrow(path) if path.exists() else None


@dg.asset(
    partitions_def=shard_partitions,
    backfill_policy=CHEAP_BACKFILL,
    group_name="raw",
    kinds={"parquet"},
    deps=[danbooru_metadata],
    check_specs=[
        dg.AssetCheckSpec("schema", asset="shard_index", description="Documented columns and statuses."),
        dg.AssetCheckSpec(
            "unique_ids", asset="shard_index",
            description="No image id has two files (a warning when one is read and the others are duplicate_file).",
        ),
        dg.AssetCheckSpec("ids_in_bucket", asset="shard_index", description="Every id lies in its bucket (id % 1000)."),
    ],
    description="One row per image file of the shard: id, path, extension, bytes, width and "
    "height (metadata, else the image header), the metadata joined by id, and a status.",
)
def shard_index(context: dg.AssetExecutionContext, dataset: DanbooruDatasetResource, storage: StorageResource):
    from danbooru_assets.dataset.shard_index import STATUSES, build_shard_index

    layout = dataset.layout()
    layout.check_root()
    checks: dict[str, dict[str, dg.AssetCheckResult]] = {c.__name__: {} for c in SHARD_INDEX_CHECKS}
    problems: list[str] = []

    def index_one(shard: str):
        metadata = load_shard_metadata(storage, shard)
        index, report = build_shard_index(layout, shard, metadata)
        if not report.files:
            context.log.debug(f"shard {shard}: no files in {layout.image_dir(shard)}")
        for rel_path in report.bad_names[:20]:
            context.log.warning(f"{rel_path}: file name is not an image id; not indexed")
        bad = index.loc[index["status"] != "ok", ["rel_path", "status", "problem"]]
        for row in bad.head(50).itertuples():
            context.log.warning(f"{row.rel_path}: {row.status} ({row.problem})")
        problems.extend(f"- `{r.rel_path}`: {r.status} — {r.problem}" for r in bad.head(25).itertuples())
        for check in SHARD_INDEX_CHECKS:
            checks[check.__name__][shard] = check(index)
        statuses = Counter(index["status"])
        return index, {
            "files": report.files,
            "indexed": len(index),
            **{f"status_{s}": int(statuses.get(s, 0)) for s in STATUSES},
            "bad_file_names": len(report.bad_names),
            "metadata_rows": 0 if metadata is None else metadata.num_rows,
            "metadata_without_file": report.metadata_without_file,
            "header_reads": report.header_reads,
            "total_bytes": int(index["file_bytes"].sum()) if len(index) else 0,
        }

    loop = ShardLoop(context, "shard_index", images_key="files")
    tables = loop.run(index_one)
    yield dg.Output(
        tables,
        metadata={
            **loop.metadata(),
            "image_folder": str(layout.root_path / layout.image_folder),
            "problems": dg.MetadataValue.md("\n".join(problems[:25]) or "none"),
        },
    )
    for name, per_shard in checks.items():
        yield combine_check_results(per_shard)


def combine_check_results(per_shard: dict[str, dg.AssetCheckResult]) -> dg.AssetCheckResult:
    """One result for a range: passed when every shard passed; failing shards listed."""
    first = next(iter(per_shard.values()))
    failed = {s: r for s, r in per_shard.items() if not r.passed}
    if len(per_shard) == 1:
        return first
    metadata = {"shards_checked": len(per_shard), "failed_shards": str(sorted(failed)[:50])}
    for shard, result in list(failed.items())[:1]:  # the first failure's details
        metadata.update({f"{shard}/{k}": v for k, v in result.metadata.items()})
    worst = dg.AssetCheckSeverity.ERROR if any(
        r.severity == dg.AssetCheckSeverity.ERROR for r in failed.values()
    ) else dg.AssetCheckSeverity.WARN
    description = next((f"shard {s}: {r.description}" for s, r in failed.items() if r.description), None)
    return dg.AssetCheckResult(
        check_name=first.check_name, passed=not failed, metadata=metadata, severity=worst, description=description
    )


def check_schema(index: "pd.DataFrame") -> dg.AssetCheckResult:
    from danbooru_assets.dataset.shard_index import INDEX_COLUMNS, STATUSES

    missing = [c for c in INDEX_COLUMNS if c not in index.columns]
    unknown_status = sorted(set(index["status"]) - set(STATUSES)) if "status" in index else []
    return dg.AssetCheckResult(
        check_name="schema",
        passed=not missing and not unknown_status,
        metadata={"missing_columns": str(missing), "unknown_statuses": str(unknown_status)},
    )


def check_unique_ids(index: "pd.DataFrame") -> dg.AssetCheckResult:
    """Fails when an id has several files. A warning when one of them is read and the
    others are marked ``duplicate_file``; an error if two rows of one id would be read."""
    from danbooru_assets.dataset.shard_index import STATUS_DUPLICATE_FILE, USABLE_STATUSES

    repeated = index.loc[index["image_id"].duplicated(keep=False)]
    usable = repeated.loc[repeated["status"].isin(USABLE_STATUSES)]
    read_twice = usable.loc[usable["image_id"].duplicated(keep=False), "rel_path"]
    extra = repeated.loc[repeated["status"] == STATUS_DUPLICATE_FILE]
    return dg.AssetCheckResult(
        check_name="unique_ids",
        passed=repeated.empty,
        severity=dg.AssetCheckSeverity.ERROR if len(read_twice) else dg.AssetCheckSeverity.WARN,
        description=None if repeated.empty else (
            f"{repeated['image_id'].nunique()} id(s) with several files; "
            + (f"{len(read_twice)} rows would be read twice" if len(read_twice)
               else "one file each is read, the others are marked duplicate_file")
        ),
        metadata={
            "duplicate_rows": len(repeated),
            "read_twice": len(read_twice),
            "examples": str([f"{r.rel_path}: {r.status} ({r.problem})" if r.problem else r.rel_path
                             for r in repeated.head(10).itertuples()]),
        },
    )


def check_ids_in_bucket(index: "pd.DataFrame") -> dg.AssetCheckResult:
    wrong = index.loc[[shard_key(i) != s for i, s in zip(index["image_id"], index["shard"])], "rel_path"]
    return dg.AssetCheckResult(
        check_name="ids_in_bucket",
        passed=wrong.empty,
        metadata={"misplaced_rows": len(wrong), "examples": str(wrong.head(10).tolist())},
    )


SHARD_INDEX_CHECKS = (check_schema, check_unique_ids, check_ids_in_bucket)
