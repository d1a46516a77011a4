"""Data: HCP discovery, synthetic cohort, preprocessing, shards, splits, datasets."""
