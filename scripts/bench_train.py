"""Training throughput of the engine + model on real data: sequences/s, s/epoch and peak memory.

Amazon Kitchen (../shared/data/amazon_food_kitchen/Kitchen, or $TRECSYS_SHARED_DATA): interactions
ordered by `position`, leave-one-out (last -> test, second last -> valid), the train part cut into
windows exactly as `trec pretrain-source` does, full-softmax loss over all 27,637 items. Item text
vectors are random (384-d like all-MiniLM-L6-v2): training cost does not depend on their values.
Each (size, device) runs in its own process so its peak RSS is its own.

    python scripts/bench_train.py [--steps 20] [--sizes small,base] [--devices cpu,cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trecsys.config import ExperimentConfig, build  # noqa: E402
from trecsys.data.prepared import DomainRange, DomainSplit  # noqa: E402
from trecsys.engine import LOG, Dist, fit, read_log, resolve_device  # noqa: E402
from trecsys.model import SeqRecModel  # noqa: E402
from trecsys.stages.pretrain_source import make_validate, training_setup  # noqa: E402

SIZES = {
    "small": {"d_model": 64, "n_layers": 2, "n_heads": 2, "max_seq_len": 50},
    "base": {"d_model": 256, "n_layers": 4, "n_heads": 4, "max_seq_len": 50},
}
TEXT_DIM = 384
WARMUP_STEPS = 3
VALID_USERS = 2000  # validation in the bench ranks a sample of users; its time is reported apart


def shared_data() -> Path:
    return Path(os.environ.get("TRECSYS_SHARED_DATA", REPO.parent / "shared" / "data"))


def kitchen_split(folder: Path) -> DomainSplit:
    inter = pd.read_csv(folder / "Kitchen.inter.gz", sep="\t")
    inter.columns = [c.split(":")[0] for c in inter.columns]
    items = pd.read_csv(folder / "Kitchen.item.gz", sep="\t", usecols=[0])
    item_ids = items.iloc[:, 0].astype(str)
    item_idx = {item: i for i, item in enumerate(item_ids)}
    inter = inter.sort_values(["user_id", "position"], kind="stable")
    inter["item_idx"] = inter["item_id"].astype(str).map(item_idx)
    train, valid, test = [], [], []
    for _, seq in inter.groupby("user_id", sort=False)["item_idx"]:
        seq = seq.to_numpy(dtype=np.int64)
        held = 2 if len(seq) >= 3 else 0
        train.append(seq[: len(seq) - held])
        valid.append(seq[len(seq) - 2: len(seq) - 1] if held else seq[:0])
        test.append(seq[len(seq) - 1:] if held else seq[:0])
    domain = DomainRange("Kitchen", "source", 0, len(item_ids))
    return DomainSplit(domain, np.arange(len(train)), train, valid, test)


def bench_one(size: str, device_name: str, steps: int, batch_size: int) -> dict:
    torch.manual_seed(0)
    device = resolve_device(device_name)
    t0 = time.perf_counter()
    split = kitchen_split(shared_data() / "amazon_food_kitchen" / "Kitchen")
    load_s = time.perf_counter() - t0
    cfg = build(ExperimentConfig, {
        "data": {"domains": {"Kitchen": {"format": "recbole"}}, "target": "Kitchen"},
        "model": {**SIZES[size], "dropout": 0.2},
        "pretrain": {"train": {"epochs": 1, "batch_size": batch_size, "max_steps": WARMUP_STEPS + steps,
                               "eval_every_steps": WARMUP_STEPS, "patience": 0}},
    })
    data, loss_fn = training_setup({"Kitchen": split}, cfg, device)
    sample = np.random.default_rng(0).choice(len(split.train), size=VALID_USERS, replace=False)
    valid_split = DomainSplit(split.domain, split.user_idx[sample], [split.train[i] for i in sample],
                              [split.valid[i] for i in sample], [split.test[i] for i in sample])
    validate = make_validate({"Kitchen": valid_split}, cfg.model.max_seq_len, 1024, device)
    model = SeqRecModel(cfg.model, TEXT_DIM, split.domain.n_items)
    model.set_item_text(torch.randn(split.domain.n_items, TEXT_DIM))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory() as work:
        t0, cpu0 = time.perf_counter(), time.process_time()
        result = fit(model, data, loss_fn, validate, cfg.pretrain.train, Path(work), seed=0, dist=Dist(device=device))
        wall_s, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
        log = list(read_log(Path(work) / LOG))
    timed = log[-1]  # covers the steps after the warm-up validation only
    seq_per_s = timed["sequences_per_s"]
    return {
        "size": size, "device": device.type, "precision": result.precision,
        "parameters": model.num_parameters(), "windows": data.n_examples, "items": split.domain.n_items,
        "batch_size": batch_size, "timed_steps": steps, "sequences_per_s": seq_per_s,
        "s_per_epoch": data.n_examples / seq_per_s, "load_s": load_s, "fit_wall_s": wall_s,
        # CPU seconds of the whole fit (warm-up and validations included): steadier than wall time
        # on a machine shared with other work.
        "fit_cpu_s": cpu_s,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--sizes", default="small,base")
    parser.add_argument("--devices", default="cpu,cuda")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # size:device, run in this process
    args = parser.parse_args()
    if not (shared_data() / "amazon_food_kitchen" / "Kitchen" / "Kitchen.inter.gz").is_file():
        print(f"skipped: Kitchen data not found under {shared_data()} (set TRECSYS_SHARED_DATA)")
        return
    if args.one:
        size, device = args.one.split(":")
        print(json.dumps(bench_one(size, device, args.steps, args.batch_size)))
        return
    devices = [d for d in args.devices.split(",") if d != "cuda" or torch.cuda.is_available()]
    for device in devices:
        for size in args.sizes.split(","):
            done = subprocess.run([sys.executable, __file__, "--one", f"{size}:{device}", "--steps", str(args.steps),
                                   "--batch-size", str(args.batch_size)], capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{size} {device}: failed: {done.stderr.strip().splitlines()[-1]}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            cuda = f", peak CUDA {r['peak_cuda_mib']:.0f} MiB" if r["peak_cuda_mib"] is not None else ""
            print(f"train {r['size']} ({r['parameters']:,} params) on {r['device']} {r['precision']}, "
                  f"{r['torch_threads']} threads: {r['sequences_per_s']:.0f} sequences/s, "
                  f"{r['s_per_epoch']:.1f} s/epoch est. ({r['windows']:,} windows, {r['items']:,} items, "
                  f"batch {r['batch_size']}, {r['timed_steps']} timed steps), peak RSS {r['peak_rss_mib']:.0f} MiB{cuda}; "
                  f"fit {r['fit_wall_s']:.0f} s wall / {r['fit_cpu_s']:.0f} s CPU")


if __name__ == "__main__":
    main()
