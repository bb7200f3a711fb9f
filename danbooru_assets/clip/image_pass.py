"""The CLIP stage's one pass over image files: embeddings and statistics from one decode.

Each image is decoded once (:mod:`danbooru_assets.clip.loader`, in its worker processes);
the decoded image gives both the model's input and the pixel statistics of
:mod:`danbooru_assets.clip.image_stats`. The model only turns batches of pixels into
embeddings (:meth:`danbooru_assets.clip.model.ClipModel.embed_pixels`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from danbooru_assets.config import DEFAULT_MAX_PIXELS

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from danbooru_assets.clip.model import ClipModel


def embed_images_with_stats(
    model: ClipModel,
    paths: Sequence[Path | str],
    image_ids: Sequence[int],
    progress: Callable[[int, int], None] | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Decode each image once: its embedding and its pixel statistics, aligned with the input.

    Returns float16 L2-normalised embeddings ``[N, D]`` (zero rows for unreadable files)
    and the :func:`~danbooru_assets.clip.image_stats.image_stats_frame` (``image_id``,
    ``status`` = ``"ok"`` or ``"unreadable: <reason>"``, the displayed ``orig_width``,
    ``orig_height``, the statistics), rows in input order. ``progress(done, total)`` is
    called after every batch (see ``ThroughputLogger``).
    """
    import numpy as np

    from danbooru_assets.clip.image_stats import image_stats_frame
    from danbooru_assets.clip.loader import default_num_workers, make_loader

    ids = [int(i) for i in image_ids]
    if len(paths) != len(ids):
        raise ValueError(f"{len(paths)} paths but {len(ids)} image ids")
    if len(set(ids)) != len(ids):
        raise ValueError("image_ids must be unique within one call")
    loaded = model.load()
    n = len(ids)
    embeddings = np.zeros((n, loaded.embed_dim), dtype=np.float16)
    row_of = {image_id: row for row, image_id in enumerate(ids)}
    status = ["unreadable: not processed"] * n
    stats: list[dict[str, Any] | None] = [None] * n
    if n:
        loader = make_loader(
            paths,
            ids,
            loaded.worker_transform,
            batch_size=model.batch_size,
            # Worker processes take seconds to start (a spawned one imports torch again);
            # a few batches decode faster in this process.
            num_workers=default_num_workers(model.num_workers) if n > 2 * model.batch_size else 0,
            target_short_side=loaded.image_size,
            max_pixels=max_pixels,
            pin_memory=loaded.device.type == "cuda",
        )
        done = 0
        for batch in loader:
            if batch.image_ids:
                rows = [row_of[i] for i in batch.image_ids]
                embeddings[rows] = model.embed_pixels(batch.pixels)
                for row, row_stats in zip(rows, batch.stats):
                    status[row] = "ok"
                    stats[row] = row_stats
            for image_id, reason in batch.failures:
                status[row_of[image_id]] = reason
            done += len(batch.image_ids) + len(batch.failures)
            if progress is not None:
                progress(done, n)
    return embeddings, image_stats_frame(ids, status, stats)


def missing_hashes(stats: pd.DataFrame) -> pd.Series:
    """Readable rows of a stored image_stats table without the duplicate fingerprints
    (decoded before they existed): a boolean mask."""
    from danbooru_assets.clip.image_stats import HASH_COLUMNS

    if not set(HASH_COLUMNS) <= set(stats.columns):
        return stats["status"] == "ok"
    return (stats["status"] == "ok") & stats["file_hash"].isna()


def hash_images(
    paths: Sequence[Path | str],
    target_short_side: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> list[dict[str, Any] | None]:
    """The fingerprints (``file_hash``, ``phash``) of images embedded before they existed:
    the decode the CLIP pass does (same draft scale, same small copy), without the model.
    ``None`` for a file that no longer decodes."""
    from danbooru_assets.clip.loader import stats_array
    from danbooru_assets.core.images import ImageDecodeError, open_image_rgb
    from danbooru_assets.dedup.hashes import image_hashes

    out: list[dict[str, Any] | None] = []
    for path in paths:
        try:
            img, _ = open_image_rgb(path, target_short_side, max_pixels)
        except ImageDecodeError:
            out.append(None)
            continue
        out.append(image_hashes(path, stats_array(img)))
    return out
