"""Benchmark: the CLIP stage's two speeds on one large shard.

    python -m danbooru_assets.bench clip_stage --images 5000 --workdir /tmp/bench-clip-stage

One shard of the sample generator's images at Danbooru sizes (512-1500 px), materialized
through the real assets, IO manager and an ephemeral Dagster instance, timed side by side:

1. ``clip_embeddings``+``image_stats`` from scratch (decode + encode every image);
2. ``prompt_embeddings`` + ``clip_scores`` after a prompt change (stored embeddings
   only): target >= 50x faster;
3. ``clip_subset`` after a threshold change: target < 1 s for the shard.

Wall times are whole materializations (Dagster's per-run overhead included). Without
``--model`` the demo model (tiny, random weights) encodes: that measures the decode-bound
pipeline; ``--model ViT-B-32 --pretrained PATH`` measures a real model.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

NEW_PROMPTS = {
    "positive_prompts": ["a full-body illustration of one anime character standing"],
    "negative_prompts": ["a manga page with panels", "a photograph of a landscape", "a page of text"],
}


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m danbooru_assets.bench clip_stage", description=__doc__)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--workdir", type=Path, default=Path("bench_out/clip_stage"))
    parser.add_argument("--model", default=None, help="open_clip model name (default: the demo model)")
    parser.add_argument("--pretrained", default="", help="hub tag or local checkpoint for --model")
    parser.add_argument("--random-weights", action="store_true",
                        help="random weights for --model (GPU throughput on a machine with no internet)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)

    from danbooru_assets.orchestration.resources import ClipModelResource
    from danbooru_assets.devtools.sample_data import generate_sample_dataset
    from danbooru_assets.devtools.sandbox import Sandbox

    root = args.workdir / "dataset"
    t_gen = timed(lambda: generate_sample_dataset(root, n_images=args.images, n_shards=1, min_side=512, max_side=1500))
    clip = (
        ClipModelResource(model_name=args.model, pretrained="" if args.random_weights else args.pretrained,
                          allow_random_weights=args.random_weights, device=args.device)
        if args.model
        else ClipModelResource.demo()
    ).model_copy(update={"batch_size": args.batch_size})
    sandbox = Sandbox(root, Path(tempfile.mkdtemp(prefix="clip-stage-", dir=args.workdir)), clip_model=clip)
    shard = sorted(p.name for p in (root / "original").iterdir())[0]
    print(f"{args.images} images in shard {shard} ({t_gen:.1f}s to generate or reuse); model {clip.model_name} "
          f"{'(demo, random weights)' if clip.model().is_demo() else clip.pretrained}; {os.cpu_count()} CPUs")
    sandbox.materialize(["danbooru_metadata", "prompt_embeddings"])
    # Every image encoded, as before the prefilter existed: this measures the encoder (the
    # prefilter's savings: `python -m danbooru_assets.bench prefilter`).
    from danbooru_assets.settings import CurationSettings, save_settings, set_setting

    save_settings(sandbox.settings_path, set_setting(CurationSettings(), "prefilter.mode", "off"))
    sandbox.materialize(["shard_index", "metadata_prefilter"], shard)
    clip.model().load()  # model loading is a once-per-process cost, not per shard

    t_embed = timed(lambda: sandbox.materialize(["clip_embeddings", "image_stats"], shard))
    n = len(sandbox.table("clip_embeddings", shard))
    sandbox.materialize(["clip_scores"], shard)
    # A prompt change: the prompts' text embeddings once, then numpy over stored embeddings.
    t_scores = timed(
        lambda: (
            sandbox.materialize(["prompt_embeddings"], run_config={"ops": {"prompt_embeddings": {"config": NEW_PROMPTS}}}),
            sandbox.materialize(["clip_scores"], shard),
        )
    )
    sandbox.materialize(["clip_threshold"])
    sandbox.materialize(["clip_subset"], shard)
    sandbox.materialize(["clip_threshold"], run_config={"ops": {"clip_threshold": {"config": {"keep_fraction": 0.3}}}})
    t_subset = timed(lambda: sandbox.materialize(["clip_subset"], shard))
    kept = int(sandbox.table("clip_subset", shard)["kept"].sum())

    figures = {
        "images": n,
        "model": clip.model_name,
        "clip_embeddings_s": round(t_embed, 2),
        "clip_embeddings_images_per_s": round(n / t_embed, 1),
        "clip_scores_after_prompt_change_s": round(t_scores, 3),
        "prompt_change_speedup": round(t_embed / t_scores, 1),
        "clip_subset_after_threshold_change_s": round(t_subset, 3),
        "clip_subset_kept": kept,
    }
    print(f"1. clip_embeddings+image_stats (decode+encode): {t_embed:8.2f} s  ({n / t_embed:.1f} img/s)")
    print(f"2. clip_scores after a prompt change          : {t_scores:8.3f} s  -> {figures['prompt_change_speedup']}x faster (target >= 50x)")
    print(f"3. clip_subset after a threshold change       : {t_subset:8.3f} s  (target < 1 s; kept {kept})")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0
