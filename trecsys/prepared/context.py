"""The target domain's users as a fine-tuned model sees them: training sequences, the histories it
reads before each held-out split, and the held-out items — from the target alone, or with the
user's source-domain items interleaved as context (`finetune.history: all_domains`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trecsys.prepared.sequences import Ragged
from trecsys.prepared.tables import DomainRange, Prepared, domain_split

SPLITS = ("valid", "test")


@dataclass
class TargetSequences:
    """Per target-domain user (rows follow `user_idx`), global item_idx in prepared order.

    `train` is what training windows are cut from (labels are only its target items);
    `histories[split]` is what the model reads to rank the target catalogue for `targets[split]`.
    """

    domain: DomainRange
    history: str
    user_idx: np.ndarray
    train: Ragged
    histories: dict[str, Ragged]
    targets: dict[str, Ragged]
    n_target_train: np.ndarray  # target-domain training items per user

    def training_users(self, fraction: float, seed: int) -> np.ndarray:
        """Rows of the users to train on: every user with a target training item, or a seeded subset."""
        return subset_users(np.flatnonzero(self.n_target_train > 0), fraction, seed)


def subset_users(users: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """ceil(fraction · n) of `users`, sorted: the first ones of a permutation seeded by `seed` alone,
    so a smaller fraction's users are a subset of a larger one's (one few-shot curve, nested)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return np.asarray(users)
    order = np.random.default_rng([seed, 7919]).permutation(len(users))
    keep = order[:int(np.ceil(fraction * len(users)))]
    return np.sort(np.asarray(users)[keep])


def target_sequences(prepared: Prepared, history: str = "target") -> TargetSequences:
    """The target domain's users; `history` is `target` or `all_domains` (source items as context),
    memory-mapped from `prepared/sequences/` (all_domains.* there: trecsys/prepared/sequences.py)."""
    split = domain_split(prepared, prepared.target)
    targets = {name: split.targets(name) for name in SPLITS}
    n_train = split.train.lengths()
    if history == "target":
        return TargetSequences(split.domain, history, split.user_idx, split.train,
                               {name: split.history(name) for name in SPLITS}, targets, n_train)
    if history != "all_domains":
        raise ValueError(f"unknown history {history!r}")
    store = prepared.sequences
    parts = {name: store.part(f"all_domains.{name}") for name in ("train", *SPLITS)}
    return TargetSequences(split.domain, history, split.user_idx, parts["train"],
                           {name: parts[name] for name in SPLITS}, targets, n_train)


def histories_for(prepared: Prepared, history: str, split: str, user_idx: np.ndarray) -> list[np.ndarray]:
    """What a model trained with `history` reads before `split` for each of `user_idx` (target users)."""
    seqs = target_sequences(prepared, history)
    rows = np.searchsorted(seqs.user_idx, user_idx)
    if not np.array_equal(seqs.user_idx[np.minimum(rows, len(seqs.user_idx) - 1)], user_idx):
        raise ValueError("histories_for: some users are not target-domain users")
    return [seqs.histories[split][r] for r in rows]
