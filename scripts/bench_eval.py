"""Evaluation throughput and memory on the Kitchen catalogue (47,589 users × 27,637 items), CPU (and
CUDA if present), in two parts:

1. Ranking alone, N and 10×N users: random d=64 user states and item representations (the ranking
   cost does not depend on what made them), real Kitchen histories excluded, metrics computed.
   `peak MiB` is the highest resident memory (or CUDA memory allocated) above what the process held
   just before ranking, so a flat number from N to 10×N users is memory that does not grow with them.
2. Every Kitchen user with an untrained model of the default size (2 blocks × 64 dims, MoE adaptor
   over 384-d text vectors, 50 items of history, model.seen_bias's offset set to a trained model's
   so that adding it to each user's seen items is counted), cost split into the item tower, encoding the users,
   ranking (scores and exact top-10) and excluding the items each user has seen; beside it, live in
   the same run, RecBole 1.2.1's full-sort evaluation of SASRec on the same file
   (scripts/recbole_fullsort.py) when RECBOLE_PYTHON names its interpreter. Both sides get the same
   thread count and the same glibc allocator settings, each in a fresh process: glibc's defaults, or
   with --tuned-malloc the settings that speed up RecBole's training (ALLOCATOR_ENV; they keep freed
   memory, so peak memory grows: 0.75 → 4.6 GiB for trecsys here). With faiss-cpu installed, the
   same user states and items also go through faiss's exact and HNSW indexes: users/s and their
   recall@10 against trecsys's exact top-10.

    python scripts/bench_eval.py [--users 4096] [--threads N] [--recbole-python PATH] [--skip-ranking]
                                 [--tuned-malloc]

`cpu` is the process's CPU seconds (all threads): on a shared machine, wall time may be stretched by
other work while the CPU seconds are not; the load average is printed with the results. Skips when
the data is absent.
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

from bench_env import ALLOCATOR_ENV, allocator_env

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TRECSYS_SHARED_DATA", REPO.parent / "shared" / "data"))
KITCHEN = SHARED / "amazon_food_kitchen" / "Kitchen"
K, DIM = 50, 64


def kitchen_histories(n_users: int | None):
    """The first n_users (None: all) Kitchen users' sequences in position order: (histories, last
    items, n_items)."""
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
    if n_users is not None and len(sequences) < n_users:
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
    from trecsys.runtime import apply_threads

    threads = apply_threads(args.threads).threads
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

    def score_into(rows, start, stop, out):
        torch.matmul(states[rows], reps[start:stop].T, out=out)

    # On CPU, as a model's scorer ranks in evaluate: each block written into the ranking's buffer.
    into = {"score_into": score_into} if device.type == "cpu" else {}
    # Warm-up on a few users (kernel selection, allocator), not timed.
    full_ranking_topk(score_chunk, min(args.n, 256), n_items, K, exclude=histories[:256],
                      user_batch=args.user_batch, item_chunk=args.item_chunk, device=device, **into)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    with PeakRSS() as rss:
        t0, cpu0 = time.perf_counter(), time.process_time()
        _, topk = full_ranking_topk(score_chunk, args.n, n_items, K, exclude=histories,
                                    user_batch=args.user_batch, item_chunk=args.item_chunk, device=device, **into)
        if device.type == "cuda":
            torch.cuda.synchronize()
        ranked_s = time.perf_counter() - t0
        metrics = ranking_metrics(topk, targets, [10, 50])
        total_s = time.perf_counter() - t0
        cpu_s = time.process_time() - cpu0
    out = {
        "device": device.type, "users": args.n, "items": n_items, "user_batch": args.user_batch,
        "item_chunk": args.item_chunk, "threads": threads, "rank_s": round(ranked_s, 3),
        "total_s": round(total_s, 3), "users_per_s": round(args.n / total_s), "cpu_s": round(cpu_s, 3),
        "peak_rss_mib": round((rss.peak - rss.base) / 2**20, 1),
        "ndcg@10": round(float(np.nanmean(metrics["ndcg@10"])), 5),
    }
    if device.type == "cuda":
        out["peak_cuda_mib"] = round((torch.cuda.max_memory_allocated() - base_cuda) / 2**20, 1)
    return out


def measure_model(args) -> dict:
    """Part 2, trecsys side: every Kitchen user ranked by an untrained default-size model."""
    import resource

    import numpy as np
    import torch

    from trecsys.config import ModelConfig
    from trecsys.model.seqrec import SeqRecModel
    from trecsys.prepared.tables import DomainRange
    from trecsys.rank import metrics as metrics_module
    from trecsys.rank.metrics import full_ranking_topk, ranking_metrics
    from trecsys.rank.scorers import ModelScorer
    from trecsys.runtime import apply_threads

    threads = apply_threads(args.threads)
    histories, targets, n_items = kitchen_histories(args.n)  # None: every user
    n = len(histories)
    torch.manual_seed(0)
    model = SeqRecModel(ModelConfig(), 384, n_items).eval()
    with torch.no_grad():  # a trained model's seen offset (ml-100k's learned -8): its cost is counted
        model.seen_bias.fill_(-0.8)
    text = np.random.default_rng(0).standard_normal((n_items, 384)).astype(np.float32)
    domain = DomainRange("Kitchen", "target", 0, n_items)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times: dict[str, tuple[float, float]] = {}

    def timed(name, fn):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        times[name] = (time.perf_counter() - wall, time.process_time() - cpu)
        return out

    model.set_item_text(torch.from_numpy(text))
    with torch.no_grad():
        timed("item_tower", lambda: model.item_reps(0, n_items))
    scorer = timed("scorer", lambda: ModelScorer(model, histories, domain, text, torch.device("cpu"),
                                                 user_batch=args.user_batch))
    times["encode_users"] = tuple(a - b for a, b in zip(times.pop("scorer"), times["item_tower"], strict=True))
    # RecBole's rule (every item ranked): the equal-work comparison.
    timed("rank", lambda: full_ranking_topk(scorer.score_chunk, n, n_items, 10, user_batch=args.user_batch,
                                            item_chunk=args.item_chunk, score_into=scorer.score_into))
    # trecsys's rule, with the time inside the score products and inside the masking summed
    # directly (a difference of two timed runs drowns in the noise of a shared machine).
    spent = {"score": [0.0, 0.0], "mask": [0.0, 0.0]}

    def clocked(name, fn):
        def wrapper(*a):
            wall, cpu = time.perf_counter(), time.process_time()
            out = fn(*a)
            spent[name][0] += time.perf_counter() - wall
            spent[name][1] += time.process_time() - cpu
            return out
        return wrapper

    # Each user block's masks sorted by item, then applied to every block of scores.
    metrics_module.ExclusionMasks.block = clocked("mask", metrics_module.ExclusionMasks.block)
    metrics_module.BlockMasks.apply = clocked("mask", metrics_module.BlockMasks.apply)
    _, top = timed("rank_exclude", lambda: full_ranking_topk(
        scorer.score_chunk, n, n_items, 10, exclude=histories, user_batch=args.user_batch,
        item_chunk=args.item_chunk, score_into=clocked("score", scorer.score_into)))
    timed("masks", lambda: metrics_module.ExclusionMasks(histories))  # built once inside the ranking too
    built = times.pop("masks")
    times["exclude_seen"] = tuple(spent["mask"][i] + built[i] for i in (0, 1))
    times["score"] = tuple(spent["score"])
    times["top_k"] = tuple(times["rank_exclude"][i] - times["score"][i] - times["exclude_seen"][i] for i in (0, 1))
    ndcg = float(np.nanmean(ranking_metrics(top, targets, [10])["ndcg@10"]))
    base = [sum(times[k][i] for k in ("item_tower", "encode_users")) for i in (0, 1)]
    ann = {}
    try:
        import faiss
    except ImportError:
        faiss = None
    if faiss is not None:  # the same states and items through a maintained index library
        scorer.seen = None  # an index ranks the states' products alone: compare it with those
        faiss.omp_set_num_threads(threads.threads)
        states, reps = scorer.states.numpy(), scorer.reps.numpy()
        _, exact = timed_topk_of(timed, "ann_exact_reference", lambda: full_ranking_topk(
            scorer.score_chunk, n, n_items, 10, user_batch=args.user_batch, item_chunk=args.item_chunk,
            score_into=scorer.score_into))
        flat = faiss.IndexFlatIP(reps.shape[1])
        flat.add(reps)
        _, found = timed_topk_of(timed, "faiss_flat", lambda: (None, flat.search(states, 10)[1]))
        ann["faiss_flat"] = {"recall@10": recall_at(found, exact), "s": times["faiss_flat"][0],
                             "cpu_s": times["faiss_flat"][1], "build_s": 0.0}
        hnsw = faiss.IndexHNSWFlat(reps.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        timed("hnsw_build", lambda: hnsw.add(reps))
        for ef in (64, 256):
            hnsw.hnsw.efSearch = ef
            _, found = timed_topk_of(timed, f"faiss_hnsw32_ef{ef}", lambda: (None, hnsw.search(states, 10)[1]))
            ann[f"faiss_hnsw32_ef{ef}"] = {"recall@10": recall_at(found, exact), "s": times[f"faiss_hnsw32_ef{ef}"][0],
                                           "cpu_s": times[f"faiss_hnsw32_ef{ef}"][1],
                                           "build_s": times["hnsw_build"][0]}
    return {
        "users": n, "items": n_items, "threads": threads.threads, "user_batch": args.user_batch,
        **{f"{k}_s": round(v[0], 3) for k, v in times.items()},
        **{f"{k}_cpu_s": round(v[1], 3) for k, v in times.items()},
        # RecBole's rule (no exclusion) is the equal-work comparison; trecsys's own rule excludes.
        "users_per_s": n / (base[0] + times["rank"][0]), "users_per_cpu_s": n / (base[1] + times["rank"][1]),
        "users_per_s_excluding_seen": n / (base[0] + times["rank_exclude"][0]),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
        "peak_rss_before_ranking_gib": rss_before / 2**30, "ndcg@10": ndcg, "ann": ann,
    }


def timed_topk_of(timed, name, fn):
    """timed(name, fn) for a function returning (values, top indices): the indices as numpy."""
    import numpy as np

    values, index = timed(name, fn)
    return values, np.asarray(index)


def recall_at(found, exact) -> float:
    """Mean share of each user's exact top-K that an index returned."""
    import numpy as np

    exact = np.asarray(exact)
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / len(b) for a, b in zip(found, exact, strict=True)]))


