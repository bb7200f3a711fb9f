"""The executor a run uses, chosen by ``DANBOORU_EXECUTOR`` (:func:`danbooru_assets.config.executor_kind`).

- ``in_process`` (default): a run's steps one after another in the run's own process (the
  README's local path, CI's tests, ``danbooru-assets run``).
- ``celery``: Dagster's own ``dagster-celery`` executor. Each step is a Celery task on the
  broker; a step whose op carries the tag ``dagster-celery/queue: gpu`` (the inference
  assets, :data:`GPU_QUEUE_TAGS`) waits in the ``gpu`` queue for a worker on a GPU machine,
  every other step in the default queue (``dagster``) for the CPU workers. Install the
  ``deploy`` extra; deploy/ holds the instance, the worker commands and the compose file.

``dagster_celery`` is imported only when it is chosen, so loading the code location stays
light and the extra optional.
"""

import dagster as dg

from danbooru_assets import config

# The Celery queue of the default workers: dagster-celery's task_default_queue.
DEFAULT_QUEUE = "dagster"
GPU_QUEUE = "gpu"
# On the inference assets' ops: their steps go to the GPU workers' queue. Harmless with
# the in-process executor, which ignores it.
GPU_QUEUE_TAGS = {"dagster-celery/queue": GPU_QUEUE}

# Settings both the executor and the workers apply (deploy/celery.yaml repeats them for
# the workers). A worker process that dies in a step (kill -9, out of memory) makes that
# task fail with WorkerLostError, and so the run fails and says so, rather than the task
# being redelivered to run the step a second time behind the run's back.
CELERY_CONFIG_SOURCE = {
    "task_acks_late": False,
    "task_reject_on_worker_lost": False,
    "worker_prefetch_multiplier": 1,
    "broker_connection_retry_on_startup": True,
}


def _env_or(name: str, default: str):
    # {"env": NAME} where set: the UI names the variable and the run resolves it at start.
    return {"env": name} if config.is_set(name) else default


def celery_executor_config() -> dict:
    """The celery executor's config: broker and result backend from the environment."""
    return {
        "broker": _env_or("DANBOORU_CELERY_BROKER", config.celery_broker()),
        "backend": _env_or("DANBOORU_CELERY_BACKEND", config.celery_backend()),
        "config_source": dict(CELERY_CONFIG_SOURCE),
    }


def build_executor() -> dg.ExecutorDefinition:
    if config.executor_kind() == "in_process":
        return dg.in_process_executor
    from dagster_celery import celery_executor

    return celery_executor.configured(celery_executor_config(), name="celery")
