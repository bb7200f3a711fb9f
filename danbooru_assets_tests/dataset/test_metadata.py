import gzip
import json
import lzma
import os
import signal
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from danbooru_assets.dataset.layout import DatasetLayout
from danbooru_assets.dataset.metadata import (
    METADATA_COLUMNS,
    ParseReport,
    convert_metadata_to_shards,
    default_scratch_root,
    iter_metadata_records,
    normalise_record,
    remove_stale_scratch,
    strict_int,
)
from danbooru_assets_tests.conftest import API_RECORDS, DUMP_RECORDS


def test_api_form_is_normalised():
    row = normalise_record(API_RECORDS[0])
    assert row["image_id"] == 1001
    assert (row["rating"], row["rating_raw"], row["rating_era"]) == ("general", "g", "since_2022")
    assert row["tags_general"] == "1girl solo"
    assert row["tags_character"] == "hatsune_miku"
    assert row["tags_copyright"] == "vocaloid"
    assert row["meta_width"] == 400 and row["meta_height"] == 300
    assert row["metadata_format"] == "api"


def test_dump_form_tags_are_split_by_category_and_numbers_parsed():
    row = normalise_record(DUMP_RECORDS[0])
    assert row["image_id"] == 4002 and row["score"] == 7 and row["meta_width"] == 64
    assert row["tags_general"] == "1girl"
    assert row["tags_artist"] == "artist_x"
    assert row["tags_copyright"] == "touhou"
    assert row["tags_character"] == "hakurei_reimu"
    assert (row["rating"], row["rating_raw"], row["rating_era"]) == ("safe", "s", "before_2022")
    assert row["metadata_format"] == "dump"


def test_unknown_rating_becomes_missing_and_is_counted():
    notes: list[str] = []
    assert normalise_record({"id": 5, "rating": "x"}, notes)["rating"] is None
    assert notes == ['rating "x" is not a rating of the since 2022 era (g, s, q, e); stored as null']
    assert normalise_record({"id": 5, "rating": "explicit"})["rating"] == "explicit"
    notes = []
    row = normalise_record({"id": "5", "rating": "g", "tags": []}, notes)  # no "g" before 2022
    assert row["rating"] is None and row["rating_raw"] == "g" and "before 2022 era (s, q, e)" in notes[0]


def test_bad_line_is_reported_with_file_and_line(mini_dataset: Path):
    report = ParseReport()
    rows = list(iter_metadata_records(mini_dataset / "metadata" / "posts000000000000.json", report))
    assert [r["image_id"] for r in rows] == [1001, 1002, 3002, 9001]
    assert len(report.problems) == 1
    assert str(report.problems[0]).startswith("posts000000000000.json:3: not JSON")


def test_conversion_splits_by_shard_and_removes_stale_shards(mini_dataset: Path, tmp_path: Path):
    out = tmp_path / "meta_shards"
    out.mkdir()
    (out / "0999.parquet").write_bytes(b"stale")
    files = sorted((mini_dataset / "metadata").iterdir())
    summary, report = convert_metadata_to_shards(files, out, chunk_rows=2)  # several chunks
    assert dict(zip(summary["shard"], summary["rows"])) == {"0001": 2, "0002": 4}
    assert sorted(p.name for p in out.iterdir()) == ["0001.parquet", "0002.parquet"]
    shard2 = pd.read_parquet(out / "0002.parquet")
    assert list(shard2.columns) == METADATA_COLUMNS
    assert shard2["image_id"].tolist() == [1002, 3002, 4002, 6002]
    assert report.records == 6 and len(report.problems) == 1


def _write_lines(path: Path, lines: list[str]) -> Path:
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def _post(image_id, **fields) -> str:
    return json.dumps({"id": image_id, "rating": "s", "image_width": 10, "image_height": 20, **fields})


