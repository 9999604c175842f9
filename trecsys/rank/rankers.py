"""What ranks a catalogue, and the one factory that turns it into a scorer for `trec evaluate` and
`trec recommend` alike: a checkpoint, a baseline (popularity, item-kNN), or a weighted fusion of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from trecsys.model.checkpoint import load_fitting
from trecsys.prepared.tables import DomainRange, Prepared
from trecsys.rank.fusion import read_fusion
from trecsys.rank.rerank import Part, WeightedSum
from trecsys.rank.scorers import ItemKNNScorer, ModelScorer, PopularityScorer, Scorer, to_local

BASELINES = (PopularityScorer.name, ItemKNNScorer.name)


@dataclass
class Ranker:
    """A checkpoint folder; a baseline (`label` popularity or item-knn) when `checkpoint` is None; or,
    with `parts`, their weighted sum (trecsys.rank.rerank.WeightedSum). `weight` counts in a fusion.
    A checkpoint folder with a fusion.json (finetune's `fusion` candidate) ranks as that fusion;
    `model_only` ranks its network alone (the fusion's own model part)."""

    label: str
    checkpoint: Path | None = None
    weight: float = 1.0
    parts: list[Ranker] = field(default_factory=list)
    model_only: bool = False


@dataclass
class RankingInputs:
    """What every scorer of one ranking reads. `histories`: one row per list to make (global
    item_idx); `counted`: the catalogue-local sequences the baselines count (a callable, so that
    a ranking without a baseline never builds them); `model_histories(history)`: the rows as a model
    trained with that `finetune.history` reads them (its config.json records which)."""

    prepared: Prepared
    domain: DomainRange
    histories: list[np.ndarray]
    counted: Callable[[], list[np.ndarray]]
    model_histories: Callable[[str], list[np.ndarray]]
    item_text: np.ndarray
    device: torch.device
    user_batch: int
    item_chunk: int = 65536  # a fusion's item chunk (its per-user statistics are taken chunk by chunk)


def fused_ranker(ranker: Ranker, weights: dict[str, float]) -> Ranker:
    """A saved fusion as rankers: the folder's network, item-kNN and popularity with their weights.
    The baselines are built from `RankingInputs.counted` like the caller's own baseline rows
    (evaluate: the train split; recommend: every split)."""
    parts = [Ranker(ranker.label, ranker.checkpoint, weights["model"], model_only=True),
             Ranker(ItemKNNScorer.name, weight=weights[ItemKNNScorer.name]),
             Ranker(PopularityScorer.name, weight=weights[PopularityScorer.name])]
    return Ranker(ranker.label, weight=ranker.weight, parts=[p for p in parts if p.weight > 0])


def make_scorer(ranker: Ranker, inputs: RankingInputs) -> Scorer:
    """The scorer `ranker` names, over `inputs.histories`."""
    domain = inputs.domain
    if ranker.checkpoint is not None and not ranker.model_only:
        weights = read_fusion(ranker.checkpoint)
        if weights is not None:
            return make_scorer(fused_ranker(ranker, weights), inputs)
    if ranker.parts:
        parts = [Part(make_scorer(part, inputs), part.weight) for part in ranker.parts]
        # The sum runs where the models run (the baselines score on the CPU).
        device = next((p.scorer.device for p in parts if p.scorer.device.type != "cpu"), torch.device("cpu"))
        return WeightedSum(parts, domain.n_items, inputs.item_chunk, device)
    if ranker.checkpoint is None:
        if ranker.label == PopularityScorer.name:
            return PopularityScorer(inputs.counted(), domain.n_items)
        if ranker.label == ItemKNNScorer.name:
            return ItemKNNScorer(inputs.counted(), to_local(inputs.histories, domain), domain.n_items)
        raise ValueError(f"unknown baseline {ranker.label!r}; expected one of {BASELINES}")
    model, info = load_fitting(ranker.checkpoint, inputs.prepared, inputs.device)
    histories = inputs.histories
    if info.history != "target":
        # Fine-tuned reading the user's source items as context (finetune.history): read them here too.
        histories = inputs.model_histories(info.history)
    return ModelScorer(model, histories, domain, inputs.item_text, inputs.device, name=ranker.label,
                       user_batch=inputs.user_batch)
