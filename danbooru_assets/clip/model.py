"""The CLIP model: open_clip weights, loaded once per process, as a plain object.

:class:`ClipModel` holds what identifies and runs a model (no Dagster; the code
location's ``ClipModelResource`` in :mod:`danbooru_assets.orchestration.resources` is a
thin face over it):

- ``model_name`` (env ``DANBOORU_CLIP_MODEL``): an open_clip architecture, default
  ``ViT-B-32``; ``danbooru-demo-tiny`` is a tiny architecture registered by this module for
  offline demos and tests.
- ``pretrained`` (env ``DANBOORU_CLIP_PRETRAINED``): an open_clip pretrained tag (default
  ``laion2b_s34b_b79k``, downloaded from the Hugging Face hub on first use, see
  :mod:`danbooru_assets.clip.hub`), the path of a local checkpoint file (a state dict, as
  open_clip loads it), or ``""`` for random weights, which is only accepted with
  ``allow_random_weights=True`` (the demo sets it).
- ``device`` (``auto`` = CUDA when present), ``precision`` (``auto`` = bf16/fp16 autocast
  on CUDA, fp32 on CPU), ``batch_size`` and ``num_workers`` (``-1`` = ``min(4, cpus)``).

Rule: sample data runs the demo model unless configured otherwise; a real dataset runs the
real model, and if its weights cannot be had the run fails fast with a message saying how
to give a local file. It never falls back to random weights silently; every embedding
carries the model fingerprint, and demo output says :data:`DEMO_WARNING`.

The model turns text and batches of decoded pixels into embeddings; the pass that decodes
images (once each, with their statistics) is :mod:`danbooru_assets.clip.image_pass`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from danbooru_assets.clip.hub import HubUnavailable, hf_offline, prepare_hub_download

if TYPE_CHECKING:  # torch and numpy load when the model does, not with the code location
    import numpy as np
    import torch

DEMO_MODEL_NAME = "danbooru-demo-tiny"
DEMO_WARNING = "demo model, random weights: scores carry no meaning"
# The variables' names, for messages; config.clip_model_env reads them.
ENV_MODEL = "DANBOORU_CLIP_MODEL"
ENV_PRETRAINED = "DANBOORU_CLIP_PRETRAINED"
DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
# The demo: the tiny architecture with random weights, for sample data and tests.
DEMO_FIELDS: dict[str, Any] = {
    "model_name": DEMO_MODEL_NAME,
    "pretrained": "",
    "allow_random_weights": True,
    "batch_size": 32,
}

# Small widths keep the demo fast on a laptop CPU; image_size stays 224 so the
# preprocessing (and the loader's draft decoding) is exactly the real models'.
DEMO_MODEL_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
# Random initialisation is seeded so every process builds the same random model: rows
# stored under one fingerprint must come from one set of weights.
RANDOM_INIT_SEED = 0
CHECKPOINT_SUFFIXES = {".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz"}

_register_lock = threading.Lock()
_demo_registered = False
_load_lock = threading.Lock()
_LOADED: dict[tuple, "LoadedClip"] = {}
_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def register_demo_model() -> None:
    """Register :data:`DEMO_MODEL_CONFIG` with open_clip under :data:`DEMO_MODEL_NAME` (once)."""
    global _demo_registered
    import open_clip

    with _register_lock:
        if _demo_registered and DEMO_MODEL_NAME in open_clip.list_models():
            return
        # open_clip registers configs from files (the file stem is the model name) and
        # reads them at once into its registry, so the folder goes when registered; its
        # later rescans skip a path that no longer exists.
        with tempfile.TemporaryDirectory(prefix="danbooru_clip_configs_") as folder:
            (Path(folder) / f"{DEMO_MODEL_NAME}.json").write_text(json.dumps(DEMO_MODEL_CONFIG))
            open_clip.add_model_config(folder)
        _demo_registered = True


def checkpoint_sha256(path: Path | str, length: int = 16) -> str:
    """First ``length`` hex digits of the file's sha256, cached by (path, size, mtime)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        _HASH_CACHE[key] = digest.hexdigest()
    return _HASH_CACHE[key][:length]