@pytest.mark.parametrize(
    "raw_id, reason",
    [
        ("1e20", "id 1e+20 is not an integer"),
        ("5042.9", "id 5042.9 is not an integer"),
        ("5042.0", "id 5042.0 is not an integer"),
        ("true", "id true is not an integer"),
        ('"\u0664\u0662"', 'id "\u0664\u0662" is not an integer (ASCII digits)'),
        ('" 42"', 'id " 42" is not an integer (ASCII digits)'),
        ('"4_2"', 'id "4_2" is not an integer (ASCII digits)'),
        ("-958", "id -958 is out of range (1 to 2**63-1)"),
        ('"-958"', 'id "-958" is not an integer (ASCII digits)'),
        ("0", "id 0 is out of range"),
        (str(2**63), f"id {2**63} is out of range"),
        ('"99999999999999999999999"', "is out of range"),
        ("null", "id null is not an integer"),
        ('["42"]', "id an array is not an integer"),
    ],
)
def test_an_id_that_is_not_a_positive_int64_rejects_the_line(raw_id: str, reason: str):
    with pytest.raises(ValueError) as exc:
        normalise_record(json.loads(f'{{"id": {raw_id}, "rating": "s"}}'))
    assert reason in str(exc.value)


def test_ids_accepted_are_json_integers_and_ascii_digit_strings():
    assert normalise_record({"id": 42})["image_id"] == 42
    assert normalise_record({"id": "42"})["image_id"] == 42  # older dumps quote numbers
    assert normalise_record({"id": 2**63 - 1})["image_id"] == 2**63 - 1
    assert strict_int("-7", -(2**63 - 1), "score") == -7


def test_bad_ids_are_skipped_by_file_and_line_and_the_rest_converts(tmp_path: Path):
    meta = tmp_path / "metadata"
    meta.mkdir()
    posts = _write_lines(
        meta / "posts.json",
        [_post(11), _post(1e20), _post(5042.9), _post(True), _post("\u0664\u0662"), _post(-958), "[1, 2]", _post(12)],
    )
    summary, report = convert_metadata_to_shards([posts], tmp_path / "meta_shards")
    assert [str(p) for p in report.problems] == [
        "posts.json:2: unusable record (id 1e+20 is not an integer)",
        "posts.json:3: unusable record (id 5042.9 is not an integer)",
        "posts.json:4: unusable record (id true is not an integer)",
        'posts.json:5: unusable record (id "\u0664\u0662" is not an integer (ASCII digits))',
        "posts.json:6: unusable record (id -958 is out of range (1 to 2**63-1))",
        "posts.json:7: unusable record (a JSON array, not an object (JSON-lines expected: one post per line))",
    ]
    assert (report.lines, report.records, report.bad_lines) == (8, 2, 6)
    stored = pd.concat([pd.read_parquet(tmp_path / "meta_shards" / f"{s}.parquet") for s in summary["shard"]])
    assert sorted(stored["image_id"]) == [11, 12]


def test_bad_non_id_values_become_null_and_are_reported(tmp_path: Path):
    posts = _write_lines(
        tmp_path / "posts.json",
        [
            _post(1, image_width=5042.9, image_height=True, score="\u0664\u0662", md5=123),
            _post(2, image_width=-5, image_height="64", score="-3", is_deleted="maybe", tag_string_general=["x"]),
            _post(3, image_width=0, image_height=1e20, score=7.0, is_deleted="false", tag_string_general="solo"),
        ],
    )
    report = ParseReport()
    rows = {r["image_id"]: r for r in iter_metadata_records(posts, report)}
    assert report.bad_lines == 0 and sorted(rows) == [1, 2, 3]  # the lines are kept
    assert [(r["meta_width"], r["meta_height"], r["score"]) for r in rows.values()] == [
        (None, None, None),
        (None, 64, -3),  # a quoted number (dump form) is still read
        (None, None, None),
    ]
    assert rows[1]["md5"] is None and rows[2]["is_deleted"] is None and rows[3]["is_deleted"] is False
    assert rows[2]["tags_general"] == "" and rows[3]["tags_general"] == "solo"
    shown = [str(p) for p in report.value_problems]
    assert report.bad_values == len(shown) == 10
    assert "posts.json:1: image_width 5042.9 is not an integer; stored as null" in shown
    assert "posts.json:1: image_height true is not an integer; stored as null" in shown
    assert "posts.json:2: image_width -5 is out of range (1 to 2**63-1); stored as null" in shown
    assert "posts.json:3: score 7.0 is not an integer; stored as null" in shown
    # and the values survive the Parquet conversion as nulls, not as an error
    summary, _ = convert_metadata_to_shards([posts], tmp_path / "meta_shards")
    assert summary["rows"].sum() == 3


