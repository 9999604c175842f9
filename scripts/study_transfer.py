"""`make study`: does transfer help on Kitchen → Food, and when? One table of test NDCG@10 / Recall@10.

Runs the pipeline on the shared data (skips with a message when it is absent): prepare, the Kitchen
teacher (pretrain-source), a distilled student, then fine-tuning variants on Food, each in its own
run folder under `<run_dir>/study/runs/<variant>/` (the prepared folder linked, not copied):
- `auto`: every strategy (full, adaptor, zero_shot, scratch, id_only), the best kept by validation;
  each candidate's checkpoint gives its own row, so one run yields six;
- `student`: the distilled student fine-tuned (full) on Food;
- few-shot: full and scratch on a seeded fraction of the Food training users (nested fractions);
- `history=all_domains`: full and scratch reading each user's Kitchen items as context.
Test numbers come from the evaluate stage's code (same users, histories and exclusion as `trec
evaluate`), with popularity and item-kNN as floors. Writes `<run_dir>/study/results.{md,parquet}` and
the few-shot table `<run_dir>/fewshot/results.parquet` that `trec evaluate` plots.

    python scripts/study_transfer.py                        # configs/kitchen_to_food.yaml, CPU-sized caps
    python scripts/study_transfer.py --epochs 20 --pretrain-epochs 20 device=cuda   # the full study
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trecsys import metrics as M  # noqa: E402
from trecsys.artifacts import read_json, write_parquet, write_text  # noqa: E402
from trecsys.config import load_config  # noqa: E402
from trecsys.data.prepared import load_prepared  # noqa: E402
from trecsys.devices import resolve_device  # noqa: E402
from trecsys.errors import TrecError  # noqa: E402
from trecsys.stages import distill, finetune_target, prepare, pretrain_source  # noqa: E402
from trecsys.stages.evaluate import System, eval_users, make_scorer  # noqa: E402

STRATEGIES = ["full", "adaptor", "zero_shot", "scratch", "id_only"]
COLUMNS = ["variant", "strategy", "init_from", "history", "train_fraction", "n_trainable", "valid_ndcg@10",
           "test_ndcg@10", "test_recall@10", "train_s"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", default=str(REPO / "configs" / "kitchen_to_food.yaml"))
    parser.add_argument("--pretrain-epochs", type=int, default=3, help="teacher epochs on the source")
    parser.add_argument("--distill-epochs", type=int, default=2, help="student epochs")
    parser.add_argument("--epochs", type=int, default=4, help="fine-tuning epochs of every variant")
    parser.add_argument("--max-steps", type=int, default=0, help="cap on optimizer steps of every training run (0 = none)")
    parser.add_argument("--fractions", default="0.1,0.25,0.5,1.0", help="few-shot train_fraction points")
    parser.add_argument("--retrain", action="store_true", help="retrain the teacher and student even when present")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. device=cuda")
    args = parser.parse_args(argv)
    fractions = [float(f) for f in args.fractions.split(",")]

    overrides = list(args.overrides)
    if "TRECSYS_SHARED_DATA" in os.environ and "kitchen_to_food" in args.config:
        overrides.append(f"data.root={Path(os.environ['TRECSYS_SHARED_DATA']) / 'amazon_food_kitchen'}")
    try:
        base = load_config(args.config, overrides)
    except TrecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    data_root = Path(base.data.root).expanduser()
    needs_files = any(d.format != "synthetic" for d in base.data.domains.values())
    if needs_files and not data_root.is_dir():
        print(f"study_transfer: skipped: {data_root} not found (set TRECSYS_SHARED_DATA)")
        return 0
    try:
        return run_study(args, base, overrides, fractions)
    except TrecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


def run_study(args, base, overrides: list[str], fractions: list[float]) -> int:
    run_dir = Path(base.run_dir).resolve()
    study = run_dir / "study"
    caps = lambda section, epochs: [f"{section}.train.epochs={epochs}", f"{section}.train.max_steps={args.max_steps}"]  # noqa: E731
    cfg = lambda *extra: load_config(args.config, [*overrides, *extra])  # noqa: E731
    timings: dict[str, float] = {}

    def timed(name, fn, *a):
        t0 = time.perf_counter()
        fn(*a)
        timings[name] = round(time.perf_counter() - t0, 1)
        print(f"study_transfer: {name} took {timings[name]:.0f} s", flush=True)

    if not (run_dir / "prepared" / "manifest.json").is_file():
        timed("prepare", prepare.run, cfg())
    if args.retrain or not (run_dir / "pretrain" / "model.safetensors").is_file():
        timed("pretrain", pretrain_source.run, cfg(*caps("pretrain", args.pretrain_epochs)))
    if args.retrain or not (run_dir / "distill" / "model.safetensors").is_file():
        timed("distill", distill.run, cfg(*caps("distill", args.distill_epochs)))

    variants = {"auto": dict(strategy="auto", candidates=STRATEGIES),
                "student": dict(strategy="full", init_from=str(run_dir / "distill"))}
    for fraction in fractions:
        if fraction < 1.0:
            for strategy in ("full", "scratch"):
                variants[f"{strategy}@{fraction:g}"] = dict(strategy=strategy, train_fraction=fraction)
    for strategy in ("full", "scratch"):
        variants[f"{strategy}+source_history"] = dict(strategy=strategy, history="all_domains")
    for name, settings in variants.items():
        folder = study / "runs" / name.replace("@", "_frac").replace("+", "_")
        folder.mkdir(parents=True, exist_ok=True)
        link = folder / "prepared"
        if not link.exists():
            link.symlink_to(run_dir / "prepared", target_is_directory=True)
        settings = {"init_from": str(run_dir / "pretrain"), **settings}
        extra = [f"run_dir={folder}", *caps("finetune", args.epochs)]
        extra += [f"finetune.{k}={v if not isinstance(v, list) else '[' + ','.join(v) + ']'}" for k, v in settings.items()]
        timed(name, finetune_target.run, cfg(*extra))
        shutil.rmtree(folder / ".finetune.work", ignore_errors=True)  # max_steps leaves resumable state

    table = evaluate_variants(base, run_dir, study, variants)
    write_tables(study, run_dir, table, timings, args)
    return 0


def evaluate_variants(base, run_dir: Path, study: Path, variants: dict) -> pd.DataFrame:
    """Test NDCG@10 / Recall@10 of every checkpoint, with the evaluate stage's users and scorers."""
    prepared = load_prepared(run_dir)
    users = eval_users(prepared, "test")
    n_items = prepared.domain(prepared.target, key="data.target").n_items
    device = resolve_device(base.device)
    rows = []

    def test_metrics(system: System) -> dict:
        scorer = make_scorer(system, prepared, users, n_items, device, base.evaluate.user_batch)
        _, top = M.full_ranking_topk(scorer.score_chunk, len(users.targets), n_items, 10, exclude=users.histories,
                                     user_batch=base.evaluate.user_batch, item_chunk=base.evaluate.item_chunk,
                                     device=scorer.device)
        per_user = M.ranking_metrics(top, users.targets, ks=(10,))
        return {f"test_{k}": float(np.nanmean(v)) for k, v in per_user.items() if k in ("ndcg@10", "recall@10")}

    for name in variants:
        out = study / "runs" / name.replace("@", "_frac").replace("+", "_") / "finetune"
        manifest = read_json(out / "manifest.json")
        init = "student" if name == "student" else "teacher"
        checkpoints = {name: (out, manifest["chosen"])}
        if name == "auto":  # every candidate, and what auto kept
            checkpoints = {s: (out / "candidates" / s, s) for s in STRATEGIES}
            checkpoints[f"auto (kept {manifest['chosen']})"] = (out, manifest["chosen"])
        for label, (folder, strategy) in checkpoints.items():
            cand = manifest["candidates"][strategy]
            rows.append({"variant": label, "strategy": strategy,
                         "init_from": init if strategy in ("full", "adaptor", "zero_shot") else "none",
                         "history": manifest["history"], "train_fraction": manifest["train_fraction"],
                         "n_trainable": cand["n_trainable"], "valid_ndcg@10": cand["valid"]["ndcg@10"],
                         **test_metrics(System(label, folder)), "train_s": cand["train_s"]})
    for baseline in ("popularity", "item-knn"):
        rows.append({"variant": baseline, "strategy": baseline, "init_from": "none", "history": "target",
                     "train_fraction": 1.0, "n_trainable": 0, "valid_ndcg@10": float("nan"),
                     **test_metrics(System(baseline)), "train_s": 0.0})
    return pd.DataFrame(rows, columns=COLUMNS)