def model_fields(env_model: str, env_pretrained: str | None, sample_data: bool) -> dict[str, Any]:
    """The model's fields from the environment's values (see ``config.clip_model_env``).

    Nothing set: the demo on sample data, else the real default model (a real dataset
    never gets the demo implicitly, and a run without its weights fails fast in
    :meth:`ClipModel.load`). The demo architecture without weights gets random weights.
    """
    model = env_model.strip()
    if not model and env_pretrained is None:
        return dict(DEMO_FIELDS) if sample_data else {}
    fields: dict[str, Any] = {"model_name": model or DEFAULT_MODEL}
    if env_pretrained is not None:
        fields["pretrained"] = env_pretrained.strip()
    elif fields["model_name"] == DEMO_MODEL_NAME:
        fields["pretrained"] = ""
    if fields["model_name"] == DEMO_MODEL_NAME and fields.get("pretrained") == "":
        fields["allow_random_weights"] = True
    return fields


def _looks_like_path(value: str) -> bool:
    return (
        os.sep in value
        or "/" in value
        or value.startswith((".", "~"))
        or Path(value).suffix.lower() in CHECKPOINT_SUFFIXES
        or Path(value).expanduser().exists()
    )


def how_to_give_weights(model_name: str) -> str:
    """The instructions every weights failure ends with."""
    return (
        f"To run without network access, download the weights once on a machine with internet "
        f"(e.g. `python -c \"import open_clip; open_clip.create_model_and_transforms('{model_name}', "
        f"pretrained='<tag>')\"`, then copy the open_clip_*.safetensors/.bin file from the "
        f"Hugging Face cache, ~/.cache/huggingface/hub), and set `pretrained` in the clip "
        f"resource config (or the {ENV_PRETRAINED} environment variable) to that file's path."
    )


