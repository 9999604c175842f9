"""Training windows of one domain's catalogue and the next-item loss over them: what pretrain-source,
distill and finetune-target hand the engine (a batch holds one domain's windows, so one catalogue).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from trecsys.config import PretrainConfig, TrainConfig
from trecsys.model.seqrec import SeqRecModel
from trecsys.prepared.sequences import Ragged
from trecsys.prepared.tables import DomainRange
from trecsys.train.contrastive import contrastive_loss
from trecsys.train.engine import TrainData
from trecsys.train.losses import chunked_cross_entropy, proposal_log_q, sampled_softmax_loss
from trecsys.train.windows import (
    WindowIndex,
    first_seen,
    label_counts,
    trim_left_padding,
    window_index,
    window_tensors,
)


@dataclass
class DomainWindows:
    """Training windows whose labels are ranked against one domain's catalogue; items of other
    domains in them are context only (never labels). The windows are positions in the (memory-mapped)
    sequence arrays, cut per batch."""

    domain: DomainRange
    windows: WindowIndex
    log_q: torch.Tensor | None = None  # proposal of `loss: sampled`, over the domain's items

    @property
    def new(self) -> np.ndarray:  # labels per window that carry the loss, counted from its end
        return self.windows.new

    def label_counts(self, chunk: int = 1 << 12) -> np.ndarray:
        """Loss terms per window, computed a chunk of windows at a time (memory flat in their number)."""
        counts = [label_counts(self.windows.gather(rows), self.domain.item_start, self.domain.item_stop,
                               self.windows.new[rows])
                  for rows in np.array_split(np.arange(len(self.windows)), max(1, -(-len(self.windows) // chunk)))]
        return np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)


def window_stride(train: TrainConfig, max_seq_len: int) -> int:
    """`train.window_stride` as the stride of window_index (0 or above max_seq_len: max_seq_len)."""
    return max_seq_len if train.window_stride in (0, None) else min(train.window_stride, max_seq_len)


def domain_windows(domain: DomainRange, sequences: Ragged | list[np.ndarray], max_seq_len: int,
                   train: TrainConfig, device: torch.device) -> DomainWindows:
    """Windows of `sequences` that hold at least one label in `domain`."""
    if not isinstance(sequences, Ragged):
        sequences = Ragged.from_lists(sequences)
    part = DomainWindows(domain, window_index(sequences, max_seq_len, window_stride(train, max_seq_len)))
    part.windows = part.windows.select(part.label_counts() > 0)
    if train.loss == "sampled":  # proposal from training popularity within the domain
        part.log_q = proposal_log_q(sequences.item_counts(domain.item_start, domain.item_stop)).to(device)
    return part


def window_train_data(parts: list[DomainWindows]) -> TrainData:
    """Every part's windows; a batch holds one part's windows (so one catalogue per batch), gathered
    from the sequence arrays when the batch is made (on each rank, only its micro-batches)."""
    sizes = [len(p.windows) for p in parts]
    first = np.concatenate([[0], np.cumsum(sizes)])
    groups = np.repeat(np.arange(len(parts)), sizes)
    n_terms = np.concatenate([p.label_counts() for p in parts])

    def make_batch(indices: np.ndarray) -> dict:
        group = int(groups[indices[0]])
        rows = indices - first[group]
        windows = parts[group].windows
        return {"windows": trim_left_padding(torch.from_numpy(windows.gather(rows))),
                "new": torch.from_numpy(windows.new[rows]), "group": group}

    return TrainData(n_terms=n_terms, make_batch=make_batch, groups=groups)


def batch_inputs(parts: list[DomainWindows], batch: dict) -> tuple[DomainWindows, torch.Tensor, torch.Tensor]:
    """(part, inputs, catalogue-local labels) of a batch made by `window_train_data`."""
    part = parts[batch["group"]]
    inputs, labels = window_tensors(batch["windows"], part.domain.item_start, part.domain.item_stop, batch["new"])
    return part, inputs, labels


def next_item_loss(model: SeqRecModel, inputs: torch.Tensor, states: torch.Tensor, labels: torch.Tensor,
                   part: DomainWindows, train: TrainConfig, item_reps: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-item loss of the labelled positions: full softmax (chunked) or sampled, with
    model.seen_bias's offset on the items each position has read in its window.
    `item_reps`: the domain's item tower output when the caller has it already; the sampled loss
    otherwise runs the tower on its targets and negatives only."""
    start, stop = part.domain.item_start, part.domain.item_stop
    offset = model.seen_offset()
    seen = first_seen(inputs, start, stop) if offset is not None else None
    if train.loss == "full":
        reps = item_reps if item_reps is not None else model.item_reps(start, stop)
        return chunked_cross_entropy(states, labels, reps, model.score, train.loss_chunk_size, seen, offset)
    if item_reps is not None:
        reps_of = lambda items: item_reps.index_select(0, items)  # noqa: E731 (deterministic backward)
    else:
        reps_of = lambda items: model.item_reps_at(items + start)  # noqa: E731
    return sampled_softmax_loss(states, labels, reps_of, model.score, train.n_negatives, part.log_q,
                                seen=seen, offset=offset)


def ce_loss_fn(parts: list[DomainWindows], train: TrainConfig,
               extra: Callable[[SeqRecModel], torch.Tensor] | None = None,
               contrastive: PretrainConfig | None = None):
    """loss_fn for the engine: the summed next-item loss of a batch (+ `extra(model)` per label,
    + UniSRec's contrastive terms per label when `contrastive` weighs them: train/contrastive.py)."""
    contrastive = contrastive if contrastive and (contrastive.seq_item_weight or contrastive.seq_seq_weight) else None

    def loss_fn(model: SeqRecModel, batch: dict) -> torch.Tensor:
        part, inputs, labels = batch_inputs(parts, batch)
        states = model.encode(inputs)
        mean = next_item_loss(model, inputs, states, labels, part, train)
        if contrastive is not None:
            mean = mean + contrastive_loss(model, inputs, states, labels, part.domain.item_start, contrastive)
        if extra is not None:
            mean = mean + extra(model)
        return mean * (labels >= 0).sum()  # the engine normalises by the global batch's label count

    return loss_fn
