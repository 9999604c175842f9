"""Item sequences as model input: training windows with a loss at every position, and scoring batches.

One causal pass over a window of `max_seq_len + 1` items trains every (history -> next item) pair
in it, instead of materialising each prefix as its own padded sequence (~40x fewer tokens).
All arrays hold global item_idx, left-padded with -1.
"""

from __future__ import annotations

import numpy as np
import torch

from trecsys.model.seqrec import PAD


def training_windows(sequences: list[np.ndarray], max_seq_len: int) -> np.ndarray:
    """Split each user's sequence into windows of `max_seq_len + 1` items: (n_windows, max_seq_len + 1).

    Windows are cut from the end backwards with stride `max_seq_len`, so the latest items form a
    full window and consecutive windows share one item: every item but a user's first is a label
    exactly once, with its history truncated at the window start. Sequences shorter than 2 are
    dropped. Per user, the latest window comes first. Inputs are `w[:, :-1]`, labels `w[:, 1:]`
    except where the input is padding (a user's first item has no history): see `window_tensors`.
    """
    if max_seq_len < 1:
        raise ValueError("max_seq_len must be >= 1")
    width = max_seq_len + 1
    kept = [np.asarray(s, dtype=np.int64) for s in sequences if len(s) >= 2]
    if not kept:
        return np.full((0, width), PAD, dtype=np.int64)
    lengths = np.array([len(s) for s in kept], dtype=np.int64)
    flat = np.concatenate(kept)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    per_user = (lengths - 2) // max_seq_len + 1  # ceil((length - 1) / max_seq_len) labels per window
    user = np.repeat(np.arange(len(kept)), per_user)
    first_window = np.repeat(np.cumsum(per_user) - per_user, per_user)
    back = np.arange(len(user)) - first_window  # 0 = the user's latest window
    stop = starts[user] + lengths[user] - back * max_seq_len  # exclusive end in `flat`
    columns = stop[:, None] - width + np.arange(width)[None, :]
    inside = columns >= starts[user][:, None]
    return np.where(inside, flat[np.maximum(columns, 0)], PAD)


def window_tensors(windows: np.ndarray, item_start: int = 0, item_stop: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) LongTensors (B, max_seq_len) from windows.

    Inputs keep global item_idx; labels become catalogue-local (`item_idx - item_start`, the index
    into `model.item_reps(start, stop)`), and -1 (ignored) wherever the input is padding — at the
    position before a user's first item, whose state is the empty history. With `item_stop`, labels
    outside [item_start, item_stop) are ignored too: items of other domains in an interleaved
    sequence are read as context but never predicted.
    """
    windows = torch.as_tensor(windows, dtype=torch.long)
    inputs, labels = windows[:, :-1], windows[:, 1:]
    keep = inputs >= 0
    if item_stop is not None:
        keep &= (labels >= item_start) & (labels < item_stop)
    labels = torch.where(keep, labels - item_start, torch.full_like(labels, PAD))
    return inputs, labels


def label_counts(windows: np.ndarray, item_start: int = 0, item_stop: int | None = None) -> np.ndarray:
    """Labels per window that `window_tensors` keeps: the loss terms each window contributes."""
    inputs, labels = windows[:, :-1], windows[:, 1:]
    keep = (inputs >= 0) & (labels >= 0)
    if item_stop is not None:
        keep &= (labels >= item_start) & (labels < item_stop)
    return keep.sum(axis=1)


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
