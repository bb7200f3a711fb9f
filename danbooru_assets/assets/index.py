"""Raw data: the metadata dump split by shard, and one index table per shard."""


from collections import Counter

import dagster as dg
import pandas as pd
import pyarrow as pa

from danbooru_assets.dataset import DanbooruDatasetResource
from danbooru_assets.io_manager import StorageResource, read_arrow
from danbooru_assets.metadata import convert_metadata_to_shards
from danbooru_assets.partitions import shard_key, shard_partitions
from danbooru_assets.shard_index import INDEX_COLUMNS, STATUSES, build_shard_index

METADATA_SHARDS_DIR = "danbooru_metadata_shards"


@dg.asset(
    group_name="raw",
    kinds={"parquet"},
    description="The dataset's metadata JSON-lines (API and dump forms) converted once to "
    "Parquet and split by shard, so each shard's index reads only its own slice.",
)
def danbooru_metadata(
    context: dg.AssetExecutionContext, dataset: DanbooruDatasetResource, storage: StorageResource
) -> pd.DataFrame:
    dataset.check_root()
    files = dataset.metadata_files()
    if not files:
        context.log.warning(f"no metadata files (*.json, *.jsonl) under {dataset.root_path / 'metadata'}")
    summary, report = convert_metadata_to_shards(files, storage.path(METADATA_SHARDS_DIR))
    for problem in report.problems[:50]:
        context.log.warning(f"metadata line skipped: {problem}")
    context.add_output_metadata(
        {
            "files": dg.MetadataValue.md("\n".join(f"- `{p.name}`" for p in files) or "none"),
            "metadata_fingerprint": dataset.metadata_fingerprint(),
            "lines": report.lines,
            "records": report.records,
            "bad_lines": len(report.problems),
            "bad_line_examples": dg.MetadataValue.md(
                "\n".join(f"- `{p}`" for p in report.problems[:20]) or "none"
            ),
            "shards_with_metadata": len(summary),
        }
    )
    return summary


def load_shard_metadata(storage: StorageResource, shard: str) -> pa.Table | None:
    path = storage.path(METADATA_SHARDS_DIR, f"{shard}.parquet")
    return read_arrow(path) if path.exists() else None


@dg.asset(
    partitions_def=shard_partitions,
    group_name="raw",
    kinds={"parquet"},
    deps=[danbooru_metadata],
    check_specs=[
        dg.AssetCheckSpec("schema", asset="shard_index", description="Documented columns and statuses."),
        dg.AssetCheckSpec("unique_ids", asset="shard_index", description="No image id appears twice."),
        dg.AssetCheckSpec("ids_in_bucket", asset="shard_index", description="Every id lies in its bucket (id % 1000)."),
    ],
    description="One row per image file of the shard: id, path, extension, bytes, width and "
    "height (metadata, else the image header), the metadata joined by id, and a status.",
)
def shard_index(
    context: dg.AssetExecutionContext, dataset: DanbooruDatasetResource, storage: StorageResource
):
    dataset.check_root()
    shard = context.partition_key
    metadata = load_shard_metadata(storage, shard)
    index, report = build_shard_index(dataset, shard, metadata)
    if not report.files:
        context.log.warning(f"shard {shard}: no files in {dataset.image_dir(shard)}")
    for rel_path in report.bad_names[:20]:
        context.log.warning(f"{rel_path}: file name is not an image id; not indexed")
    for row in index.loc[index["status"] != "ok", ["rel_path", "status", "problem"]].head(50).itertuples():
        context.log.warning(f"{row.rel_path}: {row.status} ({row.problem})")
    counts = Counter(index["status"])
    yield dg.Output(
        index,
        metadata={
            "files": report.files,
            "indexed": len(index),
            **{f"status_{s}": int(counts.get(s, 0)) for s in STATUSES},
            "bad_file_names": len(report.bad_names),
            "metadata_rows": 0 if metadata is None else metadata.num_rows,
            "metadata_without_file": report.metadata_without_file,
            "header_reads": report.header_reads,
            "total_bytes": int(index["file_bytes"].sum()) if len(index) else 0,
            "problems": dg.MetadataValue.md(
                "\n".join(
                    f"- `{r.rel_path}`: {r.status} — {r.problem}"
                    for r in index.loc[index["status"] != "ok"].head(25).itertuples()
                )
                or "none"
            ),
        },
    )
    for check in SHARD_INDEX_CHECKS:
        yield check(index)


def check_schema(index: pd.DataFrame) -> dg.AssetCheckResult:
    missing = [c for c in INDEX_COLUMNS if c not in index.columns]
    unknown_status = sorted(set(index["status"]) - set(STATUSES)) if "status" in index else []
    return dg.AssetCheckResult(
        check_name="schema",
        passed=not missing and not unknown_status,
        metadata={"missing_columns": str(missing), "unknown_statuses": str(unknown_status)},
    )


def check_unique_ids(index: pd.DataFrame) -> dg.AssetCheckResult:
    dupes = index.loc[index["image_id"].duplicated(keep=False), "rel_path"]
    return dg.AssetCheckResult(
        check_name="unique_ids",
        passed=dupes.empty,
        metadata={"duplicate_rows": len(dupes), "examples": str(dupes.head(10).tolist())},
    )


def check_ids_in_bucket(index: pd.DataFrame) -> dg.AssetCheckResult:
    wrong = index.loc[[shard_key(i) != s for i, s in zip(index["image_id"], index["shard"])], "rel_path"]
    return dg.AssetCheckResult(
        check_name="ids_in_bucket",
        passed=wrong.empty,
        metadata={"misplaced_rows": len(wrong), "examples": str(wrong.head(10).tolist())},
    )


SHARD_INDEX_CHECKS = (check_schema, check_unique_ids, check_ids_in_bucket)
