"""DDP scaling from 1 to 2 (or more) processes: pretrain-source's optimizer steps under torchrun, gloo on CPU.

    python scripts/bench_ddp.py -c runs/bench_scale/config_run_1M.yaml              # 1 vs 2 processes
    python scripts/bench_ddp.py -c CFG --procs 1,2,4 --steps 40 --repeats 3 --batch-size 512

The config must point at a prepared run_dir (`trec prepare` first; scripts/bench_scale.py writes one
with `--stages prepare`). For each process count the script launches
`python -m torch.distributed.run --nproc_per_node P scripts/bench_ddp.py --worker ...` with ONE
thread per process (TRECSYS_THREADS=1 and every pool's *_NUM_THREADS=1). Each rank builds
pretrain-source's training data and model exactly as the stage does (stages/pretrain_source.py's
`training_setup`, the same `Trainer`, DDP-wrapped when P > 1) and runs `--warmup` then `--steps`
optimizer steps of the SAME global batch (`pretrain.train.batch_size`, or `--batch-size`): with P
processes each computes 1/P of every batch and gradients are all-reduced. Validation and
checkpoints are left out: the timed loop is `Trainer.step` alone.

Per run it prints, for the timed steps: optimizer steps/s and windows/s (wall, the slowest rank),
and CPU seconds per step of each process (its own user + system time over the timed steps, all its
threads, gloo's included). The process counts are run in turn (1, 2, 1, 2, ...) `--repeats` times,
and each P > 1 run is paired with the 1-process run just before it, so a drift in the machine's
load moves both sides of a ratio. The load average is printed with every run.

Reading the numbers on a shared machine: wall time is what a user waits for, but when other jobs
hold the cores a process waits for a core too, and wall ratios mostly measure the load. CPU seconds
per step are what each process computed, nearly independent of the load: the P-process run scales
perfectly when each rank's CPU per step is 1/P of the 1-process run's, and `sum over ranks / one
process` is DDP's overhead in work (communication, per-process fixed costs, smaller matrices).
On an idle machine with P free cores, wall steps/s follows the slowest rank's CPU per step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# ---------------------------------------------------------------------------------------------
# One rank (under torchrun)


def worker(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    import torch.distributed as torch_dist

    from trecsys.config import load_config
    from trecsys.model.seqrec import SeqRecModel
    from trecsys.prepared.tables import domain_split, load_prepared, seen_items
    from trecsys.runtime import apply_threads, seed_everything
    from trecsys.stages.common import check_prepared
    from trecsys.stages.pretrain_source import training_setup
    from trecsys.train.engine import Trainer, distributed, epoch_batches

    overrides = [f"pretrain.train.batch_size={args.batch_size}"] if args.batch_size else []
    cfg = load_config(args.config, overrides)
    threads = apply_threads(cfg.runtime.threads)
    with distributed("cpu") as dist:
        setup_cpu = time.process_time()
        prepared = load_prepared(cfg.run_dir)
        sources = check_prepared(prepared, cfg)
        splits = {name: domain_split(prepared, name) for name in sources}
        data, loss_fn = training_setup(splits, cfg, dist.device)
        seed_everything(cfg.seed)
        model = SeqRecModel(cfg.model, prepared.embeddings.shape[1], prepared.n_items,
                            id_items=seen_items([seen_items(s.train) for s in splits.values()]))
        model.set_item_text(torch.from_numpy(prepared.embeddings))
        with tempfile.TemporaryDirectory(prefix="bench_ddp_") as work:
            # Every rank names its own folder: only rank 0 writes anything there, and nothing is kept.
            trainer = Trainer(model, data, loss_fn, lambda m: {"ndcg@10": 0.0}, cfg.pretrain.train, Path(work),
                              seed=cfg.seed, dist=dist)
            setup_cpu = time.process_time() - setup_cpu
            batches = epoch_batches(trainer.members, cfg.pretrain.train.batch_size, cfg.seed, 0, trainer.min_size)
            needed = args.warmup + args.steps
            if len(batches) < needed:
                raise SystemExit(f"bench_ddp: {len(batches)} batches in an epoch, {needed} needed: lower --steps")
            for b in batches[:args.warmup]:
                trainer.step(b)
            dist.barrier()
            wall, cpu = time.perf_counter(), time.process_time()
            for b in batches[args.warmup:needed]:
                trainer.step(b)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            dist.barrier()
        windows = int(sum(len(b) for b in batches[args.warmup:needed]))
        mine = {"rank": dist.rank, "wall_s": wall, "cpu_s": cpu, "setup_cpu_s": setup_cpu,
                "threads": threads.threads, "windows": windows, "local_windows": windows // dist.world_size}
        gathered = [mine]
        if dist.ddp:
            gathered = [None] * dist.world_size
            torch_dist.all_gather_object(gathered, mine)
        if dist.is_main:
            Path(args.out).write_text(json.dumps({
                "world_size": dist.world_size, "steps": args.steps, "batch_size": cfg.pretrain.train.batch_size,
                "n_windows_total": int(data.n_examples), "ranks": gathered,
                "torch": torch.__version__, "numpy": np.__version__}) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# The driver


def launch(procs: int, args: argparse.Namespace, out: Path, port: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TRECSYS_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
               "--master_port", str(port), str(Path(__file__).resolve()), "--worker", "-c", args.config,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--out", str(out)]
    if args.batch_size:
        command += ["--batch-size", str(args.batch_size)]
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench_ddp: {procs} process(es) failed:\n{done.stderr[-3000:]}")
    result = json.loads(out.read_text(encoding="utf-8"))
    result["load"] = [load_before, os.getloadavg()[0]]
    result["process_wall_s"] = time.perf_counter() - started
    return result


def summary(r: dict) -> dict:
    ranks = r["ranks"]
    wall = max(x["wall_s"] for x in ranks)
    cpu = [x["cpu_s"] / r["steps"] for x in ranks]
    return {"procs": r["world_size"], "batch_size": r["batch_size"], "steps_per_s": r["steps"] / wall,
            "windows_per_s": ranks[0]["windows"] / wall, "cpu_s_per_step": cpu,
            "cpu_s_per_step_sum": sum(cpu), "load": r["load"]}


def line(s: dict) -> str:
    per = " / ".join(f"{c * 1000:.1f}" for c in s["cpu_s_per_step"])
    return (f"{s['procs']} proc: {s['steps_per_s']:6.2f} steps/s, {s['windows_per_s']:8.0f} windows/s (wall); "
            f"CPU ms/step per process {per} (sum {s['cpu_s_per_step_sum'] * 1000:.1f}); "
            f"load {s['load'][0]:.1f} -> {s['load'][1]:.1f}")


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", required=True, help="a config whose run_dir holds prepared/")
    parser.add_argument("--procs", default="1,2", help="process counts to compare; the first is the baseline")
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every process count, in turn")
    parser.add_argument("--batch-size", type=int, default=0, help="global batch (default: pretrain.train.batch_size)")
    parser.add_argument("--json", default=None, help="also write every run's numbers here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    procs = [int(p) for p in args.procs.split(",")]
    print(f"bench_ddp: pretrain-source steps, {args.config}; 1 thread per process; gloo on CPU; "
          f"{os.cpu_count()} CPUs; {args.steps} timed steps after {args.warmup}")
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_ddp_") as tmp:
        for repeat in range(args.repeats):
            for p in procs:
                result = summary(launch(p, args, Path(tmp) / f"{repeat}_{p}.json", 29500 + (os.getpid() + p) % 400))
                result["repeat"] = repeat
                runs.append(result)
                print(line(result), flush=True)
    base = procs[0]
    print(f"global batch {runs[0]['batch_size']} windows per step, the same for every process count; "
          f"ratios of each run to the {base}-process run of the same round, median over {args.repeats} rounds:")
    for p in procs[1:]:
        pairs = [(a, b) for a in runs for b in runs if a["procs"] == base and b["procs"] == p and a["repeat"] == b["repeat"]]
        wall = median([b["steps_per_s"] / a["steps_per_s"] for a, b in pairs])
        slowest = median([a["cpu_s_per_step_sum"] / max(b["cpu_s_per_step"]) for a, b in pairs])
        work = median([b["cpu_s_per_step_sum"] / a["cpu_s_per_step_sum"] for a, b in pairs])
        print(f"  {p} processes: wall speed-up {wall:.2f}x (under this load); speed-up if each process had its own "
              f"core (1-process CPU per step / slowest rank's) {slowest:.2f}x; CPU work per step, all processes "
              f"together, {work:.2f}x the 1-process run's")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
