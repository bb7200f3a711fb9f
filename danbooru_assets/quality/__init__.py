"""The quality stage's library (no Dagster; the assets are in
``orchestration/assets/quality.py``): what the classifier sees (``features``), the
classifier (``classifier``), the labeling queue and round plan (``queue``), and the
classifier kinds settings accept (``kinds``)."""
