"""Where output goes: progress and log lines (what a stage is doing, what it wrote, warnings, training
steps) on stderr through `log`; results (tables, recommendation lists, the resolved config, `trec
configs`) on stdout through plain `print`. So `trec evaluate -c x.yaml > table.txt` keeps the table and
the terminal keeps the progress.
"""

from __future__ import annotations

import sys


def log(message: str) -> None:
    """A progress or log line, on stderr (flushed, so it interleaves with tqdm bars in order)."""
    print(message, file=sys.stderr, flush=True)
