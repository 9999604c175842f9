"""Data in: what `trec prepare` uses — readers for the formats of the field, cleaning, splits, item text and its embeddings."""
