"""Duplicate removal by every signal: the file's bytes (BLAKE2b), the metadata md5,
Danbooru parent/child posts, perceptual hashes (Hamming distance) and CLIP embeddings
(cosine).

``hashes`` computes the fingerprints in the decode pass; ``search`` finds the pairs of
perceptual hashes within a distance (multi-index hashing) and of embeddings above a cosine
(exactly for small sets, cluster-then-pairwise for large ones); ``groups`` stores every
candidate pair once, at the loosest thresholds the settings allow, and joins the pairs the
current thresholds accept into groups, keeping one image per group by a documented rule.
No Dagster.
"""

# The loosest thresholds the settings accept (settings.DedupSettings is bounded by them):
# candidate pairs are searched and stored at these, so any allowed threshold regroups from
# the stored pairs without a new search. Defined here, import-light, for the settings model.
PHASH_SEARCH_MAX = 8
CLIP_SEARCH_MIN = 0.85