def test_duplicate_ids_are_counted_and_the_last_line_wins(tmp_path: Path):
    meta = tmp_path / "metadata"
    meta.mkdir()
    first = _write_lines(meta / "a.json", [_post(5, image_width=400, image_height=300), _post(7), _post(7, score=9)])
    second = _write_lines(meta / "b.json", [_post(8), _post(5, image_width=800, image_height=600)])
    out = tmp_path / "meta_shards"
    summary, report = convert_metadata_to_shards([first, second], out, chunk_rows=1)  # one line per chunk
    assert report.duplicates == 2
    assert "id 5: a.json:1 (400×300) superseded by b.json:2 (800×600)" in report.duplicate_examples
    assert "id 7: a.json:2 (10×20) superseded by a.json:3 (10×20)" in report.duplicate_examples
    stored = pd.concat([pd.read_parquet(out / f"{s}.parquet") for s in summary["shard"]]).set_index("image_id")
    assert list(stored.columns) == METADATA_COLUMNS[1:]  # no bookkeeping columns stored
    assert (stored.loc[5, "meta_width"], stored.loc[5, "meta_height"]) == (800, 600)
    assert stored.loc[7, "score"] == 9 and len(stored) == 3


def test_compressed_metadata_is_read_by_content_and_other_files_are_listed_as_unknown(tmp_path: Path):
    root = tmp_path / "danbooru"
    meta = root / "metadata"
    (meta / "old").mkdir(parents=True)
    _write_lines(meta / "posts.json.gz", [_post(1), _post(2)])
    _write_lines(meta / "more.jsonl.gz", [_post(3)])
    _write_lines(meta / "plain.jsonl", [_post(4)])
    (meta / "gzip_without_gz.json").write_bytes(gzip.compress(_post(5).encode()))  # misnamed: read by content
    (meta / "old" / "posts.json.xz").write_bytes(lzma.compress(_post(6).encode()))  # sub-folders are searched
    (meta / "posts.json.gz.part").write_bytes(b"partial download")
    (meta / "._posts.json").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (meta / "README.txt").write_text("notes")
    layout = DatasetLayout(root)
    files = layout.metadata_files()
    assert [p.name for p in files] == ["gzip_without_gz.json", "more.jsonl.gz", "posts.json.xz", "plain.jsonl", "posts.json.gz"]
    unknown = [(f.name, f.why) for f in layout.discover_metadata() if f.kind == "unknown"]
    assert unknown == [
        ("._posts.json", "a hidden file"),
        ("README.txt", "no JSON object in its first 1 line(s) (JSON lines expected)"),
        ("posts.json.gz.part", "no JSON object in its first 1 line(s) (JSON lines expected)"),
    ]
    names = [f.name for f in layout.discover_metadata() if f.kind == "posts"]
    summary, report = convert_metadata_to_shards(files, tmp_path / "meta_shards", names=names)
    assert report.records == 6 and report.bad_lines == 0
    assert [(f.name, f.compression, f.records) for f in report.files] == [
        ("gzip_without_gz.json", "gzip", 1),
        ("more.jsonl.gz", "gzip", 1),
        ("old/posts.json.xz", "xz", 1),
        ("plain.jsonl", "", 1),
        ("posts.json.gz", "gzip", 2),
    ]


def test_a_cut_short_gzip_keeps_its_first_lines_and_reports_the_rest(tmp_path: Path):
    whole = gzip.compress(("\n".join(_post(i) for i in range(1, 2001)) + "\n").encode())
    cut = tmp_path / "posts.json.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    report = ParseReport()
    rows = list(iter_metadata_records(cut, report))
    assert 0 < len(rows) < 2000
    assert report.bad_lines == 1
    assert str(report.problems[0]).startswith(f"posts.json.gz:{len(rows) + 1}: file unreadable from here")
    assert "the rest of the file is not read" in report.files[0].error


