"""Pose estimators behind one interface, producing COCO-17 keypoints in image pixels.

Backends:

- ``keypoint_rcnn``: torchvision's Keypoint R-CNN (ResNet-50 FPN). Weights come from
  torchvision's hub on a user's machine, or from a local state-dict file; random
  initialisation only with ``allow_random_weights=True`` (tests).
- ``bizarre_pose``: the estimator the seed used (Chen & Zwicker, WACV 2022), loaded from
  a user-supplied checkout of ShuhongChen/bizarre-pose-estimator and its checkpoints;
  nothing of it is vendored here. Its keypoints are (row, col); we return (x, y).
- ``mediapipe``: BlazePose (optional extra ``mediapipe``), 33 landmarks mapped to COCO-17.
- ``keypoint_files``: not an image model; published keypoint JSON is read with
  ``keypoint_files.read_keypoint_files`` (see ``keypoint_files.source_fingerprint``).

Every estimator returns ``(keypoints [N,17,3] (x, y, conf), boxes [N,4] (x0, y0, x1, y1))``
in pixels of the images it is given, NaN where nothing was found. Images come from the
project's one decode (:func:`danbooru_assets.core.images.open_image_rgb`: EXIF
orientation applied, 8-bit RGB); any other image is brought to 8-bit RGB by the same
:func:`~danbooru_assets.core.images.to_rgb8` (16-bit scaled, transparency over white).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Iterator, Protocol, Sequence, runtime_checkable

import numpy as np
import pandas as pd
from PIL import Image

from danbooru_assets.pose.coco import NUM_KEYPOINTS
from danbooru_assets.core.images import to_rgb8
from danbooru_assets.pose.backend_names import BACKENDS, KEYPOINT_FILES
from danbooru_assets.pose.features import keypoint_frame

BIZARRE_POSE_URL = "https://github.com/ShuhongChen/bizarre-pose-estimator"
BIZARRE_POSE_DOWNLOADS = (
    "the Google Drive folder 'wacv2022_bizarre_pose_estimator_release' linked from its README "
    "(file bizarre_pose_models.zip, extracted into the checkout root)"
)
# Paths inside a checkout after extracting bizarre_pose_models.zip (per its README and
# _scripts/pose_estimator.py).
BIZARRE_POSE_CHECKPOINT = "_train/character_pose_estim/runs/feat_concat+data.ckpt"
BIZARRE_SEGMENTER_CHECKPOINT = (
    "_train/character_bg_seg/runs/eyeless_alaska_vulcan0000/checkpoints/"
    "epoch=0096-val_f1=0.9508-val_loss=0.0483.ckpt"
)

# BlazePose landmark index for each COCO-17 keypoint, in COCO order.
MEDIAPIPE_TO_COCO: tuple[int, ...] = (0, 2, 5, 7, 8, 11, 12, 13, 14, 15, 16, 23, 24, 25, 26, 27, 28)


class BackendUnavailableError(RuntimeError):
    """A backend cannot run here (missing checkout, checkpoint or package); says how to fix it."""


@runtime_checkable
class PoseEstimator(Protocol):
    """What every backend offers. ``estimate`` returns keypoints [N,17,3] and boxes [N,4]."""

    name: str

    def fingerprint(self) -> dict: ...

    def estimate(self, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]: ...


def fingerprint_string(fp: dict) -> str:
    """Stable string form of a fingerprint, for the ``backend_fingerprint`` column."""
    return json.dumps(fp, sort_keys=True, separators=(",", ":"))


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _empty(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((n, NUM_KEYPOINTS, 3), np.nan), np.full((n, 4), np.nan)


# ---------------------------------------------------------------- keypoint R-CNN


def rcnn_fingerprint(
    checkpoint: str = "",
    allow_random_weights: bool = False,
    seed: int = 0,
    min_size: int = 800,
    max_size: int = 1333,
    box_score_thresh: float = 0.05,
    detections_per_img: int = 1,
    **model_kwargs: object,
) -> dict:
    """keypoint_rcnn's fingerprint, from its settings and the weights' identity: no model built."""
    import torchvision
    from torchvision.models.detection import KeypointRCNN_ResNet50_FPN_Weights

    if checkpoint:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise BackendUnavailableError(f"keypoint_rcnn checkpoint {path} not found (a torchvision state dict)")
        weights_id = f"file:{path.name}:sha256:{_file_digest(path)}"
    elif allow_random_weights:
        weights_id = f"random-init:seed{seed}"
    else:
        weights_id = f"torchvision:{KeypointRCNN_ResNet50_FPN_Weights.DEFAULT}"
    return {
        "backend": KeypointRCNNEstimator.name,
        "weights": weights_id,
        "min_size": min_size,
        "max_size": max_size,
        "box_score_thresh": box_score_thresh,
        "detections_per_img": detections_per_img,
        **{k: v for k, v in sorted(model_kwargs.items())},
        "torchvision": torchvision.__version__.split("+")[0],
    }


class KeypointRCNNEstimator:
    """torchvision ``keypointrcnn_resnet50_fpn``; takes the top-scoring person per image.

    Extra ``model_kwargs`` (e.g. ``rpn_post_nms_top_n_test``) go to torchvision's builder.

    Confidence is the sigmoid of torchvision's per-keypoint heatmap score (a logit).
    """

    name = "keypoint_rcnn"

    def __init__(
        self,
        checkpoint: str = "",
        device: str = "auto",
        allow_random_weights: bool = False,
        batch_size: int = 8,
        min_size: int = 800,
        max_size: int = 1333,
        box_score_thresh: float = 0.05,
        detections_per_img: int = 1,
        seed: int = 0,
        **model_kwargs: object,
    ) -> None:
        import torch
        from torchvision.models.detection import (
            KeypointRCNN_ResNet50_FPN_Weights,
            keypointrcnn_resnet50_fpn,
        )

        self.device = _resolve_device(device)
        self.batch_size = max(1, int(batch_size))
        # only the top-scoring person is kept, and the model has one class (person), so
        # one detection per image suffices: the keypoint head then runs on one box, not 100
        kwargs = dict(
            min_size=min_size, max_size=max_size, box_score_thresh=box_score_thresh,
            box_detections_per_img=detections_per_img, **model_kwargs,
        )
        self._fingerprint = rcnn_fingerprint(
            checkpoint, allow_random_weights, seed, min_size, max_size, box_score_thresh, detections_per_img,
            **model_kwargs,
        )
        if checkpoint:
            model = keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None, **kwargs)
            state = torch.load(Path(checkpoint).expanduser(), map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        elif allow_random_weights:
            # random init is only for tests; a fixed seed keeps it reproducible
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None, **kwargs)
        else:
            weights = KeypointRCNN_ResNet50_FPN_Weights.DEFAULT
            model = keypointrcnn_resnet50_fpn(weights=weights, **kwargs)  # torchvision hub download/cache
        self.model = model.eval().to(self.device)

    def fingerprint(self) -> dict:
        return dict(self._fingerprint)

    def estimate(self, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        import torch
        from torchvision.transforms.functional import pil_to_tensor

        kps, boxes = _empty(len(images))
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            tensors = [pil_to_tensor(to_rgb8(im)).to(self.device, torch.float32) / 255.0 for im in batch]
            with torch.inference_mode():
                outputs = self.model(tensors)
            for j, out in enumerate(outputs):
                person = torch.nonzero(out["labels"] == 1).flatten()
                if person.numel() == 0:
                    continue
                best = person[torch.argmax(out["scores"][person])]
                k = out["keypoints"][best].float().cpu().numpy()
                score = out["keypoints_scores"][best].float().cpu().numpy()
                kps[start + j, :, 0:2] = k[:, 0:2]
                kps[start + j, :, 2] = 1.0 / (1.0 + np.exp(-score))
                boxes[start + j] = out["boxes"][best].float().cpu().numpy()
        return kps, boxes


# ---------------------------------------------------------------- bizarre-pose-estimator


def _bizarre_missing(what: str) -> BackendUnavailableError:
    return BackendUnavailableError(
        f"bizarre_pose backend: {what}. Clone {BIZARRE_POSE_URL} (never vendored here), "
        f"download {BIZARRE_POSE_DOWNLOADS}, so that <checkout>/{BIZARRE_POSE_CHECKPOINT} and "
        f"<checkout>/{BIZARRE_SEGMENTER_CHECKPOINT} exist, and install its Python dependencies "
        "(pytorch-lightning, kornia, detectron2 - see its _env/Dockerfile). Then set the config key "
        "`bizarre_pose_repo` to the checkout path (and optionally `checkpoint` to another "
        "feat_concat/feat_match .ckpt)."
    )


@contextlib.contextmanager
def _inside_checkout(repo: Path) -> Iterator[None]:
    """Import from the checkout and run with it as cwd: its model constructors load
    further checkpoints (e.g. the danbooru tagger) by paths relative to the repo root."""
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    old = os.getcwd()
    os.chdir(repo)
    try:
        yield
    finally:
        os.chdir(old)


class BizarrePoseEstimator:
    """Adapter for bizarre-pose-estimator, following its ``_scripts/pose_estimator.py``.

    Per image: background segmentation -> character bbox; crop the bbox into a square
    of the model's input size with its padding; run the pose model (batched: all crops
    share one size); map the (row, col) keypoints back through the crop to original
    pixels and return them as (x, y). Confidence is the peak of the (smoothed) keypoint
    heatmap probability; the box is the segmentation bbox.
    """

    name = "bizarre_pose"

    def __init__(
        self,
        repo: str,
        checkpoint: str = "",
        device: str = "auto",
        batch_size: int = 8,
        smoothing: float = 0.1,
    ) -> None:
        if not repo:
            raise _bizarre_missing("no checkout configured")
        root = Path(repo).expanduser().resolve()
        if not (root / "_train" / "character_pose_estim" / "models").is_dir():
            raise _bizarre_missing(f"{root} is not a bizarre-pose-estimator checkout")
        ckpt = Path(checkpoint).expanduser() if checkpoint else root / BIZARRE_POSE_CHECKPOINT
        seg_ckpt = root / BIZARRE_SEGMENTER_CHECKPOINT
        for path in (ckpt, seg_ckpt):
            if not path.is_file():
                raise _bizarre_missing(f"checkpoint {path} not found")
        # the upstream script picks the model class from the checkpoint name
        if "feat_concat" in ckpt.name:
            module_name = "_train.character_pose_estim.models.passup"
        elif "feat_match" in ckpt.name:
            module_name = "_train.character_pose_estim.models.fermat"
        else:
            raise _bizarre_missing(f"checkpoint {ckpt.name} is neither a feat_concat nor a feat_match model")
        self.device = _resolve_device(device)
        self.batch_size = max(1, int(batch_size))
        self.smoothing = smoothing
        try:
            with _inside_checkout(root):
                seg_cls = importlib.import_module("_train.character_bg_seg.models.alaska").Model
                pose_cls = importlib.import_module(module_name).Model
                self.segmenter = seg_cls.load_from_checkpoint(str(seg_ckpt)).eval().to(self.device)
                self.model = pose_cls.load_from_checkpoint(str(ckpt), strict=False).eval().to(self.device)
        except ImportError as exc:
            raise _bizarre_missing(f"importing its code failed ({exc})") from exc
        try:
            largs = self.model.hparams.largs.adds_keypoints
        except AttributeError:
            largs = self.model.hparams.largs.danbooru_coco
        self.size = int(largs.size)
        self.pad = float(largs.size * largs.padding)
        self.seg_size = int(self.segmenter.hparams.largs.bg_seg.size)
        self._fingerprint = {
            "backend": self.name,
            "checkpoint": f"{ckpt.name}:sha256:{_file_digest(ckpt)}",
            "segmenter": f"sha256:{_file_digest(seg_ckpt)}",
            "smoothing": smoothing,
        }

    def fingerprint(self) -> dict:
        return dict(self._fingerprint)

    def _segment_bbox(self, img: Image.Image) -> tuple[int, int, int, int]:
        """Character bbox (row0, col0, height, width) from the segmenter, as ``abbox`` does."""
        import torch
        import torch.nn.functional as F
        from torchvision.transforms.functional import to_tensor

        w, h = img.size
        scale = self.seg_size / min(w, h)
        small = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
        with torch.inference_mode():
            out = self.segmenter(to_tensor(small)[None].to(self.device))
            prob = out["softmax"][:, 1:2].float()
            prob = F.interpolate(prob, size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        mask = (prob > 0.5).cpu().numpy()
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if rows.size == 0 or cols.size == 0:
            return 0, 0, h, w
        r0, r1 = max(int(rows.min()) - 1, 0), min(int(rows.max()) + 1, h)
        c0, c1 = max(int(cols.min()) - 1, 0), min(int(cols.max()) + 1, w)
        return r0, c0, r1 - r0, c1 - c0

    def _crop(self, r0: int, c0: int, bh: int, bw: int) -> tuple[float, float, float]:
        """Origin (row, col) and side, in original pixels, of the square the model sees."""
        side = max(bh, bw)
        # same centring as upstream resize_square_dry (floor division of a negative)
        dr, dc = ((0, -(bh - bw) // 2), (-(bw - bh) // 2, 0))[bh < bw]
        scale = side / self.size
        return r0 + dr - self.pad / 2 * scale, c0 + dc - self.pad / 2 * scale, (self.size + self.pad) * scale

    def estimate(self, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        import torch
        from torchvision.transforms.functional import to_tensor

        kps, boxes = _empty(len(images))
        for start in range(0, len(images), self.batch_size):
            # transparency over white, as upstream's ``alpha_bg(1)`` does
            batch = [to_rgb8(im) for im in images[start : start + self.batch_size]]
            crops, frames = [], []
            for im in batch:
                r0, c0, bh, bw = self._segment_bbox(im)
                orow, ocol, side = self._crop(r0, c0, bh, bw)
                crop = im.transform(
                    (self.size, self.size), Image.EXTENT, (ocol, orow, ocol + side, orow + side),
                    Image.BILINEAR, fillcolor=(0, 0, 0),
                )
                crops.append(to_tensor(crop))
                frames.append((orow, ocol, side, (c0, r0, c0 + bw, r0 + bh)))
            with torch.inference_mode():
                out = self.model(torch.stack(crops).to(self.device), smoothing=self.smoothing, return_more=True)
            rc = out["keypoints"][:, :NUM_KEYPOINTS].float().cpu().numpy()  # (row, col)
            conf = out["keypoint_heatmaps_prob"][:, :NUM_KEYPOINTS].flatten(2).amax(-1).float().cpu().numpy()
            for j, (orow, ocol, side, box) in enumerate(frames):
                s = side / self.size
                kps[start + j, :, 0] = ocol + rc[j, :, 1] * s  # x from the column
                kps[start + j, :, 1] = orow + rc[j, :, 0] * s  # y from the row
                kps[start + j, :, 2] = conf[j]
                boxes[start + j] = box
        return kps, boxes


# ---------------------------------------------------------------- MediaPipe BlazePose


class MediapipeEstimator:
    """BlazePose via the legacy ``mp.solutions.pose`` API (model ships in the wheel).

    Confidence is BlazePose's landmark visibility.
    """

    name = "mediapipe"

    def __init__(self, model_complexity: int = 1) -> None:
        try:
            import mediapipe as mp
        except ImportError as exc:
            raise BackendUnavailableError(
                "mediapipe backend needs the optional extra: pip install 'danbooru_assets[mediapipe]' "
                "(mediapipe==0.10.21, which pins numpy<2 and protobuf<5; use a separate environment "
                "if the main one needs newer versions)"
            ) from exc
        self._mp_version = getattr(mp, "__version__", "unknown")
        self.model_complexity = model_complexity
        self._pose = mp.solutions.pose.Pose(static_image_mode=True, model_complexity=model_complexity)

    def fingerprint(self) -> dict:
        return {"backend": self.name, "mediapipe": self._mp_version, "model_complexity": self.model_complexity}

    def estimate(self, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        kps, boxes = _empty(len(images))
        index = np.asarray(MEDIAPIPE_TO_COCO)
        for i, im in enumerate(images):
            rgb = np.ascontiguousarray(np.asarray(to_rgb8(im)))
            result = self._pose.process(rgb)
            if result.pose_landmarks is None:
                continue
            w, h = im.size
            lm = np.array([(p.x * w, p.y * h, p.visibility) for p in result.pose_landmarks.landmark])
            kps[i] = lm[index]
            boxes[i] = (kps[i, :, 0].min(), kps[i, :, 1].min(), kps[i, :, 0].max(), kps[i, :, 1].max())
        return kps, boxes

    def close(self) -> None:
        self._pose.close()


# ---------------------------------------------------------------- factory and helpers


@functools.lru_cache(maxsize=8)
def _cached_estimator(
    backend: str, checkpoint: str, device: str, allow_random_weights: bool, bizarre_pose_repo: str,
    batch_size: int, options: tuple[tuple[str, object], ...],
) -> PoseEstimator:
    opts = dict(options)
    if backend == "keypoint_rcnn":
        return KeypointRCNNEstimator(
            checkpoint=checkpoint, device=device, allow_random_weights=allow_random_weights,
            batch_size=batch_size, **opts,
        )
    if backend == "bizarre_pose":
        return BizarrePoseEstimator(
            repo=bizarre_pose_repo, checkpoint=checkpoint, device=device, batch_size=batch_size, **opts
        )
    if backend == "mediapipe":
        return MediapipeEstimator(**opts)
    if backend == KEYPOINT_FILES:
        raise ValueError(
            "keypoint_files is an importer, not an image model: use "
            "danbooru_assets.pose.keypoint_files.read_keypoint_files(source, axis_order, image_ids)"
        )
    raise ValueError(f"unknown pose backend {backend!r}; choose one of {BACKENDS}")


def make_estimator(
    backend: str,
    checkpoint: str = "",
    device: str = "auto",
    allow_random_weights: bool = False,
    bizarre_pose_repo: str = "",
    batch_size: int = 8,
    **options: object,
) -> PoseEstimator:
    """Build (once per process and argument set) the estimator for ``backend``.

    ``options`` go to the backend's constructor (e.g. ``min_size`` for keypoint_rcnn,
    ``smoothing`` for bizarre_pose, ``model_complexity`` for mediapipe).
    """
    return _cached_estimator(
        backend, checkpoint, device, bool(allow_random_weights), bizarre_pose_repo, int(batch_size),
        tuple(sorted(options.items())),
    )


def estimator_fingerprint(
    backend: str,
    checkpoint: str = "",
    allow_random_weights: bool = False,
    bizarre_pose_repo: str = "",
    **options: object,
) -> dict:
    """The fingerprint :func:`make_estimator` 's estimator would have (same arguments),
    without building it: a run whose rows are all reused loads no weights (as CLIP's
    fingerprint). keypoint_rcnn and mediapipe compute it from their settings; bizarre_pose
    digests its checkpoint files (reads them, builds nothing)."""
    if backend == "keypoint_rcnn":
        return rcnn_fingerprint(checkpoint, allow_random_weights, **options)
    if backend == "mediapipe":
        try:
            import mediapipe as mp
        except ImportError:  # the constructor names the extra to install
            return make_estimator(backend, **options).fingerprint()
        return {"backend": "mediapipe", "mediapipe": getattr(mp, "__version__", "unknown"),
                "model_complexity": options.get("model_complexity", 1)}
    if backend == "bizarre_pose":
        if not bizarre_pose_repo:
            raise _bizarre_missing("no checkout configured")
        root = Path(bizarre_pose_repo).expanduser().resolve()
        ckpt = Path(checkpoint).expanduser() if checkpoint else root / BIZARRE_POSE_CHECKPOINT
        seg_ckpt = root / BIZARRE_SEGMENTER_CHECKPOINT
        for path in (ckpt, seg_ckpt):
            if not path.is_file():
                raise _bizarre_missing(f"checkpoint {path} not found")
        return {
            "backend": "bizarre_pose",
            "checkpoint": f"{ckpt.name}:sha256:{_file_digest(ckpt)}",
            "segmenter": f"sha256:{_file_digest(seg_ckpt)}",
            "smoothing": options.get("smoothing", 0.1),
        }
    return make_estimator(backend, checkpoint=checkpoint, allow_random_weights=allow_random_weights,
                          bizarre_pose_repo=bizarre_pose_repo, **options).fingerprint()


def run_estimator(
    estimator: PoseEstimator,
    image_ids: Sequence[int],
    images: Sequence[Image.Image | None],
) -> pd.DataFrame:
    """The ``pose_keypoints`` rows for a batch: unreadable images (None) get status
    ``unreadable``, images without a person ``no_person``, the rest ``ok``."""
    n = len(images)
    kps, boxes = _empty(n)
    readable = [i for i, im in enumerate(images) if im is not None]
    if readable:
        k, b = estimator.estimate([images[i] for i in readable])
        kps[readable], boxes[readable] = k, b
    found = np.isfinite(kps[:, :, 0]).any(axis=1)
    status = np.where(found, "ok", "no_person").astype(object)
    status[[i for i, im in enumerate(images) if im is None]] = "unreadable"
    return keypoint_frame(
        image_ids, kps, boxes, backend=estimator.name,
        backend_fingerprint=fingerprint_string(estimator.fingerprint()), status=list(status),
    )
