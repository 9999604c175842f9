"""Full-ranking validation for the training stages (and the study's test numbers), with the scorer
and top-K that `trec evaluate` uses: NDCG/Recall@K of every case's users over its domain's catalogue.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from trecsys.errors import ConfigError
from trecsys.model.seqrec import SeqRecModel
from trecsys.prepared.tables import DomainRange
from trecsys.rank.metrics import full_ranking_topk, ranking_metrics
from trecsys.rank.scorers import ModelScorer, to_local


@dataclass
class EvalCase:
    """Users to rank one domain's catalogue for: what each read (global item_idx, any domain) and
    their held-out items (global item_idx in `domain`)."""

    name: str
    domain: DomainRange
    histories: list[np.ndarray]
    targets: list[np.ndarray]


def make_ranker(cases: list[EvalCase], item_text: np.ndarray, user_batch: int, device: torch.device,
                ks: Sequence[int] = (10,), key: str = "data.source") -> Callable[[SeqRecModel], dict[str, float]]:
    """rank(model) -> NDCG/Recall@K pooled over every case's users with a held-out item, and per case
    ("<name>/ndcg@10"). Each case's full catalogue is ranked by trecsys.rank.scorers.ModelScorer (the
    scorer `trec evaluate` uses), the items in the user's history excluded."""
    prepared_cases = []
    for case in cases:
        # Users in order of history length, so a batch of them needs little padding.
        users = sorted((u for u, t in enumerate(case.targets) if len(t)), key=lambda u: len(case.histories[u]))
        histories = [case.histories[u] for u in users]
        prepared_cases.append((case, histories, to_local(histories, case.domain),
                               to_local([case.targets[u] for u in users], case.domain)))
    reported = [f"{m}@{k}" for k in ks for m in ("ndcg", "recall")]

    def rank(model: SeqRecModel) -> dict[str, float]:
        metrics: dict[str, float] = {}
        pooled: dict[str, list[np.ndarray]] = {k: [] for k in reported}
        for case, histories, exclude, targets in prepared_cases:
            if not targets:
                continue
            scorer = ModelScorer(model, histories, case.domain, item_text, device, user_batch=user_batch)
            _, top = full_ranking_topk(scorer.score_chunk, len(targets), case.domain.n_items, k=max(ks),
                                       exclude=exclude, user_batch=user_batch, device=device,
                                       score_into=scorer.score_into)
            per_user = ranking_metrics(top, targets, ks=ks)
            for name in reported:
                metrics[f"{case.name}/{name}"] = float(np.nanmean(per_user[name]))
                pooled[name].append(per_user[name])
        if not pooled[reported[0]]:
            raise ConfigError(f"config key '{key}': no user has a held-out item to rank")
        metrics.update({name: float(np.nanmean(np.concatenate(v))) for name, v in pooled.items()})
        return metrics

    return rank


def n_ranked_users(cases: list[EvalCase]) -> int:
    return sum(1 for case in cases for t in case.targets if len(t))