@dataclass
class LoadedClip:
    """A loaded open_clip model with what it takes to use it."""

    model: torch.nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    device: torch.device
    dtype: torch.dtype  # compute dtype: fp32, or the autocast dtype (fp16/bf16)
    image_size: int
    embed_dim: int
    # ``preprocess`` split (clip.loader.split_preprocess): the part loader workers run on
    # each image (to uint8), and the normalisation run once per batch on the device.
    worker_transform: Callable[[Any], torch.Tensor]
    normalize: Callable[[torch.Tensor], torch.Tensor]

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to :attr:`dtype` when it is a reduced precision, else a no-op."""
        import torch

        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


@dataclass(frozen=True)
class ClipModel:
    """An open_clip model for image embeddings and prompt scoring (see the module docstring)."""

    model_name: str = DEFAULT_MODEL
    pretrained: str = DEFAULT_PRETRAINED
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 64
    num_workers: int = -1
    allow_random_weights: bool = False

    @classmethod
    def demo(cls) -> "ClipModel":
        """The tiny random-weights model for sample data and tests (no download)."""
        return cls(**DEMO_FIELDS)

    def replace(self, **changes: Any) -> "ClipModel":
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------- validation
    def _checked_model_name(self) -> str:
        import open_clip

        register_demo_model()
        names = open_clip.list_models()
        if self.model_name in names:
            return self.model_name
        near = difflib.get_close_matches(self.model_name, names, n=5, cutoff=0.5)
        raise ValueError(
            f"Unknown CLIP model name {self.model_name!r}"
            + (f"; close matches: {', '.join(near)}" if near else "")
            + f". Set `model_name` in the clip resource config (or the {ENV_MODEL} environment "
            f"variable) to one of open_clip.list_models() ({len(names)} names, e.g. "
            f"{DEFAULT_MODEL}, ViT-L-14), or {DEMO_MODEL_NAME!r} for the offline demo."
        )

    def _pretrained_kind(self) -> str:
        """``"random"``, ``"path"`` or ``"tag"``, after checking the value is usable."""
        import open_clip

        value = self.pretrained.strip()
        if not value:
            if not self.allow_random_weights:
                raise ValueError(
                    f"pretrained='' means random weights for {self.model_name!r}, whose embeddings "
                    f"and scores carry no meaning. Give a pretrained tag or a checkpoint path in "
                    f"`pretrained` (or {ENV_PRETRAINED}); only demos and tests set "
                    f"allow_random_weights=True."
                )
            return "random"
        tags = open_clip.list_pretrained_tags_by_model(self.model_name)
        if value in tags:  # a known tag wins over a same-named file in the working directory
            return "tag"
        if _looks_like_path(value):
            path = Path(value).expanduser()
            if not path.is_file():
                raise FileNotFoundError(
                    f"CLIP checkpoint file not found: {path}. Fix `pretrained` in the clip resource "
                    f"config (or the {ENV_PRETRAINED} environment variable) to point at an existing "
                    f"open_clip checkpoint (.safetensors/.bin/.pt) for model {self.model_name!r}."
                )
            return "path"
        raise ValueError(
            f"Unknown pretrained tag {value!r} for CLIP model {self.model_name!r}. Known tags: "
            f"{', '.join(tags) or '(none)'}. Set `pretrained` (or {ENV_PRETRAINED}) to one of "
            f"them or to the path of a local checkpoint file."
        )

    def _resolved_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but CUDA is not available; use 'auto' or 'cpu'.")
        return device

    def _resolved_dtype(self, device: torch.device) -> torch.dtype:
        import torch

        precision = self.precision.lower()
        if precision == "auto":
            if device.type != "cuda":
                return torch.float32
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
        if precision not in dtypes:
            raise ValueError(f"precision={self.precision!r}; use one of auto, fp32, fp16, bf16.")
        if precision == "fp16" and device.type != "cuda":
            raise ValueError("precision='fp16' needs CUDA; use 'auto', 'fp32' or 'bf16' on CPU.")
        return dtypes[precision]

    # ---------------------------------------------------------------- fingerprint
    def fingerprint(self) -> dict[str, Any]:
        """What identifies the embeddings this model produces (no weights are loaded)."""
        import open_clip

        name = self._checked_model_name()
        kind = self._pretrained_kind()
        cfg = open_clip.get_model_config(name) or {}
        image_size = cfg.get("vision_cfg", {}).get("image_size", 224)
        if isinstance(image_size, (list, tuple)):
            image_size = int(max(image_size))
        if kind == "path":
            weights = "sha256:" + checkpoint_sha256(Path(self.pretrained.strip()).expanduser())
        elif kind == "tag":
            weights = self.pretrained.strip()
        else:
            weights = f"random-init-seed-{RANDOM_INIT_SEED}"
        return {
            "model_name": name,
            "pretrained": weights,
            "image_size": int(image_size),
            "embed_dim": int(cfg.get("embed_dim", 0)),
            "random_weights": kind == "random",
        }

    def fingerprint_id(self) -> str:
        """A short stable hash of :meth:`fingerprint`, stored with every embedding row."""
        payload = json.dumps(self.fingerprint(), sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:16]

    def is_demo(self) -> bool:
        """True for the demo architecture or random weights: outputs carry no meaning."""
        return self.model_name == DEMO_MODEL_NAME or not self.pretrained.strip()

    def metadata(self) -> dict[str, Any]:
        """What describes the model in the assets' metadata (with :data:`DEMO_WARNING` for the demo)."""
        fp = self.fingerprint()
        meta: dict[str, Any] = {f"clip_{k}": v for k, v in fp.items()}
        meta["clip_fingerprint"] = self.fingerprint_id()
        if self.is_demo():
            meta["warning"] = DEMO_WARNING
        return meta

    # ---------------------------------------------------------------------- load
    def load(self) -> LoadedClip:
        """Load the model once per process (cached by model, weights, device, precision)."""
        name = self._checked_model_name()
        kind = self._pretrained_kind()
        device = self._resolved_device()
        dtype = self._resolved_dtype(device)
        weights_key: tuple = (self.pretrained.strip(),)
        if kind == "path":
            path = Path(self.pretrained.strip()).expanduser()
            weights_key = (str(path.resolve()), checkpoint_sha256(path))
        key = (name, kind, weights_key, str(device), str(dtype))
        with _load_lock:
            if key not in _LOADED:
                _LOADED[key] = self._create(name, kind, device, dtype)
            return _LOADED[key]

    def _create(self, name: str, kind: str, device: torch.device, dtype: torch.dtype) -> LoadedClip:
        import torch

        import open_clip

        from danbooru_assets.clip.loader import split_preprocess

        pretrained: str | None = None
        offline = False
        if kind == "path":
            pretrained = str(Path(self.pretrained.strip()).expanduser())
        elif kind == "tag":
            pretrained = self.pretrained.strip()
            try:
                offline = prepare_hub_download(name, pretrained)
            except HubUnavailable as exc:
                raise RuntimeError(f"{exc} " + how_to_give_weights(name)) from exc
        try:
            with hf_offline(offline), torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_INIT_SEED)
                model, _, preprocess = open_clip.create_model_and_transforms(
                    name, pretrained=pretrained, precision="fp32", device=device
                )
        except Exception as exc:
            if kind == "tag":
                raise RuntimeError(
                    f"Could not get the weights {name}/{pretrained} from the hub ({exc}). "
                    + how_to_give_weights(name)
                ) from exc
            if kind == "path":
                raise RuntimeError(
                    f"Could not load checkpoint {pretrained} into CLIP model {name!r} ({exc}). "
                    f"Check that the file is an open_clip state dict for this architecture, or "
                    f"change `model_name`/`pretrained` ({ENV_MODEL}/{ENV_PRETRAINED})."
                ) from exc
            raise
        model.eval()
        cfg = open_clip.get_model_config(name) or {}
        image_size = model.visual.image_size
        image_size = int(max(image_size)) if isinstance(image_size, (tuple, list)) else int(image_size)
        worker_transform, normalize = split_preprocess(preprocess)
        return LoadedClip(
            model=model,
            preprocess=preprocess,
            tokenizer=open_clip.get_tokenizer(name),
            device=device,
            dtype=dtype,
            image_size=image_size,
            embed_dim=int(cfg.get("embed_dim", 0)),
            worker_transform=worker_transform,
            normalize=normalize,
        )

    # -------------------------------------------------------------------- encode
    def encode_text(self, prompts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 text embeddings ``[len(prompts), D]``."""
        import numpy as np
        import torch
        import torch.nn.functional as F

        loaded = self.load()
        if not prompts:
            return np.zeros((0, loaded.embed_dim), dtype=np.float32)
        tokens = loaded.tokenizer(list(prompts)).to(loaded.device)
        with torch.inference_mode(), loaded.autocast():
            feats = loaded.model.encode_text(tokens)
        return F.normalize(feats.float(), dim=-1).cpu().numpy()

    def embed_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """L2-normalised float16 embeddings ``[B, D]`` of a batch from the loader (the
        ``uint8`` output of :attr:`LoadedClip.worker_transform`, stacked)."""
        import numpy as np
        import torch
        import torch.nn.functional as F

        loaded = self.load()
        with torch.inference_mode(), loaded.autocast():
            batch = loaded.normalize(pixels.to(loaded.device, non_blocking=True))
            feats = F.normalize(loaded.model.encode_image(batch).float(), dim=-1)
        return feats.cpu().numpy().astype(np.float16)

    def logit_scale(self) -> float:
        """The model's learned softmax temperature (``exp(logit_scale)``, ~100 for real CLIP)."""
        return float(self.load().model.logit_scale.exp().item())


__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_PRETRAINED",
    "DEMO_FIELDS",
    "DEMO_MODEL_CONFIG",
    "DEMO_MODEL_NAME",
    "DEMO_WARNING",
    "ENV_MODEL",
    "ENV_PRETRAINED",
    "ClipModel",
    "LoadedClip",
    "checkpoint_sha256",
    "model_fields",
    "register_demo_model",
]
