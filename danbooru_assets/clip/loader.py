"""The one image decode of the project, and one decode pass over a shard's images.

:func:`open_image_rgb` is how every stage reads pixels (the CLIP loader, the image
statistics, the pose stage, contact sheets, exports), and :func:`read_image_header` how
the shard index reads sizes; both follow the same rules:

- **Orientation.** The EXIF orientation tag (JPEG, WebP, PNG ``eXIf``) is applied: pixels,
  sizes and so keypoints are in the *displayed* frame, the one a browser shows.
- **Bit depth.** 16-bit greyscale (``I;16*``, and ``I``) keeps each sample's high byte:
  the full 0-65535 range maps to 0-255 (as Pillow does for 16-bit RGB), never stretched to
  the image's own min-max, so a dark image stays dark. Transparency is composited over white.
- **Pixel limit.** An image is decoded only if the decode produces at most ``max_pixels``
  pixels (:func:`size_problem`): JPEGs are decoded in draft mode (DCT scaling by 1/2, 1/4 or
  1/8) at the smallest scale that keeps both sides >= the requested size, reduced further
  when needed to fit the limit, so a 1500 px file for a 224 px model decodes at ~375 px;
  other formats decode whole, so over the limit they are never decoded
  (:class:`ImageDecodeError` with status ``too_large``).

The decode pass: each image is read and decoded once, in a DataLoader worker; the
statistics of :mod:`danbooru_assets.clip.image_stats` are computed on a <= 256 px copy of the
decoded image, and the model's preprocessing turns it into a tensor. Batches span files
(the sampler runs over the whole shard), the number of batches in flight is bounded
(``num_workers * prefetch_factor``) so memory stays flat however many images a run covers,
and a file that cannot be decoded becomes a ``"unreadable: <reason>"`` (or
``"too_large: <reason>"``) status row instead of an exception.

torch is imported only where tensors are made, so the shard index can use the header
reader without loading it.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from danbooru_assets.dataset.layout import DEFAULT_MAX_PIXELS
from danbooru_assets.clip.image_stats import STATS_COLUMNS, compute_image_stats

if TYPE_CHECKING:
    import torch
    from torch.utils.data import DataLoader

logger = logging.getLogger(__name__)

# Our own limit (max_pixels, below PIL's warning threshold by default) decides what is
# decoded; PIL's warning at open would only repeat it, for every large header read.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# Statistics are computed on a copy no larger than this (longest side): they are coarse
# measures and 256 px keeps them well under a millisecond.
STATS_MAX_SIDE = 256
# Transparent pixels are composited over white: Danbooru PNGs with transparency are
# characters on an empty canvas, and a black fill would read as a black border.
TRANSPARENT_FILL = (255, 255, 255)
# libjpeg decodes at 1/1, 1/2, 1/4 or 1/8 scale (PIL's draft mode).
JPEG_DRAFT_SCALES = (1, 2, 4, 8)
STATUS_UNREADABLE = "unreadable"
STATUS_TOO_LARGE = "too_large"

EXIF_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that turns stored pixels into displayed ones (the
# EXIF 2.3 table; the same as ImageOps.exif_transpose). 5-8 swap width and height.
ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


class ImageDecodeError(OSError):
    """A file that is not decoded; the message names the file and why.

    ``status`` is ``"too_large"`` for an image over the pixel limit, else ``"unreadable"``;
    ``reason`` never repeats the file name (statuses are grouped and counted)."""

    def __init__(self, path: Path | str, reason: str, status: str = STATUS_UNREADABLE):
        self.path = str(path)
        self.reason = reason
        self.status = status
        super().__init__(f"cannot decode image {self.path}: {reason}")


class ImageHeader(NamedTuple):
    """What an image's header says, sizes in the displayed (EXIF-oriented) frame."""

    width: int
    height: int
    format: str
    orientation: int


def pil_pixel_ceiling() -> int | None:
    """The size above which PIL refuses to open an image at all (None: no ceiling)."""
    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else 2 * int(limit)