def _scratch_holder(root: Path) -> subprocess.Popen:
    """A process that takes a scratch folder under ``root`` and waits (to be killed)."""
    code = (
        "import sys, pathlib\n"
        "from danbooru_assets.dataset.metadata import run_scratch\n"
        "with run_scratch(pathlib.Path(sys.argv[1])) as folder:\n"
        "    print(folder, flush=True)\n"
        "    sys.stdin.read()\n"  # until killed (or stdin closes)
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


@pytest.mark.skipif(os.name != "posix", reason="kill -9 and flock are POSIX")
def test_scratch_of_a_killed_run_is_removed_by_the_next_and_a_live_runs_is_kept(mini_dataset: Path, tmp_path: Path):
    out = tmp_path / "storage" / "meta_shards"
    root = default_scratch_root(out)
    assert root == tmp_path / "storage" / ".scratch" / "meta_shards"  # under storage, not /tmp
    killed, live = _scratch_holder(root), _scratch_holder(root)
    try:
        killed_folder = Path(killed.stdout.readline().strip())
        live_folder = Path(live.stdout.readline().strip())
        (killed_folder / "chunk-00000.arrow").write_bytes(b"x" * 1000)
        assert remove_stale_scratch(root) == []  # both alive: nothing removed
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        assert killed_folder.is_dir()  # a kill -9 leaves it behind
        files = sorted((mini_dataset / "metadata").iterdir())
        _, report = convert_metadata_to_shards(files, out)
        assert report.records == 6
        assert not killed_folder.exists()
        assert live_folder.is_dir()
        assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [live_folder.name]  # ours went too
    finally:
        for proc in (killed, live):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdin.close()
            proc.stdout.close()


def test_materialization_lists_files_bad_lines_values_and_duplicates(tmp_path: Path):
    from danbooru_assets.orchestration.assets.index import danbooru_metadata
    from danbooru_assets.orchestration.io_manager import ParquetIOManagerFactory
    from danbooru_assets.orchestration.resources import DanbooruDatasetResource, StorageResource

    root = tmp_path / "danbooru"
    meta = root / "metadata"
    meta.mkdir(parents=True)
    _write_lines(meta / "posts.json.gz", [_post(1), _post(1e20), _post(2, image_width=5042.9), _post(1)])
    (meta / "notes.txt").write_text("x")
    storage = StorageResource(base_path=str(tmp_path / "storage"))
    result = dg.materialize(
        [danbooru_metadata],
        resources={
            "dataset": DanbooruDatasetResource(root=str(root)),
            "storage": storage,
            "io_manager": ParquetIOManagerFactory(storage=storage),
        },
    )
    md = {k: getattr(v, "value", v) for k, v in result.asset_materializations_for_node("danbooru_metadata")[0].metadata.items()}
    assert md["files"] == (  # its posts are rated "s" and never "g": a pre-2022 export
        "- `posts.json.gz (gzip): 4 lines, 3 records; API form without any 'g' rating: ratings read as before 2022 (s = safe)`"
    )
    assert md["ignored_files"].startswith("- `notes.txt`: no JSON object")
    assert (md["lines"], md["records"], md["bad_lines"], md["bad_values"], md["duplicate_ids"]) == (4, 3, 1, 1, 1)
    assert "posts.json.gz:2: unusable record (id 1e+20 is not an integer)" in md["bad_line_examples"]
    assert "posts.json.gz:3: image_width 5042.9 is not an integer; stored as null" in md["bad_value_examples"]
    assert "id 1: posts.json.gz:1 (10×20) superseded by posts.json.gz:4 (10×20)" in md["duplicate_id_examples"]


def test_parent_and_children_fields_of_both_forms():
    from danbooru_assets.dataset.metadata import normalise_record

    assert normalise_record({"id": 5, "parent_id": 3, "has_children": False})["parent_id"] == 3
    dump = normalise_record({"id": "5", "parent_id": "0", "has_children": True, "tags": []})
    assert dump["parent_id"] is None and dump["has_children"] is True  # "0": no parent
    problems: list[str] = []
    bad = normalise_record({"id": 6, "parent_id": 2.5, "has_children": "perhaps"}, problems)
    assert bad["parent_id"] is None and bad["has_children"] is None
    assert [p.split()[0] for p in problems] == ["parent_id", "has_children"]


def _fixture_lines() -> list[bytes]:
    from danbooru_assets_tests.dataset.releases import danbooru2021_posts, live_api_posts

    quirks = [
        '{"id": 5042.9, "rating": "s"}', '{"id": true}', '{"id": "0042"}', '{"id": " 42"}', '{"id": -3}',
        '{"id": 100000000000000000000}', '{"id": "9223372036854775807", "rating": "s"}',
        '{"id": 1, "score": "-4", "image_width": "0", "rating": "S"}', '{"id": 1, "rating": 5}',
        '{"id": 1, "is_deleted": "false", "is_banned": 1, "has_children": "t"}',
        '{"id": 1, "tags": [{"name": "a", "category": "9"}, {"name": 3, "category": 0}, "bare"]}',
        '{"id": 1, "tags": [{"name": "a", "category": ""}]}', '{"id": 1, "tags": "a b"}',
        '{"id": 1, "tag_string": "x  y x", "md5": 5, "file_ext": ""}', '[1, 2]', '"text"', '{"id": 1,',
        '{"id": 1, "tag_string_general": ["a"]}', '{"id": 1, "parent_id": "0", "created_at": 7}',
        '{"id": 1, "id": "2", "rating": "g"}',
    ]
    lines = [json.dumps(r) for r in API_RECORDS + DUMP_RECORDS] + danbooru2021_posts() + live_api_posts() + quirks
    return [line.encode() + b"\n" for line in lines]


def test_the_fast_path_gives_the_reference_rows_or_leaves_the_line_to_it():
    """``fast_row`` either returns exactly what :func:`normalise_record` gives for a line
    without a note, or declines; and declines whenever the reference has something to say."""
    import msgspec

    from danbooru_assets.dataset.metadata import fast_row

    taken = 0
    for raw in _fixture_lines():
        notes: list[str] = []
        try:
            reference = normalise_record(json.loads(raw), notes)
        except Exception:
            reference = None
        try:
            fast = fast_row(raw)
        except Exception as exc:
            assert isinstance(exc, msgspec.MsgspecError) or type(exc).__name__ == "_Unsure", raw
            continue
        assert reference is not None and not notes, raw
        assert fast == reference, raw
        taken += 1
    assert taken >= 12  # the clean lines of every release form do take the fast path


def test_files_parsed_by_two_worker_processes_give_the_same_tables_and_report(tmp_path: Path):
    """Files are the unit of parallel work; merged in file order, a repeated id still keeps
    the later file's line, and every count and example is the single-process one."""
    meta = tmp_path / "metadata"
    meta.mkdir()
    _write_lines(meta / "a.json", [_post(1, image_width=1), _post(2), "{broken", _post(1003, rating="x")])
    _write_lines(meta / "b.json.gz", [_post(1, image_width=2), _post(5, image_width=5042.9)])
    _write_lines(meta / "c.jsonl", [_post(2, image_width=3), '{"rating": "s"}'])
    files = sorted(p for p in meta.iterdir())
    results = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        summary, report = convert_metadata_to_shards(files, out, workers=workers, scratch_root=tmp_path / "scratch")
        tables = {p.name: pd.read_parquet(p) for p in sorted(out.glob("*.parquet"))}
        results[workers] = (summary, report, tables)
    (s1, r1, t1), (s2, r2, t2) = results[1], results[2]
    assert s1.equals(s2) and t1.keys() == t2.keys()
    for name in t1:
        pd.testing.assert_frame_equal(t1[name], t2[name])
    assert [str(p) for p in r1.problems] == [str(p) for p in r2.problems] == [
        "a.json:3: not JSON (Expecting property name enclosed in double quotes)",
        "c.jsonl:2: unusable record (no 'id' field)",
    ]
    assert [str(p) for p in r1.value_problems] == [str(p) for p in r2.value_problems]
    assert (r1.duplicates, r1.duplicate_examples) == (r2.duplicates, r2.duplicate_examples) == (
        2, ["id 1: a.json:1 (1×20) superseded by b.json.gz:1 (2×20)", "id 2: a.json:2 (10×20) superseded by c.jsonl:1 (3×20)"]
    )
    assert [str(f) for f in r1.files] == [str(f) for f in r2.files]
