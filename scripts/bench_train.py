"""Training throughput of the engine + model on real data: sequences/s, s/epoch and peak memory.

Amazon Kitchen (../shared/data/amazon_food_kitchen/Kitchen, or $TRECSYS_SHARED_DATA): interactions
ordered by `position`, leave-one-out (last -> test, second last -> valid), the train part cut into
windows exactly as `trec pretrain-source` does, full-softmax loss over all 27,637 items. Item text
vectors are random (384-d like all-MiniLM-L6-v2): training cost does not depend on their values.
Each (size, device) runs in its own process so its peak RSS is its own.

    python scripts/bench_train.py [--steps 10] [--sizes small,base] [--devices cpu,cuda] [--threads N]

On a machine shared with other work, `--threads 1` gives steadier numbers: idle OpenMP threads spin
while they wait for a core, which inflates both wall and CPU time.
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
from trecsys.model.seqrec import SeqRecModel  # noqa: E402
from trecsys.prepared.tables import DomainRange, DomainSplit  # noqa: E402
from trecsys.runtime import resolve_device  # noqa: E402
from trecsys.stages.pretrain_source import make_validate, training_setup  # noqa: E402
from trecsys.train.engine import Dist, fit  # noqa: E402

SIZES = {
    "small": {"d_model": 64, "n_layers": 2, "n_heads": 2, "max_seq_len": 50},
    "base": {"d_model": 256, "n_layers": 4, "n_heads": 4, "max_seq_len": 50},
}
TEXT_DIM = 384
WARMUP_STEPS = 3
VALID_USERS = 2000  # the one validation (outside the timed steps) ranks a sample of users


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


class StepClock:
    """Wall and process CPU time of the timed steps: from the first step after the warm-up to the
    validation that ends the run. With one thread, CPU time is what the steps cost on an idle core."""

    def __init__(self, loss_fn, validate):
        self._loss_fn, self._validate = loss_fn, validate
        self.calls, self.sequences = 0, 0
        self.start = self.stop = (0.0, 0.0)  # (wall, cpu)

    def loss_fn(self, model, batch):
        self.calls += 1
        if self.calls == WARMUP_STEPS + 1:
            self.start = (time.perf_counter(), time.process_time())
        if self.calls > WARMUP_STEPS:
            self.sequences += len(batch["windows"])
        return self._loss_fn(model, batch)

    def validate(self, model):
        self.stop = (time.perf_counter(), time.process_time())
        return self._validate(model)

    def sequences_per_s(self) -> tuple[float, float]:
        """(per wall second, per CPU second)."""
        return tuple(self.sequences / (b - a) for a, b in zip(self.start, self.stop, strict=True))


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
                               "patience": 0}},
    })
    data, loss_fn = training_setup({"Kitchen": split}, cfg, device)
    sample = np.random.default_rng(0).choice(len(split.train), size=VALID_USERS, replace=False)
    valid_split = DomainSplit(split.domain, split.user_idx[sample], [split.train[i] for i in sample],
                              [split.valid[i] for i in sample], [split.test[i] for i in sample])
    item_text = np.random.default_rng(0).standard_normal((split.domain.n_items, TEXT_DIM), dtype=np.float32)
    validate = make_validate({"Kitchen": valid_split}, item_text, 1024, device)
    model = SeqRecModel(cfg.model, TEXT_DIM, split.domain.n_items)
    model.set_item_text(torch.from_numpy(item_text))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory() as work:
        t0, cpu0 = time.perf_counter(), time.process_time()
        clock = StepClock(loss_fn, validate)  # the one validation is at max_steps
        result = fit(model, data, clock.loss_fn, clock.validate, cfg.pretrain.train, Path(work), seed=0,
                     dist=Dist(device=device))
        wall_s, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    seq_per_s, seq_per_cpu_s = clock.sequences_per_s()
    return {
        "size": size, "device": device.type, "precision": result.precision,
        "parameters": model.num_parameters(), "windows": data.n_examples, "items": split.domain.n_items,
        "batch_size": batch_size, "timed_steps": steps, "sequences_per_s": seq_per_s,
        "sequences_per_cpu_s": seq_per_cpu_s,
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
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--sizes", default="small,base")
    parser.add_argument("--devices", default="cpu,cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # size:device, run in this process
    args = parser.parse_args()
    if not (shared_data() / "amazon_food_kitchen" / "Kitchen" / "Kitchen.inter.gz").is_file():
        print(f"train: skipped (Kitchen data not found under {shared_data()}; set TRECSYS_SHARED_DATA)")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        size, device = args.one.split(":")
        print(json.dumps(bench_one(size, device, args.steps, args.batch_size)))
        return
    devices = [d for d in args.devices.split(",") if d != "cuda" or torch.cuda.is_available()]
    for device in devices:
        for size in args.sizes.split(","):
            done = subprocess.run([sys.executable, __file__, "--one", f"{size}:{device}", "--steps", str(args.steps),
                                   "--batch-size", str(args.batch_size), "--threads", str(args.threads)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                print(f"train.{size}.{device}.failed: {done.stderr.strip().splitlines()[-1]}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            prefix = f"train.{size}.{r['device']}"
            for key in ("parameters", "precision", "torch_threads", "windows", "items", "batch_size", "timed_steps"):
                print(f"{prefix}.{key}: {r[key]}")
            print(f"{prefix}.sequences_per_s: {r['sequences_per_s']:.0f}")
            print(f"{prefix}.s_per_epoch (from the timed steps): {r['s_per_epoch']:.0f}")
            print(f"{prefix}.sequences_per_cpu_s: {r['sequences_per_cpu_s']:.0f}")
            print(f"{prefix}.cpu_s_per_epoch: {r['windows'] / r['sequences_per_cpu_s']:.0f}")
            print(f"{prefix}.peak_rss_mib: {r['peak_rss_mib']:.0f}")
            if r["peak_cuda_mib"] is not None:
                print(f"{prefix}.peak_cuda_mib: {r['peak_cuda_mib']:.0f}")


if __name__ == "__main__":
    main()
