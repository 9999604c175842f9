"""The prepared-data contract every stage after prepare reads: items, interactions, embeddings, per-domain views."""
