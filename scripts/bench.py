"""`make bench`: every benchmark in turn, each printing plain `key: value` lines.

Benchmarks measure speed and memory on the shared real data (../shared/data, or TRECSYS_SHARED_DATA)
and skip with a message when it is absent; tests never check wall-clock time. Pass names to run a
subset: `python scripts/bench.py embed train`.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
# name -> extra arguments; the order follows the pipeline.
BENCHMARKS = {
    "prepare": [],
    "embed": ["--n", "4000", "--compare-plain"],
    "train": [],
    # The RecBole comparison; skips unless ml-100k is found (see the script). Both sides get glibc
    # malloc tuned as RecBole's reference runs had it (bench_env.ALLOCATOR_ENV), and the same threads.
    # RecBole trains until its early stopping ends it (~30 epochs, about an hour on one thread), so
    # the anchor is its converged quality; the script's --recbole-resume spreads that over sittings.
    "ml100k": ["--tuned-malloc", "--recbole-epochs", "200"],
    "eval": [],
    "rank": ["kitchen", "--model", "--threads", "1"],  # ranking's costs split, the README's table
    "recommend": [],
    "search": [],  # on the demo run (built when absent)
}


def main(names: list[str]) -> int:
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    failed = []
    for name in names or list(BENCHMARKS):
        script = SCRIPTS / f"bench_{name}.py"
        if not script.is_file():
            continue
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        result = subprocess.run([sys.executable, str(script), *BENCHMARKS[name]])
        print(f"{name}.bench_wall_s: {time.perf_counter() - started:.1f}", flush=True)
        if result.returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
