"""`trec prepare` throughput on the shared Kitchen→Food data: interactions/s and peak memory.

    python scripts/bench_prepare.py [--run-dir runs/bench_prepare]

Runs the real stage (configs/kitchen_to_food.yaml) in a child process and prints plain `key: value`
lines from its manifest: the time of each step, interactions/s of everything but the text encoder,
and the child's peak RSS. The embedding cache is the configured one, so the first run also measures
encoding (see scripts/bench_embed.py for the encoder alone) and later runs measure the cached path.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trecsys.stage_table import PREPARE  # noqa: E402


def shared_data() -> Path:
    return Path(os.environ.get("TRECSYS_SHARED_DATA", REPO.parent / "shared" / "data"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/bench_prepare")
    args = parser.parse_args()
    root = shared_data() / "amazon_food_kitchen"
    if not root.is_dir():
        print(f"prepare: skipped ({root} is absent; set TRECSYS_SHARED_DATA)")
        return 0
    command = [sys.executable, "-m", "trecsys", "prepare", "-c", str(REPO / "configs/kitchen_to_food.yaml"),
               f"data.root={root}", f"run_dir={args.run_dir}"]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    manifest = json.loads((REPO / args.run_dir / PREPARE.folder / "manifest.json").read_text())
    timings = manifest["timings_s"]
    n_interactions = sum(d["n_interactions"] for d in manifest["domains"].values())
    without_encoder = sum(v for k, v in timings.items() if k != "embed")
    print(f"prepare.interactions: {n_interactions}")
    print(f"prepare.items: {manifest['n_items']}")
    for step, seconds in timings.items():
        print(f"prepare.{step}_s: {seconds:.2f}")
    print(f"prepare.wall_s: {wall:.1f}")
    print(f"prepare.interactions_per_s (without text encoding): {n_interactions / without_encoder:,.0f}")
    print(f"prepare.peak_rss_mib: {peak_mib:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
