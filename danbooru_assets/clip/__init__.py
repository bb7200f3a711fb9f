"""The CLIP stage's library: the open_clip model, the decode pass, image statistics,
prompt scoring and the image rules. No Dagster."""
