"""Product search: what matches the query first, then the person.

relevance(q, i) = α · mm(bm25(q, i)) + (1 − α) · mm(cos(e_q, e_i)), with e the text encoder's unit
vectors (the query is embedded like the items) and mm a min-max scaling over the catalogue per query:
a convex combination of normalised scores, which Bruch et al. (2023, "An analysis of fusion functions
for hybrid retrieval") found better than reciprocal-rank fusion.

The candidates of a query are the items whose relevance, scaled to [0, 1] over the catalogue, is at
least `threshold`, at most `max_candidates` of them (ties at the cut all stay in). They do not depend
on the user. Among them the score is (1 − w) · relevance + w · mm_C(personal(u, i)), the personal
score (the sequence model's for the user's history, or popularity) scaled over the candidates; every
other item follows, in relevance order. So a user's history changes the order only among relevant items.

α, threshold and w are chosen on validation queries (`choose_mixes`), under the protocol of
personalised product search (`category_query`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from trecsys.rank.lexical import LexicalIndex, words
from trecsys.rank.metrics import full_ranking_topk, ranking_metrics
from trecsys.rank.rerank import masked

# The grids validation chooses from when a search.* weight is null. Thresholds go strictest first:
# where validation cannot tell them apart, the person may reorder fewer, more relevant items.
LEXICAL_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
THRESHOLD_GRID = (0.9, 0.8, 0.7, 0.6, 0.5)
PERSONAL_GRID = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
# Below every candidate (whose scores are in [0, 1]), keeping the relevance order.
_NOT_CANDIDATE = -2.0


@dataclass(frozen=True)
class Mix:
    """How relevance and the person combine (see the module docstring)."""

    lexical: float  # α: share of BM25 in relevance; the rest is the text encoder's cosine
    threshold: float  # candidates: scaled relevance >= threshold
    personal: float  # w: share of the personal score among the candidates

    def describe(self) -> str:
        return f"lexical_weight={self.lexical:g}, threshold={self.threshold:g}, personal_weight={self.personal:g}"


def category_query(category: str) -> str:
    """The protocol's query for an item (Van Gysel et al. 2016; Ai et al. 2017): the words of its
    category path, lower-cased, each once in first-seen order, stop words dropped."""
    return " ".join(dict.fromkeys(words([category or ""])[0]))


def search_documents(items: pd.DataFrame, fields: Sequence[str]) -> list[str]:
    """One document per item for the lexical index: the listed fields the item table has, joined."""
    present = [f for f in fields if f in items.columns]
    if not present:
        return [""] * len(items)
    parts = [items[f].astype(object).where(items[f].notna(), "").astype(str) for f in present]
    joined = parts[0]
    for part in parts[1:]:
        joined = joined + " " + part
    return joined.tolist()


class SearchIndex:
    """One catalogue's lexical index and unit text vectors: the relevance side of search."""

    def __init__(self, documents: list[str], item_vectors: np.ndarray, k1: float = 1.5, b: float = 0.75):
        if len(documents) != len(item_vectors):
            raise ValueError(f"{len(documents)} documents but {len(item_vectors)} item vectors")
        self.lexical = LexicalIndex(documents, k1=k1, b=b)
        self.vectors = torch.nn.functional.normalize(torch.from_numpy(np.asarray(item_vectors, np.float32)), dim=1)
        self.n_items = len(documents)

    def parts(self, queries: list[str], query_vectors: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(lexical, semantic) match of each query to every item, each min-max scaled per query to [0, 1]
        (a query that matches no item's words has lexical 0 everywhere)."""
        lexical = torch.from_numpy(self.lexical.scores(queries))
        unit = torch.nn.functional.normalize(torch.from_numpy(np.asarray(query_vectors, np.float32)), dim=1)
        semantic = unit @ self.vectors.T
        return minmax(lexical, constant=0.0), minmax(semantic, constant=0.0)


def minmax(x: torch.Tensor, constant: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Each row scaled to [0, 1] by its min and max (over `mask` only, when given); a row with one
    value throughout gets `constant`."""
    lo = (x if mask is None else x.masked_fill(~mask, torch.inf)).amin(dim=1, keepdim=True)
    hi = (x if mask is None else x.masked_fill(~mask, -torch.inf)).amax(dim=1, keepdim=True)
    span = hi - lo
    flat = ~(span > 0)
    scaled = (x - lo) / torch.where(flat, torch.ones_like(span), span)
    return torch.where(flat, torch.full_like(x, constant), scaled)


def relevance(lexical: torch.Tensor, semantic: torch.Tensor, weight: float) -> torch.Tensor:
    """α · lexical + (1 − α) · semantic, scaled to [0, 1] per query (all 1 when nothing differs)."""
    return minmax(weight * lexical + (1.0 - weight) * semantic, constant=1.0)


def search_scores(lexical: torch.Tensor, semantic: torch.Tensor, personal: torch.Tensor | None, mix: Mix,
                  max_candidates: int) -> torch.Tensor:
    """(queries, items) final scores: candidates in [0, 1], every other item below them by relevance."""
    rel = relevance(lexical, semantic, mix.lexical)
    if personal is None or mix.personal == 0.0:
        return rel  # the same order as the two-tier score with w = 0
    depth = min(max_candidates, rel.shape[1])
    cut = torch.topk(rel, depth, dim=1).values[:, -1:]
    candidate = (rel >= mix.threshold) & (rel >= cut)
    mine = minmax(personal.float(), constant=0.0, mask=candidate)
    inside = (1.0 - mix.personal) * rel + mix.personal * mine
    return torch.where(candidate, inside, rel + _NOT_CANDIDATE)


def search_topk(lexical: torch.Tensor, semantic: torch.Tensor, personal: torch.Tensor | None, mix: Mix,
                max_candidates: int, k: int, exclude: Sequence[np.ndarray] | None = None,
                allowed: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (scores, catalogue-local items) per query, under evaluation's exact tie rule; `exclude`d
    items and items outside `allowed` (recommend's category filters) score -inf."""
    scores = search_scores(lexical, semantic, personal, mix, max_candidates)
    n_rows, n_items = scores.shape
    chunk = masked(lambda rows, start, stop: scores[rows.cpu(), start:stop].clone(), allowed)
    return full_ranking_topk(chunk, n_rows, n_items, min(k, n_items), exclude=exclude,
                             user_batch=max(n_rows, 1), item_chunk=n_items)


# ---------------------------------------------------------------------------------------------
# Choosing the mix on validation


def mix_grid(lexical: float | None, threshold: float | None, personal: float | None,
             with_personal: bool) -> list[Mix]:
    """Every mix to try: a fixed (non-null) weight is the only value of its axis. Without a personal
    score only w = 0 is tried (and the threshold does not matter then)."""
    lexicals = LEXICAL_GRID if lexical is None else (lexical,)
    if not with_personal:
        return [Mix(a, THRESHOLD_GRID[0] if threshold is None else threshold, 0.0) for a in lexicals]
    thresholds = THRESHOLD_GRID if threshold is None else (threshold,)
    personals = PERSONAL_GRID if personal is None else (personal,)
    return [Mix(a, t, w) for a in lexicals for w in personals for t in (thresholds if w > 0 else thresholds[:1])]


@dataclass
class Block:
    """Validation queries scored at once: their match parts, held-out items and excluded items."""

    lexical: torch.Tensor
    semantic: torch.Tensor
    personal: dict[str, torch.Tensor]  # per personal scorer name
    targets: list[np.ndarray]
    exclude: list[np.ndarray] | None


def choose_mixes(blocks: Iterable[Block], grids: dict[str, list[Mix]], max_candidates: int, k: int = 10
                 ) -> dict[str, tuple[Mix, float]]:
    """For each system (name -> its grid; the name picks its personal scores, or none when absent
    from the blocks), the mix with the best mean NDCG@k on the blocks' queries, and that NDCG.
    Ties go to the earlier mix of the grid."""
    totals = {name: np.zeros(len(grid)) for name, grid in grids.items()}
    n = 0
    for block in blocks:
        n += len(block.targets)
        for name, grid in grids.items():
            personal = block.personal.get(name)
            for g, mix in enumerate(grid):
                _, top = search_topk(block.lexical, block.semantic, personal, mix, max_candidates, k, block.exclude)
                totals[name][g] += np.nansum(ranking_metrics(top.numpy(), block.targets, [k])[f"ndcg@{k}"])
    out = {}
    for name, grid in grids.items():
        best = int(np.argmax(totals[name]))  # the first of equal totals
        out[name] = (grid[best], float(totals[name][best] / max(n, 1)))
    return out
