"""Where pretrain-source's memory goes: resident and peak RSS after each step of its setup and one
full validation, for a prepared run (e.g. one `make bench-scale` made).

    python scripts/train_memory.py runs/bench_scale/config_run_1M.yaml

Steps: the imports; load_prepared (items, embeddings, the memory-mapped sequences); domain_split of
every source domain; the training windows (trecsys/train/next_item.py); the validation cases; the
model; one validation over every source user with a valid item. Run it once per size to see which
step grows with users and which with the catalogue. Numbers are this process's own (VmRSS and
ru_maxrss), CPU seconds are process time; set OMP_NUM_THREADS=1 for runs that compare.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def usage() -> str:
    with open("/proc/self/status", encoding="utf-8") as status:
        rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return f"rss {rss:7.0f} MiB  peak {peak:7.0f} MiB  cpu {time.process_time():6.1f} s"


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    import torch

    from trecsys.config import load_config
    from trecsys.model.seqrec import SeqRecModel
    from trecsys.prepared.tables import domain_split, load_prepared, seen_items
    from trecsys.runtime import apply_threads
    from trecsys.stages.pretrain_source import make_validate, training_setup

    cfg = load_config(sys.argv[1])
    apply_threads(cfg.runtime.threads)
    print(f"{'imports':<16} {usage()}", flush=True)
    prepared = load_prepared(cfg.run_dir)
    print(f"{'load_prepared':<16} {usage()}", flush=True)
    splits = {name: domain_split(prepared, name) for name in prepared.source}
    users = sum(len(s.train) for s in splits.values())
    print(f"{'domain_split':<16} {usage()}  ({users:,} source users)", flush=True)
    data, _ = training_setup(splits, cfg, torch.device("cpu"))
    print(f"{'windows':<16} {usage()}  ({data.n_examples:,} windows)", flush=True)
    validate = make_validate(splits, prepared.embeddings, cfg.pretrain.train.eval_user_batch, torch.device("cpu"))
    print(f"{'validation cases':<16} {usage()}", flush=True)
    model = SeqRecModel(cfg.model, prepared.embeddings.shape[1], prepared.n_items,
                        id_items=seen_items([seen_items(s.train) for s in splits.values()]))
    model.set_item_text(torch.from_numpy(prepared.embeddings))
    print(f"{'model':<16} {usage()}  ({prepared.n_items:,} items)", flush=True)
    with torch.no_grad():
        validate(model.eval())
    print(f"{'one validation':<16} {usage()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
