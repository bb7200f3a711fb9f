"""Every environment variable is read in config.py, with its default."""

import re
from pathlib import Path

import pytest

from danbooru_assets import config

PACKAGE = Path(config.__file__).resolve().parent


def test_every_project_variable_in_the_code_is_in_the_table():
    # Tests and benchmarks read a few of their own (DANBOORU_UI_SCREENSHOTS, ...); the package only these.
    used = set()
    for path in PACKAGE.rglob("*.py"):
        if "bench" not in path.parts:
            used |= set(re.findall(r"\b(DANBOORU_[A-Z_]+)\b", path.read_text()))
    assert used
    assert sorted(used - set(config.ENVIRONMENT)) == []
    assert all(v.default and v.meaning for v in config.ENVIRONMENT.values())


# os.environ.get("DANBOORU_…"), os.getenv("DANBOORU_…"), os.environ["DANBOORU_…"] (a read;
# setting one for a child process, os.environ["DANBOORU_…"] = …, is not)
ENV_READ = re.compile(
    r"""(?:environ\.get\(|getenv\()\s*["']DANBOORU_|environ\[\s*["']DANBOORU_\w*["']\s*\](?!\s*=(?!=))"""
)


def test_the_environment_read_pattern_finds_each_form():
    for read in ('os.environ.get("DANBOORU_X")', "os.getenv('DANBOORU_X', '')", 'os.environ["DANBOORU_X"]'):
        assert ENV_READ.search(read), read
    assert not ENV_READ.search('env = {"DANBOORU_X": "1"}')
    assert not ENV_READ.search('os.environ["DANBOORU_X"] = value')
    assert ENV_READ.search('if os.environ["DANBOORU_X"] == "1":')


def test_only_config_reads_the_environment():
    readers = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if "bench" not in path.parts and ENV_READ.search(path.read_text())
    ]
    assert readers == [] or readers == ["config.py"], readers


def test_defaults_and_overrides(monkeypatch, tmp_path):
    for name in config.ENVIRONMENT:
        if name.startswith("DANBOORU_"):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    assert config.using_sample_data()
    assert config.dataset_root() == tmp_path / "data" / "sample"
    assert config.storage_base() == str(tmp_path / "data" / "storage")
    assert config.inference_shards_per_run() == 50
    assert config.sensor_interval_s() == 30
    monkeypatch.setenv("DANBOORU_ROOT", str(tmp_path / "real"))
    monkeypatch.setenv("DANBOORU_INFERENCE_SHARDS_PER_RUN", "0")
    monkeypatch.setenv("DANBOORU_SENSOR_INTERVAL_S", "1")
    assert not config.using_sample_data()
    assert config.dataset_root() == tmp_path / "real"
    assert config.inference_shards_per_run() == 1
    assert config.sensor_interval_s() == config.MIN_SENSOR_INTERVAL_S


def test_a_bad_number_names_the_variable(monkeypatch):
    monkeypatch.setenv("DANBOORU_SENSOR_INTERVAL_S", "5m")
    with pytest.raises(ValueError, match=r"DANBOORU_SENSOR_INTERVAL_S='5m': expected a whole number"):
        config.sensor_interval_s()


def test_an_unknown_variable_is_a_programming_error():
    with pytest.raises(KeyError, match="DANBOORU_NOPE"):
        config.env("DANBOORU_NOPE")


def test_pose_environment_sample_tarball_unless_a_backend_is_named(monkeypatch, tmp_path):
    for name in ("DANBOORU_ROOT", "DANBOORU_KEYPOINTS", "DANBOORU_POSE_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DANBOORU_SAMPLE_ROOT", str(tmp_path))
    assert config.pose_environment().keypoint_files == str(tmp_path / config.KEYPOINTS_TARBALL)
    monkeypatch.setenv("DANBOORU_POSE_BACKEND", "mediapipe")
    pose = config.pose_environment()
    assert (pose.keypoint_files, pose.backend) == ("", "mediapipe")
    monkeypatch.setenv("DANBOORU_ROOT", str(tmp_path))
    monkeypatch.delenv("DANBOORU_POSE_BACKEND")
    assert config.pose_environment() == config.PoseEnvironment("", config.DEFAULT_POSE_BACKEND, "", "")


def test_settings_live_next_to_tables_at_a_url(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DANBOORU_SETTINGS", raising=False)
    monkeypatch.delenv("DANBOORU_STORAGE", raising=False)
    assert config.settings_path() == tmp_path / "data" / "settings.yaml"
    monkeypatch.setenv("DANBOORU_STORAGE", str(tmp_path / "tables"))  # a local folder: unchanged
    assert config.settings_path() == tmp_path / "data" / "settings.yaml"
    monkeypatch.setenv("DANBOORU_STORAGE", "s3://bucket/danbooru/")
    assert str(config.settings_path()) == "s3://bucket/danbooru/settings.yaml"
    monkeypatch.setenv("DANBOORU_SETTINGS", "memory://elsewhere/settings.yaml")  # an explicit choice wins
    assert str(config.settings_path()) == "memory://elsewhere/settings.yaml"


def test_executor_choice(monkeypatch):
    monkeypatch.delenv("DANBOORU_EXECUTOR", raising=False)
    assert config.executor_kind() == "in_process"
    monkeypatch.setenv("DANBOORU_EXECUTOR", "celery")
    assert config.executor_kind() == "celery"
    monkeypatch.delenv("DANBOORU_CELERY_BROKER", raising=False)
    monkeypatch.delenv("DANBOORU_CELERY_BACKEND", raising=False)
    assert config.celery_backend() == config.celery_broker() == config.DEFAULT_CELERY_BROKER


def test_keypoint_frame_and_image_folder_from_the_environment(monkeypatch, tmp_path):
    from danbooru_assets import config

    for name in ("DANBOORU_KEYPOINTS", "DANBOORU_KEYPOINT_FRAME", "DANBOORU_POSE_BACKEND", "DANBOORU_IMAGE_FOLDER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DANBOORU_ROOT", str(tmp_path / "real"))
    sample = tmp_path / "sample"
    (sample / "keypoints").mkdir(parents=True)
    (sample / "SAMPLE_DATASET.json").write_text("{}")
    monkeypatch.setenv("DANBOORU_KEYPOINTS", str(sample / config.KEYPOINTS_TARBALL))
    assert config.pose_environment().keypoint_frame == "image"  # the generator's own tarball
    monkeypatch.setenv("DANBOORU_KEYPOINTS", str(tmp_path / "seed_keypoints.tar.gz"))
    assert config.pose_environment().keypoint_frame == "512px"  # published files: the 512px frame
    monkeypatch.setenv("DANBOORU_KEYPOINT_FRAME", "image")
    assert config.pose_environment().keypoint_frame == "image"
    assert config.image_folder() == ""
    monkeypatch.setenv("DANBOORU_IMAGE_FOLDER", "512px")
    assert config.image_folder() == "512px"
