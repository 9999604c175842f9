"""Between scores and the final lists: several rankers fused into one score, catalogue filters, and
MMR diversity re-ranking. Fusion and filters keep the scorer shape of trecsys/scorers.py, so the one
exact chunked top-K of trecsys/metrics.py ranks their result, as it does in evaluation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from trecsys.errors import ConfigError
from trecsys.rank.metrics import ScoreChunk
from trecsys.rank.scorers import Scorer

# ---------------------------------------------------------------------------------------------
# Fusion


@dataclass
class Part:
    """One ranker in a weighted sum; `rows` maps the sum's rows to the ranker's rows (None: the same)."""

    scorer: Scorer
    weight: float
    rows: torch.Tensor | None = None


class WeightedSum:
    """Σ weight · z(scores): each ranker's scores z-scored per row over the whole catalogue,
    (s − mean) / std, so rankers on different scales (dot products, counts, similarity sums) add up.
    A row whose scores are all equal contributes zeros.

    One ranker on its own rows is passed through unchanged: z-scoring is increasing, so the ranking
    would be the same anyway, but float rounding could turn two adjacent scores into a tie.
    """

    name = "fusion"

    def __init__(self, parts: list[Part], n_items: int, item_chunk: int, device: torch.device):
        if not parts:
            raise ValueError("a weighted sum needs at least one part")
        self.parts, self.n_items, self.item_chunk, self.device = parts, n_items, item_chunk, torch.device(device)
        self._cached: tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]] | None = None

    @property
    def passthrough(self) -> bool:
        return len(self.parts) == 1 and self.parts[0].rows is None

    def score_chunk(self, user_rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        if self.passthrough:
            return self.parts[0].scorer.score_chunk(user_rows, start, stop).float().to(self.device)
        whole = start == 0 and stop == self.n_items
        stats = None if whole else self._stats(user_rows)
        total = None
        for i, part in enumerate(self.parts):
            scores = self._scores(part, user_rows, start, stop)
            mean, std = _row_stats(scores) if whole else stats[i]
            # In place: these blocks are user_batch × item_chunk, and memory traffic is the cost here.
            term = scores.sub_(mean).mul_(part.weight / std)
            total = term if total is None else total.add_(term)
        return total

    def _scores(self, part: Part, user_rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """The part's scores as float32 on this sum's device. A scorer returns a fresh block that its
        caller may change in place (full_ranking_topk masks it in place too)."""
        rows = user_rows if part.rows is None else part.rows[user_rows.cpu()]
        return part.scorer.score_chunk(rows, start, stop).to(self.device, torch.float32)

    def _stats(self, user_rows: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-row mean and std of every part over the catalogue, merged chunk by chunk (Chan et al.);
        cached for the user batch, which asks for every item chunk in turn."""
        if self._cached is not None and torch.equal(self._cached[0], user_rows):
            return self._cached[1]
        stats = []
        for part in self.parts:
            count, mean, m2 = 0, None, None
            for start in range(0, self.n_items, self.item_chunk):
                stop = min(start + self.item_chunk, self.n_items)
                var_b, mean_b = torch.var_mean(self._scores(part, user_rows, start, stop), dim=1, correction=0,
                                               keepdim=True)
                n_b, mean_b = stop - start, mean_b.double()
                m2_b = var_b.double() * n_b
                if mean is None:
                    count, mean, m2 = n_b, mean_b, m2_b
                    continue
                delta = mean_b - mean
                total = count + n_b
                mean = mean + delta * (n_b / total)
                m2 = m2 + m2_b + delta**2 * (count * n_b / total)
                count = total
            std = (m2 / count).sqrt()
            stats.append((mean.float(), torch.where(std > 0, std, torch.inf).float()))
        self._cached = (user_rows.clone(), stats)
        return stats


