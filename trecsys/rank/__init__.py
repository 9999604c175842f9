"""Ranking: metrics, scorers (models and baselines), re-ranking, evaluation, reports and recommend requests."""
