"""Training windows of one domain's catalogue and the next-item loss over them: what pretrain-source,
distill and finetune-target hand the engine (a batch holds one domain's windows, so one catalogue).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from trecsys.config import TrainConfig
from trecsys.model.seqrec import SeqRecModel
from trecsys.prepared.tables import DomainRange
from trecsys.train.engine import TrainData
from trecsys.train.losses import chunked_cross_entropy, proposal_log_q, sampled_softmax_loss
from trecsys.train.windows import label_counts, training_windows, trim_left_padding, window_tensors


@dataclass
class DomainWindows:
    """Training windows whose labels are ranked against one domain's catalogue; items of other
    domains in them are context only (never labels)."""

    domain: DomainRange
    windows: np.ndarray
    new: np.ndarray  # labels per window that carry the loss, counted from its end (training_windows)
    log_q: torch.Tensor | None = None  # proposal of `loss: sampled`, over the domain's items

    def label_counts(self) -> np.ndarray:
        return label_counts(self.windows, self.domain.item_start, self.domain.item_stop, self.new)


def window_stride(train: TrainConfig, max_seq_len: int) -> int:
    """`train.window_stride` as the stride of training_windows (0 or above max_seq_len: max_seq_len)."""
    return max_seq_len if train.window_stride in (0, None) else min(train.window_stride, max_seq_len)


def domain_windows(domain: DomainRange, sequences: Sequence[np.ndarray], max_seq_len: int,
                   train: TrainConfig, device: torch.device) -> DomainWindows:
    """Windows of `sequences` that hold at least one label in `domain`."""
    windows, new = training_windows(list(sequences), max_seq_len, window_stride(train, max_seq_len))
    part = DomainWindows(domain, windows, new)
    has_label = part.label_counts() > 0
    part.windows, part.new = windows[has_label], new[has_label]
    if train.loss == "sampled":  # proposal from training popularity within the domain
        flat = np.concatenate(list(sequences)) if len(sequences) else np.zeros(0, dtype=np.int64)
        flat = flat[(flat >= domain.item_start) & (flat < domain.item_stop)] - domain.item_start
        part.log_q = proposal_log_q(np.bincount(flat, minlength=domain.n_items)).to(device)
    return part


def window_train_data(parts: list[DomainWindows]) -> TrainData:
    """Every part's windows; a batch holds one part's windows (so one catalogue per batch)."""
    windows = np.concatenate([p.windows for p in parts])
    new = np.concatenate([p.new for p in parts])
    groups = np.repeat(np.arange(len(parts)), [len(p.windows) for p in parts])
    n_terms = np.concatenate([p.label_counts() for p in parts])

    def make_batch(indices: np.ndarray) -> dict:
        return {"windows": trim_left_padding(torch.from_numpy(windows[indices])),
                "new": torch.from_numpy(new[indices]), "group": int(groups[indices[0]])}

    return TrainData(n_terms=n_terms, make_batch=make_batch, groups=groups)


def batch_inputs(parts: list[DomainWindows], batch: dict) -> tuple[DomainWindows, torch.Tensor, torch.Tensor]:
    """(part, inputs, catalogue-local labels) of a batch made by `window_train_data`."""
    part = parts[batch["group"]]
    inputs, labels = window_tensors(batch["windows"], part.domain.item_start, part.domain.item_stop, batch["new"])
    return part, inputs, labels


def next_item_loss(model: SeqRecModel, states: torch.Tensor, labels: torch.Tensor, part: DomainWindows,
                   train: TrainConfig, item_reps: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-item loss of the labelled positions: full softmax (chunked) or sampled.
    `item_reps`: the domain's item tower output when the caller has it already; the sampled loss
    otherwise runs the tower on its targets and negatives only."""
    start, stop = part.domain.item_start, part.domain.item_stop
    if train.loss == "full":
        reps = item_reps if item_reps is not None else model.item_reps(start, stop)
        return chunked_cross_entropy(states, labels, reps, model.score, train.loss_chunk_size)
    if item_reps is not None:
        reps_of = lambda items: item_reps.index_select(0, items)  # noqa: E731 (deterministic backward)
    else:
        reps_of = lambda items: model.item_reps_at(items + start)  # noqa: E731
    return sampled_softmax_loss(states, labels, reps_of, model.score, train.n_negatives, part.log_q)


def ce_loss_fn(parts: list[DomainWindows], train: TrainConfig,
               extra: Callable[[SeqRecModel], torch.Tensor] | None = None):
    """loss_fn for the engine: the summed next-item loss of a batch (+ `extra(model)` per label)."""

    def loss_fn(model: SeqRecModel, batch: dict) -> torch.Tensor:
        part, inputs, labels = batch_inputs(parts, batch)
        mean = next_item_loss(model, model.encode(inputs), labels, part, train)
        if extra is not None:
            mean = mean + extra(model)
        return mean * (labels >= 0).sum()  # the engine normalises by the global batch's label count

    return loss_fn
