"""Pose backends: real code paths on small inputs, never downloading anything."""

from __future__ import annotations

import os
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from danbooru_assets.pose.coco import KEYPOINT_COLUMNS
from danbooru_assets.pose.backends import (
    BIZARRE_POSE_CHECKPOINT,
    BIZARRE_SEGMENTER_CHECKPOINT,
    BackendUnavailableError,
    BizarrePoseEstimator,
    KeypointRCNNEstimator,
    PoseEstimator,
    make_estimator,
    run_estimator,
)


# fewer region proposals keep the CPU test fast; the code path is the production one
SMALL = dict(rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50)


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, size=(72, 96, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 255, size=(100, 64, 3), dtype=np.uint8)).convert("L"),
    ]


@pytest.fixture(scope="module")
def rcnn() -> KeypointRCNNEstimator:
    torch.set_num_threads(2)
    return make_estimator(
        "keypoint_rcnn", device="cpu", allow_random_weights=True, batch_size=2,
        min_size=64, max_size=96, box_score_thresh=0.0, **SMALL,
    )


def test_keypoint_rcnn_random_weights_shapes_on_cpu(rcnn):
    assert isinstance(rcnn, PoseEstimator)
    images = _images()
    kps, boxes = rcnn.estimate(images)
    assert kps.shape == (2, 17, 3) and boxes.shape == (2, 4)
    # box_score_thresh=0 with seeded random weights: every image yields a (meaningless) person,
    # so the coordinate checks below always run.
    assert np.isfinite(kps).all()
    for i, im in enumerate(images):
        assert (kps[i, :, 0] >= -1).all() and (kps[i, :, 0] <= im.width + 1).all()
        assert (kps[i, :, 1] >= -1).all() and (kps[i, :, 1] <= im.height + 1).all()
        assert ((kps[i, :, 2] >= 0) & (kps[i, :, 2] <= 1)).all()
        assert boxes[i, 0] <= boxes[i, 2] and boxes[i, 1] <= boxes[i, 3]
    fp = rcnn.fingerprint()
    assert fp["backend"] == "keypoint_rcnn" and fp["weights"] == "random-init:seed0"
    # cached per process: same arguments, same object
    again = make_estimator(
        "keypoint_rcnn", device="cpu", allow_random_weights=True, batch_size=2,
        min_size=64, max_size=96, box_score_thresh=0.0, **SMALL,
    )
    assert again is rcnn


def test_keypoint_rcnn_loads_a_local_state_dict(rcnn, tmp_path):
    path = tmp_path / "kprcnn.pth"
    torch.save(rcnn.model.state_dict(), path)
    loaded = KeypointRCNNEstimator(
        checkpoint=str(path), device="cpu", min_size=64, max_size=96, box_score_thresh=0.0, **SMALL
    )
    assert loaded.fingerprint()["weights"].startswith("file:kprcnn.pth:sha256:")
    images = _images()[:1]
    a, _ = rcnn.estimate(images)
    b, _ = loaded.estimate(images)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)
    with pytest.raises(BackendUnavailableError):
        KeypointRCNNEstimator(checkpoint=str(tmp_path / "absent.pth"), device="cpu")


def test_run_estimator_statuses(rcnn):
    class Fixed:
        name = "fixed"

        def fingerprint(self) -> dict:
            return {"backend": "fixed", "v": 1}

        def estimate(self, images):
            kps = np.full((len(images), 17, 3), np.nan)
            kps[0] = 1.0  # first readable image: a person; the rest: none
            return kps, np.zeros((len(images), 4))

    frame = run_estimator(Fixed(), [10, 11, 12], [Image.new("RGB", (8, 8)), None, Image.new("RGB", (8, 8))])
    assert frame["status"].tolist() == ["ok", "unreadable", "no_person"]
    assert frame["image_id"].tolist() == [10, 11, 12]
    assert set(KEYPOINT_COLUMNS) <= set(frame.columns)
    assert frame["backend"].eq("fixed").all() and frame["backend_fingerprint"].iloc[0] == '{"backend":"fixed","v":1}'
    assert np.isnan(frame.loc[1, "kp_nose_x"]) and frame.loc[0, "kp_nose_x"] == 1.0


def test_unknown_and_importer_backends():
    with pytest.raises(ValueError, match="unknown pose backend"):
        make_estimator("openpose")
    with pytest.raises(ValueError, match="read_keypoint_files"):
        make_estimator("keypoint_files")


def test_bizarre_pose_without_checkout_says_what_to_do(tmp_path):
    for repo in ("", str(tmp_path)):
        with pytest.raises(BackendUnavailableError) as info:
            make_estimator("bizarre_pose", bizarre_pose_repo=repo, device="cpu")
        msg = str(info.value)
        assert "https://github.com/ShuhongChen/bizarre-pose-estimator" in msg
        assert "bizarre_pose_models.zip" in msg and BIZARRE_POSE_CHECKPOINT in msg
        assert "`bizarre_pose_repo`" in msg


