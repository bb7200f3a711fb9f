"""The code location: assets, resources, jobs and sensors, configured from the environment.

``dagster dev`` (workspace.yaml) and ``danbooru-assets run`` both load ``defs`` from here.
"""

from __future__ import annotations

import dagster as dg

from danbooru_assets import environment
from danbooru_assets.assets.index import danbooru_metadata, shard_index
from danbooru_assets.dataset import DanbooruDatasetResource
from danbooru_assets.io_manager import ParquetIOManagerFactory, StorageResource
from danbooru_assets.partitions import shard_partitions
from danbooru_assets.sensors import build_new_data_sensor
from danbooru_assets.settings import SettingsResource

storage = StorageResource(base_path=environment.storage_base())

# The main job runs in stages: each per-shard stage for every shard, then the global
# asset that needs all shards (e.g. a threshold calibrated over the whole dataset).
metadata_job = dg.define_asset_job("metadata_job", selection=[danbooru_metadata])
index_job = dg.define_asset_job("index_job", selection=[shard_index], partitions_def=shard_partitions)

# What the new-data sensor runs for a changed shard.
shard_job = index_job

RUN_STAGES: list[tuple] = [
    (metadata_job, False),
    (index_job, True),
]

defs = dg.Definitions(
    assets=[danbooru_metadata, shard_index],
    jobs=[job for job, _ in RUN_STAGES],
    sensors=[build_new_data_sensor(shard_job, metadata_job)],
    resources={
        "dataset": DanbooruDatasetResource(root=str(environment.dataset_root())),
        "storage": storage,
        "io_manager": ParquetIOManagerFactory(storage=storage),
        "settings": SettingsResource(path=str(environment.settings_path())),
    },
)
