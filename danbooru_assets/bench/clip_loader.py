"""Benchmark: the CLIP stage's image loader against a naive decode loop.

    python -m danbooru_assets.bench clip_loader --images 5000 --workdir /tmp/bench-clip

Generates (or reuses) the sample dataset with large images (512-1500 px sides, like
Danbooru originals), warms the page cache, then times on the same files, side by side:

- naive: ``Image.open(p).convert("RGB")`` + open_clip's preprocess, one image at a time,
  no statistics (broken files are skipped);
- ours: :func:`danbooru_assets.clip.loader.make_loader` (draft-mode JPEG decoding, worker
  processes, pixel statistics included, worker start-up included).

Both produce the same 224 px model input. The tiny demo model's encode of the loader's
batches is timed separately (it is not part of either figure). Target: ours >= 2x naive
on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from danbooru_assets.clip.model import ClipModel
from danbooru_assets.clip.loader import default_num_workers, make_loader, split_preprocess

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".psd"}


def sample_images(workdir: Path, n_images: int, min_side: int, max_side: int) -> tuple[list[Path], float]:
    """The sample generator's image files under ``workdir`` (generated unless reusable)."""
    from danbooru_assets.devtools.sample_data import generate_sample_dataset

    started = time.perf_counter()
    generate_sample_dataset(workdir, n_images=n_images, min_side=min_side, max_side=max_side)
    seconds = time.perf_counter() - started
    paths = sorted(
        p for p in (workdir / "original").glob("*/*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    return paths, seconds


def image_id_of(path: Path, fallback: int) -> int:
    return int(path.stem) if path.stem.isdigit() else fallback


def warm_cache(paths: list[Path]) -> int:
    """Read every file once so both loops measure decoding, not the disk."""
    total = 0
    for p in paths:
        total += len(p.read_bytes())
    return total


def run_naive(paths: list[Path], preprocess, torch_threads: int | None = None) -> tuple[int, int, float]:
    """(decoded, failed, seconds) for the one-image-at-a-time baseline.

    ``torch_threads=None`` keeps torch's default intra-op pool, as a plain script runs;
    ``1`` avoids the pool's overhead on the tiny per-image tensor ops (the stronger baseline).
    """
    from PIL import Image

    previous = torch.get_num_threads()
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    ok = failed = 0
    started = time.perf_counter()
    try:
        for p in paths:
            try:
                preprocess(Image.open(p).convert("RGB"))
                ok += 1
            except Exception:  # noqa: BLE001 - the baseline just skips broken files
                failed += 1
    finally:
        torch.set_num_threads(previous)
    return ok, failed, time.perf_counter() - started


def run_loader(
    paths: list[Path], preprocess, image_size: int, batch_size: int, workers: int, keep_images: int
) -> tuple[int, int, float, list[torch.Tensor]]:
    """(decoded, failed, seconds, first batches up to ``keep_images``) for our loader."""
    ids = [image_id_of(p, -1 - i) for i, p in enumerate(paths)]
    ok = failed = kept = 0
    kept_batches: list[torch.Tensor] = []
    started = time.perf_counter()
    # Exactly what clip.image_pass.embed_images_with_stats does: uint8 from the workers, batch
    # normalisation in the consumer (counted in this figure).
    worker_transform, normalize = split_preprocess(preprocess)
    loader = make_loader(
        paths, ids, worker_transform, batch_size=batch_size, num_workers=workers, target_short_side=image_size
    )
    for batch in loader:
        ok += len(batch.image_ids)
        failed += len(batch.failures)
        if len(batch.image_ids):
            pixels = normalize(batch.pixels)
            if kept < keep_images:
                kept_batches.append(pixels)
                kept += len(batch.image_ids)
    return ok, failed, time.perf_counter() - started, kept_batches


def time_encode(model: torch.nn.Module, batches: list[torch.Tensor]) -> tuple[int, float]:
    """(images, seconds) to encode ``batches`` with ``model`` on the CPU."""
    n = sum(len(b) for b in batches)
    started = time.perf_counter()
    with torch.inference_mode():
        for pixels in batches:
            model.encode_image(pixels)
    return n, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m danbooru_assets.bench clip_loader", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000, help="sample images to generate (default 5000)")
    parser.add_argument("--workdir", type=Path, default=Path("bench_out/clip_loader"))
    parser.add_argument("--min-side", type=int, default=512)
    parser.add_argument("--max-side", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=-1, help="loader workers (-1: min(4, cpus))")
    parser.add_argument("--encode-images", type=int, default=512,
                        help="images of the loader's batches to time the demo model's encode on")
    parser.add_argument("--json", type=Path, default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)

    workers = default_num_workers(args.workers)
    args.workdir.mkdir(parents=True, exist_ok=True)
    paths, gen_s = sample_images(args.workdir, args.images, args.min_side, args.max_side)
    if not paths:
        print(f"no images found under {args.workdir}")
        return 1
    nbytes = warm_cache(paths)
    print(f"{len(paths)} files ({nbytes / 2**20:,.0f} MiB) in {args.workdir}; generation/reuse took {gen_s:.1f} s")

    clip = ClipModel.demo()
    loaded = clip.load()
    preprocess = loaded.preprocess

    default_threads = torch.get_num_threads()
    n_ok, n_fail, naive_s = run_naive(paths, preprocess)
    naive_rate = n_ok / naive_s
    print(f"naive loop ({default_threads} torch threads): {n_ok} decoded + preprocessed, {n_fail} failed, "
          f"{naive_s:7.2f} s, {naive_rate:8.1f} img/s")
    n1_ok, _, naive1_s = run_naive(paths, preprocess, torch_threads=1)
    naive1_rate = n1_ok / naive1_s
    print(f"naive loop (1 torch thread) : {n1_ok} decoded + preprocessed, {naive1_s:7.2f} s, {naive1_rate:8.1f} img/s")

    l_ok, l_fail, loader_s, batches = run_loader(
        paths, preprocess, loaded.image_size, args.batch_size, workers, args.encode_images)
    loader_rate = l_ok / loader_s
    print(f"our loader : {l_ok} decoded + preprocessed + stats, {l_fail} failed, {loader_s:7.2f} s, "
          f"{loader_rate:8.1f} img/s ({workers} workers, batch {args.batch_size}, draft decoding)")
    ratio = loader_rate / naive_rate
    ratio1 = loader_rate / naive1_rate
    print(f"speed-up   : {ratio:.2f}x vs naive with default threads, {ratio1:.2f}x vs naive with 1 thread "
          f"(target >= 2x)")

    enc_n, enc_s = time_encode(loaded.model, batches)
    enc_rate = enc_n / enc_s if enc_s > 0 else 0.0
    print(f"tiny model encode (separate, {torch.get_num_threads()} threads): {enc_n} images, {enc_s:.2f} s, "
          f"{enc_rate:.1f} img/s")

    result = {
        "files": len(paths),
        "naive_images": n_ok,
        "naive_failed": n_fail,
        "naive_seconds": round(naive_s, 3),
        "naive_images_per_s": round(naive_rate, 1),
        "loader_images": l_ok,
        "loader_failed": l_fail,
        "loader_seconds": round(loader_s, 3),
        "loader_images_per_s": round(loader_rate, 1),
        "speedup": round(ratio, 2),
        "naive_1thread_seconds": round(naive1_s, 3),
        "naive_1thread_images_per_s": round(naive1_rate, 1),
        "speedup_vs_1thread": round(ratio1, 2),
        "torch_default_threads": default_threads,
        "encode_images": enc_n,
        "encode_images_per_s": round(enc_rate, 1),
        "workers": workers,
        "batch_size": args.batch_size,
        "cpu_count": os.cpu_count(),
        "min_side": args.min_side,
        "max_side": args.max_side,
        "generation_seconds": round(gen_s, 1),
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return 0
