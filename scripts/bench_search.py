"""`trec recommend --queries` throughput and latency on the demo shop: many queries in one warm process.

    python scripts/bench_search.py [--queries 2000] [--batches 1,32,256] [--user u00003] [--device cpu]

Builds the demo run if it is not there (`trec run -c configs/demo.yaml`), writes N seeded queries of
1-3 words drawn from the Food titles, and ranks them through the real stage in search mode for one
user, with the mix fixed (no validation pass: that is setup, not query time), once per batch size.
Every distinct query is encoded (queries stay out of the embedding cache). Prints `key: value` lines:
queries/s over the batches, and per-query latency percentiles, a query's latency being the time of the
batch it rode in (encoding, matching, the personal mix, top-K).
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--batches", default="1,32,256")
    parser.add_argument("--user", default="u00003")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    import torch

    from trecsys.artifacts import read_json
    from trecsys.config import load_config
    from trecsys.model.checkpoint import is_checkpoint
    from trecsys.prepared.tables import load_prepared
    from trecsys.stage_table import FINETUNE
    from trecsys.stages import recommend

    config = REPO / "configs" / "demo.yaml"
    run_dir = REPO / "runs" / "demo"
    if not is_checkpoint(run_dir / FINETUNE.folder):
        subprocess.run([sys.executable, "-m", "trecsys", "run", "-c", str(config), "--show", "0",
                        f"run_dir={run_dir}"], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    items = load_prepared(run_dir).items
    words = sorted({w.strip(",").lower() for t in items.loc[items["domain"] == "Food", "title"] for w in t.split()
                    if w.strip(",").isalpha()})
    rng = random.Random(0)
    queries = [" ".join(rng.sample(words, rng.choice([1, 2, 3]))) for _ in range(args.queries)]
    print(f"search.queries: {len(queries)} ({len(set(queries))} distinct)")
    print(f"search.cpu_threads: {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "queries.txt"
        path.write_text("\n".join(queries) + "\n")
        for batch in [int(b) for b in args.batches.split(",")]:
            overrides = [f"run_dir={run_dir}", f"device={args.device}", f"search.query_batch={batch}",
                         "search.lexical_weight=0.5", "search.threshold=0.7", "search.personal_weight=0.4"]
            cfg = load_config(config, overrides)
            out = recommend.run(cfg, queries=str(path), user=args.user, output=str(Path(tmp) / "out.parquet"), show=0)
            context = read_json(out.manifest)["context"]
            key = f"search.batch{batch}"
            print(f"{key}.queries_per_s: {context['n_rows'] / context['search_seconds']:,.1f}")
            for p in ("p50", "p95", "p99"):
                print(f"{key}.latency_{p}_ms: {1000 * context[f'latency_{p}_s']:.1f}")
            print(f"{key}.setup_s: {context['setup_seconds']:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
