"""Quality benchmark (`make bench-quality`): per dataset, one table per evaluation rule with the simple
baselines, RecBole's SASRec, trecsys's candidates and what `auto` keeps, on the same test users.

For each dataset: `trec prepare` (reused when the run folder has it), `trec pretrain-source` when the
dataset has a source domain, `trec finetune-target` with `auto` over the dataset's candidates
(scratch, transfer `full` when there is a source, `fusion`), chosen on validation; then every row is
ranked on the test split with the code `trec evaluate` uses (rank.rankers.make_scorer, the exact
chunked top-K, the tie rule), under both rules:
  exclude_seen  items the user already has are never ranked (trecsys's default),
  seen_ranked   they are ranked like any other item (RecBole's sequential evaluation).
RecBole 1.2.1 SASRec runs live in its own environment (RECBOLE_PYTHON or --recbole-python; see
../shared/design/PERFORMANCE.md) on the prepared target domain, exported with each user's prepared
order as the timestamp, so its leave-one-out split is the same; its top-50 lists are scored here
with the same metric code. Without that environment its row says "not measured".

Rows: NDCG@10, Recall@10, NDCG@50 with 95% bootstrap CIs over users (--bootstrap resamples), and
the paired difference (kept − best other row by NDCG@10, same resamples) with its CI. A dataset with a
source also gets the source-data control (<out>/<dataset>.target_only, skipped with
--no-source-control): the same pretraining on the target's train split alone (pretrain.data=target),
then `full` from it, so the table separates what the source data add from what a warm start adds.

Schedules (--schedule; the tables say which ran):
  quick  finetune ≤ 10 epochs (patience 3), pretrain ≤ 4 epochs (patience 2), RecBole ≤ 5 epochs:
         fits a shared 2-core machine; models are under-trained, RecBole most of all.
  full   every config's own epochs; RecBole ≤ 50 epochs with its early stopping (patience 10).

    python scripts/bench_quality.py [--datasets ml-100k,office,kitchen_to_food] [--schedule quick]
        [--recbole-python PATH] [--bootstrap 1000] [--out runs/bench_quality] [--set DATASET:KEY=VALUE ...]

--set adds a config override to one dataset's trec commands (a lever measured by the same command;
the table's header lists it), e.g. --set kitchen_to_food:finetune.train.epochs=20.

Writes <out>/<dataset>/quality.md and quality.parquet and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_env import child_env  # noqa: E402
from bench_ml100k import find_ml100k  # noqa: E402

from trecsys.artifacts import MANIFEST  # noqa: E402
from trecsys.model.manifests import FinetuneManifest  # noqa: E402
from trecsys.prepared.identity import catalogue_identity  # noqa: E402
from trecsys.prepared.tables import load_prepared  # noqa: E402
from trecsys.rank import metrics as M  # noqa: E402
from trecsys.rank.rankers import Ranker, make_scorer  # noqa: E402
from trecsys.rank.report import protocol  # noqa: E402
from trecsys.stage_table import FINETUNE, PREPARE, PRETRAIN  # noqa: E402
from trecsys.stages.evaluate import eval_users, ranking_inputs  # noqa: E402

RULES = {"exclude_seen": True, "seen_ranked": False}
KS = (10, 50)
SHOWN = ("ndcg@10", "recall@10", "ndcg@50")
SCHEDULES = {
    "quick": {"finetune": ["finetune.train.epochs=10", "finetune.train.patience=3"],
              "pretrain": ["pretrain.train.epochs=4", "pretrain.train.patience=2"], "recbole_epochs": 5},
    "full": {"finetune": [], "pretrain": [], "recbole_epochs": 50},
}


@dataclass
class Dataset:
    name: str
    config: str
    candidates: list[str]
    overrides: list[str] = field(default_factory=list)
    has_source: bool = False
    extra: list[str] = field(default_factory=list)  # --set: the lever under test, named in the table


def datasets(recbole_python: str | None) -> dict[str, Dataset | str]:
    """Each benchmark dataset, or why it cannot run here."""
    out: dict[str, Dataset | str] = {}
    ml = find_ml100k(None, recbole_python)
    out["ml-100k"] = (Dataset("ml-100k", "configs/ml100k_sasrec.yaml", ["scratch", "fusion"],
                              [f"data.root={ml}", "finetune.strategy=auto"]) if ml else
                      "ml-100k not found (set RECBOLE_PYTHON or TRECSYS_ML100K)")
    office = REPO.parent / "shared" / "data" / "amazon2014_office"
    office = office if office.is_dir() else Path("/work/shared/data/amazon2014_office")
    out["office"] = (Dataset("office", "configs/office2014.yaml", ["scratch", "id_only", "fusion"],
                             [f"data.root={office}"]) if office.is_dir() else f"{office} not found")
    k2f = office.parent / "amazon_food_kitchen"
    out["kitchen_to_food"] = (Dataset("kitchen_to_food", "configs/kitchen_to_food.yaml",
                                      ["full", "scratch", "fusion"], [f"data.root={k2f}"], has_source=True)
                              if k2f.is_dir() else f"{k2f} not found")
    return out


def trec(*args: str) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "trecsys", *args], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"bench_quality: `trec {' '.join(args[:1])}` failed ({done.returncode}): {tail}")
    return time.perf_counter() - started


def train(ds: Dataset, run_dir: Path, schedule: dict, retrain: bool) -> dict[str, float]:
    """prepare (reused), pretrain when there is a source, finetune auto over the candidates.
    The --set overrides come last, so they win over the schedule's."""
    base = ["-c", ds.config, f"run_dir={run_dir}", *ds.overrides]
    seconds = {}
    if not (run_dir / PREPARE.folder / MANIFEST).is_file():
        seconds["prepare"] = trec(PREPARE.name, *base, *ds.extra)
    if ds.has_source and (retrain or not (run_dir / PRETRAIN.folder / MANIFEST).is_file()):
        seconds["pretrain"] = trec(PRETRAIN.name, *base, *schedule["pretrain"], *ds.extra)
    if retrain or not (run_dir / FINETUNE.folder / MANIFEST).is_file():
        candidates = "finetune.candidates=[" + ", ".join(ds.candidates) + "]"
        seconds["finetune"] = trec(FINETUNE.name, *base, "finetune.strategy=auto", candidates,
                                   *schedule["finetune"], *ds.extra)
    return seconds


