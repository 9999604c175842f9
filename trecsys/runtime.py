"""The process a stage runs in: its CPU threads (the one place that reads `runtime.threads`), its device
(the one place that reads the `device` config key), seeding, and SIGINT/SIGTERM as a request to stop
at the next safe point."""

from __future__ import annotations

import os
import random
import signal
import threading
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from trecsys.errors import ConfigError

THREADS_ENV = "TRECSYS_THREADS"
# Thread pools that read their size from the environment when they start: torch's OpenMP and MKL,
# numpy's OpenBLAS, the tokenizers' Rayon pool and Polars' (both used by `trec prepare`), and any
# child process.
POOL_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS", "POLARS_MAX_THREADS")


@dataclass(frozen=True)
class Threads:
    """What a stage runs with, as recorded in its manifest (`runtime`) and printed when it starts."""

    threads: int  # torch intra-op threads = BLAS/OpenMP pool size
    interop_threads: int  # torch inter-op pool
    source: str  # runtime.threads, TRECSYS_THREADS or default
    usable_cpus: int  # cores this process may run on (its CPU affinity)
    local_world_size: int  # processes of this run on this machine (torchrun's LOCAL_WORLD_SIZE)
    omp_wait_policy: str | None  # PASSIVE unless set before trecsys was imported (trecsys/__init__.py)

    def line(self) -> str:
        why = {"default": f"default: {self.usable_cpus} usable cores / {self.local_world_size} process(es) here"}
        return f"{self.threads} CPU thread(s) ({why.get(self.source, self.source)})"


_applied: Threads | None = None


def usable_cpus() -> int:
    """Cores the OS lets this process run on (a container's or `taskset`'s limit), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def local_world_size() -> int:
    """Processes of this run on this machine: torchrun sets LOCAL_WORLD_SIZE, a plain run is one."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def resolve_threads(requested: int, key: str = "runtime.threads") -> tuple[int, str]:
    """(threads, where the number came from): the config key when > 0, else TRECSYS_THREADS, else
    the usable cores shared among this machine's ranks, so that no two threads share a core."""
    if requested < 0:
        raise ConfigError(f"config key '{key}': must be >= 0 (0 = {THREADS_ENV} or the usable cores), got {requested}")
    if requested > 0:
        return requested, key
    env = os.environ.get(THREADS_ENV, "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ConfigError(f"environment variable {THREADS_ENV}: expected a whole number >= 1, got {env!r}")
        return int(env), THREADS_ENV
    return max(1, usable_cpus() // local_world_size()), "default"


def apply_threads(requested: int = 0, key: str = "runtime.threads") -> Threads:
    """Every stage calls this first (under torchrun, every rank), and names the result in the first
    line it prints.

    Size every CPU thread pool of this process before any work: torch intra- and inter-op,
    the BLAS/OpenMP pools already loaded (via threadpoolctl: numpy's OpenBLAS is loaded before
    any stage runs), and the environment that pools started later and child processes read."""
    global _applied
    threads, source = resolve_threads(requested, key)
    for name in POOL_ENV:
        os.environ[name] = str(threads)
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads)
    torch.set_num_threads(threads)
    if torch.get_num_interop_threads() != threads:
        try:
            torch.set_num_interop_threads(threads)
        except RuntimeError:
            pass  # settable once per process, before inter-op work: the manifest records what holds
    _applied = Threads(threads=torch.get_num_threads(), interop_threads=torch.get_num_interop_threads(),
                       source=source, usable_cpus=usable_cpus(), local_world_size=local_world_size(),
                       omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"))
    return _applied


def thread_record() -> dict:
    """The `runtime` entry of a manifest: what `apply_threads` set, or torch's own state if it never ran."""
    if _applied is not None:
        return asdict(_applied)
    return {"threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "source": "not set (torch's own default)", "usable_cpus": usable_cpus(),
            "local_world_size": local_world_size(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


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


class StopRequest:
    """SIGINT/SIGTERM ask the work to stop at its next safe point (after saving what it can); a
    second signal stops at once. Outside the main thread signals cannot be caught: nothing is asked."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a signal"
