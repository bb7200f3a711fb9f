"""The per-shard stage contract without Dagster: reuse, setup only with work, batches
across shards, a failed batch failing only its shards, partial writes."""

import pandas as pd
import pytest

from danbooru_assets.core.stage import ShardStage, StageRun
from danbooru_assets.core.tables import TableLayout


class Doubler(ShardStage):
    name = "doubler"
    tables = ("doubled",)
    batch_rows = 3

    def __init__(self, inputs, fail_ids=()):
        self.inputs = inputs
        self.fail_ids = set(fail_ids)
        self.setups = 0
        self.batches = []

    def candidates(self, shard):
        return self.inputs[shard], {"wanted": len(self.inputs[shard])}

    def setup(self):
        self.setups += 1

    def process(self, todo, progress):
        self.batches.append(sorted(todo["shard"].unique()))
        if self.fail_ids & set(todo["image_id"]):
            raise RuntimeError("model fault")
        progress(len(todo), len(todo))
        return todo.assign(value=todo["image_id"] * 2)[["shard", "image_id", "file_bytes", "mtime", "value"]]

    def assemble(self, plan, fresh):
        parts = [p for p in (fresh, plan.reused[0]) if p is not None and len(p)]
        table = pd.concat(parts, ignore_index=True).sort_values("image_id").reset_index(drop=True)
        return (table,), {"images": len(table), "computed": len(plan.todo), "wanted": plan.notes["wanted"]}


def frame(ids):
    return pd.DataFrame({"image_id": ids, "file_bytes": [10] * len(ids), "mtime": [1.0] * len(ids)})


@pytest.fixture
def inputs():
    return {"0001": frame([1, 1001]), "0002": frame([2, 1002, 2002]), "0003": frame([3])}


def run_all(stage, store):
    run = StageRun(stage, list(stage.inputs), store).plan().compute()
    results, failed = {}, {}
    for shard in run.shards:
        try:
            results[shard] = run.assemble(shard)
        except Exception as exc:
            failed[shard] = exc
    return run, results, failed


def test_first_run_batches_across_shards_and_sets_up_once(tmp_path, inputs):
    stage = Doubler(inputs)
    run, results, failed = run_all(stage, TableLayout(str(tmp_path)))
    assert not failed and stage.setups == 1
    assert [len(b) for b in stage.batches] == [2, 2]  # 6 rows in batches of 3, each spanning two shards
    assert results["0002"][0][0]["value"].tolist() == [4, 2004, 4004]
    assert results["0002"][1] == {"images": 3, "computed": 3, "wanted": 3}
    assert run.processed == 6


def test_stored_rows_are_reused_and_no_setup_without_work(tmp_path, inputs):
    store = TableLayout(str(tmp_path))
    first, results, _ = run_all(Doubler(inputs), store)
    for shard, (tables, _) in results.items():
        first.keep(shard, tables)
    again = Doubler(inputs)
    run, results, failed = run_all(again, store)
    assert not failed
    assert again.setups == 0 and again.batches == []  # everything reused: no model loaded
    assert results["0002"][1]["computed"] == 0 and results["0002"][1]["images"] == 3
    # A replaced file (another size) is computed again; only it.
    changed = dict(inputs, **{"0003": frame([3]).assign(file_bytes=11)})
    third = Doubler(changed)
    _, results, _ = run_all(third, store)
    assert third.setups == 1 and results["0003"][1]["computed"] == 1 and results["0001"][1]["computed"] == 0


def test_failed_batch_fails_only_its_shards_and_the_others_are_kept(tmp_path, inputs):
    store = TableLayout(str(tmp_path))
    stage = Doubler(inputs, fail_ids={3})  # the second batch holds shards 0002 and 0003
    run, results, failed = run_all(stage, store)
    assert set(failed) == {"0002", "0003"} and set(results) == {"0001"}
    for shard, (tables, _) in results.items():
        run.keep(shard, tables)  # what the shard loop does when a range fails
    assert store.table_path("doubled", "0001").exists()
    assert not store.table_path("doubled", "0002").exists()


def test_a_damaged_previous_table_is_set_aside_and_recomputed(tmp_path, inputs):
    store = TableLayout(str(tmp_path))
    path = store.table_path("doubled", "0001")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")
    logged = []
    run = StageRun(Doubler(inputs), ["0001"], store, log=logged.append).plan().compute()
    assert len(run.set_aside) == 1 and any("could not be read" in line for line in logged)
    assert run.assemble("0001")[1]["computed"] == 2


def test_a_failed_plan_fails_only_that_shard(tmp_path, inputs):
    class Broken(Doubler):
        def candidates(self, shard):
            if shard == "0003":
                raise ValueError("index out of date")
            return super().candidates(shard)

    run, results, failed = run_all(Broken(inputs), TableLayout(str(tmp_path)))
    assert set(results) == {"0001", "0002"} and isinstance(failed["0003"], ValueError)
