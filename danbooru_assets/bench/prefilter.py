"""Benchmark: what the metadata prefilter saves the CLIP stage, side by side with it off.

    python -m danbooru_assets.bench prefilter --images 2000 --workdir /tmp/bench-prefilter

One shard of the sample generator's images at Danbooru sizes (512-1500 px) whose metadata
is replaced by posts drawn from a synthetic Danbooru-like tag distribution
(:data:`TAG_FRACTIONS`), materialized through the real assets, IO manager and an ephemeral
Dagster instance with the demo CLIP model (tiny, random weights) on the CPU, twice, each in
a fresh storage so nothing is reused: prefilter ``off`` and prefilter ``skip`` (the default
rules). Reported: the fraction of decodes saved, and the CLIP stage's throughput per INPUT
image (usable indexed images / (metadata_prefilter + clip_embeddings seconds)). A third
figure times the prefilter library alone over ``--rows`` synthetic rows.

The distribution (fractions of all posts; approximate Danbooru tag counts, 2024, over
~8.5 M posts, rounded — assumptions, not measurements): ``1girl`` 70 %, ``solo`` 58 %,
``1boy`` 16 %, ``multiple_girls`` 15 % (``2girls`` 9 %, ``3girls`` 2.5 %, ``4girls`` 1 %,
``5girls``/``6+girls`` 1 %), ``multiple_boys`` 4 % (``2boys`` 3 %), ``1boy 1girl``
(hetero pairs) 6 %, ``comic`` 6.5 % (of which ``4koma`` 15 %, monochrome 45 %, several
people 50 %), ``monochrome`` 6.5 % (``greyscale`` 80 % of it), ``no_humans`` 3.5 % (of
which ``scenery`` 15 %), ``chibi`` 2.5 %, ``multiple_views`` 2.5 %, ``character_sheet``
0.6 %, ``text-only_page`` 0.1 %; ``is_deleted`` 5 %, ``is_banned`` 0.5 %, score < 0 1 %;
ratings g 45 %, s 30 %, q 13 %, e 12 %.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

# Kinds of post, as fractions of all posts; tags per kind below. "single": one person,
# "multi": several, "comic": a manga page, "scenery": no person.
TAG_FRACTIONS = {
    "kind": {"single": 0.705, "multi": 0.190, "comic": 0.065, "no_humans": 0.035, "text_only": 0.001,
             "other": 0.004},
    "monochrome_single": 0.045,  # of single/multi posts
    "greyscale_given_monochrome": 0.8,
    "chibi": 0.025,
    "multiple_views": 0.025,
    "character_sheet": 0.006,
    "deleted": 0.05,
    "banned": 0.005,
    "negative_score": 0.01,
    "ratings": {"g": 0.45, "s": 0.30, "q": 0.13, "e": 0.12},
}


def synthetic_posts(ids, seed: int = 0) -> list[dict]:
    """API-form posts for ``ids`` drawn from :data:`TAG_FRACTIONS`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    kinds = list(TAG_FRACTIONS["kind"])
    p_kind = np.array([TAG_FRACTIONS["kind"][k] for k in kinds])
    ratings = list(TAG_FRACTIONS["ratings"])
    p_rating = np.array([TAG_FRACTIONS["ratings"][r] for r in ratings])
    posts = []
    for image_id in ids:
        kind = kinds[rng.choice(len(kinds), p=p_kind / p_kind.sum())]
        general: set[str] = set()
        if kind == "single":
            general |= {"1girl" if rng.random() < 0.85 else "1boy", "solo"}
        elif kind == "multi":
            u = rng.random()
            if u < 0.32:
                general |= {"1boy", "1girl"}
            elif u < 0.79:
                general |= {"2girls", "multiple_girls"}
            elif u < 0.85:
                general |= {"3girls", "multiple_girls"}
            elif u < 0.9:
                general |= {"4girls", "multiple_girls"}
            else:
                general |= {"2boys", "multiple_boys"}
        elif kind == "comic":
            general |= {"comic"} | ({"4koma"} if rng.random() < 0.15 else set())
            general |= {"monochrome", "greyscale"} if rng.random() < 0.45 else set()
            general |= {"2girls", "multiple_girls"} if rng.random() < 0.5 else {"1girl"}
        elif kind == "no_humans":
            general |= {"no_humans"} | ({"scenery"} if rng.random() < 0.15 else set())
        elif kind == "text_only":
            general |= {"text-only_page", "text_focus"}
        if kind in ("single", "multi") and rng.random() < TAG_FRACTIONS["monochrome_single"]:
            general.add("monochrome")
            if rng.random() < TAG_FRACTIONS["greyscale_given_monochrome"]:
                general.add("greyscale")
        for tag in ("chibi", "multiple_views", "character_sheet"):
            if kind in ("single", "multi") and rng.random() < TAG_FRACTIONS[tag]:
                general.add(tag)
        general |= {"long_hair", "smile"} if rng.random() < 0.5 else {"short_hair"}
        score = -int(rng.integers(1, 6)) if rng.random() < TAG_FRACTIONS["negative_score"] else int(rng.geometric(0.1))
        posts.append({
            "id": int(image_id),
            "rating": ratings[rng.choice(len(ratings), p=p_rating)],
            "score": score,
            "is_deleted": bool(rng.random() < TAG_FRACTIONS["deleted"]),
            "is_banned": bool(rng.random() < TAG_FRACTIONS["banned"]),
            "tag_string_general": " ".join(sorted(general)),
            "tag_string_character": "",
            "tag_string_copyright": "original",
            "tag_string_artist": "someone",
            "tag_string_meta": "highres",
        })
    return posts


