"""The CLIP resource on the tiny demo architecture with random weights (no downloads)."""

from __future__ import annotations

import copy
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import danbooru_assets.clip.model as clip_model
from danbooru_assets.clip.image_stats import STATS_COLUMNS
from danbooru_assets.clip.model import (
    DEMO_MODEL_NAME,
    DEMO_WARNING,
    ClipModelResource,
)


def _demo(**kw) -> ClipModelResource:
    return ClipModelResource.demo().model_copy(update={"num_workers": 0, "batch_size": 4, **kw})


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


def test_load_once_per_process() -> None:
    a = _demo().load()
    b = ClipModelResource.demo().load()  # a different resource instance, same config
    assert a is b
    assert a.embed_dim == 64 and a.image_size == 224
    assert a.device.type == "cpu" and a.dtype == torch.float32


def test_fingerprint_depends_on_model_and_weights(tmp_path: Path) -> None:
    demo = _demo()
    fp = demo.fingerprint()
    assert fp == {
        "model_name": DEMO_MODEL_NAME,
        "pretrained": "random-init-seed-0",
        "image_size": 224,
        "embed_dim": 64,
        "random_weights": True,
    }
    assert demo.fingerprint_id() == _demo(batch_size=99).fingerprint_id()  # batch size is irrelevant
    real = ClipModelResource()
    assert real.fingerprint()["pretrained"] == "laion2b_s34b_b79k"
    assert real.fingerprint()["embed_dim"] == 512
    other_tag = ClipModelResource(pretrained="openai")
    ids = {demo.fingerprint_id(), real.fingerprint_id(), other_tag.fingerprint_id()}
    assert len(ids) == 3

    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"first version")
    from_file = ClipModelResource(model_name=DEMO_MODEL_NAME, pretrained=str(ckpt))
    first = from_file.fingerprint()
    assert first["pretrained"].startswith("sha256:") and len(first["pretrained"]) == 7 + 16
    assert first["random_weights"] is False
    first_id = from_file.fingerprint_id()
    ckpt.write_bytes(b"second version!")
    assert from_file.fingerprint_id() != first_id


def test_demo_flags_and_metadata() -> None:
    demo = _demo()
    assert demo.is_demo()
    assert demo.metadata()["warning"] == DEMO_WARNING
    assert demo.metadata()["clip_fingerprint"] == demo.fingerprint_id()
    real = ClipModelResource()
    assert not real.is_demo()
    assert "warning" not in real.metadata()


def test_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(clip_model.ENV_MODEL, raising=False)
    monkeypatch.delenv(clip_model.ENV_PRETRAINED, raising=False)
    assert ClipModelResource.from_env(sample_data=True).is_demo()
    real = ClipModelResource.from_env(sample_data=False)
    assert (real.model_name, real.pretrained, real.allow_random_weights) == (
        "ViT-B-32", "laion2b_s34b_b79k", False)
    ckpt = tmp_path / "w.safetensors"
    monkeypatch.setenv(clip_model.ENV_PRETRAINED, str(ckpt))
    configured = ClipModelResource.from_env(sample_data=True, batch_size=8)
    assert (configured.model_name, configured.pretrained, configured.batch_size) == (
        "ViT-B-32", str(ckpt), 8)
    assert not configured.is_demo()


def test_wrong_model_name_lists_near_matches() -> None:
    with pytest.raises(ValueError) as info:
        ClipModelResource(model_name="ViT-B-3").load()
    msg = str(info.value)
    assert "ViT-B-32" in msg and "DANBOORU_CLIP_MODEL" in msg and "model_name" in msg


def test_missing_checkpoint_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "clip.safetensors"
    res = ClipModelResource(model_name=DEMO_MODEL_NAME, pretrained=str(missing))
    for call in (res.load, res.fingerprint):
        with pytest.raises(FileNotFoundError) as info:
            call()
        assert str(missing) in str(info.value) and "DANBOORU_CLIP_PRETRAINED" in str(info.value)


def test_random_weights_need_the_flag() -> None:
    with pytest.raises(ValueError) as info:
        ClipModelResource(model_name=DEMO_MODEL_NAME, pretrained="").load()
    assert "allow_random_weights" in str(info.value)


def test_unknown_tag_lists_known_tags() -> None:
    with pytest.raises(ValueError) as info:
        ClipModelResource(pretrained="laion9b_nonsense").fingerprint()
    assert "laion2b_s34b_b79k" in str(info.value)


def test_hub_failure_fails_fast_with_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clip_model, "_hub_weights_cached", lambda cfg: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never touch the network in tests
    with pytest.raises(RuntimeError) as info:
        ClipModelResource(device="cpu").load()
    msg = str(info.value)
    assert "DANBOORU_CLIP_PRETRAINED" in msg and "path" in msg and "ViT-B-32" in msg