def smallest_decode_pixels(width, height, jpeg):
    """Pixels of the smallest decode PIL offers: 1/8 scale per side for JPEG, else all.
    Works on numbers and numpy arrays alike."""
    most = JPEG_DRAFT_SCALES[-1]
    reduced = -(-width // most) * -(-height // most)  # sides rounded up, as libjpeg does
    if isinstance(jpeg, np.ndarray):
        return np.where(jpeg, reduced, width * height)
    return reduced if jpeg else width * height


def size_problem(width: int, height: int, jpeg: bool, max_pixels: int | None) -> str:
    """Why an image of this stored size is not decoded ("" when it is): even its smallest
    decode exceeds ``max_pixels`` (None: no limit of ours), or PIL refuses to open it."""
    width, height = int(width), int(height)
    total = width * height
    ceiling = pil_pixel_ceiling()
    if ceiling is not None and total > ceiling:
        return f"{width}x{height} = {total:,} pixels, over PIL's own limit of {ceiling:,}"
    smallest = int(smallest_decode_pixels(width, height, jpeg))
    if max_pixels is not None and smallest > max_pixels:
        at = f" ({smallest:,} at 1/8 scale)" if jpeg else ""
        return f"{width}x{height} = {total:,} pixels{at}, over the limit of {max_pixels:,} (max_pixels)"
    return ""


def _jpeg_draft_scale(width: int, height: int, target_short_side: int | None, max_pixels: int | None) -> int:
    """The DCT scale to decode a JPEG at: the largest that keeps both sides >= the target,
    or larger when needed to stay within ``max_pixels``; never more than the sides allow."""
    scale = 1
    if target_short_side:
        fits = min(width // int(target_short_side), height // int(target_short_side))
        scale = max([s for s in JPEG_DRAFT_SCALES if s <= fits], default=1)
    if max_pixels is not None:
        for s in JPEG_DRAFT_SCALES:
            if s >= scale and -(-width // s) * -(-height // s) <= max_pixels:
                scale = s
                break
    return max(s for s in JPEG_DRAFT_SCALES if s <= max(1, min(scale, width, height)))


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8) in the header PIL has read; 1 without one.

    Only EXIF present at open counts (JPEG and WebP always; PNG when ``eXIf`` precedes the
    pixels), so the header reader and the decoder always agree."""
    raw = img.info.get("exif")
    if not raw:
        return 1
    try:
        exif = Image.Exif()
        exif.load(raw)
        value = int(exif.get(EXIF_ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block does not make the pixels unreadable
        return 1
    return value if 1 <= value <= 8 else 1


def displayed_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """``(width, height)`` as displayed: swapped for the orientations that turn by 90 degrees."""
    return (size[1], size[0]) if orientation >= 5 else (size[0], size[1])


def to_rgb8(img: Image.Image) -> Image.Image:
    """``img`` in 8-bit RGB (itself when it already is, else a new image): 16-bit samples
    keep their high byte, and transparency is composited over white."""
    if img.mode in SIXTEEN_BIT_MODES:
        samples = np.asarray(img)
        if img.mode == "I":  # 32-bit container; PIL's 16-bit sources fill 0-65535
            samples = np.clip(samples, 0, 65535)
        img = Image.fromarray((samples.astype(np.uint32) >> 8).astype(np.uint8))
    if img.mode == "RGB":
        return img
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (
        img.mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, TRANSPARENT_FILL + (255,))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return img.convert("RGB")


def _reason(exc: BaseException, path: Path) -> str:
    # Statuses are grouped and counted, so the reason does not repeat the file name.
    return str(exc).replace(str(path), "<file>").strip() or type(exc).__name__


def read_image_header(path: Path | str) -> ImageHeader:
    """Parse the header only (no pixels are decoded): the displayed size, format and EXIF
    orientation. A file whose header cannot be read raises :class:`ImageDecodeError`
    (status ``too_large`` when PIL refuses its size)."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            orientation = exif_orientation(img)
            width, height = displayed_size(img.size, orientation)
            return ImageHeader(width, height, img.format or "", orientation)
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(path, _reason(exc, path), STATUS_TOO_LARGE) from exc
    except FileNotFoundError as exc:
        raise ImageDecodeError(path, "file not found") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(path, "unknown or unsupported image format") from exc
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, struct.error... on bad files
        raise ImageDecodeError(path, _reason(exc, path)) from exc


def open_image_rgb(
    path: Path | str,
    target_short_side: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode ``path`` to an 8-bit RGB image in the displayed (EXIF-oriented) frame; return
    it with the full image's displayed ``(width, height)``.

    With ``target_short_side``, JPEGs are decoded in draft mode at the largest DCT scale
    reduction that keeps both sides >= the target, so the returned image may be smaller
    than the full size (never smaller than the target unless ``max_pixels`` demands it).
    An image whose decode would exceed ``max_pixels`` raises :class:`ImageDecodeError`
    with status ``too_large`` before any pixel is decoded. Zero-byte, truncated,
    unknown-format and otherwise broken files raise it with status ``unreadable``.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageDecodeError(path, "zero-byte file")
        with Image.open(path) as img:
            orientation = exif_orientation(img)
            stored = img.size
            jpeg = img.format == "JPEG"
            problem = size_problem(stored[0], stored[1], jpeg, max_pixels)
            if problem:
                raise ImageDecodeError(path, problem, STATUS_TOO_LARGE)
            if jpeg:
                scale = _jpeg_draft_scale(stored[0], stored[1], target_short_side, max_pixels)
                if scale > 1:
                    img.draft("RGB", (stored[0] // scale, stored[1] // scale))
            decoded = img.size[0] * img.size[1]
            if max_pixels is not None and decoded > max_pixels:  # a side too short to reduce by enough
                raise ImageDecodeError(
                    path, f"{img.size[0]}x{img.size[1]} = {decoded:,} pixels to decode, over the limit of "
                    f"{max_pixels:,} (max_pixels)", STATUS_TOO_LARGE,
                )
            img.load()
            rgb = to_rgb8(img)
            if rgb is img:
                rgb = img.copy()  # detached from the file the context manager closes
        if orientation in ORIENTATION_TRANSPOSE:
            rgb = rgb.transpose(ORIENTATION_TRANSPOSE[orientation])
    except ImageDecodeError:
        raise
    except FileNotFoundError as exc:
        raise ImageDecodeError(path, "file not found") from exc
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(path, _reason(exc, path), STATUS_TOO_LARGE) from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(path, "unknown or unsupported image format") from exc
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, struct.error... on bad files
        raise ImageDecodeError(path, _reason(exc, path)) from exc
    return rgb, displayed_size(stored, orientation)


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
        stats.update(compute_image_stats(stats_array(img, self.stats_max_side)))
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
    """``requested`` if >= 0, else ``min(4, cpu count)`` (the resource's ``-1`` = auto)."""
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


class ThroughputLogger:
    """A ``progress(done, total)`` callback that logs images/s and ETA every ``interval_s``.

    Pass ``log=context.log.info`` inside a Dagster asset; the final call always logs.
    """

    def __init__(
        self,
        log: Callable[[str], Any] | None = None,
        interval_s: float = 30.0,
        label: str = "images",
        clock: Callable[[], float] = time.monotonic,
    ):
        self.log = log or logger.info
        self.interval_s = interval_s
        self.label = label
        self.clock = clock
        self.start = clock()
        self.last_log = self.start

    def message(self, done: int, total: int) -> str:
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = done / elapsed
        eta = (total - done) / rate if rate > 0 else math.inf
        eta_text = f"{eta:,.0f} s" if math.isfinite(eta) else "unknown"
        return (
            f"{done:,}/{total:,} {self.label} ({done / max(total, 1):.0%}), "
            f"{rate:,.1f} {self.label}/s, ETA {eta_text}"
        )

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        if done >= total or now - self.last_log >= self.interval_s:
            self.last_log = now
            self.log(self.message(done, total))


__all__ = [
    "STATS_COLUMNS",
    "BatchNormalize",
    "ImageDecodeError",
    "ImageHeader",
    "LoaderBatch",
    "Sample",
    "ShardImageDataset",
    "ThroughputLogger",
    "ToUint8CHW",
    "collate_samples",
    "default_num_workers",
    "make_loader",
    "open_image_rgb",
    "read_image_header",
    "size_problem",
    "split_preprocess",
    "stats_array",
]
