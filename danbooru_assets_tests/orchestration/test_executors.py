"""DANBOORU_EXECUTOR picks the executor; the inference steps carry the gpu queue tag."""

import dagster as dg
import pytest

from danbooru_assets.orchestration import executors


def test_in_process_by_default(monkeypatch):
    monkeypatch.delenv("DANBOORU_EXECUTOR", raising=False)
    assert executors.build_executor() is dg.in_process_executor


def test_celery_with_the_broker_from_the_environment(monkeypatch):
    pytest.importorskip("dagster_celery", reason="the deploy extra is not installed")
    monkeypatch.setenv("DANBOORU_EXECUTOR", "celery")
    monkeypatch.setenv("DANBOORU_CELERY_BROKER", "redis://broker.example:6379/0")
    monkeypatch.delenv("DANBOORU_CELERY_BACKEND", raising=False)
    assert executors.build_executor().name == "celery"
    config = executors.celery_executor_config()
    # The variable's name, not its value: the UI shows it and a run resolves it when it starts.
    assert config["broker"] == {"env": "DANBOORU_CELERY_BROKER"}
    assert config["backend"] == "redis://broker.example:6379/0"  # the broker's, unless set
    assert config["config_source"]["task_acks_late"] is False


def test_an_unknown_executor_names_the_choices(monkeypatch):
    monkeypatch.setenv("DANBOORU_EXECUTOR", "k8s")
    with pytest.raises(ValueError, match="DANBOORU_EXECUTOR='k8s': expected one of in_process, celery"):
        executors.build_executor()


def test_only_the_inference_steps_go_to_the_gpu_queue():
    from danbooru_assets.definitions import defs

    job = defs.resolve_implicit_global_asset_job_def()
    queued = {node.name: node.tags.get("dagster-celery/queue") for node in job.graph.node_defs}
    assert {name for name, queue in queued.items() if queue == "gpu"} == {
        "clip_embeddings_and_image_stats",
        "pose_keypoints",
    }
    assert len(queued) > 2
