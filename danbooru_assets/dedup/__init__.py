"""Duplicate removal: exact (md5, Danbooru parent/child posts) and near (CLIP embeddings).

``search`` finds the pairs of embeddings above a cosine similarity (exactly for small
sets, cluster-then-pairwise for large ones); ``groups`` joins them with the exact
duplicates into groups and keeps one image per group by a documented rule. No Dagster.
"""