# A stand-in checkout with the upstream layout and interfaces (load_from_checkpoint,
# hparams.largs, forward outputs). The fake pose model answers the (row, col) of the
# brightest input pixel, so the adapter's crop inversion and (row, col) -> (x, y) have
# a known answer.
_FAKE_SEGMENTER = """
import torch
from types import SimpleNamespace as NS

class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.hparams = NS(largs=NS(bg_seg=NS(size=32)))

    @classmethod
    def load_from_checkpoint(cls, path, **kwargs):
        assert open(path).read() == "segmenter"
        return cls()

    def forward(self, x):
        fg = (x.amax(1, keepdim=True) > 0.2).float()
        return {"softmax": torch.cat([1 - fg, fg], 1)}
"""
_FAKE_POSE = """
import torch
from types import SimpleNamespace as NS

class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.hparams = NS(largs=NS(adds_keypoints=NS(size=64, padding=0.1)))

    @classmethod
    def load_from_checkpoint(cls, path, strict=True):
        assert open(path).read() == "pose"
        return cls()

    def forward(self, x, smoothing=None, return_more=False):
        b, _, h, w = x.shape
        flat = x[:, 0].reshape(b, -1).argmax(-1)
        rc = torch.stack([flat // w, flat % w], dim=1).float()  # (row, col) like upstream
        kps = rc[:, None, :].expand(b, 25, 2)
        prob = torch.full((b, 25, 16, 16), 0.25)
        prob[:, :, 3, 4] = 0.75
        return {"keypoints": kps, "keypoint_heatmaps_prob": prob}
"""


@pytest.fixture()
def fake_checkout(tmp_path):
    repo = tmp_path / "bizarre-pose-estimator"
    (repo / "_train/character_bg_seg/models").mkdir(parents=True)
    (repo / "_train/character_pose_estim/models").mkdir(parents=True)
    (repo / "_train/character_bg_seg/models/alaska.py").write_text(textwrap.dedent(_FAKE_SEGMENTER))
    (repo / "_train/character_pose_estim/models/passup.py").write_text(textwrap.dedent(_FAKE_POSE))
    for rel, text in ((BIZARRE_POSE_CHECKPOINT, "pose"), (BIZARRE_SEGMENTER_CHECKPOINT, "segmenter")):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(text)
    yield repo
    for name in [m for m in sys.modules if m == "_train" or m.startswith("_train.")]:
        del sys.modules[name]
    if str(repo) in sys.path:
        sys.path.remove(str(repo))


def test_bizarre_pose_adapter_returns_xy_in_original_pixels(fake_checkout):
    est = BizarrePoseEstimator(repo=str(fake_checkout), device="cpu", batch_size=2)
    # a wide grey character (x 20..99, y 10..69) with a white dot at x 85..87, y 60..62
    images = []
    for dot in ((85, 60), (30, 15)):
        img = Image.new("RGB", (120, 80))
        d = ImageDraw.Draw(img)
        d.rectangle([20, 10, 99, 69], fill=(100, 100, 100))
        d.rectangle([dot[0], dot[1], dot[0] + 2, dot[1] + 2], fill=(255, 255, 255))
        images.append(img)
    kps, boxes = est.estimate(images + images[:1])  # 3 images: a full and a partial batch
    assert kps.shape == (3, 17, 3)
    for i, (dx, dy) in enumerate(((85, 60), (30, 15), (85, 60))):
        np.testing.assert_allclose(kps[i, :, 0], dx + 1, atol=2.0)  # x from the column
        np.testing.assert_allclose(kps[i, :, 1], dy + 1, atol=2.0)  # y from the row
    np.testing.assert_allclose(kps[:, :, 2], 0.75)
    np.testing.assert_allclose(boxes[0], (20, 10, 100, 70), atol=3.0)
    assert est.fingerprint()["checkpoint"].startswith("feat_concat+data.ckpt:sha256:")


def test_bizarre_pose_rejects_unknown_checkpoint_name(fake_checkout, tmp_path):
    other = tmp_path / "model.ckpt"
    other.write_text("pose")
    with pytest.raises(BackendUnavailableError, match="neither a feat_concat nor a feat_match"):
        BizarrePoseEstimator(repo=str(fake_checkout), checkpoint=str(other), device="cpu")


def _sample_photos() -> list[tuple[str, Image.Image]]:
    import matplotlib.cbook

    photos = []
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as fh:
        photos.append(("grace_hopper", Image.open(fh).convert("RGB")))
    try:
        from skimage import data

        photos.append(("astronaut", Image.fromarray(data.astronaut())))
    except ImportError:
        pass
    return photos


def test_mediapipe_on_packaged_photos():
    if os.environ.get("DANBOORU_REQUIRE_MEDIAPIPE"):  # CI's mediapipe venv: never skip
        import mediapipe  # noqa: F401
    else:
        pytest.importorskip("mediapipe")
    est = make_estimator("mediapipe")
    names, photos = zip(*_sample_photos())
    kps, boxes = est.estimate(list(photos))
    assert kps.shape == (len(photos), 17, 3)
    for name, im, kp in zip(names, photos, kps):
        assert np.isfinite(kp[:7]).all(), name  # a face and shoulders were found
        nose_y = kp[0, 1]
        shoulders_y = kp[[5, 6], 1].mean()
        assert nose_y < shoulders_y, name  # y down: the head is above the shoulders
        assert 0 <= kp[0, 0] <= im.width and 0 <= nose_y <= im.height, name
        # the person's left shoulder is on the image right for a camera-facing portrait
        assert kp[5, 0] > kp[6, 0], name


def test_fingerprint_without_building_the_model_matches_the_model(monkeypatch):
    """Issue 19: an all-reused pose_keypoints run loads no weights, as CLIP's."""
    from danbooru_assets.orchestration.resources import PoseEstimatorResource
    from danbooru_assets.pose import backends

    resource = PoseEstimatorResource(backend="keypoint_rcnn", allow_random_weights=True, input_size=320)
    built = backends.fingerprint_string(resource.estimator().fingerprint())
    monkeypatch.setattr(backends, "_cached_estimator", lambda *a, **k: pytest.fail("model built for a fingerprint"))
    assert resource.fingerprint() == built
