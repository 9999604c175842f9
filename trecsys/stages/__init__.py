"""One module per CLI stage: `run(cfg, ...)` does what `trec <stage>` does."""