def process_env(tuned_malloc: bool) -> dict:
    """A fresh process's environment: the shared allocator settings, this checkout's trecsys first."""
    return {**allocator_env(tuned_malloc), "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def child(args: list[str], tuned_malloc: bool) -> dict:
    """Run this script's measurement in a fresh process with the shared allocator settings."""
    done = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True,
                          env=process_env(tuned_malloc))
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare_with_recbole(args) -> None:
    """Part 2: trecsys and RecBole on every Kitchen user, one after the other, same settings."""
    import tempfile

    from trecsys.runtime import resolve_threads

    threads = resolve_threads(args.threads)[0]
    print(f"eval.model: every Kitchen user, untrained default-size model, top-10; {threads} thread(s); "
          f"allocator {' '.join(f'{k}={v}' for k, v in ALLOCATOR_ENV.items()) if args.tuned_malloc else 'glibc defaults'}; load {os.getloadavg()[0]:.1f}",
          flush=True)
    ours = child(["--model", "--threads", str(threads), "--user-batch", str(args.user_batch),
                  "--item-chunk", str(args.item_chunk)], args.tuned_malloc)
    print("eval.trecsys: the costs below add up to one pass over every user with seen items excluded")
    for key in ("item_tower", "encode_users", "score", "top_k", "exclude_seen"):
        print(f"eval.trecsys.{key}_s: {ours[f'{key}_s']:.2f} (cpu {ours[f'{key}_cpu_s']:.2f})")
    print(f"eval.trecsys.rank_without_exclusion_s: {ours['rank_s']:.2f} (cpu {ours['rank_cpu_s']:.2f})")
    print(f"eval.trecsys.users_per_s: {ours['users_per_s']:,.0f} (RecBole's rule: seen items not excluded; "
          f"{ours['users_per_cpu_s']:,.0f} per CPU second)")
    print(f"eval.trecsys.users_per_s_excluding_seen: {ours['users_per_s_excluding_seen']:,.0f}")
    print(f"eval.trecsys.peak_rss_gib: {ours['peak_rss_gib']:.2f} ({ours['peak_rss_before_ranking_gib']:.2f} before ranking)")
    if not ours["ann"]:
        print("eval.ann: not measured (pip install faiss-cpu)")
    for name, row in ours["ann"].items():  # ranking only (states and items given), RecBole's rule, top-10
        print(f"eval.ann.{name}: recall@10 vs exact {row['recall@10']:.4f}, {ours['users'] / row['s']:,.0f} users/s "
              f"ranking only (cpu {row['cpu_s']:.2f} s; build {row['build_s']:.1f} s)")
    print(f"eval.ann.trecsys_exact: {ours['users'] / ours['rank_s']:,.0f} users/s ranking only (cpu {ours['rank_cpu_s']:.2f} s)")
    served = recommend_all_users(threads, args.tuned_malloc)
    if served:
        print(f"eval.recommend: `trec recommend` (scripts/bench_recommend.py --cases plain_all_users), every Kitchen "
              f"user, top-10, seen items excluded (recommend.exclude_seen), user states + scores + top-K: "
              f"{served['users_per_s']:,.0f} users/s ({served['users_per_cpu_s']:,.0f} per CPU second)")
    if not args.recbole_python:
        print("eval.recbole: not measured (set RECBOLE_PYTHON to a virtual environment with recbole==1.2.1)")
        return
    with tempfile.TemporaryDirectory() as work:
        env = allocator_env(args.tuned_malloc)
        done = subprocess.run([args.recbole_python, str(REPO / "scripts" / "recbole_fullsort.py"), str(KITCHEN), work,
                               str(threads)], capture_output=True, text=True, cwd=work, env=env)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        print(f"eval.recbole: failed ({done.returncode}): {tail}")
        return
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"eval.recbole.users: {theirs['users']:,} x {theirs['items']:,} items, {theirs['threads']} thread(s)")
    print(f"eval.recbole.users_per_s: {theirs['users_per_s']:,.0f} "
          f"({theirs['users'] / theirs['cpu_seconds']:,.0f} per CPU second)")
    print(f"eval.recbole.peak_rss_gib: {theirs['peak_rss_gib']:.2f} ({theirs['peak_rss_before_eval_gib']:.2f} before evaluating)")
    print(f"eval.speedup: {ours['users_per_s'] / theirs['users_per_s']:.1f}x users/s, "
          f"{ours['users_per_cpu_s'] / (theirs['users'] / theirs['cpu_seconds']):.1f}x users per CPU second; "
          f"memory {ours['peak_rss_gib'] / theirs['peak_rss_gib']:.2f}x; load {os.getloadavg()[0]:.1f}")
    if served:
        print(f"eval.recommend_speedup: {served['users_per_s'] / theirs['users_per_s']:.1f}x users/s, "
              f"{served['users_per_cpu_s'] / (theirs['users'] / theirs['cpu_seconds']):.1f}x users per CPU second "
              "(recommend excludes seen items, RecBole's full sort ranks them)")


