"""Weights from the hub: cached weights load offline, a missing hub fails at once."""

from __future__ import annotations

import os
import socket

import pytest

from danbooru_assets.clip import hub
from danbooru_assets.clip.model import ClipModel


def test_hub_failure_fails_fast_with_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub, "hub_weights_cached", lambda cfg: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never touch the network in tests
    with pytest.raises(RuntimeError) as info:
        ClipModel(device="cpu").load()
    msg = str(info.value)
    assert "DANBOORU_CLIP_PRETRAINED" in msg and "path" in msg and "ViT-B-32" in msg


def test_unreachable_hub_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub, "hub_weights_cached", lambda cfg: False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # nothing listens: refused at once
    # Fast failure means one bounded connection probe, not open_clip's retrying download.
    probes: list[tuple[tuple[str, int], float]] = []
    real_connect = socket.create_connection

    def recording_connect(address, timeout=None, *args, **kwargs):
        probes.append((address, timeout))
        return real_connect(address, timeout, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", recording_connect)
    with pytest.raises(RuntimeError, match="unreachable"):
        ClipModel(device="cpu").load()
    assert probes == [(("127.0.0.1", 9), 3.0)]


def test_hf_offline_context_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    before = constants.HF_HUB_OFFLINE
    with hub.hf_offline(True):
        assert constants.is_offline_mode()
    assert constants.HF_HUB_OFFLINE == before
    assert "HF_HUB_OFFLINE" not in os.environ


def test_prepare_hub_download_cached_weights_load_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub, "hub_weights_cached", lambda cfg: True)
    monkeypatch.setattr(hub, "hub_reachable", lambda url, timeout_s=0: pytest.fail("probed the hub"))
    assert hub.prepare_hub_download("ViT-B-32", "laion2b_s34b_b79k") is True


def test_proxies_are_trusted_without_a_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("probed"))
    assert hub.hub_reachable("https://127.0.0.1:9")
