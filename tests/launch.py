"""Run a `trec` command the way a user does: one process, or under torchrun with n processes (gloo
on CPU), in a fresh interpreter with one thread each, from the repository root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def trec(n_proc: int, args: list[str], timeout: int) -> subprocess.CompletedProcess:
    """`python -m trecsys *args`, under `torch.distributed.run --standalone --nproc_per_node n_proc` when
    n_proc > 1 (torchrun picks a free port itself, so concurrent test runs do not collide)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "trecsys", *args]
    if n_proc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n_proc),
                   *command[1:]]
    return subprocess.run(command, env=env, timeout=timeout, capture_output=True, text=True, cwd=REPO)
