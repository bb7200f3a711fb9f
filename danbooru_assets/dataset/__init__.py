"""The Danbooru20xx dataset on disk: folder layout, metadata conversion, the shard index. No Dagster."""
