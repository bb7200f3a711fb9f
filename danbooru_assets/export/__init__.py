"""Training exports of the curated dataset: manifest and WebDataset shards. No Dagster."""
