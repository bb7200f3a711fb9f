"""One decode pass over a shard's images: CLIP input tensors and image statistics.

Each image is read and decoded once (:func:`danbooru_assets.core.images.open_image_rgb`, the
project's one decode and its rules), in a DataLoader worker; the statistics of
:mod:`danbooru_assets.clip.image_stats` are computed on a <= 256 px copy of the decoded
image, and the model's preprocessing turns it into a tensor. The same small copy gives the perceptual
hash, and the file's bytes their hash (:mod:`danbooru_assets.dedup.hashes`). Batches span files (the
sampler runs over the whole shard), the number of batches in flight is bounded
(``num_workers * prefetch_factor``) so memory stays flat however many images a run covers,
and a file that cannot be decoded becomes a ``"unreadable: <reason>"`` (or
``"too_large: <reason>"``) status row instead of an exception.

torch is imported only where tensors are made.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence

import numpy as np
from PIL import Image

from danbooru_assets.clip.image_stats import STATS_COLUMNS, compute_image_stats
from danbooru_assets.config import DEFAULT_MAX_PIXELS
from danbooru_assets.core.images import ImageDecodeError, open_image_rgb
from danbooru_assets.dedup.hashes import image_hashes

if TYPE_CHECKING:
    import torch
    from torch.utils.data import DataLoader

logger = logging.getLogger(__name__)

# Statistics are computed on a copy no larger than this (longest side): they are coarse
# measures and 256 px keeps them well under a millisecond.
STATS_MAX_SIDE = 256
def stats_array(img: Image.Image, max_side: int = STATS_MAX_SIDE) -> np.ndarray:
    """A ``uint8`` HxWx3 copy of ``img`` with its longest side at most ``max_side``."""
    longest = max(img.size)
    if longest > max_side:
        # Integer box reduction: several times cheaper than a resampling filter and a
        # proper average, which is all coarse statistics need.
        img = img.reduce(math.ceil(longest / max_side))
    return np.asarray(img, dtype=np.uint8)


class ToUint8CHW:
    """PIL RGB image -> ``uint8`` ``3 x H x W`` tensor (what the workers send)."""

    def __call__(self, img: Image.Image) -> torch.Tensor:
        import torch

        return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)

    def __repr__(self) -> str:
        return "ToUint8CHW()"


class BatchNormalize:
    """``uint8`` batch ``[B, 3, H, W]`` -> float32 ``(x / 255 - mean) / std`` on its device.

    The same arithmetic as torchvision's ToTensor + Normalize, applied once per batch in
    the consumer (on the GPU when there is one) instead of per image in the workers.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(v) for v in std)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        import torch

        if pixels.dtype != torch.uint8:
            return pixels  # already normalised by a transform that could not be split
        x = pixels.float().div_(255.0)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return x.sub_(mean).div_(std)


