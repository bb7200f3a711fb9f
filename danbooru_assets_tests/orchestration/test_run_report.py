"""``danbooru-assets run``'s report: warnings one line per kind with a count, rows and
kept counted once per range run, and why curated_dataset is empty."""

import dagster as dg
import pandas as pd

from danbooru_assets.orchestration.run_report import curated_note, output_asset_keys, stage_summary, warning_lines

parts = dg.StaticPartitionsDefinition(["a", "b", "c"])


@dg.asset(partitions_def=parts)
def noisy(context: dg.AssetExecutionContext) -> dg.Output:
    for i in range(5):
        context.log.warning(f"original/0001/{i}001.jpg: no_metadata (no metadata line for this id)")
    context.log.warning("original/0002/9002.jpg: zero_bytes (file is empty)")
    context.log.warning("shard 0001: 3 kept images without an embedding are left out")
    context.log.warning("shard 0002: 7 kept images without an embedding are left out")
    context.add_output_metadata({"dagster/row_count": 12})
    return dg.Output(pd.DataFrame({"x": range(12)}), metadata={"kept": 4, "rows": 12})


def test_warnings_grouped_by_kind_and_rows_counted_once_per_range():
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        [noisy], instance=instance, tags={"dagster/asset_partition_range_start": "a",
                                          "dagster/asset_partition_range_end": "c"},
        resources={"io_manager": dg.mem_io_manager},
    )
    lines = warning_lines(instance, result.run_id)
    assert lines == [
        "WARNING noisy: no_metadata ×5 (e.g. original/0001/0001.jpg: no_metadata (no metadata line for this id))",
        "WARNING noisy: original/0002/9002.jpg: zero_bytes (file is empty)",
        "WARNING noisy: 2 times: shard 0001: 3 kept images without an embedding are left out",
    ]
    summary = stage_summary(result, output_asset_keys([noisy]))
    assert summary.kept == {"noisy": 4}  # three partitions, one step: counted once
    assert summary.line().startswith("noisy") and "(4 kept)" in summary.line()


def test_curated_note_says_no_labels_yet():
    assert "no labels yet" in curated_note({"curated_dataset": {"images": 0}, "quality_model": {"labels": 0}})
    assert "quality.keep_classes" in curated_note({"curated_dataset": {"images": 0}, "quality_model": {"labels": 9}})
    assert curated_note({"curated_dataset": {"images": 3}}) is None
