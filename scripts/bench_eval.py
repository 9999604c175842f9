"""Evaluation throughput and memory: full ranking of the Kitchen catalogue (27,637 items) for N and
10×N users, with real Kitchen histories excluded and metrics computed, on CPU (and CUDA if present).

    python scripts/bench_eval.py [--users 4096] [--user-batch 1024] [--item-chunk 65536] [--threads 2]

User states and item representations are random d=64 vectors: the ranking cost does not depend on
what made them. `cpu` is the process's CPU seconds (all threads): on a shared machine, wall time
may be stretched by other work while the CPU seconds are not. Each measurement runs in a fresh process; `peak MiB` is the highest resident memory
(or CUDA memory allocated) above what the process held just before ranking, so a flat number from
N to 10×N users is memory that does not grow with the number of users. Skips when the data is absent.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TRECSYS_SHARED_DATA", REPO.parent / "shared" / "data"))
KITCHEN = SHARED / "amazon_food_kitchen" / "Kitchen"
K, DIM = 50, 64


def kitchen_histories(n_users: int):
    """The first n_users Kitchen users' sequences in position order: (histories, last items, n_items)."""
    import numpy as np
    import pandas as pd

    with gzip.open(KITCHEN / "Kitchen.item.gz", "rt", encoding="utf-8") as handle:
        items = pd.read_csv(handle, sep="\t", usecols=[0], dtype=str).iloc[:, 0]
    index = {item: i for i, item in enumerate(items)}
    with gzip.open(KITCHEN / "Kitchen.inter.gz", "rt", encoding="utf-8") as handle:
        inter = pd.read_csv(handle, sep="\t", dtype={0: str, 1: str})
    inter.columns = ["user", "item", "position"]
    inter = inter.sort_values(["user", "position"], kind="stable")
    inter["item_idx"] = inter["item"].map(index).astype(np.int64)
    sequences = [g.to_numpy() for _, g in inter.groupby("user", sort=True)["item_idx"]]
    if len(sequences) < n_users:
        raise SystemExit(f"only {len(sequences)} Kitchen users, asked for {n_users}")
    sequences = sequences[:n_users]
    return [s[:-1] for s in sequences], [s[-1:] for s in sequences], len(items)


class PeakRSS:
    """Samples this process's resident memory every 2 ms; torch kernels release the GIL."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = self.base = self.current()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def current(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self.page

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.current())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def measure(args) -> dict:
    """One configuration in this process: returns the numbers as a dict."""
    import numpy as np
    import torch

    from trecsys.rank.metrics import full_ranking_topk, ranking_metrics

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    histories, targets, n_items = kitchen_histories(args.n)
    gen = torch.Generator().manual_seed(0)
    states = torch.randn(args.n, DIM, generator=gen).to(device)
    reps = torch.randn(n_items, DIM, generator=gen).to(device)

    def score_chunk(rows, start, stop):
        if device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return states[rows] @ reps[start:stop].T
        return states[rows] @ reps[start:stop].T

    # Warm-up on a few users (kernel selection, allocator), not timed.
    full_ranking_topk(score_chunk, min(args.n, 256), n_items, K, exclude=histories[:256],
                      user_batch=args.user_batch, item_chunk=args.item_chunk, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    with PeakRSS() as rss:
        t0, cpu0 = time.perf_counter(), time.process_time()
        _, topk = full_ranking_topk(score_chunk, args.n, n_items, K, exclude=histories,
                                    user_batch=args.user_batch, item_chunk=args.item_chunk, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        ranked_s = time.perf_counter() - t0
        metrics = ranking_metrics(topk, targets, [10, 50])
        total_s = time.perf_counter() - t0
        cpu_s = time.process_time() - cpu0
    out = {
        "device": device.type, "users": args.n, "items": n_items, "user_batch": args.user_batch,
        "item_chunk": args.item_chunk, "threads": args.threads, "rank_s": round(ranked_s, 3),
        "total_s": round(total_s, 3), "users_per_s": round(args.n / total_s), "cpu_s": round(cpu_s, 3),
        "peak_rss_mib": round((rss.peak - rss.base) / 2**20, 1),
        "ndcg@10": round(float(np.nanmean(metrics["ndcg@10"])), 5),
    }
    if device.type == "cuda":
        out["peak_cuda_mib"] = round((torch.cuda.max_memory_allocated() - base_cuda) / 2**20, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=4096, help="N; also runs 10×N")
    parser.add_argument("--user-batch", type=int, default=1024)
    parser.add_argument("--item-chunk", type=int, default=65536)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--single", action="store_true", help="only N users (a quick look at settings)")
    parser.add_argument("--device", default=None, help=argparse.SUPPRESS)  # the child process's job
    parser.add_argument("--n", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device is not None:
        print(json.dumps(measure(args)))
        return
    if not (KITCHEN / "Kitchen.inter.gz").is_file():
        print(f"skip: Kitchen data not found under {KITCHEN} (set TRECSYS_SHARED_DATA)")
        return
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"bench_eval: full ranking, top-{K}, d={DIM}, history excluded, Recall/NDCG computed")
    for device in devices:
        for n in ([args.users] if args.single else [args.users, 10 * args.users]):
            cmd = [sys.executable, __file__, "--device", device, "--n", str(n), "--user-batch", str(args.user_batch),
                   "--item-chunk", str(args.item_chunk), "--threads", str(args.threads)]
            env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
            result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout)
            line = (f"{result['device']:>4}  users {result['users']:>7,}  items {result['items']:,}  "
                    f"batch {result['user_batch']}x{result['item_chunk']}  threads {result['threads']}  "
                    f"rank {result['rank_s']:.2f}s  total {result['total_s']:.2f}s  "
                    f"{result['users_per_s']:>8,} users/s  (cpu {result['cpu_s']:.2f}s)  peak +{result['peak_rss_mib']} MiB RSS")
            if "peak_cuda_mib" in result:
                line += f"  +{result['peak_cuda_mib']} MiB CUDA"
            print(line, flush=True)


if __name__ == "__main__":
    main()
