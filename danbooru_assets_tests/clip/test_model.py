"""The CLIP model (dagster-free) on the tiny demo architecture with random weights (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from danbooru_assets.clip.model import (
    DEMO_FIELDS,
    DEMO_MODEL_NAME,
    DEMO_WARNING,
    ClipModel,
    model_fields,
)


def _demo(**kw) -> ClipModel:
    return ClipModel.demo().replace(**{"num_workers": 0, "batch_size": 4, **kw})


def test_load_once_per_process() -> None:
    a = _demo().load()
    b = ClipModel.demo().load()  # a different instance, same config
    assert a is b
    assert a.embed_dim == 64 and a.image_size == 224
    assert a.normalize is not None and a.worker_transform is not a.preprocess  # split for the loader
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
    real = ClipModel()
    assert real.fingerprint()["pretrained"] == "laion2b_s34b_b79k"
    assert real.fingerprint()["embed_dim"] == 512
    other_tag = ClipModel(pretrained="openai")
    ids = {demo.fingerprint_id(), real.fingerprint_id(), other_tag.fingerprint_id()}
    assert len(ids) == 3

    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"first version")
    from_file = ClipModel(model_name=DEMO_MODEL_NAME, pretrained=str(ckpt))
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
    real = ClipModel()
    assert not real.is_demo()
    assert "warning" not in real.metadata()


def test_model_fields_from_the_environment(tmp_path: Path) -> None:
    # Nothing set: the demo on sample data, the real default model on a real dataset.
    assert model_fields("", None, sample_data=True) == DEMO_FIELDS
    real = ClipModel(**model_fields("", None, sample_data=False))
    assert (real.model_name, real.pretrained, real.allow_random_weights) == (
        "ViT-B-32", "laion2b_s34b_b79k", False)
    ckpt = tmp_path / "w.safetensors"
    configured = ClipModel(**model_fields("", f" {ckpt} ", sample_data=True))
    assert (configured.model_name, configured.pretrained) == ("ViT-B-32", str(ckpt))
    assert not configured.is_demo()
    # The demo architecture named without weights: random weights, accepted.
    assert model_fields(DEMO_MODEL_NAME, None, sample_data=False) == {
        "model_name": DEMO_MODEL_NAME, "pretrained": "", "allow_random_weights": True}
    # Any other model with pretrained="" is not allowed random weights implicitly.
    assert "allow_random_weights" not in model_fields("ViT-B-32", "", sample_data=True)


def test_wrong_model_name_lists_near_matches() -> None:
    with pytest.raises(ValueError) as info:
        ClipModel(model_name="ViT-B-3").load()
    msg = str(info.value)
    assert "ViT-B-32" in msg and "DANBOORU_CLIP_MODEL" in msg and "model_name" in msg


def test_missing_checkpoint_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "clip.safetensors"
    res = ClipModel(model_name=DEMO_MODEL_NAME, pretrained=str(missing))
    for call in (res.load, res.fingerprint):
        with pytest.raises(FileNotFoundError) as info:
            call()
        assert str(missing) in str(info.value) and "DANBOORU_CLIP_PRETRAINED" in str(info.value)


def test_random_weights_need_the_flag() -> None:
    with pytest.raises(ValueError) as info:
        ClipModel(model_name=DEMO_MODEL_NAME, pretrained="").load()
    assert "allow_random_weights" in str(info.value)


def test_unknown_tag_lists_known_tags() -> None:
    with pytest.raises(ValueError) as info:
        ClipModel(pretrained="laion9b_nonsense").fingerprint()
    assert "laion2b_s34b_b79k" in str(info.value)


def test_precision_validation() -> None:
    with pytest.raises(ValueError):
        _demo(precision="fp16").load()
    with pytest.raises(ValueError):
        _demo(precision="int3").load()


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


def test_encode_text_normalised() -> None:
    emb = _demo().encode_text(["a girl standing", "a manga page"])
    assert emb.shape == (2, 64) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(emb[0], emb[1])
    assert _demo().encode_text([]).shape == (0, 64)


def test_registering_the_demo_model_leaves_no_temporary_folder(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    # A fresh process registers the demo once; its config folder must not outlive that.
    code = (
        "from danbooru_assets.clip.model import register_demo_model, DEMO_MODEL_NAME\n"
        "import open_clip\n"
        "register_demo_model(); register_demo_model()\n"
        "assert DEMO_MODEL_NAME in open_clip.list_models()\n"
        "open_clip.add_model_config(open_clip.factory._MODEL_CONFIG_PATHS[0])  # a later rescan keeps it\n"
        "assert DEMO_MODEL_NAME in open_clip.list_models()\n"
        "open_clip.create_model(DEMO_MODEL_NAME, pretrained=None)\n"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("danbooru_clip_configs_")] == []
