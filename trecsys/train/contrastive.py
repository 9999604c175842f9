"""UniSRec's pretraining objectives (Hou et al., KDD 2022), added to the next-item loss by
`pretrain.seq_item_weight` and `pretrain.seq_seq_weight`: in-batch contrastive terms on a window's
last state (the sequence representation), cosine / `pretrain.contrastive_temperature`.

- sequence-item: the state against its next item's representation, the batch's other next items
  as negatives;
- sequence-sequence: the state against the state of an augmented view of the same window (history
  items dropped, text-vector entries dropped), the other windows' views as negatives.

Windows whose next item is the same are not each other's negatives (UniSRec's same_pos_id).
"""

from __future__ import annotations

import torch

from trecsys.config import PretrainConfig
from trecsys.model.seqrec import PAD, SeqRecModel
from trecsys.train.losses import info_nce


def drop_items(inputs: torch.Tensor, p: float) -> torch.Tensor:
    """Each real item of (B, L) left-padded inputs but the last one becomes padding with
    probability p: the encoder skips padding anywhere (positions count real items only)."""
    drop = (torch.rand(inputs.shape, device=inputs.device) < p) & (inputs != PAD)
    drop[:, -1] = False  # the state read is the last position's: it must stay an item
    return inputs.masked_fill(drop, PAD)


def contrastive_loss(model: SeqRecModel, inputs: torch.Tensor, states: torch.Tensor, labels: torch.Tensor,
                     item_start: int, cfg: PretrainConfig) -> torch.Tensor:
    """seq_item_weight · L_seq-item + seq_seq_weight · L_seq-seq for a batch: `inputs` (B, L) item_idx,
    `states` their `model.encode`, `labels` (B, L) catalogue-local next items (-1: none)."""
    last = labels[:, -1]
    keep = last >= 0
    total = states.new_zeros(())
    if int(keep.sum()) < 2:  # no negative to contrast with
        return total
    state, last = states[keep, -1], last[keep]
    same = last[:, None] == last[None, :]
    tau = cfg.contrastive_temperature
    if cfg.seq_item_weight > 0:
        items = model.item_reps_at(last + item_start)
        total = total + cfg.seq_item_weight * info_nce(state, items, tau, same)
    if cfg.seq_seq_weight > 0:
        view = model.encode(drop_items(inputs[keep], cfg.item_drop), text_drop=cfg.text_drop)[:, -1]
        total = total + cfg.seq_seq_weight * info_nce(state, view, tau, same)
    return total