def _row_stats(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    std, mean = torch.std_mean(scores, dim=1, correction=0, keepdim=True)
    return mean, torch.where(std > 0, std, torch.inf)


# ---------------------------------------------------------------------------------------------
# Filters


def category_mask(items: pd.DataFrame, include: list[str], exclude: list[str], domain: str) -> np.ndarray | None:
    """Which catalogue items pass the category filters (None: no filter). An item is in category C
    when C, case-insensitively, is its whole category or one level of it ("A > B" or "A, B")."""
    if not include and not exclude:
        return None
    key = "recommend.include_categories" if include else "recommend.exclude_categories"
    categories = items["category"] if "category" in items.columns else None
    if categories is None or not categories.fillna("").astype(str).str.strip().any():
        raise ConfigError(f"config key '{key}': the items of domain {domain!r} have no category to filter on")
    levels = [_levels(c) for c in categories.fillna("").astype(str)]
    allowed = np.ones(len(items), dtype=bool)
    if include:
        wanted = {c.strip().lower() for c in include}
        allowed &= np.fromiter((bool(lv & wanted) for lv in levels), dtype=bool, count=len(levels))
    if exclude:
        unwanted = {c.strip().lower() for c in exclude}
        allowed &= np.fromiter((not (lv & unwanted) for lv in levels), dtype=bool, count=len(levels))
    if not allowed.any():
        known = sorted({c for c in categories.fillna("").astype(str) if c})[:5]
        raise ConfigError(f"config key '{key}': no item of domain {domain!r} passes the category filters; "
                          f"categories there include {known}")
    return allowed


def _levels(category: str) -> set[str]:
    text = category.strip().lower()
    parts = {p.strip() for p in re.split(r" > |, ", text) if p.strip()}
    return parts | {text} if text else parts


def masked(score_chunk: ScoreChunk, allowed: np.ndarray | None) -> ScoreChunk:
    """Items outside `allowed` score -inf, so they rank after every allowed item."""
    if allowed is None:
        return score_chunk
    blocked = torch.from_numpy(~allowed)

    def score(user_rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        scores = score_chunk(user_rows, start, stop)
        scores[:, blocked[start:stop].to(scores.device)] = -torch.inf
        return scores

    return score


# ---------------------------------------------------------------------------------------------
# Diversity


def mmr_rerank(values: torch.Tensor, index: torch.Tensor, unit_embeddings: torch.Tensor, k: int,
               weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximal marginal relevance over candidate lists (rows sorted best first, -inf = no candidate).

    Step by step each row takes the candidate maximising (1 − weight)·relevance − weight·(highest
    cosine to the items already taken), relevance being the score min-max scaled to [0, 1] over the
    row's candidates; ties go to the better-ranked candidate, so weight 0 returns the first k
    candidates unchanged. Returns the picks' original scores and indices, (rows, min(k, candidates)).
    """
    n_rows, n_cand = values.shape
    k = min(k, n_cand)
    finite = torch.isfinite(values)
    low = torch.where(finite, values, torch.inf).min(dim=1, keepdim=True).values
    high = torch.where(finite, values, -torch.inf).max(dim=1, keepdim=True).values
    span = torch.where(high > low, high - low, torch.ones_like(high))
    relevance = torch.where(finite, (values - low) / span, -torch.inf)
    emb = unit_embeddings[index]  # (rows, candidates, dim)
    # All candidate pairs at once: one batched product beats k thin ones on a CPU (measured, k=10, n=100).
    similarity = emb @ emb.mT
    available = finite.clone()
    penalty = torch.zeros_like(values)
    rows = torch.arange(n_rows, device=values.device)
    picks, valid = [], []
    for step in range(k):
        gain = (1.0 - weight) * relevance - weight * penalty
        gain = torch.where(available, gain, -torch.inf)
        valid.append(available.any(dim=1))  # a row out of candidates picks nothing more
        pick = gain.argmax(dim=1)  # the first maximum: the better-ranked candidate
        picks.append(pick)
        available[rows, pick] = False
        picked_similarity = similarity[rows, pick]
        penalty = picked_similarity if step == 0 else torch.maximum(penalty, picked_similarity)
    if not picks:
        return values[:, :0], index[:, :0]
    order = torch.stack(picks, dim=1)
    chosen = torch.where(torch.stack(valid, dim=1), values.gather(1, order), -torch.inf)
    return chosen, index.gather(1, order)

