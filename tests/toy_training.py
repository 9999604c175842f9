"""A tiny next-item model and dataset for testing trecsys/train/engine.py without the real model.

Also runnable as a script (`python tests/toy_training.py OUT [key=value ...]`), which is how the DDP
test launches it under torchrun.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trecsys.config import TrainConfig
from trecsys.model.checkpoint import save_weights
from trecsys.train.engine import TrainData, distributed, fit

N_ITEMS, WINDOW = 40, 9  # windows hold 8 inputs and their 8 next items


class ToyModel(nn.Module):
    """Predicts the next item from the current one: an embedding, dropout, a bias-carrying head."""

    def __init__(self, dropout: float = 0.1, d: int = 16):
        super().__init__()
        self.item = nn.Embedding(N_ITEMS, d)
        self.norm = nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(d, N_ITEMS)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.norm(self.item(items))))


def toy_windows(n: int = 96, seed: int = 0) -> np.ndarray:
    """Sequences where the next item is (3 * item + 1) mod N_ITEMS 80% of the time; some left padding."""
    rng = np.random.default_rng(seed)
    windows = np.full((n, WINDOW), -1, dtype=np.int64)
    for r in range(n):
        length = int(rng.integers(3, WINDOW + 1))
        item = int(rng.integers(N_ITEMS))
        seq = []
        for _ in range(length):
            seq.append(item)
            item = (3 * item + 1) % N_ITEMS if rng.random() < 0.8 else int(rng.integers(N_ITEMS))
        windows[r, WINDOW - length:] = seq
    return windows


def toy_data(windows: np.ndarray, n_groups: int = 2) -> TrainData:
    n_terms = ((windows[:, :-1] >= 0) & (windows[:, 1:] >= 0)).sum(axis=1)
    return TrainData(
        n_terms=n_terms,
        make_batch=lambda idx: torch.from_numpy(windows[idx]),
        groups=np.arange(len(windows)) % n_groups,
    )


def toy_loss(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    inputs, targets = windows[:, :-1], windows[:, 1:]
    mask = (inputs >= 0) & (targets >= 0)
    logits = model(inputs[mask])
    return nn.functional.cross_entropy(logits.float(), targets[mask], reduction="sum")


def toy_validate(model: nn.Module) -> dict[str, float]:
    """Hit rate at 10 of the true rule's next item, for every item: a number that can only rise by learning."""
    items = torch.arange(N_ITEMS, device=model.item.weight.device)
    top = model(items).topk(10, dim=1).indices
    hit = (top == ((3 * items + 1) % N_ITEMS)[:, None]).any(dim=1).float().mean()
    return {"hit@10": float(hit)}


def toy_fit(work_dir: Path, cfg: TrainConfig, dropout: float = 0.1, seed: int = 0, resume: bool = False,
            loss_fn=toy_loss, dist=None):
    torch.manual_seed(seed)
    model = ToyModel(dropout)
    result = fit(model, toy_data(toy_windows()), loss_fn, toy_validate, cfg, work_dir, seed=seed, dist=dist,
                 monitor="hit@10", resume=resume)
    return model, result


if __name__ == "__main__":
    out = Path(sys.argv[1])
    overrides = dict(arg.split("=", 1) for arg in sys.argv[2:])
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.01, warmup_fraction=0.1, patience=0,
                      **{k: int(v) for k, v in overrides.items()})
    with distributed("cpu") as dist:
        model, _ = toy_fit(out, cfg, dropout=0.0, dist=dist)
        if dist.is_main:
            save_weights(model, out)
