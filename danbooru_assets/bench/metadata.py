"""Benchmark: the metadata stage over Danbooru2021-form lines, parsers side by side.

    python -m danbooru_assets.bench metadata --lines 1000000 --files 4 --workdir /tmp/bench-metadata

Writes (or reuses) ``--lines`` JSON lines, over ``--files`` posts files, in Danbooru2021's dump form (numbers as strings,
``tags`` as ~30 ``{id, name, category}`` objects, about 2 KB a line, a few planted quirks),
then, each in its own process (so each peak memory is its own):

- ``parse:<candidate>``: the file to the stored columns' values, by the standard ``json``
  module, ``orjson``, ``msgspec`` (typed, only the fields kept), pyarrow's JSON reader,
  polars and duckdb (the last three read the whole file as a table; whether they give the
  same rows as the reference is checked and printed);
- ``library:1`` and ``library``: :func:`~danbooru_assets.dataset.metadata.convert_metadata_to_shards`,
  the whole conversion, in one process and with its default (the files parsed by two
  worker processes);
- ``asset``: the ``danbooru_metadata`` asset through ``dagster.materialize`` (discovery,
  conversion, metadata), interleaved with the library call in one warmed-up process, best
  of two each, so the ratio is the asset's own cost (the peak is that process's).

Seconds and peak RSS are printed per row; ratios matter more than absolute figures on a
shared machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

GENERAL = [f"general_tag_{i}" for i in range(400)]
CHARACTERS = [f"character_{i}_(series)" for i in range(60)]


def synthetic_line(image_id: int, rng) -> str:
    """One Danbooru2021-form post (dump form) of about 2 KB."""
    n_tags = int(rng.integers(24, 36))
    picks = rng.choice(len(GENERAL), n_tags, replace=False)
    tags = [{"id": str(1000 + int(i)), "name": GENERAL[int(i)], "category": "0"} for i in picks]
    tags.append({"id": "7", "name": CHARACTERS[image_id % 60], "category": "4"})
    tags.append({"id": "8", "name": f"artist_{image_id % 97}", "category": "1"})
    tags.append({"id": "9", "name": "highres", "category": "5"})
    record = {
        "id": str(image_id), "created_at": "2021-03-04 05:06:07.123 UTC", "uploader_id": str(image_id % 5000),
        "score": str(int(rng.integers(-3, 60))), "source": f"https://i.pximg.net/img-original/img/{image_id}_p0.png",
        "md5": f"{image_id:032x}", "last_commented_at": "1970-01-01 00:00:00 UTC",
        "rating": "sqe"[int(rng.choice(3, p=[0.75, 0.18, 0.07]))],
        "image_width": str(int(rng.integers(400, 3000))), "image_height": str(int(rng.integers(400, 3000))),
        "is_note_locked": False, "file_ext": "jpg" if image_id % 5 else "png",
        "last_noted_at": "1970-01-01 00:00:00 UTC", "is_rating_locked": False,
        "parent_id": "0" if image_id % 11 else str(image_id - 1), "has_children": False, "approver_id": "0",
        "file_size": str(int(rng.integers(50_000, 5_000_000))), "is_status_locked": False,
        "up_score": "5", "down_score": "0", "is_pending": False, "is_flagged": False,
        "is_deleted": image_id % 40 == 0, "updated_at": "2021-05-06 07:08:09.123 UTC", "is_banned": False,
        "pixiv_id": str(image_id * 7), "tags": tags, "pools": [], "favs": [str(x) for x in range(int(rng.integers(0, 12)))],
    }
    return json.dumps(record, separators=(",", ":"))


def write_release(folder: Path, n: int, files: int, seed: int = 0, templates: int = 5000) -> list[Path]:
    """``n`` lines over ``files`` files ``posts000000000000.json`` …, as a release ships them:
    ``templates`` distinct posts drawn once, then repeated with their own id, md5 and parent
    (drawing 1M posts one by one takes longer than reading them)."""
    import numpy as np

    paths = [folder / f"posts{i:012d}.json" for i in range(files)]
    marker = folder.parent / "bench_metadata.params"  # outside metadata/: not a metadata file
    params = {"lines": n, "files": files, "seed": seed, "templates": templates, "version": 3}
    if all(p.exists() for p in paths) and marker.exists() and json.loads(marker.read_text()) == params:
        return paths
    if folder.exists():
        for old in folder.iterdir():
            old.unlink()
    rng = np.random.default_rng(seed)
    forms = []
    for t in range(min(templates, n)):
        line = synthetic_line(999_999_000 + t, rng)
        forms.append(line.replace(f'"{999_999_000 + t}"', '"{id}"', 1).replace(f"{999_999_000 + t:032x}", "{md5}"))
    folder.mkdir(parents=True, exist_ok=True)
    per_file = -(-n // files)
    for f, path in enumerate(paths):
        with open(path, "w") as out:
            for i in range(f * per_file, min(n, (f + 1) * per_file)):
                image_id = 100_000 + i
                if i % 100_000 == 50:
                    out.write('{"rating":"s","md5":"x"}\n')  # a row without an id
                    continue
                out.write(forms[i % len(forms)].replace("{id}", str(image_id), 1).replace("{md5}", f"{image_id:032x}", 1) + "\n")
    marker.write_text(json.dumps(params))
    return paths


# ---------------------------------------------------------------- candidates


def _reference_rows(paths: list[Path], loads) -> list[tuple]:
    """(id, rating, general tags) per line with the library's record normaliser."""
    from danbooru_assets.dataset.metadata import normalise_record

    out = []
    for path in paths:
        with open(path, "rb") as f:
            for raw in f:
                try:
                    row = normalise_record(loads(raw))
                except (KeyError, ValueError):
                    continue
                out.append((row["image_id"], row["rating"], row["tags_general"]))
    return out