def train_control(ds: Dataset, out: Path, schedule: dict, retrain: bool) -> tuple[Path, dict[str, float]]:
    """The source-data control of a dataset with a source: the same pretraining on the target's train
    split alone (pretrain.data=target), then `full` from it, in a sibling run folder. Its row says how
    much of transfer's gain over scratch the source data bring and how much any warm start would."""
    control = Dataset(ds.name, ds.config, ["full"], ds.overrides, True, [*ds.extra, "pretrain.data=target"])
    run_dir = out / f"{ds.name}.target_only"
    return run_dir, {f"control {k}": v for k, v in train(control, run_dir, schedule, retrain).items()}


# ---------------------------------------------------------------------------------------------
# RecBole


def export_for_recbole(prepared, folder: Path, name: str) -> None:
    """The target domain's interactions as a RecBole atomic file; the timestamp is each row's
    position in prepared order, so RecBole's leave-one-out (by time) holds out the same items."""
    rows = prepared.interactions
    rows = rows[rows["domain"] == prepared.target]
    order = {"train": 0, "valid": 1, "test": 2}
    rows = rows.assign(_split=rows["split"].map(order), _pos=np.arange(len(rows)))
    rows = rows.sort_values(["user_idx", "_split", "_pos"], kind="stable")
    items = prepared.items.set_index("item_idx")["item_id"]
    table = pd.DataFrame({"user_id:token": rows["user_id"].astype(str).to_numpy(),
                          "item_id:token": items.loc[rows["item_idx"]].astype(str).to_numpy(),
                          "timestamp:float": np.arange(len(rows), dtype=np.int64)})
    (folder / name).mkdir(parents=True, exist_ok=True)
    table.to_csv(folder / name / f"{name}.inter", sep="\t", index=False)