def write_tables(study: Path, run_dir: Path, table: pd.DataFrame, timings: dict, args) -> None:
    write_parquet(pa.Table.from_pandas(table, preserve_index=False), study / "results.parquet")
    shown = table.copy()
    for col in ("valid_ndcg@10", "test_ndcg@10", "test_recall@10"):
        shown[col] = shown[col].map(lambda v: "" if pd.isna(v) else f"{v:.4f}")
    shown["n_trainable"] = shown["n_trainable"].map(lambda v: f"{v:,}")
    header = "| " + " | ".join(shown.columns) + " |\n|" + "---|" * len(shown.columns) + "\n"
    body = "".join("| " + " | ".join(str(v) for v in row) + " |\n" for row in shown.itertuples(index=False))
    trained = [f"teacher {args.pretrain_epochs} epochs" if "pretrain" in timings else "teacher reused from the run",
               f"student {args.distill_epochs} epochs" if "distill" in timings else "student reused from the run"]
    caps = f"{', '.join(trained)}, fine-tuning {args.epochs} epochs per variant, max_steps {args.max_steps or 'none'}"
    times = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
    text = (f"# Transfer study: {run_dir.name}\n\nTest split of the target, full ranking, history items "
            f"excluded (the evaluate stage's code). Valid NDCG@10 is what `auto` chose by.\n\n{header}{body}\n"
            f"Budget: {caps}.\n\nWall time (s): {times}; total {sum(timings.values()):.0f} s.\n")
    write_text(study / "results.md", text)
    fewshot = table[table["strategy"].isin(["full", "scratch"]) & (table["history"] == "target")
                    & (table["init_from"] != "student") & ~table["variant"].str.startswith("auto")]
    long = pd.concat([pd.DataFrame({"train_fraction": fewshot["train_fraction"], "strategy": fewshot["strategy"],
                                    "metric": metric, "k": 10, "value": fewshot[f"test_{metric}@10"]})
                      for metric in ("ndcg", "recall")], ignore_index=True)
    write_parquet(pa.Table.from_pandas(long, preserve_index=False), run_dir / "fewshot" / "results.parquet")
    print(text)
    print(f"study_transfer: wrote {study / 'results.md'}, {study / 'results.parquet'} and "
          f"{run_dir / 'fewshot' / 'results.parquet'}")


if __name__ == "__main__":
    sys.exit(main())