def split_preprocess(
    transform: Callable[[Image.Image], torch.Tensor],
) -> tuple[Callable[[Image.Image], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """Split a ``Compose([..., ToTensor, Normalize])`` into a worker part and a batch part.

    Workers then send ``uint8`` tensors, a quarter of the float32 bytes through shared
    memory and over PCIe, and normalisation runs once per batch. Any other transform is
    returned whole with an identity batch part.
    """
    from torchvision import transforms as T

    steps = list(getattr(transform, "transforms", []))
    if (
        len(steps) >= 2
        and isinstance(steps[-2], T.ToTensor)
        and isinstance(steps[-1], T.Normalize)
        and not getattr(steps[-1], "inplace", False)
    ):
        worker = T.Compose([*steps[:-2], ToUint8CHW()])
        return worker, BatchNormalize(steps[-1].mean, steps[-1].std)
    return transform, _identity


def _identity(pixels: torch.Tensor) -> torch.Tensor:
    return pixels


class Sample(NamedTuple):
    """One dataset item: the tensor (None when unreadable), id, stats row and status."""

    pixels: torch.Tensor | None
    image_id: int
    stats: dict[str, Any] | None
    status: str


class LoaderBatch(NamedTuple):
    """A batch of decoded images; iterate a loader from :func:`make_loader` to get them.

    ``pixels[i]``, ``image_ids[i]`` and ``stats[i]`` describe the i-th readable image;
    ``failures`` holds ``(image_id, status)`` for the unreadable ones of the batch.
    """

    pixels: torch.Tensor
    image_ids: list[int]
    stats: list[dict[str, Any]]
    failures: list[tuple[int, str]]


class ShardImageDataset:
    """The images of one shard: decode once, return the model tensor and pixel statistics.

    A map-style dataset for torch's DataLoader (``__len__`` + ``__getitem__``).
    ``transform`` is the model's preprocessing (a PIL image -> tensor callable, e.g.
    open_clip's ``preprocess``); ``target_short_side`` enables JPEG draft decoding and
    should be the model's input size; ``max_pixels`` is the decode limit.
    """

    def __init__(
        self,
        paths: Sequence[Path | str],
        image_ids: Sequence[int],
        transform: Callable[[Image.Image], torch.Tensor],
        target_short_side: int | None = None,
        stats_max_side: int = STATS_MAX_SIDE,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        if len(paths) != len(image_ids):
            raise ValueError(f"{len(paths)} paths but {len(image_ids)} image ids")
        # Plain str/int lists pickle cheaply to worker processes.
        self.paths = [str(p) for p in paths]
        self.image_ids = [int(i) for i in image_ids]
        self.transform = transform
        self.target_short_side = target_short_side
        self.stats_max_side = stats_max_side
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Sample:
        image_id = self.image_ids[index]
        try:
            img, (width, height) = open_image_rgb(self.paths[index], self.target_short_side, self.max_pixels)
        except ImageDecodeError as exc:
            return Sample(None, image_id, None, f"{exc.status}: {exc.reason}")
        stats: dict[str, Any] = {"orig_width": width, "orig_height": height}
        small = stats_array(img, self.stats_max_side)
        stats.update(compute_image_stats(small))
        # The duplicate fingerprints of the same decode (and the bytes the decode just read).
        stats.update(image_hashes(self.paths[index], small))
        return Sample(self.transform(img), image_id, stats, "ok")


def collate_samples(samples: Sequence[Sample]) -> LoaderBatch:
    """Stack the readable samples of a batch; list the unreadable ones as failures."""
    import torch

    ok = [s for s in samples if s.pixels is not None]
    failures = [(s.image_id, s.status) for s in samples if s.pixels is None]
    if ok:
        pixels = torch.stack([s.pixels for s in ok])
    else:
        pixels = torch.empty(0)
    return LoaderBatch(pixels, [s.image_id for s in ok], [s.stats for s in ok], failures)


def _worker_init(_worker_id: int) -> None:
    # One intra-op thread per worker: the workers are the parallelism, and N workers x N
    # threads would oversubscribe the cores the model also needs.
    import torch

    torch.set_num_threads(1)


def default_num_workers(requested: int = -1) -> int:
    """``requested`` if >= 0, else ``min(4, cpu count)`` (the resource's ``-1`` = auto); 0
    (decode in this process) in a daemonic process, which may not start children: a step
    on a Celery prefork worker (deploy/worker) runs in one."""
    if multiprocessing.current_process().daemon:
        return 0
    if requested >= 0:
        return requested
    return min(4, os.cpu_count() or 1)


def _mp_context(name: str | None) -> multiprocessing.context.BaseContext | None:
    if name is None:
        return None
    ctx = multiprocessing.get_context(name)
    if name == "forkserver":
        # Preloaded in the server once, so each worker forks with torch/PIL already imported.
        ctx.set_forkserver_preload(["torch", "danbooru_assets.clip.loader", "open_clip"])
    return ctx


def make_loader(
    paths: Sequence[Path | str],
    image_ids: Sequence[int],
    transform: Callable[[Image.Image], torch.Tensor],
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    target_short_side: int | None = None,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
    multiprocessing_context: str | None = None,
    worker_timeout_s: float = 600.0,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> DataLoader:
    """A DataLoader over a shard yielding :class:`LoaderBatch` in input order.

    At most ``num_workers * prefetch_factor`` batches are decoded ahead of the consumer.
    ``multiprocessing_context=None`` uses Python's default start method (``fork`` on Linux
    up to 3.13: workers start in ~0.5 s); ``"forkserver"`` starts them from a clean
    preloaded server instead (a few seconds once per process), for hosts where forking a
    threaded process is a concern. A worker that stalls longer than ``worker_timeout_s``
    raises instead of hanging the run. Pass the worker part of :func:`split_preprocess`
    as ``transform`` to get ``uint8`` batches to normalise on the device.
    """
    from torch.utils.data import DataLoader

    dataset = ShardImageDataset(paths, image_ids, transform, target_short_side, max_pixels=max_pixels)
    num_workers = max(0, int(num_workers))
    extra: dict[str, Any] = {}
    if num_workers > 0:
        extra = {
            "prefetch_factor": prefetch_factor,
            "worker_init_fn": _worker_init,
            "multiprocessing_context": _mp_context(multiprocessing_context),
            "timeout": worker_timeout_s,
            "persistent_workers": False,
        }
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_samples,
        pin_memory=pin_memory,
        drop_last=False,
        **extra,
    )


__all__ = [
    "STATS_COLUMNS",
    "BatchNormalize",
    "LoaderBatch",
    "Sample",
    "ShardImageDataset",
    "ToUint8CHW",
    "collate_samples",
    "default_num_workers",
    "make_loader",
    "split_preprocess",
    "stats_array",
]
