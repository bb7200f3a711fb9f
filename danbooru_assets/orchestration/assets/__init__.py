"""orchestration.assets."""
