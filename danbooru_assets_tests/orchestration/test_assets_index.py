"""shard_index's asset checks over a range: one result per step."""

import dagster as dg

from danbooru_assets.orchestration.assets.index import combine_check_results


def result(passed: bool, severity=dg.AssetCheckSeverity.WARN, description=None, **metadata):
    return dg.AssetCheckResult(check_name="schema", passed=passed, severity=severity, description=description,
                               metadata=metadata)


def test_one_shard_is_its_own_result():
    only = result(False, description="bad", missing="x")
    assert combine_check_results({"0001": only}) is only


def test_a_range_passes_only_when_every_shard_passes_and_names_the_failures():
    combined = combine_check_results({"0001": result(True), "0002": result(True)})
    assert combined.passed and combined.metadata["shards_checked"].value == 2
    combined = combine_check_results({
        "0001": result(True),
        "0002": result(False, description="unknown status", unknown="weird"),
        "0003": result(False, severity=dg.AssetCheckSeverity.ERROR),
    })
    assert not combined.passed and combined.check_name == "schema"
    assert combined.severity == dg.AssetCheckSeverity.ERROR  # the worst of the failures
    assert combined.metadata["failed_shards"].value == "['0002', '0003']"
    assert combined.metadata["0002/unknown"].value == "weird"  # the first failure's details
    assert combined.description == "shard 0002: unknown status"


def test_warnings_alone_stay_warnings():
    combined = combine_check_results({"0001": result(False), "0002": result(True)})
    assert not combined.passed and combined.severity == dg.AssetCheckSeverity.WARN and combined.description is None
