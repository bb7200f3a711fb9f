"""The CLIP image pass as a per-shard stage (:class:`~danbooru_assets.core.stage.ShardStage`):
``clip_embeddings`` and ``image_stats`` from one decode of each image.

An image is reused when both stored tables hold it for the same file (size, mtime) and
the embedding is from the same model; after a kill between the two tables' writes they
differ, and only what both hold counts, so the re-run encodes the rest and the two agree
again. Images the metadata prefilter excludes (skip mode) are never decoded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

from danbooru_assets.core.incremental import FILE_IDENTITY
from danbooru_assets.core.stage import Progress, ShardPlan, ShardStage

if TYPE_CHECKING:
    from pathlib import Path

    import pandas as pd

    from danbooru_assets.clip.model import ClipModel

EMBEDDINGS = "clip_embeddings"
STATS = "image_stats"
REUSE_KEY = list(FILE_IDENTITY)
EMBEDDING_COLUMNS = [*REUSE_KEY, "status", "embedding", "model_fingerprint_id"]
# The counts of one shard, in the order the materializations list them.
COUNT_KEYS = ["images", "encoded", "reused", "unreadable", "truncated", "never_decoded_prefiltered",
              "hashes_backfilled", "without_file_hash", "without_phash_flat"]


class ClipImageStage(ShardStage):
    name = "clip_embeddings"
    tables = (EMBEDDINGS, STATS)

    def __init__(
        self,
        model: ClipModel,
        index: Mapping[str, pd.DataFrame],
        prefilter: Mapping[str, pd.DataFrame],
        image_path: Callable[[str], Path],
        max_pixels: int | None,
        warn: Callable[[str], Any] | None = None,
    ):
        self.model = model
        self.fingerprint_id = model.fingerprint_id()  # from the configuration: no weights loaded
        self.index = index
        self.prefilter = prefilter
        self.image_path = image_path
        self.max_pixels = max_pixels
        self.warn = warn or (lambda message: None)

    def candidates(self, shard: str):
        from danbooru_assets.dataset.prefilter import decode_candidates

        index = self.index[shard]
        decode, prefiltered = decode_candidates(index, self.prefilter[shard], shard)
        return index.loc[decode, REUSE_KEY + ["rel_path"]], {"prefiltered": prefiltered}

    def still_valid(self, table: str, previous: pd.DataFrame) -> pd.DataFrame:
        if table == EMBEDDINGS:
            return previous.loc[previous["model_fingerprint_id"] == self.fingerprint_id]
        return previous

    def refresh_reused(self, plan: ShardPlan) -> ShardPlan:
        """Rows stored before the duplicate fingerprints existed get them now, from one
        decode without the model (never silently missing)."""
        import pandas as pd

        from danbooru_assets.clip.image_pass import hash_images, missing_hashes

        stats = plan.reused[1]
        plan.notes["hashes_backfilled"] = 0
        if stats is None or not len(stats):
            return plan
        stats = stats.assign(**{c: stats.get(c) for c in ("file_hash", "phash")})
        stats = stats.astype({"file_hash": "string", "phash": "Int64"})
        old = missing_hashes(stats).to_numpy()
        if old.any():
            rel = stats.loc[old, ["image_id"]].merge(
                plan.candidates[["image_id", "rel_path"]].drop_duplicates("image_id"), on="image_id", how="left"
            )
            found = hash_images([self.image_path(p) for p in rel["rel_path"]], self.model.load().image_size,
                                self.max_pixels)
            for column in ("file_hash", "phash"):
                stats.loc[old, column] = pd.array([h[column] if h else None for h in found], dtype=stats[column].dtype)
            stats = stats.copy()
            plan.notes["hashes_backfilled"] = int(old.sum())
        plan.reused[1] = stats
        return plan

    def setup(self) -> None:
        self.model.load()

    def process(self, todo: pd.DataFrame, progress: Progress) -> pd.DataFrame:
        """Statistics and an ``embedding`` column for every row of ``todo``: one data
        loader over every shard's new images (its workers start once, batches are full)."""
        import pandas as pd

        from danbooru_assets.clip.image_pass import embed_images_with_stats
        from danbooru_assets.core.embeddings import embedding_column

        parts = []
        done = 0
        # An id can sit in two bucket folders (a misplaced file); the model takes unique ids per call.
        for part in (todo.loc[~todo["image_id"].duplicated()], todo.loc[todo["image_id"].duplicated()]):
            if not len(part):
                continue
            embeddings, stats = embed_images_with_stats(
                self.model, [self.image_path(p) for p in part["rel_path"]], part["image_id"].tolist(),
                progress=lambda d, _n, base=done: progress(base + d, len(todo)), max_pixels=self.max_pixels,
            )
            done += len(part)
            stats.insert(1, "shard", part["shard"].to_numpy())
            stats["embedding"] = embedding_column(embeddings)
            parts.append(stats)
        return pd.concat(parts, ignore_index=True)

    def assemble(self, plan: ShardPlan, fresh: pd.DataFrame | None):
        import pandas as pd

        from danbooru_assets.clip.image_stats import image_stats_frame
        from danbooru_assets.core.images import TRUNCATED

        todo, (reused_emb, reused_stats) = plan.todo, plan.reused
        if fresh is None:
            fresh = image_stats_frame([], [], []).assign(embedding=pd.Series(dtype=object))
        vectors = fresh.pop("embedding").tolist()
        stats = fresh.merge(todo[REUSE_KEY], on="image_id", how="left")
        new_emb = stats[REUSE_KEY + ["status"]].copy()
        new_emb["embedding"] = [v if status == "ok" else None for v, status in zip(vectors, stats["status"])]
        new_emb["model_fingerprint_id"] = self.fingerprint_id
        embeddings = _sorted([new_emb[EMBEDDING_COLUMNS], reused_emb, EMBEDDING_COLUMNS])
        stats_table = _sorted([stats, reused_stats, list(stats.columns)])
        failed = new_emb.loc[new_emb["status"] != "ok"]
        for row in failed.merge(todo[["image_id", "rel_path"]], on="image_id").head(50).itertuples():
            self.warn(f"{row.rel_path}: {row.status}")
        ok_stats = stats_table.loc[stats_table["status"] == "ok"]
        counts = {
            "images": len(embeddings),
            "encoded": len(todo),
            "reused": 0 if reused_emb is None else len(reused_emb),
            "unreadable": int((embeddings["status"] != "ok").sum()),
            # Of those, the files whose data ends before their pixels do (core.images).
            "truncated": int(embeddings["status"].str.startswith(f"unreadable: {TRUNCATED}").sum()),
            "readable": len(ok_stats),
            "greyscale": int(ok_stats["is_greyscale"].sum()),
            # Readable images whose fingerprints were added to their stored row this run,
            # and those still without one (their file no longer decodes).
            "hashes_backfilled": plan.notes.get("hashes_backfilled", 0),
            "without_file_hash": int(ok_stats["file_hash"].isna().sum()),
            "without_phash_flat": int((ok_stats["file_hash"].notna() & ok_stats["phash"].isna()).sum()),
            # Usable images the metadata prefilter (skip mode) kept from the decoder.
            "never_decoded_prefiltered": plan.notes["prefiltered"],
        }
        return (embeddings, stats_table), counts


def _sorted(parts: list) -> pd.DataFrame:
    """``[new rows, reused rows or None, columns]`` as one table sorted by image id."""
    import pandas as pd

    new, reused, columns = parts
    frames = [new[columns]] + ([reused[columns]] if reused is not None and len(reused) else [])
    return pd.concat(frames, ignore_index=True).sort_values("image_id").reset_index(drop=True)
