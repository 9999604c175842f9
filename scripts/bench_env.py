"""What the benchmarks that race trecsys against RecBole hold equal: thread count, glibc allocator
settings, and the line that states them with the machine's load next to every timing.

Each side runs in a fresh process started with `child_env(threads, tuned)`, so both read the same
environment before their thread pools and allocator start (scripts/bench_eval.py, bench_ml100k.py).
"""

from __future__ import annotations

import os

# --tuned-malloc: glibc malloc tuned the same way for both sides (RecBole's training epoch is ~30%
# slower without it; ../shared/design/PERFORMANCE.md): no mmap for large blocks, no trimming.
ALLOCATOR_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736", "MALLOC_TOP_PAD_": "268435456"}
# Pools that size themselves from the environment when they start (torch's OpenMP and MKL, numpy's
# OpenBLAS, the tokenizers' Rayon pool): the same list as trecsys.runtime.POOL_ENV, repeated here
# because RecBole's process never imports trecsys.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS")


def allocator_env(tuned: bool) -> dict[str, str]:
    """This process's environment with glibc's malloc defaults, or with ALLOCATOR_ENV when tuned
    (any MALLOC_* of the caller's is dropped, so both sides start from the same settings)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    return {**env, **ALLOCATOR_ENV} if tuned else env


def wait_policy() -> str:
    """OpenMP's idle-thread policy of both sides: the caller's, else PASSIVE (trecsys's own default,
    trecsys/__init__.py), so RecBole's idle threads do not spin either."""
    return os.environ.get("OMP_WAIT_POLICY", "PASSIVE")


def child_env(threads: int, tuned: bool) -> dict[str, str]:
    """The environment of one side's process: the allocator settings, every thread pool at `threads`
    and the same OpenMP wait policy."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return {**allocator_env(tuned), **{name: str(threads) for name in THREAD_ENV}, "OMP_WAIT_POLICY": wait_policy()}


def allocator_line(tuned: bool) -> str:
    return " ".join(f"{k}={v}" for k, v in ALLOCATOR_ENV.items()) if tuned else "glibc defaults"


def load_line() -> str:
    """The 1-, 5- and 15-minute load averages now (runnable processes; the machine's cores beside them)."""
    one, five, fifteen = os.getloadavg()
    return f"load {one:.1f}/{five:.1f}/{fifteen:.1f} on {os.cpu_count()} cores"


def setting_line(threads: int, tuned: bool) -> str:
    """What a timing was taken under: printed next to each one."""
    return f"{threads} thread(s) (OMP_WAIT_POLICY={wait_policy()}), allocator {allocator_line(tuned)}, {load_line()}"
