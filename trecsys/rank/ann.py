"""`recommend.index: hnsw`: one model's top-K from an approximate nearest-neighbour index (faiss's HNSW,
the field's standard library) instead of the exact chunked top-K of trecsys.rank.metrics.

The index holds the model's item vectors and is searched with the users' states, so it serves a
model ranked as it is (a dot-product or cosine score), not a fusion. Each user's candidates are
re-scored exactly (with the model's seen offset where seen items are ranked), so only which items
are found is approximate: the lists may miss items of the exact top-K, never mis-order what they hold.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from trecsys.errors import ConfigError
from trecsys.rank.metrics import in_row_lists
from trecsys.rank.scorers import ModelScorer

HNSW_M = 32  # graph degree (neighbours per node): the M of the README's HNSW measurements


class HNSWIndex:
    """The scorer's item vectors in a faiss HNSW graph under inner product (cosine: unit vectors)."""

    def __init__(self, scorer: ModelScorer, ef_search: int, key: str = "recommend.index"):
        try:
            import faiss
        except ImportError:
            raise ConfigError(f"config key '{key}': hnsw needs faiss; pip install faiss-cpu (or the `ann` extra), "
                              "or use exact") from None
        self.scorer, self.cosine = scorer, scorer.model.config.score == "cosine"
        self.reps = scorer.reps.float().cpu()  # what the candidates are re-scored with, batch after batch
        reps = self._unit(self.reps).numpy()
        self.index = faiss.IndexHNSWFlat(reps.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efSearch = ef_search
        self.index.add(np.ascontiguousarray(reps))

    def _unit(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) if self.cosine else x

    def topk(self, user_rows: torch.Tensor, k: int, exclude: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, catalogue-local items), (rows, k), best first, -inf where fewer than k were found.
        `exclude[i]`: items never listed for row i; the model's seen items join the candidates when
        its offset is positive (users who buy again), so that ranking them needs no luck."""
        scorer, n_items = self.scorer, self.reps.shape[0]
        states = scorer.states[user_rows.to(scorer.device)].float().cpu()
        depth = min(n_items, k + max((len(e) for e in exclude), default=0))
        self.index.hnsw.efSearch = max(self.index.hnsw.efSearch, depth)
        _, found = self.index.search(np.ascontiguousarray(self._unit(states).numpy()), depth)
        candidates = torch.from_numpy(found).long()
        seen = scorer.seen.lists(user_rows) if scorer.seen is not None else None
        if seen is not None and scorer.seen_offset > 0:
            candidates = torch.cat([candidates, _padded(seen)], dim=1)
        # Each candidate once (-1 marks a hole), in item order so that a stable sort breaks ties by index.
        candidates, _ = torch.sort(candidates, dim=1)
        repeated = torch.zeros_like(candidates, dtype=torch.bool)
        repeated[:, 1:] = candidates[:, 1:] == candidates[:, :-1]
        missing = (candidates < 0) | repeated
        scores = scorer.model.score(states[:, None, :], self.reps[candidates.clamp(min=0)])[:, 0, :]
        if seen is not None:
            scores = scores + scorer.seen_offset * torch.from_numpy(in_row_lists(candidates.numpy(), seen))
        missing |= torch.from_numpy(in_row_lists(candidates.numpy(), exclude))
        scores = scores.masked_fill(missing, -torch.inf)
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
        values, items = scores.gather(1, order), candidates.gather(1, order)
        if values.shape[1] < k:  # a catalogue smaller than k: empty places, as the exact top-K leaves them
            pad = k - values.shape[1]
            values = torch.cat([values, values.new_full((len(values), pad), -torch.inf)], dim=1)
            items = torch.cat([items, items.new_zeros((len(items), pad))], dim=1)
        return values, items.clamp(min=0)


def _padded(lists: list[np.ndarray]) -> torch.Tensor:
    """Item lists as one (rows, longest) tensor, -1-padded."""
    out = torch.full((len(lists), max((len(x) for x in lists), default=0)), -1, dtype=torch.long)
    for i, items in enumerate(lists):
        out[i, :len(items)] = torch.from_numpy(items)
    return out
