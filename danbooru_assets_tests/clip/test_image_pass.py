"""One decode per image: embeddings and pixel statistics of the same pass, in input order."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from danbooru_assets.clip.image_pass import embed_images_with_stats
from danbooru_assets.clip.image_stats import FRAME_COLUMNS
from danbooru_assets.clip.model import DEMO_MODEL_NAME, ClipModel


def _demo(**kw) -> ClipModel:
    return ClipModel.demo().replace(**{"num_workers": 0, "batch_size": 4, **kw})


def _images(root: Path, n: int = 5) -> list[Path]:
    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        small = rng.integers(0, 255, (6, 5, 3), dtype=np.uint8)
        path = root / f"{i}.jpg"
        Image.fromarray(small).resize((250 + 40 * i, 300), Image.Resampling.BILINEAR).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clip_images")
    _images(root)
    return root


def _paths(root: Path) -> list[Path]:
    return sorted(root.glob("*.jpg"), key=lambda p: int(p.stem))


def test_embeddings_normalised_deterministic_and_aligned(image_dir: Path) -> None:
    paths = _paths(image_dir)
    ids = [10, 11, 12, 13, 14]
    seen: list[tuple[int, int]] = []
    emb, frame = embed_images_with_stats(_demo(), paths, ids, progress=lambda d, t: seen.append((d, t)))
    assert emb.dtype == np.float16 and emb.shape == (5, 64)
    np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)
    assert list(frame.columns) == FRAME_COLUMNS
    assert frame["image_id"].tolist() == ids
    assert (frame["status"] == "ok").all()
    assert frame["orig_width"].tolist() == [250, 290, 330, 370, 410]
    assert seen[-1] == (5, 5) and len(seen) == 2  # batch_size 4: batches span files
    # Same input in a different order: each image gets the same embedding.
    emb2, frame2 = embed_images_with_stats(_demo(), paths[::-1], ids[::-1])
    np.testing.assert_array_equal(emb2[::-1], emb)
    assert len({e.tobytes() for e in emb}) == 5  # different images, different embeddings


def test_broken_images_get_status_others_still_embedded(image_dir: Path, tmp_path: Path) -> None:
    good = _paths(image_dir)
    zero = tmp_path / "zero.jpg"
    zero.write_bytes(b"")
    truncated = tmp_path / "trunc.jpg"
    truncated.write_bytes(good[0].read_bytes()[:200])
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    paths = [good[0], zero, good[1], truncated, corrupt, good[2]]
    ids = list(range(6))
    emb, frame = embed_images_with_stats(_demo(), paths, ids)
    reference, _ = embed_images_with_stats(_demo(), good[:3], [0, 2, 5])
    status = frame.set_index("image_id")["status"]
    assert status[[0, 2, 5]].tolist() == ["ok"] * 3
    for bad in (1, 3, 4):
        assert status[bad].startswith("unreadable: ")
        assert not emb[bad].any()
        assert frame.loc[bad, "content_area_frac"] is pd.NA
    np.testing.assert_array_equal(emb[[0, 2, 5]], reference)


def test_checkpoint_round_trip(image_dir: Path, tmp_path: Path) -> None:
    paths = _paths(image_dir)[:3]
    loaded = _demo().load()
    # Different weights from the seeded random init, so a checkpoint that is silently
    # ignored cannot pass.
    model = copy.deepcopy(loaded.model)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(123)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    ckpt = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), ckpt)

    from_file = ClipModel(
        model_name=DEMO_MODEL_NAME, pretrained=str(ckpt), num_workers=0, batch_size=4)
    assert from_file.load() is not loaded
    emb, frame = embed_images_with_stats(from_file, paths, [1, 2, 3])
    with torch.inference_mode():
        pixels = torch.stack(
            [loaded.preprocess(Image.open(p).convert("RGB")) for p in paths])
        direct = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1).numpy()
    # The loader decodes in draft mode; these JPEGs are < 2x224 px so decoding is identical.
    np.testing.assert_allclose(emb.astype(np.float32), direct, atol=2e-3)
    random_emb, _ = embed_images_with_stats(_demo(), paths, [1, 2, 3])
    assert np.abs(random_emb.astype(np.float32) - direct).max() > 0.05


def test_two_workers_match_in_process(image_dir: Path) -> None:
    paths = _paths(image_dir)
    ids = list(range(len(paths)))
    in_process, f0 = embed_images_with_stats(_demo(), paths, ids)
    workers, f2 = embed_images_with_stats(_demo(num_workers=2, batch_size=2), paths, ids)
    np.testing.assert_array_equal(workers, in_process)
    assert f2["status"].tolist() == f0["status"].tolist()
    np.testing.assert_allclose(
        f2["edge_density"].to_numpy(float), f0["edge_density"].to_numpy(float))


def test_embed_rejects_duplicate_ids(image_dir: Path) -> None:
    paths = _paths(image_dir)[:2]
    with pytest.raises(ValueError):
        embed_images_with_stats(_demo(), paths, [1, 1])
    emb, frame = embed_images_with_stats(_demo(), [], [])
    assert emb.shape == (0, 64) and list(frame.columns) == FRAME_COLUMNS


def test_bf16_autocast_on_cpu(image_dir: Path) -> None:
    paths = _paths(image_dir)[:2]
    bf16 = _demo(precision="bf16")
    assert bf16.load().dtype == torch.bfloat16 and bf16.load() is not _demo().load()
    emb, _ = embed_images_with_stats(bf16, paths, [1, 2])
    ref, _ = embed_images_with_stats(_demo(), paths, [1, 2])
    assert emb.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)
    # Reduced precision changes the numbers a little, not the direction.
    cos = (emb.astype(np.float32) * ref.astype(np.float32)).sum(axis=1)
    assert (cos > 0.98).all()


def test_the_same_pass_gives_the_file_hash_and_perceptual_hash(image_dir: Path, tmp_path: Path) -> None:
    """The duplicate fingerprints come from the one decode; hash_images (the backfill for
    rows stored before them) gives the same values without the model."""
    import shutil

    from danbooru_assets.clip.image_pass import hash_images, missing_hashes
    from danbooru_assets.dedup.hashes import file_hash

    paths = _paths(image_dir)[:3]
    copy_path = tmp_path / "copy.jpg"
    shutil.copyfile(paths[0], copy_path)
    model = _demo()
    _, frame = embed_images_with_stats(model, [*paths, copy_path], [1, 2, 3, 4])
    assert frame["file_hash"].tolist()[:3] == [file_hash(p) for p in paths]
    assert frame["file_hash"].iloc[3] == frame["file_hash"].iloc[0]
    assert frame["phash"].notna().all() and frame["phash"].iloc[3] == frame["phash"].iloc[0]
    again = hash_images(paths, model.load().image_size)
    assert [h["phash"] for h in again] == frame["phash"].tolist()[:3]
    assert not missing_hashes(frame).any()
    assert missing_hashes(frame.drop(columns=["file_hash", "phash"])).all()
