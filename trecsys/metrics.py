"""Full-ranking metrics in one place: exact top-K over the catalogue, and accuracy metrics from it.

Tie rule (documented, deterministic): a higher score ranks first; equal scores rank by the lower
item index. NaN scores rank last. The result is the same for any user batch or item chunk size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

# score_chunk(user_rows, item_start, item_stop) -> (len(user_rows), item_stop - item_start) scores,
# where user_rows index the users being ranked and item indices are catalogue-local.
ScoreChunk = Callable[[torch.Tensor, int, int], torch.Tensor]


def chunk_topk(scores: torch.Tensor, k: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of each row by (score desc, index asc); indices are shifted by `offset`."""
    scores = torch.nan_to_num(scores.float(), nan=-torch.inf)
    k = min(k, scores.shape[1])
    kth = torch.topk(scores, k, dim=1, sorted=False).values.min(dim=1, keepdim=True).values
    greater = scores > kth
    # torch.topk picks arbitrarily among scores equal to the k-th value: take the lowest indices.
    ties = scores == kth
    ties_needed = k - greater.sum(dim=1, keepdim=True)
    selected = greater | (ties & (torch.cumsum(ties, dim=1) <= ties_needed))
    index = selected.nonzero()[:, 1].view(scores.shape[0], k)  # row-major: ascending index per row
    values = scores.gather(1, index)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    return values.gather(1, order), index.gather(1, order) + offset


def merge_topk(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor],
               k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two per-row top lists under the same tie rule."""
    values = torch.cat([a[0], b[0]], dim=1)
    index = torch.cat([a[1], b[1]], dim=1)
    by_index = torch.sort(index, dim=1, stable=True).indices
    values, index = values.gather(1, by_index), index.gather(1, by_index)
    by_score = torch.sort(values, dim=1, descending=True, stable=True).indices[:, :k]
    return values.gather(1, by_score), index.gather(1, by_score)


def full_ranking_topk(score_chunk: ScoreChunk, n_users: int, n_items: int, k: int,
                      exclude: Sequence[np.ndarray] | None = None, user_batch: int = 1024,
                      item_chunk: int = 65536, device: str | torch.device = "cpu"
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k catalogue-local item indices for every user, with `exclude[u]` items masked out.

    Memory is O(user_batch × item_chunk), whatever the number of users and items.
    """
    if k < 1:
        raise ValueError("k must be >= 1")
    all_values, all_index = [], []
    for lo in range(0, n_users, user_batch):
        rows = torch.arange(lo, min(lo + user_batch, n_users), device=device)
        best = None
        for start in range(0, n_items, item_chunk):
            stop = min(start + item_chunk, n_items)
            scores = score_chunk(rows, start, stop).float()
            if exclude is not None:
                _mask_excluded(scores, exclude, lo, start, stop)
            part = chunk_topk(scores, k, offset=start)
            best = part if best is None else merge_topk(best, part, k)
        all_values.append(best[0].cpu())
        all_index.append(best[1].cpu())
    return torch.cat(all_values), torch.cat(all_index)


def _mask_excluded(scores: torch.Tensor, exclude: Sequence[np.ndarray], first_user: int, start: int,
                   stop: int) -> None:
    rows, cols = [], []
    for r in range(scores.shape[0]):
        items = exclude[first_user + r]
        items = items[(items >= start) & (items < stop)]
        rows.append(np.full(len(items), r))
        cols.append(items - start)
    if rows:
        r = torch.from_numpy(np.concatenate(rows)).to(scores.device)
        c = torch.from_numpy(np.concatenate(cols)).to(scores.device)
        scores[r, c] = -torch.inf


def ranking_metrics(topk_index: torch.Tensor, targets: Sequence[np.ndarray], ks: Sequence[int]
                    ) -> dict[str, np.ndarray]:
    """Per-user Recall/HR/NDCG/MRR/Precision at each K from top lists and held-out target sets.

    Returns {"recall@10": array(n_users), ...}. Users without targets get NaN (callers drop them).
    NDCG uses binary gains, log2(rank + 1) discounts, and the ideal DCG of min(|targets|, K) hits.
    """
    topk = topk_index.numpy()
    n_users, depth = topk.shape
    hits = np.zeros((n_users, depth), dtype=bool)
    n_targets = np.array([len(t) for t in targets], dtype=np.int64)
    for u, t in enumerate(targets):
        if len(t):
            hits[u] = np.isin(topk[u], t)
    discounts = 1.0 / np.log2(np.arange(2, depth + 2))
    first_hit = np.where(hits.any(axis=1), hits.argmax(axis=1), depth)
    out: dict[str, np.ndarray] = {}
    valid = n_targets > 0
    for k in ks:
        if k > depth:
            raise ValueError(f"K={k} is larger than the ranked depth {depth}")
        h = hits[:, :k]
        n_hit = h.sum(axis=1)
        ideal = np.array([discounts[: min(n, k)].sum() for n in n_targets])
        with np.errstate(invalid="ignore", divide="ignore"):
            metrics = {
                "recall": n_hit / n_targets,
                "hit": (n_hit > 0).astype(float),
                "ndcg": (h * discounts[:k]).sum(axis=1) / ideal,
                "mrr": np.where(first_hit < k, 1.0 / (first_hit + 1), 0.0),
                "precision": n_hit / k,
            }
        for name, values in metrics.items():
            out[f"{name}@{k}"] = np.where(valid, values, np.nan)
    return out
