"""A fused model: a sequence model's scores plus item-kNN and popularity, each z-scored per user over
the catalogue and summed with weights (rerank.WeightedSum, the sum `recommend.fusion` uses).

The weights are chosen on VALIDATION from a small grid (`choose_weights`) by finetune-target's
`fusion` candidate and saved as `fusion.json` beside the model's weights, so the folder is a model
like any other: the scorer factory (trecsys/rank/rankers.py) reads the file, so `trec evaluate`,
`trec recommend` and the search protocol rank with the fusion wherever they would rank the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from trecsys.artifacts import read_json
from trecsys.errors import ArtifactError
from trecsys.rank.metrics import full_ranking_topk, ranking_metrics
from trecsys.rank.rerank import Part, WeightedSum
from trecsys.rank.scorers import ItemKNNScorer, PopularityScorer, Scorer

FUSION_FILE = "fusion.json"
COMPONENTS = ("model", ItemKNNScorer.name, PopularityScorer.name)
# (model, item-knn, popularity) weights tried on validation, in order (a tie keeps the earlier one:
# the model alone comes first). Weights act on z-scores, so only their ratios matter; (0, 1, 0) is
# item-kNN alone, so the fused model is never below item-kNN or the model on validation (by more
# than the one-standard-error margin of `choose_weights`).
GRID: tuple[tuple[float, float, float], ...] = tuple(
    (1.0, knn, pop) for knn in (0.0, 0.25, 0.5, 1.0, 2.0, 4.0) for pop in (0.0, 0.1, 0.3)
) + ((0.0, 1.0, 0.0),)


def read_fusion(folder: Path) -> dict[str, float] | None:
    """The weights in a model folder's fusion.json (None: a plain model). A file that does not give
    each of COMPONENTS a finite weight >= 0, one of them > 0, is refused naming it (exit 2)."""
    path = Path(folder) / FUSION_FILE
    if not path.is_file():
        return None
    data = read_json(path)
    weights = data.get("weights") if isinstance(data, dict) else None
    ok = isinstance(weights, dict) and set(weights) == set(COMPONENTS) and all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
        for w in weights.values()) and any(w > 0 for w in weights.values())
    if not ok:
        raise ArtifactError(f"{path}: 'weights' must give each of {', '.join(COMPONENTS)} a number >= 0, "
                            f"one of them > 0; got {weights!r}")
    return {name: float(weights[name]) for name in COMPONENTS}


class _Block:
    """Scores computed once for a batch of users (rows lo..hi), served as a scorer."""

    def __init__(self, scores: torch.Tensor, lo: int, device: torch.device):
        self.scores, self.lo, self.device = scores, lo, device

    def score_chunk(self, user_rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return self.scores[user_rows.to(self.scores.device) - self.lo, start:stop].clone()


def choose_weights(model: Scorer, baseline_sequences: Sequence[np.ndarray], histories: Sequence[np.ndarray],
                   targets: Sequence[np.ndarray], n_items: int, user_batch: int = 256,
                   grid: Sequence[tuple[float, float, float]] = GRID, k: int = 10
                   ) -> tuple[dict[str, float], list[dict]]:
    """(chosen weights, one row per grid point with its ndcg@k and recall@k) on held-out `targets`,
    items in `histories` excluded, as validation ranks. Each user batch is scored once per ranker;
    every grid point then ranks the same blocks with the exact top-K of evaluation.

    The chosen point is the best by mean ndcg@k unless its paired gain over the grid's first point
    (the model alone) is within one standard error: then the model alone. The best of 19 points on
    the same users is biased upward, and a fusion kept for a gain inside the noise only adds two
    rankers' cost (the one-standard-error rule of model selection, Breiman et al. 1984)."""
    knn, pop = ItemKNNScorer(baseline_sequences, histories, n_items), PopularityScorer(baseline_sequences, n_items)
    users = [u for u, t in enumerate(targets) if len(t)]
    ndcg, recall = np.zeros((len(grid), len(users))), np.zeros((len(grid), len(users)))
    for lo in range(0, len(users), user_batch):
        rows = torch.tensor(users[lo:lo + user_batch])
        blocks = [_Block(s.score_chunk(rows.to(s.device), 0, n_items).float().cpu(), 0, torch.device("cpu"))
                  for s in (model, knn, pop)]
        exclude = [np.asarray(histories[u]) for u in rows.tolist()]
        held = [targets[u] for u in rows.tolist()]
        for g, weights in enumerate(grid):
            parts = [Part(b, w) for b, w in zip(blocks, weights, strict=True) if w > 0]
            score = WeightedSum(parts, n_items, n_items, torch.device("cpu")).score_chunk
            _, top = full_ranking_topk(score, len(rows), n_items, k, exclude=exclude, user_batch=len(rows),
                                       item_chunk=n_items)
            per_user = ranking_metrics(top, held, ks=(k,))
            ndcg[g, lo:lo + len(rows)] = per_user[f"ndcg@{k}"]
            recall[g, lo:lo + len(rows)] = per_user[f"recall@{k}"]
    means = np.stack([ndcg.mean(axis=1), recall.mean(axis=1)], axis=1) if users else np.zeros((len(grid), 2))
    table = [{**dict(zip(COMPONENTS, w, strict=True)), f"ndcg@{k}": float(m[0]), f"recall@{k}": float(m[1])}
             for w, m in zip(grid, means, strict=True)]
    best = max(range(len(grid)), key=lambda g: (means[g, 0], -g))  # the first of the best
    if best and not clear_gain(ndcg[best] - ndcg[0]):
        best = 0
    return dict(zip(COMPONENTS, grid[best], strict=True)), table


def clear_gain(delta: np.ndarray) -> bool:
    """Whether per-user differences have a mean above one standard error of that mean."""
    if len(delta) < 2:
        return False
    return float(delta.mean()) > float(delta.std(ddof=1)) / np.sqrt(len(delta))
