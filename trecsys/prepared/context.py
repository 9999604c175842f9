"""The target domain's users as a fine-tuned model sees them: training sequences, the histories it
reads before each held-out split, and the held-out items — from the target alone, or with the
user's source-domain items interleaved as context (`finetune.history: all_domains`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
    train: list[np.ndarray]
    histories: dict[str, list[np.ndarray]]
    targets: dict[str, list[np.ndarray]]
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
    """The target domain's users; `history` is `target` or `all_domains` (source items as context)."""
    split = domain_split(prepared, prepared.target)
    targets = {name: split.targets(name) for name in SPLITS}
    n_train = np.array([len(t) for t in split.train], dtype=np.int64)
    if history == "target":
        return TargetSequences(split.domain, history, split.user_idx, split.train,
                               {name: split.history(name) for name in SPLITS}, targets, n_train)
    if history != "all_domains":
        raise ValueError(f"unknown history {history!r}")
    domains = [*prepared.source, prepared.target]
    rows = prepared.interactions
    rows = rows[rows["domain"].isin(domains) & rows["user_idx"].isin(split.user_idx)]
    users = rows["user_idx"].to_numpy()
    items = rows["item_idx"].to_numpy().astype(np.int64)
    in_target = ((items >= split.domain.item_start) & (items < split.domain.item_stop))
    row_split = rows["split"].to_numpy()
    starts = np.searchsorted(users, split.user_idx)  # rows are sorted by user_idx
    stops = np.searchsorted(users, split.user_idx, side="right")
    train, histories = [], {name: [] for name in SPLITS}
    for lo, hi in zip(starts, stops, strict=True):
        seq, target, kind = items[lo:hi], in_target[lo:hi], row_split[lo:hi]
        train.append(_before_last_train(seq, target, kind))
        for name in SPLITS:
            histories[name].append(_history_before(seq, target, kind, name))
    return TargetSequences(split.domain, history, split.user_idx, train, histories, targets, n_train)


def _before_last_train(seq: np.ndarray, target: np.ndarray, kind: np.ndarray) -> np.ndarray:
    """Everything up to the user's last target training item, without held-out target items:
    context after it could never precede a training label."""
    train_positions = np.flatnonzero(target & (kind == "train"))
    if len(train_positions) == 0:
        return seq[:0]
    end = train_positions[-1] + 1
    return seq[:end][~(target[:end] & (kind[:end] != "train"))]


def _history_before(seq: np.ndarray, target: np.ndarray, kind: np.ndarray, split: str) -> np.ndarray:
    """What the user did before their first `split` target item: items of every domain, target
    items only from the splits that precede it (train; train and valid for test)."""
    held = np.flatnonzero(target & (kind == split))
    end = held[0] if len(held) else len(seq)
    visible = ("train", "input") if split == "valid" else ("train", "input", "valid")
    keep = ~target[:end] | np.isin(kind[:end], visible)
    return seq[:end][keep]


def histories_for(prepared: Prepared, history: str, split: str, user_idx: np.ndarray) -> list[np.ndarray]:
    """What a model trained with `history` reads before `split` for each of `user_idx` (target users)."""
    seqs = target_sequences(prepared, history)
    rows = np.searchsorted(seqs.user_idx, user_idx)
    if not np.array_equal(seqs.user_idx[np.minimum(rows, len(seqs.user_idx) - 1)], user_idx):
        raise ValueError("histories_for: some users are not target-domain users")
    return [seqs.histories[split][r] for r in rows]
