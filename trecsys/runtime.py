"""The process a stage runs in: its device (the one place that reads the `device` config key) and seeding."""

from __future__ import annotations

import random

import numpy as np
import torch

from trecsys.errors import ConfigError


def resolve_device(name: str, key: str = "device") -> torch.device:
    """`auto` is cuda when available, else cpu; anything else must be a device torch knows."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"config key '{key}': {name!r} is not a device (use auto, cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key '{key}': {name!r} was asked for but CUDA is not available; use device=cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
