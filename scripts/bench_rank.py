"""Ranking alone, its cost split and its memory, at any catalogue size: every user's exact top-K over
the catalogue with their seen items excluded (trecsys.rank.metrics.full_ranking_topk, the code
`trec evaluate` and `trec recommend` rank with), from fixed d=64 user states and item
representations drawn at random (the cost of ranking does not depend on what made them).

    PYTHONPATH=. python scripts/bench_rank.py kitchen [--threads 1] [--k 10] [--model]
    PYTHONPATH=. python scripts/bench_rank.py synthetic --items 1000000 [--users 4096] [--threads 1]

kitchen: every Kitchen user (47,589) × its 27,637 items, each user's real history (all but the last
item) excluded; skips when the data is absent. synthetic: N items and U users whose histories are
1-50 items drawn from a Zipf-like popularity. User batch and item chunk are the `evaluate` config's
defaults unless given, so the same file run against two versions of the code compares their defaults.
With --model the states and items come from an untrained model of the default size instead (what
`trec evaluate` computes first; ranking costs the same for any weights), and encoding them is timed.

Prints `key: value` lines: CPU seconds (this process, all threads) of the score products, the
top-K, and the exclusion of seen items (masks built and applied), which add up to the ranking; the
item representations' size; peak resident memory of the whole process and above what it held just
before ranking (a 2 ms sampler, after a warm-up on 256 users), so the second is what ranking itself
needs, and the anonymous part of it (library code paged in does not count). Timing is not checked
by any test; the load average is printed beside it.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_eval import KITCHEN, PeakRSS, kitchen_histories  # noqa: E402


class PeakAnon(PeakRSS):
    """Resident memory less its file-backed pages: the code of libraries paged in by a kernel's first
    call would otherwise count as memory that ranking needs."""

    def current(self) -> int:
        with open("/proc/self/statm") as handle:
            fields = handle.read().split()
        return (int(fields[1]) - int(fields[2])) * self.page


DIM = 64


def synthetic_histories(n_users: int, n_items: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 51, size=n_users)
    # Zipf-like popularity over a shuffled catalogue: popular items are spread over every chunk.
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.8
    order = rng.permutation(n_items)
    drawn = order[np.minimum(rng.choice(n_items, size=int(lengths.sum()), p=popularity / popularity.sum()),
                             n_items - 1)]
    return np.split(drawn.astype(np.int64), np.cumsum(lengths)[:-1])


TEXT_DIM = 384
encoding = {"cpu_s": 0.0}


def model_states(histories, n_items: int):
    """User states and item representations from an untrained model of the default size (2 blocks ×
    64 dims, MoE adaptor over random 384-d text vectors, 50 items of history): what `trec evaluate`
    computes before ranking, timed into encoding["cpu_s"]."""
    import numpy as np
    import torch

    from trecsys.config import ModelConfig
    from trecsys.model.seqrec import SeqRecModel
    from trecsys.prepared.tables import DomainRange
    from trecsys.rank.scorers import ModelScorer

    torch.manual_seed(0)
    model = SeqRecModel(ModelConfig(), TEXT_DIM, n_items).eval()
    text = np.random.default_rng(0).standard_normal((n_items, TEXT_DIM), dtype=np.float32)
    with PeakAnon() as anon:
        cpu = time.process_time()
        scorer = ModelScorer(model, histories, DomainRange("items", "target", 0, n_items), text, torch.device("cpu"))
        encoding["cpu_s"] = time.process_time() - cpu
    encoding["peak_mib"] = (anon.peak - anon.base) / 2**20
    return scorer.states, scorer.reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("catalogue", choices=["kitchen", "synthetic"])
    parser.add_argument("--items", type=int, default=1_000_000, help="synthetic: catalogue size")
    parser.add_argument("--users", type=int, default=4096, help="synthetic: users ranked")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--model", action="store_true",
                        help="states from an untrained default-size model (encoding timed), not random")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--user-batch", type=int, default=None, help="default: evaluate.user_batch")
    parser.add_argument("--item-chunk", type=int, default=None, help="default: evaluate.item_chunk")
    args = parser.parse_args()

    import numpy as np
    import torch

    from trecsys.config import EvaluateConfig
    from trecsys.rank import metrics as M
    from trecsys.runtime import apply_threads

    threads = apply_threads(args.threads).threads
    defaults = EvaluateConfig()
    user_batch = args.user_batch or defaults.user_batch
    item_chunk = args.item_chunk or defaults.item_chunk
    cpu0 = time.process_time()
    if args.catalogue == "kitchen":
        if not (KITCHEN / "Kitchen.inter.gz").is_file():
            print(f"skip: Kitchen data not found under {KITCHEN} (set TRECSYS_SHARED_DATA)")
            return
        exclude, _, n_items = kitchen_histories(None)
    else:
        n_items = args.items
        exclude = synthetic_histories(args.users, n_items)
    n_users = len(exclude)
    gen = torch.Generator().manual_seed(0)
    if args.model:
        states, reps = model_states(exclude, n_items)
    else:
        states = torch.randn(n_users, DIM, generator=gen)
        reps = torch.randn(n_items, DIM, generator=gen)
    print(f"rank.catalogue: {args.catalogue}, {n_users:,} users x {n_items:,} items, top-{args.k}, seen items "
          f"excluded, d={DIM}, {threads} thread(s), blocks {user_batch} users x {item_chunk} items")
    print(f"rank.setup_cpu_s: {time.process_time() - cpu0 - encoding['cpu_s']:.2f}")
    if args.model:
        print(f"rank.encode_users_cpu_s: {encoding['cpu_s']:.2f} (item tower and user states, untrained default-size "
              f"model over {TEXT_DIM}-d text vectors; +{encoding['peak_mib']:.0f} MiB anonymous memory above the "
              f"{n_items * TEXT_DIM * 4 / 2**20:,.0f} MiB of text vectors)")
    print(f"rank.item_reps_mib: {reps.numel() * 4 / 2**20:.0f}")

    spent = {"score": 0.0, "exclude": 0.0}

    def clocked(name, fn):
        def wrapper(*a, **kw):
            cpu = time.process_time()
            out = fn(*a, **kw)
            spent[name] += time.process_time() - cpu
            return out
        return wrapper

    def score_chunk(rows, start, stop):
        return states[rows] @ reps[start:stop].T

    def score_into(rows, start, stop, out):
        torch.matmul(states[rows], reps[start:stop].T, out=out)

    # What a model's scorer gives evaluate: the same scores written into the ranking's own buffer
    # (versions of the code before score_into ranked score_chunk's new tensors).
    into = "score_into" in inspect.signature(M.full_ranking_topk).parameters

    # Exclusion: the masks built once, and applied to each block (the version before item-sorted
    # block masks applied ExclusionMasks.apply directly).
    M.ExclusionMasks.__init__ = clocked("exclude", M.ExclusionMasks.__init__)
    if hasattr(M, "BlockMasks"):
        M.ExclusionMasks.block = clocked("exclude", M.ExclusionMasks.block)
        M.BlockMasks.apply = clocked("exclude", M.BlockMasks.apply)
    else:
        M.ExclusionMasks.apply = clocked("exclude", M.ExclusionMasks.apply)
    # Warm-up on a few users, not timed: kernels chosen, library code paged in.
    M.full_ranking_topk(score_chunk, min(n_users, 256), n_items, args.k, exclude=exclude[:256],
                        user_batch=user_batch, item_chunk=item_chunk, **({"score_into": score_into} if into else {}))
    spent.update(score=0.0, exclude=0.0)
    with PeakRSS() as rss, PeakAnon() as anon:
        wall, cpu = time.perf_counter(), time.process_time()
        values, top = M.full_ranking_topk(clocked("score", score_chunk), n_users, n_items, args.k, exclude=exclude,
                                          user_batch=user_batch, item_chunk=item_chunk,
                                          **({"score_into": clocked("score", score_into)} if into else {}))
        rank_cpu, rank_wall = time.process_time() - cpu, time.perf_counter() - wall
    top_k = rank_cpu - spent["score"] - spent["exclude"]
    print(f"rank.score_cpu_s: {spent['score']:.2f}")
    print(f"rank.top_k_cpu_s: {top_k:.2f}")
    print(f"rank.exclude_seen_cpu_s: {spent['exclude']:.2f}")
    print(f"rank.total_cpu_s: {rank_cpu:.2f} ({n_users / rank_cpu:,.0f} users per CPU second; wall {rank_wall:.2f} s)")
    print(f"rank.peak_rss_mib: {rss.peak / 2**20:.0f} (ranking: +{(rss.peak - rss.base) / 2**20:.0f} above "
          f"{rss.base / 2**20:.0f} before; anonymous memory +{(anon.peak - anon.base) / 2**20:.0f})")
    # A fingerprint of the lists, to check that two versions of the code agree.
    print(f"rank.checksum: {int((top.long() * torch.arange(1, top.shape[1] + 1)).sum()) % 1_000_000_007} "
          f"{float(np.float64(values[torch.isfinite(values)].double().sum())):.6g}")
    print(f"rank.load: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