def run_recbole(python: str, prepared, epochs: int) -> tuple[dict, dict]:
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        export_for_recbole(prepared, work / "data", "bench")
        # RecBole's process gets the thread environment every RecBole run of the benchmarks gets
        # (bench_env.child_env: each pool at this process's OMP_NUM_THREADS, default 1; glibc malloc).
        threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
        started = time.perf_counter()
        done = subprocess.run([python, str(REPO / "scripts" / "recbole_sasrec.py"), str(work / "data"), str(epochs),
                               str(work / "ckpt"), "--dataset", "bench", "--lists", str(work / "lists.json"),
                               "--threads", str(threads)],
                              capture_output=True, text=True, cwd=work, env=child_env(threads, tuned=False))
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise SystemExit(f"bench_quality: RecBole failed ({done.returncode}): {tail}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["wall_s"] = time.perf_counter() - started
        return result, json.loads((work / "lists.json").read_text())


def recbole_topk(lists: dict[str, list[str]], prepared, users, k: int) -> tuple[np.ndarray, int]:
    """RecBole's lists as catalogue-local indices for the evaluated users (-1 where it ranked none)."""
    domain = prepared.domain(prepared.target)
    items = prepared.items
    items = items[(items["item_idx"] >= domain.item_start) & (items["item_idx"] < domain.item_stop)]
    local = dict(zip(items["item_id"].astype(str), items["item_idx"] - domain.item_start, strict=True))
    user_ids = prepared.interactions.drop_duplicates("user_idx").set_index("user_idx")["user_id"].astype(str)
    topk = np.full((len(users.user_idx), k), -1, dtype=np.int64)
    missing = 0
    for row, u in enumerate(users.user_idx):
        ranked = lists.get(user_ids[u])
        if ranked is None:
            missing += 1
            continue
        ranked = [local[i] for i in ranked[:k] if i in local]
        topk[row, :len(ranked)] = ranked
    return topk, missing


# ---------------------------------------------------------------------------------------------
# Tables


def per_user(topk: np.ndarray, users) -> dict[str, np.ndarray]:
    values = M.ranking_metrics(topk, users.targets, ks=KS)
    return {key: values[key] for key in SHOWN}


def ci(values: np.ndarray, n: int, seed: int) -> tuple[float, float, float]:
    if np.isnan(values).all():  # a row that was not measured
        return float("nan"), float("nan"), float("nan")
    point = float(np.nanmean(values))
    if not n:
        return point, float("nan"), float("nan")
    low, high = M.percentile_interval(M.bootstrap_means(values[:, None], n, seed))
    return point, float(low[0]), float(high[0])


def table_for_rule(rows: dict[str, dict[str, np.ndarray]], kept: str | None, n_boot: int, seed: int
                   ) -> tuple[pd.DataFrame, dict]:
    keep = ~np.isnan(next(iter(rows.values()))["ndcg@10"])
    records = []
    for name, values in rows.items():
        record = {"row": name}
        for key in SHOWN:
            record[key], record[f"{key}_low"], record[f"{key}_high"] = ci(values[key][keep], n_boot, seed)
        records.append(record)
    frame = pd.DataFrame(records)
    paired = {}
    if kept in rows:
        # A row that ranks every user exactly as the kept model (the fusion candidate when no fused
        # point passed validation: its base model alone) is the same model, not another row to beat.
        same = [name for name, values in rows.items() if name != kept and
                all(np.array_equal(values[key], rows[kept][key], equal_nan=True) for key in SHOWN)]
        others = frame[~frame["row"].isin([kept, *same])].sort_values("ndcg@10", ascending=False)
        each = {}
        for other in others["row"]:
            if np.isnan(rows[other]["ndcg@10"][keep]).all():
                continue  # "not measured"
            delta = rows[kept]["ndcg@10"][keep] - rows[other]["ndcg@10"][keep]
            point, low, high = ci(delta, n_boot, seed)
            reference = float(np.nanmean(rows[other]["ndcg@10"][keep]))
            each[other] = {"delta": point, "low": low, "high": high,
                           "relative": point / reference if reference else float("nan")}
        best = others["row"].iloc[0]
        paired = {"kept": kept, "best_other": best, **each[best], "each": each}
    return frame, paired


def markdown(frame: pd.DataFrame, paired: dict, title: str) -> str:
    lines = [f"#### {title}", "", "| row | " + " | ".join(f"{k} [95% CI]" for k in SHOWN) + " |",
             "|---|" + "---|" * len(SHOWN)]
    for r in frame.rename(columns=lambda c: c.replace("@", "_at_")).itertuples(index=False):
        cells, row = [], {k.replace("_at_", "@"): v for k, v in r._asdict().items()}
        for key in SHOWN:
            value, low, high = row[key], row[f"{key}_low"], row[f"{key}_high"]
            cells.append("not measured" if np.isnan(value) else
                         f"{value:.4f} [{low:.4f}, {high:.4f}]" if not np.isnan(low) else f"{value:.4f}")
        lines.append(f"| {r.row} | " + " | ".join(cells) + " |")
    if paired:
        lines += ["", f"Paired NDCG@10, kept `{paired['kept']}` − best other `{paired['best_other']}`: "
                      f"{paired['delta']:+.4f} [{paired['low']:+.4f}, {paired['high']:+.4f}] "
                      f"({paired['relative']:+.1%} of the other row); goal ≥ +10% with the CI above 0: "
                      f"{'met' if paired['relative'] >= 0.10 and paired['low'] > 0 else 'not met'}."]
        lines += ["", "Kept − each other row: " + "; ".join(
            f"`{row}` {d['delta']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] ({d['relative']:+.1%})"
            for row, d in paired["each"].items()) + "."]
    return "\n".join(lines)


def bench_dataset(ds: Dataset, out: Path, args) -> str:
    run_dir = out / ds.name
    schedule = SCHEDULES[args.schedule]
    seconds = train(ds, run_dir, schedule, args.retrain)
    control = None
    if ds.has_source and args.source_control:
        control, control_seconds = train_control(ds, out, schedule, args.retrain)
        seconds.update(control_seconds)
    prepared = load_prepared(run_dir)
    kept = FinetuneManifest.read(run_dir / FINETUNE.folder).chosen
    recbole = lists = None
    missing = 0
    if args.recbole_python:
        recbole, lists = run_recbole(args.recbole_python, prepared, args.recbole_epochs or schedule["recbole_epochs"])
    users = eval_users(prepared, "test")
    n_items = prepared.domain(prepared.target).n_items
    systems = [Ranker("popularity"), Ranker("item-knn")]
    candidates = run_dir / FINETUNE.folder / "candidates"
    names = sorted(p.name for p in candidates.iterdir()) if candidates.is_dir() else [kept]
    for name in names:
        folder = candidates / name if candidates.is_dir() else run_dir / FINETUNE.folder
        label = {"full": "trecsys transfer (full)", "scratch": "trecsys scratch"}.get(name, f"trecsys {name}")
        systems.append(Ranker(label + (" ← auto keeps" if name == kept else ""), folder))
    if control is not None:
        # Its rows are scored with this run's catalogue and users: the two prepares must have made the same.
        if catalogue_identity(load_prepared(control))["items_sha256"] != catalogue_identity(prepared)["items_sha256"]:
            raise SystemExit(f"bench_quality: {control} was prepared with another catalogue than {run_dir}")
        folder = control / FINETUNE.folder / "candidates" / "full"
        systems.append(Ranker("trecsys target-only pretraining (full)",
                              folder if folder.is_dir() else control / FINETUNE.folder))
    depth = max(KS)
    inputs = ranking_inputs(prepared, users, torch.device("cpu"), 1024, 65536)
    parts, tables = [], []
    for rule, exclude in RULES.items():
        rows: dict[str, dict[str, np.ndarray]] = {}
        for system in systems:
            scorer = make_scorer(system, inputs)
            _, topk = M.full_ranking_topk(scorer.score_chunk, len(users.targets), n_items, depth,
                                          exclude=users.histories if exclude else None)
            rows[system.label] = per_user(topk.numpy(), users)
        label = f"RecBole SASRec ({recbole['epochs']} epochs)" if recbole else "RecBole SASRec"
        if lists is not None:
            topk, missing = recbole_topk(lists[rule], prepared, users, depth)
            rows[label] = per_user(topk, users)
        else:
            rows[label] = {key: np.full(len(users.targets), np.nan) for key in SHOWN}
        kept_label = next(s.label for s in systems if s.label.endswith("auto keeps"))
        frame, paired = table_for_rule(rows, kept_label, args.bootstrap, args.seed)
        frame.insert(0, "exclude_seen", exclude)
        frame.insert(0, "dataset", ds.name)
        tables.append(frame)
        parts.append(markdown(frame, paired, f"{ds.name}: test, {protocol(exclude)}"))
    pd.concat(tables).to_parquet(run_dir / "quality.parquet", index=False)
    budget = (f"schedule `{args.schedule}` ({' '.join(schedule['finetune'] + schedule['pretrain']) or 'config epochs'}); "
              f"{len(users.targets):,} test users, {n_items:,} items; bootstrap {args.bootstrap}; "
              f"trained here: {', '.join(f'{k} {v:.0f} s' for k, v in seconds.items()) or 'reused'}; "
              f"finetune candidates {', '.join(ds.candidates)} (kept `{kept}` on validation)")
    if ds.extra:
        budget += "; overrides (--set): " + " ".join(f"`{o}`" for o in ds.extra)
    if recbole:
        budget += (f"; RecBole: {recbole['epochs']} epochs (at most {args.recbole_epochs or schedule['recbole_epochs']}), "
                   f"{recbole['wall_s']:.0f} s, {recbole['threads']} thread(s), no list for {missing:,} of our test users; "
                   f"its own evaluator {recbole['recbole_own.test_ndcg@10']:.4f} NDCG@10 (seen ranked)")
    else:
        budget += "; RecBole: not measured (no RECBOLE_PYTHON)"
    text = f"### {ds.name}\n\n{budget}.\n\n" + "\n\n".join(parts) + "\n"
    (run_dir / "quality.md").write_text(text, encoding="utf-8")
    return text


def dataset_overrides(items: list[str], known) -> dict[str, list[str]]:
    """--set DATASET:KEY=VALUE items -> {dataset: [KEY=VALUE, ...]} in the order given."""
    extra: dict[str, list[str]] = {}
    for item in items:
        name, sep, override = item.partition(":")
        if not sep or "=" not in override:
            raise ValueError(f"--set {item!r}: expected DATASET:KEY=VALUE")
        if name not in known:
            raise ValueError(f"--set {item!r}: unknown dataset {name!r} (one of {', '.join(known)})")
        extra.setdefault(name, []).append(override)
    return extra


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="ml-100k,office,kitchen_to_food")
    parser.add_argument("--schedule", choices=sorted(SCHEDULES), default="quick")
    parser.add_argument("--recbole-python", default=os.environ.get("RECBOLE_PYTHON"))
    parser.add_argument("--recbole-epochs", type=int, default=0, help="0: the schedule's")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retrain", action="store_true", help="train again even when the run folder has models")
    parser.add_argument("--out", default=str(REPO / "runs" / "bench_quality"))
    parser.add_argument("--no-source-control", dest="source_control", action="store_false",
                        help="skip the target-only pretraining row of datasets with a source (a second pretrain "
                             "and finetune)")
    parser.add_argument("--set", action="append", default=[], metavar="DATASET:KEY=VALUE",
                        help="a config override for one dataset's trec commands (repeatable)")
    args = parser.parse_args()
    args.recbole_python = args.recbole_python or None  # "" (an unset make variable) means none
    available = datasets(args.recbole_python)
    try:
        extra = dataset_overrides(args.set, available)
    except ValueError as err:
        parser.error(str(err))
    out = Path(args.out)
    for name in args.datasets.split(","):
        ds = available.get(name.strip(), f"unknown dataset (one of {', '.join(available)})")
        if isinstance(ds, str):
            print(f"### {name}\n\nskipped: {ds}\n")
            continue
        ds.extra = extra.get(ds.name, [])
        print(bench_dataset(ds, out, args), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