def parse_json(paths: list[Path]):
    return _reference_rows(paths, json.loads)


def parse_orjson(paths: list[Path]):
    import orjson

    return _reference_rows(paths, orjson.loads)


def parse_msgspec(paths: list[Path]):
    from danbooru_assets.dataset.metadata import ParseReport, iter_metadata_records

    report = ParseReport()
    return [(r["image_id"], r["rating"], r["tags_general"]) for p in paths for r in iter_metadata_records(p, report)]


def _columnar_rows(ids, ratings, tag_lists) -> list[tuple]:
    """The engines' table rows in the reference's terms (what each would still need to do)."""
    from danbooru_assets.dataset.ratings import ERA_BEFORE_2022, rating_word

    rows = []
    for i, rating, tags in zip(ids, ratings, tag_lists):
        if i is None:
            continue
        general = " ".join(dict.fromkeys(t["name"] for t in tags if str(t["category"]) == "0"))
        rows.append((int(i), rating_word(rating, ERA_BEFORE_2022), general))
    return rows


def parse_pyarrow(paths: list[Path]):
    import pyarrow.json as pj

    rows = []
    for path in paths:
        table = pj.read_json(path)
        rows += _columnar_rows(table["id"].to_pylist(), table["rating"].to_pylist(), table["tags"].to_pylist())
    return rows


def parse_polars(paths: list[Path]):
    import polars as pl

    rows = []
    for path in paths:
        frame = pl.read_ndjson(path, infer_schema_length=None)
        rows += _columnar_rows(frame["id"].to_list(), frame["rating"].to_list(), frame["tags"].to_list())
    return rows


def parse_duckdb(paths: list[Path]):
    import duckdb

    con = duckdb.connect()
    con.execute("SET threads TO 2")
    rows = []
    for path in paths:
        rel = con.execute(
            "SELECT id, rating, tags FROM read_json_auto(?, format='newline_delimited', sample_size=-1)", [str(path)]
        )
        ids, ratings, tags = [], [], []
        for i, r, t in rel.fetchall():
            ids.append(i)
            ratings.append(r)
            tags.append(t or [])
        rows += _columnar_rows(ids, ratings, tags)
    return rows


CANDIDATES = {
    "json": parse_json, "orjson": parse_orjson, "msgspec": parse_msgspec,
    "pyarrow": parse_pyarrow, "polars": parse_polars, "duckdb": parse_duckdb,
}


def run_library(paths: list[Path], work: Path, workers: int | None = None) -> int:
    from danbooru_assets.dataset.metadata import convert_metadata_to_shards

    _, report = convert_metadata_to_shards(paths, work / "library_out", scratch_root=work / "scratch", workers=workers)
    return report.records


def run_asset(root: Path, work: Path) -> int:
    import dagster as dg

    from danbooru_assets.orchestration.assets.index import danbooru_metadata
    from danbooru_assets.orchestration.io_manager import ParquetIOManagerFactory
    from danbooru_assets.orchestration.resources import DanbooruDatasetResource, StorageResource

    storage = StorageResource(base_path=str(work / "asset_storage"))
    result = dg.materialize(
        [danbooru_metadata],
        resources={
            "dataset": DanbooruDatasetResource(root=str(root), image_folder="original"),
            "storage": storage,
            "io_manager": ParquetIOManagerFactory(storage=storage),
        },
        instance=dg.DagsterInstance.ephemeral(),
    )
    return int(result.asset_materializations_for_node("danbooru_metadata")[0].metadata["records"].value)


