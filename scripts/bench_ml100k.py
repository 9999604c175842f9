"""trecsys vs RecBole 1.2.1 on ml-100k: seconds per training epoch of a SASRec-sized model, and test NDCG@10.

trecsys side: `trec prepare`, `trec finetune-target` (the id_only strategy: an item-ID SASRec, 2 blocks,
64 dims, 50 items of history, full-softmax CE, early stopping on validation) and `trec evaluate` with
configs/ml100k_sasrec.yaml, as a user would run them. Seconds per epoch are wall seconds between
epoch ends in the training log, so they include each epoch's full-ranking validation.

RecBole side (scripts/recbole_sasrec.py, run by RecBole's own Python): one timed epoch of its SASRec
on the same files (--recbole-epochs N > 1: trained to early stopping within N epochs, with its test
NDCG@10 under both rules), when RECBOLE_PYTHON (or --recbole-python) names that interpreter;
otherwise every RecBole number prints as "not measured" — never a stored constant.

Two evaluation rules, both printed: `exclude_seen` (trecsys's default: items the user already has are
not ranked) and `seen_ranked` (RecBole's sequential rule). Ratios only compare numbers of one rule.

Where ml-100k comes from, first found: --data DIR, $TRECSYS_ML100K, the recbole package of
RECBOLE_PYTHON, a recbole package importable here. Skips with a message when none has it. To get it:
`pip download --no-deps recbole==1.2.1` and unzip recbole/dataset_example/ml-100k/ from the wheel.

    python scripts/bench_ml100k.py [--data DIR] [--recbole-python PATH] [--recbole-epochs 1]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "ml100k_sasrec.yaml"
RULES = {"exclude_seen": "true", "seen_ranked": "false"}  # rule name -> evaluate.exclude_seen


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


def trec(*args: str) -> None:
    checked(subprocess.run([sys.executable, "-m", "trecsys", *args], cwd=REPO, capture_output=True, text=True),
            f"`trec {' '.join(args)}`")


def run_trecsys(data: Path, run_dir: Path) -> dict:
    overrides = [f"data.root={data}", f"run_dir={run_dir}"]
    trec("prepare", "-c", str(CONFIG), *overrides)
    started = time.perf_counter()
    trec("finetune-target", "-c", str(CONFIG), *overrides)
    train_wall_s = time.perf_counter() - started
    log = [json.loads(line) for line in (run_dir / "finetune" / "train_log.jsonl").read_text().splitlines()]
    ends = [row["elapsed_s"] for row in log if float(row["epoch"]).is_integer()]
    per_epoch = [b - a for a, b in zip([0.0, *ends[:-1]], ends, strict=True)]
    best_epoch = next(row["epoch"] for row in reversed(log) if row.get("best_step") == row["step"])
    out = {"s_per_epoch": statistics.median(per_epoch), "epochs": len(per_epoch), "best_epoch": best_epoch,
           "train_wall_s": train_wall_s}
    for rule, flag in RULES.items():
        trec("evaluate", "-c", str(CONFIG), *overrides, f"evaluate.exclude_seen={flag}")
        metrics = pd.read_parquet(run_dir / "eval" / "metrics.parquet")
        model = metrics["run"].iloc[0]  # the run's model comes first, then the baselines
        ours = metrics[(metrics["run"] == model) & (metrics["slice"] == "all") & (metrics["k"] == 10)]
        value = dict(zip(ours["metric"], ours["value"], strict=True))
        out[f"{rule}.test_ndcg@10"], out[f"{rule}.test_recall@10"] = value["ndcg"], value["recall"]
    return out


def run_recbole(python: str, data: Path, epochs: int) -> dict:
    with tempfile.TemporaryDirectory() as work:
        # RecBole writes its logs and tensorboard files into the working directory.
        done = checked(subprocess.run([python, str(REPO / "scripts" / "recbole_sasrec.py"), str(data.parent),
                                       str(epochs), work], capture_output=True, text=True, cwd=work), "RecBole run")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if "train_s" in result:
        result["s_per_epoch"] = result["train_s"] / max(result["epochs"], 1)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="folder with ml-100k.inter and ml-100k.item")
    parser.add_argument("--recbole-python", default=os.environ.get("RECBOLE_PYTHON"),
                        help="python of a virtual environment with recbole==1.2.1 (default: $RECBOLE_PYTHON)")
    parser.add_argument("--recbole-epochs", type=int, default=1,
                        help="1 times one RecBole epoch; more trains it to early stopping and measures its test NDCG")
    parser.add_argument("--run-dir", default=str(REPO / "runs" / "bench_ml100k"))
    args = parser.parse_args()
    data = find_ml100k(args.data, args.recbole_python)
    if data is None:
        print("ml100k: skipped (ml-100k not found: pass --data, set TRECSYS_ML100K or RECBOLE_PYTHON; "
              "`pip download --no-deps recbole==1.2.1` holds it under recbole/dataset_example/ml-100k/)")
        return 0
    print(f"ml100k.data: {data}", flush=True)
    ours = run_trecsys(data, Path(args.run_dir))
    for key, value in ours.items():
        print(f"ml100k.trecsys.{key}: {value:.4f}" if "test" in key else f"ml100k.trecsys.{key}: {value:.1f}")
    theirs = run_recbole(args.recbole_python, data, args.recbole_epochs) if args.recbole_python else {}
    print("ml100k.recbole.source: " + (f"measured here, {theirs['epochs']} epoch(s) of at most {args.recbole_epochs}"
                                       if theirs else "not measured (set RECBOLE_PYTHON)"))
    shown = lambda key, fmt: format(theirs[key], fmt) if key in theirs else "not measured"  # noqa: E731
    print(f"ml100k.recbole.s_per_epoch: {shown('s_per_epoch', '.1f')}")
    for rule in RULES:
        for metric in ("test_ndcg@10", "test_recall@10"):
            print(f"ml100k.recbole.{rule}.{metric}: {shown(f'{rule}.{metric}', '.4f')}")
    if "s_per_epoch" in theirs:
        print(f"ml100k.speedup_per_epoch: {theirs['s_per_epoch'] / ours['s_per_epoch']:.1f}x")
    for rule in RULES:  # a ratio only within one rule
        key = f"{rule}.test_ndcg@10"
        ratio = f"{ours[key] / theirs[key]:.2f}" if key in theirs else "not measured"
        print(f"ml100k.{rule}.ndcg@10_ratio: {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