def recommend_all_users(threads: int, tuned_malloc: bool) -> dict:
    """`trec recommend` for every Kitchen user through scripts/bench_recommend.py, in a fresh process
    with the same threads and allocator settings: its users/s and users per CPU second ({} if it failed)."""
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_recommend.py"), "--cases", "plain_all_users",
                           "--device", "cpu", "--threads", str(threads)], capture_output=True, text=True,
                           env=process_env(tuned_malloc), cwd=REPO)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        print(f"eval.recommend: failed ({done.returncode}): {tail}")
        return {}
    values = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line)
    key = "recommend.cpu.plain_all_users."
    return {name: float(values[key + name].replace(",", "")) for name in ("users_per_s", "users_per_cpu_s")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=4096, help="N; also runs 10×N")
    parser.add_argument("--user-batch", type=int, default=1024)
    parser.add_argument("--item-chunk", type=int, default=4096, help="default: evaluate.item_chunk's")
    parser.add_argument("--threads", type=int, default=0, help="0: trecsys's default (runtime.threads)")
    parser.add_argument("--single", action="store_true", help="only N users (a quick look at settings)")
    parser.add_argument("--recbole-python", default=os.environ.get("RECBOLE_PYTHON"),
                        help="python of a virtual environment with recbole==1.2.1 (default: $RECBOLE_PYTHON)")
    parser.add_argument("--skip-ranking", action="store_true", help="only part 2 (the model and RecBole)")
    parser.add_argument("--tuned-malloc", action="store_true", help="both sides with ALLOCATOR_ENV")
    parser.add_argument("--model", action="store_true", help=argparse.SUPPRESS)  # the child process's job
    parser.add_argument("--device", default=None, help=argparse.SUPPRESS)  # the child process's job
    parser.add_argument("--n", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model:
        print(json.dumps(measure_model(args)))
        return
    if args.device is not None:
        print(json.dumps(measure(args)))
        return
    if not (KITCHEN / "Kitchen.inter.gz").is_file():
        print(f"skip: Kitchen data not found under {KITCHEN} (set TRECSYS_SHARED_DATA)")
        return
    sys.path.insert(0, str(REPO))
    if not args.skip_ranking:
        ranking_alone(args)
    compare_with_recbole(args)


def ranking_alone(args) -> None:
    """Part 1: N and 10×N users with random states, each in a fresh process."""
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"bench_eval: full ranking, top-{K}, d={DIM}, history excluded, Recall/NDCG computed")
    for device in devices:
        for n in ([args.users] if args.single else [args.users, 10 * args.users]):
            result = child(["--device", device, "--n", str(n), "--user-batch", str(args.user_batch),
                            "--item-chunk", str(args.item_chunk), "--threads", str(args.threads)], args.tuned_malloc)
            line = (f"{result['device']:>4}  users {result['users']:>7,}  items {result['items']:,}  "
                    f"batch {result['user_batch']}x{result['item_chunk']}  threads {result['threads']}  "
                    f"rank {result['rank_s']:.2f}s  total {result['total_s']:.2f}s  "
                    f"{result['users_per_s']:>8,} users/s  (cpu {result['cpu_s']:.2f}s)  peak +{result['peak_rss_mib']} MiB RSS")
            if "peak_cuda_mib" in result:
                line += f"  +{result['peak_cuda_mib']} MiB CUDA"
            print(line, flush=True)


if __name__ == "__main__":
    main()