def test_unreachable_hub_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(clip_model, "_hub_weights_cached", lambda cfg: False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # nothing listens: refused at once
    # Fast failure means one bounded connection probe, not open_clip's retrying download.
    probes: list[tuple[tuple[str, int], float]] = []
    real_connect = socket.create_connection

    def recording_connect(address, timeout=None, *args, **kwargs):
        probes.append((address, timeout))
        return real_connect(address, timeout, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", recording_connect)
    with pytest.raises(RuntimeError, match="unreachable"):
        ClipModelResource(device="cpu").load()
    assert probes == [(("127.0.0.1", 9), 3.0)]


def test_hf_offline_context_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    before = constants.HF_HUB_OFFLINE
    with clip_model._hf_offline(True):
        assert constants.is_offline_mode()
    assert constants.HF_HUB_OFFLINE == before
    assert "HF_HUB_OFFLINE" not in __import__("os").environ


def test_precision_validation() -> None:
    with pytest.raises(ValueError):
        _demo(precision="fp16").load()
    with pytest.raises(ValueError):
        _demo(precision="int3").load()


def test_encode_text_normalised() -> None:
    emb = _demo().encode_text(["a girl standing", "a manga page"])
    assert emb.shape == (2, 64) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(emb[0], emb[1])
    assert _demo().encode_text([]).shape == (0, 64)


def test_embeddings_normalised_deterministic_and_aligned(image_dir: Path) -> None:
    paths = _paths(image_dir)
    ids = [10, 11, 12, 13, 14]
    seen: list[tuple[int, int]] = []
    emb, frame = _demo().embed_images(paths, ids, progress=lambda d, t: seen.append((d, t)))
    assert emb.dtype == np.float16 and emb.shape == (5, 64)
    np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)
    assert list(frame.columns) == ["image_id", "status", "orig_width", "orig_height", *STATS_COLUMNS]
    assert frame["image_id"].tolist() == ids
    assert (frame["status"] == "ok").all()
    assert frame["orig_width"].tolist() == [250, 290, 330, 370, 410]
    assert seen[-1] == (5, 5) and len(seen) == 2  # batch_size 4: batches span files
    # Same input in a different order: each image gets the same embedding.
    emb2, frame2 = _demo().embed_images(paths[::-1], ids[::-1])
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
    emb, frame = _demo().embed_images(paths, ids)
    reference, _ = _demo().embed_images(good[:3], [0, 2, 5])
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

    from_file = ClipModelResource(
        model_name=DEMO_MODEL_NAME, pretrained=str(ckpt), num_workers=0, batch_size=4)
    assert from_file.load() is not loaded
    emb, frame = from_file.embed_images(paths, [1, 2, 3])
    with torch.inference_mode():
        pixels = torch.stack(
            [loaded.preprocess(Image.open(p).convert("RGB")) for p in paths])
        direct = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1).numpy()
    # The loader decodes in draft mode; these JPEGs are < 2x224 px so decoding is identical.
    np.testing.assert_allclose(emb.astype(np.float32), direct, atol=2e-3)
    random_emb, _ = _demo().embed_images(paths, [1, 2, 3])
    assert np.abs(random_emb.astype(np.float32) - direct).max() > 0.05


def test_two_workers_match_in_process(image_dir: Path) -> None:
    paths = _paths(image_dir)
    ids = list(range(len(paths)))
    in_process, f0 = _demo().embed_images(paths, ids)
    workers, f2 = _demo(num_workers=2, batch_size=2).embed_images(paths, ids)
    np.testing.assert_array_equal(workers, in_process)
    assert f2["status"].tolist() == f0["status"].tolist()
    np.testing.assert_allclose(
        f2["edge_density"].to_numpy(float), f0["edge_density"].to_numpy(float))


def test_embed_rejects_duplicate_ids(image_dir: Path) -> None:
    paths = _paths(image_dir)[:2]
    with pytest.raises(ValueError):
        _demo().embed_images(paths, [1, 1])
    emb, frame = _demo().embed_images([], [])
    assert emb.shape == (0, 64) and list(frame.columns) == ["image_id", "status", "orig_width", "orig_height", *STATS_COLUMNS]


def test_device_and_precision_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    res = _demo()
    assert res._resolved_dtype(torch.device("cpu")) == torch.float32
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert res._resolved_dtype(cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert res._resolved_dtype(cuda) == torch.float16
    assert _demo(precision="fp16")._resolved_dtype(cuda) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert res._resolved_device() == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        _demo(device="cuda").load()


def test_bf16_autocast_on_cpu(image_dir: Path) -> None:
    paths = _paths(image_dir)[:2]
    bf16 = _demo(precision="bf16")
    assert bf16.load().dtype == torch.bfloat16 and bf16.load() is not _demo().load()
    emb, _ = bf16.embed_images(paths, [1, 2])
    ref, _ = _demo().embed_images(paths, [1, 2])
    assert emb.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)
    # Reduced precision changes the numbers a little, not the direction.
    cos = (emb.astype(np.float32) * ref.astype(np.float32)).sum(axis=1)
    assert (cos > 0.98).all()
