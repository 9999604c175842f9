"""`trec recommend` throughput over the shared Kitchen catalogue (27,637 items): users/s on CPU, and on
the GPU when there is one.

    python scripts/bench_recommend.py [--run-dir runs/bench_recommend] [--users N] [--device cpu|cuda]
                                      [--threads N] [--cases plain_all_users,...] [--seen-offset X]

Prepares Kitchen as the target domain (configs/kitchen_to_food.yaml with the roles swapped; the
embedding cache makes re-runs fast), saves an untrained model of the default size (the cost of
ranking does not depend on the weights), then times the real stage: plain top-10 for every Kitchen
user, and on a sample, fusion with popularity and MMR diversity. Prints plain `key: value` lines;
users/s counts scoring and ranking (user states, scores, top-K, re-ranking), not loading or writing.
`--seen-offset` gives the saved model a trained model's model.seen_bias offset (a model saved with
another is replaced), so adding it to each user's seen items is counted; scripts/bench_eval.py runs
`--cases plain_all_users` beside RecBole's full-sort evaluation.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def shared_data() -> Path:
    return Path(os.environ.get("TRECSYS_SHARED_DATA", REPO.parent / "shared" / "data"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/bench_recommend")
    parser.add_argument("--users", type=int, default=5000, help="sample size for the fusion and MMR timings")
    parser.add_argument("--device", default=None, help="default: cpu, then cuda too when available")
    parser.add_argument("--threads", type=int, default=0, help="runtime.threads (0: trecsys's default)")
    parser.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    parser.add_argument("--seen-offset", type=float, default=-8.0,
                        help="the model's seen-item offset (model.seen_bias; ml-100k learns about -8)")
    args = parser.parse_args()
    root = shared_data() / "amazon_food_kitchen"
    if not root.is_dir():
        print(f"recommend: skipped ({root} is absent; set TRECSYS_SHARED_DATA)")
        return 0
    sys.path.insert(0, str(REPO))
    import torch

    from trecsys.artifacts import MANIFEST, read_json
    from trecsys.config import ModelConfig, load_config
    from trecsys.model.checkpoint import is_checkpoint, load_checkpoint, save_checkpoint
    from trecsys.model.seqrec import SEEN_SCALE, SeqRecModel
    from trecsys.prepared.tables import load_prepared
    from trecsys.runtime import resolve_threads
    from trecsys.stage_table import PREPARE, PRETRAIN
    from trecsys.stages import recommend

    run_dir = REPO / args.run_dir
    overrides = [f"data.root={root}", f"run_dir={run_dir}", "data.target=Kitchen", "data.source=[Food]",
                 f"runtime.threads={args.threads}"]
    config = REPO / "configs" / "kitchen_to_food.yaml"
    if not (run_dir / PREPARE.folder / MANIFEST).is_file():
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "trecsys", "prepare", "-c", str(config), *overrides], check=True,
                       cwd=REPO, stdout=subprocess.DEVNULL)
        print(f"recommend.prepare_s: {time.perf_counter() - started:.1f}")
    prepared = load_prepared(run_dir)
    model_dir = run_dir / PRETRAIN.folder
    if not is_checkpoint(model_dir) or load_checkpoint(model_dir)[0].seen_offset() != args.seen_offset:
        torch.manual_seed(0)
        model = SeqRecModel(ModelConfig(), prepared.embeddings.shape[1], prepared.n_items)
        with torch.no_grad():
            model.seen_bias.fill_(args.seen_offset / SEEN_SCALE)
        save_checkpoint(model, model_dir)
    kitchen = prepared.domains["Kitchen"]
    sample = run_dir / "sample_users.txt"
    users = prepared.interactions.loc[prepared.interactions["domain"] == "Kitchen", "user_id"].unique()
    sample.write_text("\n".join(users[: args.users]) + "\n")
    print(f"recommend.items: {kitchen.n_items}")
    print(f"recommend.kitchen_users: {len(users)}")
    print(f"recommend.model: d_model={ModelConfig().d_model}, n_layers={ModelConfig().n_layers}, "
          f"adaptor={ModelConfig().adaptor}")
    print(f"recommend.cpu_threads: {resolve_threads(args.threads)[0]} (runtime.threads, as the stage applies it)")

    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    cases = [
        ("plain_all_users", [], None),
        ("plain_sample", [], sample),
        ("fusion_popularity_sample", ["recommend.fusion=[{model: latest, weight: 0.8}, {model: popularity, weight: 0.2}]"],
         sample),
        ("mmr_0.3_sample", ["recommend.diversity=0.3"], sample),
        # recommend.index hnsw: faiss's HNSW graph (pip install faiss-cpu); its recall@10 against plain_all_users.
        ("hnsw_all_users", ["recommend.index=hnsw"], None),
    ]
    if args.cases:
        unknown = set(args.cases.split(",")) - {name for name, _, _ in cases}
        if unknown:
            parser.error(f"--cases: unknown {', '.join(sorted(unknown))}; known: {', '.join(n for n, _, _ in cases)}")
        cases = [case for case in cases if case[0] in args.cases.split(",")]
    for device in devices:
        for name, extra, users_file in cases:
            cfg = load_config(config, [*overrides, f"device={device}", *extra])
            out = recommend.run(cfg, users=str(users_file) if users_file else None,
                                output=str(run_dir / "out" / f"{device}_{name}.parquet"))
            context = read_json(out.manifest)["context"]
            rate = context["n_rows"] / context["rank_seconds"]
            print(f"recommend.{device}.{name}.users: {context['n_rows']}")
            print(f"recommend.{device}.{name}.rank_s: {context['rank_seconds']:.2f}")
            print(f"recommend.{device}.{name}.users_per_s: {rate:,.0f}")
            print(f"recommend.{device}.{name}.users_per_cpu_s: {context['n_rows'] / context['rank_cpu_seconds']:,.0f}")
            print(f"recommend.{device}.{name}.stage_s: {context['seconds']:.2f}", flush=True)
            exact = run_dir / "out" / f"{device}_plain_all_users.parquet"
            if name == "hnsw_all_users" and exact.is_file():
                print(f"recommend.{device}.{name}.recall@{cfg.recommend.k}_vs_exact: "
                      f"{recall_vs_exact(out.parquet, exact):.4f}", flush=True)
    return 0


def recall_vs_exact(approximate: Path, exact: Path) -> float:
    """Mean over users of the share of their exact list that the approximate list holds."""
    import pandas as pd

    found = pd.read_parquet(approximate).groupby("user_id")["item_id"].apply(set)
    wanted = pd.read_parquet(exact).groupby("user_id")["item_id"].apply(set)
    return float(sum(len(found.get(user, set()) & items) / len(items) for user, items in wanted.items()) / len(wanted))


if __name__ == "__main__":
    sys.exit(main())
