"""Dagster's edge: partitions, the IO manager, resources, the shard loop, sensors and one
asset module per stage. Asset bodies read inputs, call the library and return tables
and metadata."""
