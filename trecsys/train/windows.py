"""Item sequences as model input: training windows with a loss at every position, and scoring batches.

One causal pass over a window of `max_seq_len + 1` items trains every (history -> next item) pair
in it, instead of materialising each prefix as its own padded sequence (up to max_seq_len x fewer
tokens). Overlapping windows (`stride` < max_seq_len) give labels longer histories at more tokens.
All arrays hold global item_idx, left-padded with -1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trecsys.model.seqrec import PAD
from trecsys.prepared.sequences import Ragged


@dataclass
class WindowIndex:
    """Training windows as positions in a flat item array, cut on the fly by `gather`.

    Window i is `items[lo[i]:end[i]]` left-padded with -1 to `width` items; only its last `new[i]`
    labels carry the loss. `items` is usually the memory-mapped array of trecsys/prepared/sequences.py,
    so the windows' items are read from disk per batch and never held all at once.
    """

    items: np.ndarray
    lo: np.ndarray  # int64, first item of each window (the user's first item when the window reaches it)
    end: np.ndarray  # int64, exclusive end
    new: np.ndarray  # int64
    width: int

    def __len__(self) -> int:
        return len(self.end)

    def gather(self, indices: np.ndarray) -> np.ndarray:
        """Windows `indices` as an int64 array (len(indices), width), left-padded with -1."""
        lo, end = self.lo[indices], self.end[indices]
        columns = end[:, None] - self.width + np.arange(self.width)[None, :]
        inside = columns >= lo[:, None]
        values = np.asarray(self.items[np.where(inside, columns, 0)] if len(self.items) else
                            np.zeros(columns.shape, dtype=np.int64), dtype=np.int64)
        return np.where(inside, values, PAD)

    def select(self, keep: np.ndarray) -> WindowIndex:
        return WindowIndex(self.items, self.lo[keep], self.end[keep], self.new[keep], self.width)


def window_index(sequences: Ragged | list[np.ndarray], max_seq_len: int, stride: int | None = None) -> WindowIndex:
    """Each user's sequence as windows of `max_seq_len + 1` items (positions only: see `WindowIndex`).

    Windows are cut from the end backwards every `stride` items (default `max_seq_len`: windows
    share one item), so the latest items form a full window. Only a window's last `new[i]` labels
    carry the loss (the earlier ones are another window's): every item but a user's first is a
    label exactly once, and the label at sequence position p reads min(p, max_seq_len - stride + 1)
    items of history at least. stride 1 gives every label its full history up to `max_seq_len`
    (the per-prefix task, at one window per label); stride max_seq_len gives the fewest windows,
    with histories cut at the window start. Sequences shorter than 2 are dropped. Per user, the
    latest window comes first. Inputs are `w[:, :-1]`, labels `w[:, 1:]`: see `window_tensors`.
    """
    if max_seq_len < 1:
        raise ValueError("max_seq_len must be >= 1")
    stride = max_seq_len if stride is None else stride
    if not 1 <= stride <= max_seq_len:
        raise ValueError(f"stride must be in [1, max_seq_len={max_seq_len}], got {stride}")
    width = max_seq_len + 1
    if not isinstance(sequences, Ragged):
        sequences = Ragged.from_lists(sequences)
    lengths = sequences.lengths()
    kept = lengths >= 2
    lengths, starts = lengths[kept], np.asarray(sequences.starts, dtype=np.int64)[kept]
    per_user = (lengths - 2) // stride + 1  # ceil((length - 1) / stride) windows
    user = np.repeat(np.arange(len(lengths)), per_user)
    first_window = np.repeat(np.cumsum(per_user) - per_user, per_user)
    back = np.arange(len(user)) - first_window  # 0 = the user's latest window
    end = lengths[user] - back * stride  # exclusive end within the user's sequence
    new = np.minimum(stride, end - 1)  # labels at sequence positions [max(1, end - stride), end)
    absolute_end = starts[user] + end
    return WindowIndex(sequences.items, np.maximum(starts[user], absolute_end - width), absolute_end,
                       new.astype(np.int64), width)


def training_windows(sequences: Ragged | list[np.ndarray], max_seq_len: int, stride: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Every window of `window_index` at once: (windows (n, max_seq_len + 1), new (n,)); for small
    inputs (tests, studies). Training gathers each batch's windows instead."""
    index = window_index(sequences, max_seq_len, stride)
    return index.gather(np.arange(len(index))), index.new


def _loss_mask(inputs, labels, new, item_start: int, item_stop: int | None):
    """Label positions that carry the loss (works on numpy arrays and tensors alike)."""
    keep = (inputs >= 0) & (labels >= 0)
    if item_stop is not None:
        keep &= (labels >= item_start) & (labels < item_stop)
    if new is not None:
        width = labels.shape[1]
        column = np.arange(width)[None, :] if isinstance(labels, np.ndarray) else torch.arange(width, device=labels.device)[None, :]
        keep &= column >= width - new[:, None]
    return keep


def window_tensors(windows: np.ndarray, item_start: int = 0, item_stop: int | None = None,
                   new: np.ndarray | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) LongTensors (B, max_seq_len) from windows.

    Inputs keep global item_idx; labels become catalogue-local (`item_idx - item_start`, the index
    into `model.item_reps(start, stop)`), and -1 (ignored) wherever the input is padding — at the
    position before a user's first item, whose state is the empty history. With `item_stop`, labels
    outside [item_start, item_stop) are ignored too: items of other domains in an interleaved
    sequence are read as context but never predicted. With `new` (from `training_windows`), only
    each window's last `new[i]` labels are kept (left-trimming the windows does not change them).
    """
    windows = torch.as_tensor(windows, dtype=torch.long)
    inputs, labels = windows[:, :-1], windows[:, 1:]
    new = None if new is None else torch.as_tensor(new, dtype=torch.long, device=windows.device)
    keep = _loss_mask(inputs, labels, new, item_start, item_stop)
    labels = torch.where(keep, labels - item_start, torch.full_like(labels, PAD))
    return inputs, labels


def first_seen(inputs: torch.Tensor, item_start: int = 0, item_stop: int | None = None) -> torch.Tensor:
    """(B, L) inputs -> (B, L): the catalogue-local item at each position where it first occurs in
    its window, -1 elsewhere (padding, items outside [item_start, item_stop), a repeat). The state
    after position t has read the window's first_seen items at positions <= t, each once: what the
    losses' `seen` argument (model.seen_bias) reads."""
    inside = inputs >= item_start
    if item_stop is not None:
        inside &= inputs < item_stop
    L = inputs.shape[1]
    earlier = torch.ones(L, L, dtype=torch.bool, device=inputs.device).tril(-1)  # [s, s']: s' < s
    repeat = ((inputs[:, :, None] == inputs[:, None, :]) & earlier).any(dim=2)
    return torch.where(inside & ~repeat, inputs - item_start, torch.full_like(inputs, PAD))


def label_counts(windows: np.ndarray, item_start: int = 0, item_stop: int | None = None,
                 new: np.ndarray | None = None) -> np.ndarray:
    """Labels per window that `window_tensors` keeps: the loss terms each window contributes."""
    return _loss_mask(windows[:, :-1], windows[:, 1:], new, item_start, item_stop).sum(axis=1)


def history_batch(histories: list[np.ndarray], max_seq_len: int) -> torch.Tensor:
    """The last `max_seq_len` items of each history, left-padded with -1: (B, max_seq_len).

    An empty history gives an all -1 row, for which `SeqRecModel.user_state` returns zeros.
    """
    if max_seq_len < 1:
        raise ValueError("max_seq_len must be >= 1")
    out = np.full((len(histories), max_seq_len), PAD, dtype=np.int64)
    for row, history in enumerate(histories):
        recent = np.asarray(history, dtype=np.int64)[-max_seq_len:]
        if len(recent):
            out[row, max_seq_len - len(recent):] = recent
    return torch.from_numpy(out)


def trim_left_padding(seq: torch.Tensor) -> torch.Tensor:
    """Drop the leading columns that are padding in every row of a left-padded (B, L) batch.

    Positions count from each row's first real item, so the model's output is the same, and a
    batch of short histories stops paying for `max_seq_len`.
    """
    real = (seq != PAD).any(dim=0)
    return seq[:, int(real.int().argmax()):] if bool(real.any()) else seq[:, -1:]
