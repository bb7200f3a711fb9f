"""Getting open_clip weights from the Hugging Face hub without hanging.

open_clip downloads a pretrained tag's weights from the hub on first use and retries for
minutes when the hub cannot be reached. :func:`prepare_hub_download` decides before the
download: weights already in the local cache load offline (:func:`hf_offline`); otherwise
one bounded connection probe (:func:`hub_reachable`) tells whether a download can work,
and if not the run fails at once (:mod:`danbooru_assets.clip.model` says how to give a
local file instead).

The variables read here (``HF_HUB_OFFLINE``, ``HF_ENDPOINT``, the proxy variables) are
huggingface_hub's own, read as it reads them; the project's own CLIP variables are in
:func:`danbooru_assets.config.clip_model_fields`.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any, Iterator
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0


class HubUnavailable(RuntimeError):
    """The weights of a tag are not cached and the hub cannot be reached."""


def hub_reachable(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``url``'s host opens; proxied setups are trusted as is."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    parsed = urlparse(url)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def hub_weights_cached(pretrained_cfg: dict[str, Any]) -> bool:
    """Whether the hub weights of an open_clip pretrained config are in the local HF cache."""
    hub = pretrained_cfg.get("hf_hub", "")
    if not hub:
        return False
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    repo_id, filename = os.path.split(hub)
    names = [filename] if filename else [
        "open_clip_model.safetensors",
        "open_clip_pytorch_model.bin",
    ]
    return any(isinstance(try_to_load_from_cache(repo_id, n), str) for n in names)


@contextlib.contextmanager
def hf_offline(enabled: bool) -> Iterator[None]:
    """Temporarily put huggingface_hub in offline mode, so a missing file fails at once.

    ``HF_HUB_OFFLINE`` is read when huggingface_hub is imported, so the module constant is
    set as well as the environment variable; both are restored afterwards.
    """
    if not enabled:
        yield
        return
    try:
        from huggingface_hub import constants as hf_constants
    except ImportError:
        hf_constants = None
    old_env = os.environ.get("HF_HUB_OFFLINE")
    old_const = getattr(hf_constants, "HF_HUB_OFFLINE", None)
    os.environ["HF_HUB_OFFLINE"] = "1"
    if hf_constants is not None:
        hf_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env
        if hf_constants is not None:
            hf_constants.HF_HUB_OFFLINE = old_const


def prepare_hub_download(name: str, tag: str) -> bool:
    """Whether to load the tag ``name``/``tag`` offline; :class:`HubUnavailable` at once
    when its weights can be had neither from the cache nor from the hub.

    Returns True when the weights are already cached (no network needed).
    """
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, tag) or {}
    if cfg.get("file") or hub_weights_cached(cfg):
        return True
    env_offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
    # open_clip prefers the hub when a tag has both a hub repo and a plain URL.
    hub = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = hub if cfg.get("hf_hub") or not cfg.get("url") else cfg["url"]
    if env_offline or not hub_reachable(url):
        why = "HF_HUB_OFFLINE is set" if env_offline else f"{urlparse(url).hostname} is unreachable"
        raise HubUnavailable(f"The weights {name}/{tag} are not in the local cache and {why}.")
    return False