def _run(root: Path, workdir: Path, mode: str, shard: str, clip) -> dict:
    from danbooru_assets.devtools.sandbox import Sandbox
    from danbooru_assets.settings import CurationSettings, save_settings, set_setting

    sandbox = Sandbox(root, Path(tempfile.mkdtemp(prefix=f"prefilter-{mode}-", dir=workdir)), clip_model=clip)
    save_settings(sandbox.settings_path, set_setting(CurationSettings(), "prefilter.mode", mode))
    sandbox.materialize(["danbooru_metadata"])
    sandbox.materialize(["shard_index"], shard)
    started = time.perf_counter()
    result = sandbox.materialize(["metadata_prefilter"], shard)
    t_prefilter = time.perf_counter() - started
    prefilter = sandbox.metadata(result, "metadata_prefilter")
    started = time.perf_counter()
    result = sandbox.materialize(["clip_embeddings", "image_stats"], shard)
    t_embed = time.perf_counter() - started
    clip_meta = sandbox.metadata(result, "clip_embeddings")
    inputs = int(prefilter["rows"])
    return {
        "mode": mode,
        "input_images": inputs,
        "decoded": int(clip_meta["encoded"]),
        "never_decoded": int(clip_meta["never_decoded_prefiltered"]),
        "metadata_prefilter_s": round(t_prefilter, 3),
        "clip_embeddings_s": round(t_embed, 2),
        "input_images_per_s": round(inputs / (t_prefilter + t_embed), 1),
        "decoded_images_per_s": round(int(clip_meta["encoded"]) / t_embed, 1),
    }


def library_rows_per_s(rows: int) -> float:
    """The prefilter library alone over ``rows`` synthetic index rows (default rules)."""
    import pandas as pd

    from danbooru_assets.dataset.prefilter import apply_prefilter
    from danbooru_assets.settings import PrefilterSettings

    posts = synthetic_posts(range(1, rows + 1), seed=1)
    index = pd.DataFrame({
        "image_id": [p["id"] for p in posts],
        "status": "ok",
        "ext": "jpg",
        "width": 1000,
        "height": 1400,
        "rating": [p["rating"] for p in posts],
        "score": [p["score"] for p in posts],
        "is_deleted": [p["is_deleted"] for p in posts],
        "is_banned": [p["is_banned"] for p in posts],
        **{f"tags_{c}": [p[f"tag_string_{c}"] for p in posts]
           for c in ("general", "character", "copyright", "artist", "meta")},
    })
    started = time.perf_counter()
    apply_prefilter(index, PrefilterSettings())
    return rows / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m danbooru_assets.bench prefilter", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rows", type=int, default=100_000, help="rows for the library-only timing")
    parser.add_argument("--workdir", type=Path, default=Path("bench_out/prefilter"))
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)

    from danbooru_assets.core.tables import atomic_write_text
    from danbooru_assets.dataset.layout import DatasetLayout
    from danbooru_assets.devtools.sample_data import METADATA_DIR, generate_sample_dataset
    from danbooru_assets.orchestration.resources import ClipModelResource

    args.workdir.mkdir(parents=True, exist_ok=True)
    root = args.workdir / "dataset"
    generate_sample_dataset(root, n_images=args.images, n_shards=1, min_side=512, max_side=1500)
    # The generator's own metadata replaced by the synthetic distribution's.
    shard = sorted(p.name for p in (root / "original").iterdir())[0]
    ids = DatasetLayout(root).scan_shard(shard).image_id
    posts = synthetic_posts(sorted(int(i) for i in ids if i >= 0))
    for old in (root / METADATA_DIR).iterdir():
        old.unlink()
    atomic_write_text(root / METADATA_DIR / "posts_synthetic.json", "".join(json.dumps(p) + "\n" for p in posts))

    clip = ClipModelResource.demo()
    clip.model().load()  # a once-per-process cost, not the stage's
    print(f"{len(posts)} images in shard {shard}, synthetic Danbooru-like metadata; demo CLIP model "
          f"(random weights) on the CPU; {os.cpu_count()} CPUs")
    figures = {mode: _run(root, args.workdir, mode, shard, clip) for mode in ("off", "skip")}
    off, skip = figures["off"], figures["skip"]
    saved = 1 - skip["decoded"] / off["decoded"] if off["decoded"] else 0.0
    figures["decodes_saved_fraction"] = round(saved, 4)
    figures["speedup_per_input_image"] = round(skip["input_images_per_s"] / off["input_images_per_s"], 2)
    figures["library_rows_per_s"] = round(library_rows_per_s(args.rows))
    print("| prefilter | input images | decoded | never decoded | prefilter s | clip_embeddings s | "
          "input images/s | decoded images/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in (off, skip):
        print(f"| {row['mode']} | {row['input_images']} | {row['decoded']} | {row['never_decoded']} | "
              f"{row['metadata_prefilter_s']} | {row['clip_embeddings_s']} | {row['input_images_per_s']} | "
              f"{row['decoded_images_per_s']} |")
    print(f"decodes saved: {saved:.1%}; CLIP stage per input image: {figures['speedup_per_input_image']}x; "
          f"prefilter library alone: {figures['library_rows_per_s']:,} rows/s over {args.rows:,} rows")
    if args.json:
        atomic_write_text(args.json, json.dumps(figures, indent=1))
    return 0