def _warm_up(child: str, work: Path) -> None:
    """One run on a ten-line tree first: both rows are then timed warm (modules imported,
    Dagster's first-run set-up done), so their ratio is the cost of the asset itself."""
    root = work / "warm" / "root"
    paths = write_release(root / "metadata", 10, 1)
    (root / "original").mkdir(exist_ok=True)
    if child.startswith("library"):
        run_library(paths, work / "warm")
    else:
        run_asset(root, work / "warm")


def _child(args: argparse.Namespace) -> int:
    """One measurement in this process: prints a JSON line with seconds and peak RSS."""
    work = Path(args.workdir)
    paths = sorted((work / "root" / "metadata").glob("posts*.json"))
    if args.child in ("library", "library:1", "asset"):  # imports before the clock: the call is measured, not start-up
        import dagster  # noqa: F401

        import danbooru_assets.dataset.metadata  # noqa: F401
        import danbooru_assets.orchestration.assets.index  # noqa: F401
        _warm_up(args.child, work)
    started = time.perf_counter()
    error = ""
    digest = None
    count = 0
    extra: dict = {}
    try:
        if args.child == "library":
            count = run_library(paths, work)
        elif args.child == "library:1":  # the same, in one process
            count = run_library(paths, work, workers=1)
        elif args.child == "asset":
            # Interleaved with the library call in this one process, best of two each: the
            # ratio is then the asset's own cost, not which process warmed up first.
            times = {"library": [], "asset": []}
            for _ in range(2):
                t = time.perf_counter()
                run_library(paths, work)
                times["library"].append(time.perf_counter() - t)
                t = time.perf_counter()
                count = run_asset(work / "root", work)
                times["asset"].append(time.perf_counter() - t)
            extra = {"library_same_process": min(times["library"]), "asset_best": min(times["asset"])}
        else:
            rows = CANDIDATES[args.child.removeprefix("parse:")](paths)
            count = len(rows)
            digest = hashlib.sha256(repr(rows).encode()).hexdigest()[:16]  # str hash() differs per process
    except ImportError as exc:  # orjson, polars, duckdb are measured when installed, never required
        error = f"not installed ({exc.name})"
    except Exception as exc:  # a candidate that cannot read the file: reported, not fatal
        error = f"{type(exc).__name__}: {str(exc)[:160]}"
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if extra:
        seconds = extra["asset_best"]
    print(json.dumps({"name": args.child, "seconds": seconds, "peak_mb": peak_mb, "rows": count,
                      "digest": digest, "error": error, **extra}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m danbooru_assets.bench metadata", description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--files", type=int, default=4, help="posts files the lines are spread over (a release ships several)")
    parser.add_argument("--workdir", default="/tmp/bench-metadata")
    parser.add_argument("--only", default="", help="comma-separated rows to run (parse:json,...,library,asset)")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args)
    work = Path(args.workdir)
    t0 = time.perf_counter()
    paths = write_release(work / "root" / "metadata", args.lines, args.files)
    (work / "root" / "original").mkdir(exist_ok=True)
    size_mb = sum(p.stat().st_size for p in paths) / 1e6
    print(f"{args.lines:,} lines in {args.files} files, {size_mb:,.0f} MB ({size_mb * 1e6 / args.lines:,.0f} B a line), "
          f"ready in {time.perf_counter() - t0:.1f} s; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    rows = [f"parse:{c}" for c in CANDIDATES] + ["library:1", "library", "asset"]
    if args.only:
        rows = [r for r in rows if r in args.only.split(",")]
    results = {}
    for name in rows:
        out = subprocess.run(
            [sys.executable, "-m", "danbooru_assets.bench", "metadata", "--workdir", str(work), "--child", name],
            capture_output=True, text=True,
        )
        line = next((l for l in reversed(out.stdout.splitlines()) if l.startswith("{")), None)
        if line is None:
            print(f"{name:16s} failed: {out.stderr.strip().splitlines()[-1:] if out.stderr else out.returncode}")
            continue
        r = json.loads(line)
        results[name] = r
    reference = results.get("parse:json", {}).get("digest")
    print(f"{'row':16s} {'seconds':>8s} {'lines/s':>9s} {'peak MB':>8s}  same rows as json")
    for name, r in results.items():
        same = "" if r["digest"] is None or reference is None else ("yes" if r["digest"] == reference else "NO")
        rate = args.lines / r["seconds"] if r["seconds"] else 0
        note = f"  ({r['error']})" if r["error"] else ""
        print(f"{name:16s} {r['seconds']:8.2f} {rate:9,.0f} {r['peak_mb']:8.0f}  {same}{note}")
    if "asset" in results and "library_same_process" in results["asset"]:
        r = results["asset"]
        print(f"asset / library, interleaved in one process (best of 2 each): {r['asset_best']:.2f} s / "
              f"{r['library_same_process']:.2f} s = {r['asset_best'] / r['library_same_process']:.2f}x")
    return 0
