"""Shared fixtures: a hand-built miniature Danbooru tree with known problems."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from danbooru_assets.devtools.sandbox import Sandbox


def jpeg_bytes(size=(40, 30), color=(200, 60, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def noisy_jpeg_bytes(size=(160, 120)) -> bytes:
    import numpy as np

    pixels = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def png_bytes(size=(24, 36)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", size, (0, 120, 0, 128)).save(buf, format="PNG")
    return buf.getvalue()


API_RECORDS = [
    # 1001: metadata sizes win (they differ from the real 40x30 on purpose).
    {"id": 1001, "md5": "a" * 32, "rating": "g", "score": 12, "image_width": 400, "image_height": 300,
     "file_ext": "jpg", "tag_string": "1girl solo", "tag_string_general": "1girl solo",
     "tag_string_character": "hatsune_miku", "tag_string_copyright": "vocaloid",
     "tag_string_artist": "someone", "tag_string_meta": "highres", "is_deleted": False},
    {"id": 1002, "md5": "b" * 32, "rating": "s", "score": 3, "image_width": 40, "image_height": 30,
     "file_ext": "png", "tag_string_general": "landscape", "is_deleted": False},  # ext differs: header used
    {"id": 3002, "md5": "c" * 32, "rating": "q", "score": 0, "image_width": 10, "image_height": 10,
     "file_ext": "jpg", "tag_string_general": "", "is_deleted": True},
    {"id": 9001, "md5": "d" * 32, "rating": "e", "score": 1, "image_width": 5, "image_height": 5,
     "file_ext": "jpg"},  # metadata without a file
]
DUMP_RECORDS = [
    {"id": "4002", "md5": "e" * 32, "rating": "s", "score": "7", "image_width": "64", "image_height": "64",
     "file_ext": "psd", "tags": [{"id": "1", "name": "1girl", "category": "0"},
                                 {"id": "2", "name": "artist_x", "category": "1"},
                                 {"id": "3", "name": "touhou", "category": "3"},
                                 {"id": "4", "name": "hakurei_reimu", "category": "4"}]},
    {"id": "6002", "md5": "f" * 32, "rating": "e", "score": "2", "file_ext": "jpg", "tags": []},
]


def build_mini_dataset(root: Path) -> Path:
    """Shards 0001 and 0002 with one of each problem the index must report."""
    s1 = root / "original" / "0001"
    s2 = root / "original" / "0002"
    s1.mkdir(parents=True)
    s2.mkdir(parents=True)
    (s1 / "1001.jpg").write_bytes(jpeg_bytes())
    (s1 / "2001.png").write_bytes(png_bytes())  # no metadata
    (s1 / "notes.txt").write_text("not an image id")  # bad file name
    (s2 / "1002.jpg").write_bytes(jpeg_bytes((40, 30)))
    (s2 / "3002.jpg").write_bytes(b"")  # zero bytes
    (s2 / "4002.psd").write_bytes(b"8BPS junk")  # unknown extension
    (s2 / "5002.jpg").write_bytes(b"\x00garbage, not a jpeg header")  # unreadable header, no metadata
    (s2 / "6002.jpg").write_bytes(noisy_jpeg_bytes((160, 120))[:2500])  # truncated, header intact
    meta = root / "metadata"
    meta.mkdir()
    lines = [json.dumps(r) for r in API_RECORDS]
    lines.insert(2, '{"id": 7001, "rating": "s", "tag_str')  # broken line: line 3
    (meta / "posts000000000000.json").write_text("\n".join(lines) + "\n")
    (meta / "2020000000000000.json").write_text("\n".join(json.dumps(r) for r in DUMP_RECORDS) + "\n")
    return root


@pytest.fixture
def mini_dataset(tmp_path: Path) -> Path:
    return build_mini_dataset(tmp_path / "danbooru")


# clip_threshold run config that keeps every image at the CLIP stage.
# portrait_score is a probability (>= 0): a threshold of 0 keeps every scored image.
KEEP_ALL = {"ops": {"clip_threshold": {"config": {"fixed_threshold": 0.0}}}}

class Pipeline(Sandbox):
    """The sandbox over a small generated sample dataset, with the demo CLIP model
    (tiny architecture, random weights) on the CPU, in-process data loading."""

    def __init__(self, base: Path, n_images: int = 90, n_shards: int = 8):
        from danbooru_assets.orchestration.resources import ClipModelResource
        from danbooru_assets.devtools.sample_data import generate_sample_dataset

        root = base / "sample"
        self.summary = generate_sample_dataset(root, n_images=n_images, n_shards=n_shards, max_side=400)
        clip = ClipModelResource.demo().model_copy(update={"num_workers": 0, "batch_size": 16})
        super().__init__(root, base, clip_model=clip)

    @property
    def shards(self) -> list[str]:
        return self.summary.shards

    def run_through(self, last_stage: str, keep_all: bool = False) -> None:
        """Materialize every stage up to ``last_stage`` ('ingest', 'clip', 'pose') for every
        shard; ``keep_all``: the CLIP stage keeps every image (the demo model's scores carry
        no meaning), so every drawn figure reaches the pose stage."""
        self.materialize(["danbooru_metadata", "published_keypoints", "prompt_embeddings"])
        self.materialize(
            ["shard_index", "metadata_prefilter", "clip_embeddings", "image_stats", "clip_scores"], shards=self.shards
        )
        if last_stage == "ingest":
            return
        self.materialize(["clip_threshold"], run_config=KEEP_ALL if keep_all else None)
        self.materialize(["clip_subset"], shards=self.shards)
        if last_stage == "clip":
            return
        self.materialize(["pose_keypoints"], shards=self.shards)
        self.materialize(["pose_statistics", "near_duplicates"])
        self.materialize(["pose_subset"], shards=self.shards)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Pipeline:
    return Pipeline(tmp_path_factory.mktemp("pipeline"))
