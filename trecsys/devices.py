"""Which device a stage runs on: the one place that reads the `device` config key."""

from __future__ import annotations

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
