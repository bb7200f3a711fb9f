"""Foundations every stage shares: shard keys, the one image decode, thumbnails, stored
tables (one atomic Parquet writer), incremental reuse, embeddings and pictures. No Dagster."""
