"""`make study`: does transfer help on Kitchen → Food, and when? One table of test NDCG@10 / Recall@10.

Runs the pipeline on the shared data (skips with a message when it is absent): prepare, the Kitchen
teacher (pretrain-source), a distilled student, then fine-tuning variants on Food, each in its own
run folder under `<run_dir>/study/runs/<variant>/` (the prepared folder linked, not copied):
- `auto`: every strategy (full, adaptor, zero_shot, scratch, id_only), the best kept by validation;
  each candidate's checkpoint gives its own row, so one run yields six;
- `auto+ids`: the same with target item IDs added to the text item tower (full+ids, adaptor+ids,
  scratch+ids rows);
- `student`: the distilled student (from the Kitchen teacher) fine-tuned (full) on Food;
- `student (KD from full, on target)`: the same small architecture distilled on Food from the
  Food-tuned teacher (auto's `full` candidate): the classic teacher → student compression;
- few-shot: full and scratch (text only and +ids) on a seeded fraction of the Food training users
  (nested fractions), each with the full-data run's number of optimizer steps;
- `history=all_domains`: full and scratch reading each user's Kitchen items as context (the
  `shared_ndcg@10` column is the slice of test users who have Kitchen interactions).
Test numbers come from the evaluate stage's code (same users, histories and exclusion as `trec
evaluate`), with popularity and item-kNN as floors. Writes `<run_dir>/study/results.{md,parquet}` and
the few-shot table `<run_dir>/fewshot/results.parquet` that `trec evaluate` plots.

    python scripts/study_transfer.py                        # configs/kitchen_to_food.yaml, its epochs
    python scripts/study_transfer.py --epochs 20 --pretrain-epochs 40 device=cuda   # a longer study
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trecsys.artifacts import read_json, write_parquet, write_text  # noqa: E402
from trecsys.config import load_config, to_dict  # noqa: E402
from trecsys.errors import ArtifactError, TrecError  # noqa: E402
from trecsys.model.checkpoint import is_checkpoint, load_checkpoint  # noqa: E402
from trecsys.model.manifests import DistillManifest, FinetuneManifest  # noqa: E402
from trecsys.model.seqrec import MoEAdaptor  # noqa: E402
from trecsys.model.strategies import STRATEGIES  # noqa: E402
from trecsys.prepared.context import target_sequences  # noqa: E402
from trecsys.prepared.tables import load_prepared  # noqa: E402
from trecsys.rank import metrics as M  # noqa: E402
from trecsys.rank.rankers import Ranker, make_scorer  # noqa: E402
from trecsys.runtime import resolve_device  # noqa: E402
from trecsys.stage_table import DISTILL, FINETUNE, PREPARE, PRETRAIN  # noqa: E402
from trecsys.stages import distill, finetune_target, prepare, pretrain_source  # noqa: E402
from trecsys.stages.evaluate import eval_users, ranking_inputs  # noqa: E402
from trecsys.train.engine import epoch_batches  # noqa: E402
from trecsys.train.next_item import domain_windows  # noqa: E402

# Every strategy of the table; "+ids" rows for those that finetune.item_ids changes.
STRATEGY_NAMES = list(STRATEGIES)
WITH_IDS = [name for name, s in STRATEGIES.items() if s.takes_item_ids]
STUDENT_KD = "student_kd_target"  # the student distilled from the target-tuned teacher
COLUMNS = ["variant", "strategy", "init_from", "history", "train_fraction", "n_trainable", "valid_ndcg@10",
           "test_ndcg@10", "test_recall@10", "shared_ndcg@10", "train_s"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", default=str(REPO / "configs" / "kitchen_to_food.yaml"))
    parser.add_argument("--pretrain-epochs", type=int, help="teacher epochs on the source (default: the config's)")
    parser.add_argument("--distill-epochs", type=int, help="student epochs (default: the config's)")
    parser.add_argument("--epochs", type=int, help="fine-tuning epochs of every variant (default: the config's)")
    parser.add_argument("--kd-epochs", type=int, default=30,
                        help="epochs of the student distilled on the target from the target-tuned teacher")
    parser.add_argument("--max-steps", type=int, default=0, help="cap on optimizer steps of every training run (0 = none)")
    parser.add_argument("--fractions", default="0.1,0.25,0.5,1.0", help="few-shot train_fraction points")
    parser.add_argument("--retrain", action="store_true",
                        help="retrain the teacher, the student and every variant even when present")
    parser.add_argument("--skip", default="", help="variants to leave out, e.g. full+source_history,scratch+source_history")
    parser.add_argument("--only", default="",
                        help="run and tabulate only these variants, e.g. full@0.1,scratch@0.1 (the students "
                             "and their distillation only when named: student, " + STUDENT_KD + ")")
    parser.add_argument("--lever", action="append", default=[], metavar="LABEL:KEY=VALUE[,KEY=VALUE]",
                        help="a transfer variant beside full at every few-shot fraction, e.g. "
                             "whiten:finetune.adaptor_init=whiten gives full[whiten]@0.1 and full[whiten]+ids@0.1; "
                             "a key finetune.init_from=FOLDER fine-tunes another teacher; repeatable")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. device=cuda")
    args = parser.parse_args(argv)
    fractions = [float(f) for f in args.fractions.split(",")]

    # The study asks what the SOURCE data buy, at every few-shot fraction: a teacher that had read the
    # target's train split (pretrain.data: both) would have seen the users a few-shot point leaves out.
    overrides = [*args.overrides, "pretrain.data=source"]
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
    def caps(section: str, epochs: int | None) -> list[str]:
        """Overrides of a training section: the config's own epochs unless given."""
        return [f"{section}.train.max_steps={args.max_steps}"] + ([f"{section}.train.epochs={epochs}"] if epochs else [])

    cfg = lambda *extra: load_config(args.config, [*overrides, *extra])  # noqa: E731
    timings: dict[str, float] = {}

    def timed(name, fn, *a):
        t0 = time.perf_counter()
        fn(*a)
        timings[name] = round(time.perf_counter() - t0, 1)
        print(f"study_transfer: {name} took {timings[name]:.0f} s", flush=True)

    teacher = run_dir / PRETRAIN.folder
    if not args.retrain and is_checkpoint(teacher) and base.data.target in read_json(teacher / "manifest.json").get(
            "domains", []):
        raise ArtifactError(f"{teacher}: the run's teacher was trained on the target {base.data.target!r} too "
                            "(pretrain.data); the study needs a source-only one: pass --retrain, or another "
                            "run_dir=... override")
    if not (run_dir / PREPARE.folder / "manifest.json").is_file():
        timed("prepare", prepare.run, cfg())
    if args.retrain or not is_checkpoint(teacher):
        timed("pretrain", pretrain_source.run, cfg(*caps("pretrain", args.pretrain_epochs)))
    only = {n.strip() for n in args.only.split(",") if n.strip()}
    students = not only or "student" in only
    if students and (args.retrain or not is_checkpoint(run_dir / DISTILL.folder)):
        timed("distill", distill.run, cfg(*caps("distill", args.distill_epochs)))

    # Every variant says whether it adds target item IDs and which history it reads, whatever the
    # config's finetune.item_ids and finetune.history (target only, but for the source_history rows).
    # auto twice: text-only item towers, and with IDs added (transductive; id_only and zero_shot are
    # the same in both).
    variants = {"auto": dict(strategy="auto", candidates=STRATEGY_NAMES, item_ids=False),
                "auto+ids": dict(strategy="auto", candidates=STRATEGY_NAMES, item_ids=True),
                "student": dict(strategy="full", init_from=str(run_dir / DISTILL.folder), item_ids=False)}
    # Few-shot: full vs scratch, text only and with IDs, on a seeded fraction of the target's training
    # users (nested fractions), with as many optimizer steps as the full-data run (epochs / fraction)
    # and validation as often in steps: the config's epochs on 10% of the users are a tenth of the
    # steps, and would compare two under-trained models.
    epochs = args.epochs or base.finetune.train.epochs
    epoch_steps = full_data_epoch_steps(cfg(), run_dir)
    try:
        levers = dict(parse_lever(text) for text in args.lever)
    except ValueError as exc:
        print(f"error: --lever {exc}", file=sys.stderr)
        return 2
    lever_overrides = {}
    for fraction in [f for f in fractions if f < 1.0]:
        for strategy in ("full", "scratch", *(f"full[{label}]" for label in levers)):
            for item_ids in (False, True):
                name = f"{strategy}{'+ids' if item_ids else ''}@{fraction:g}"
                variants[name] = dict(
                    strategy=strategy.split("[")[0], train_fraction=fraction, item_ids=item_ids,
                    **{"train.epochs": math.ceil(epochs / fraction), "train.eval_every_steps": epoch_steps})
                if "[" in strategy:
                    lever_overrides[name] = levers[strategy[len("full["):-1]]
    for strategy in ("full", "scratch"):
        variants[f"{strategy}+source_history"] = dict(strategy=strategy, history="all_domains", item_ids=False)
    for option, names in (("--skip", args.skip.split(",")), ("--only", only - {"student", STUDENT_KD})):
        for name in [n.strip() for n in names if n.strip()]:
            if name not in variants:
                print(f"error: {option} {name}: not a variant; variants: {', '.join(variants)}", file=sys.stderr)
                return 2
            if option == "--skip":
                del variants[name]
    if only:
        variants = {name: v for name, v in variants.items() if name in only}
    for name, settings in variants.items():
        folder = study / "runs" / variant_folder(name)
        settings = {"init_from": str(run_dir / PRETRAIN.folder), "history": "target", **settings}
        extra = [f"run_dir={folder}", *caps("finetune", args.epochs)]
        extra += [f"finetune.{k}={v if not isinstance(v, list) else '[' + ','.join(v) + ']'}" for k, v in settings.items()]
        extra += lever_overrides.get(name, [])
        variant_cfg = cfg(*extra)
        if not args.retrain and trained_with(folder / FINETUNE.folder, variant_cfg, "finetune"):
            print(f"study_transfer: {name}: reusing {folder / FINETUNE.folder} (--retrain to train it again)")
            continue
        variant_run_dir(folder, run_dir)
        timed(name, finetune_target.run, variant_cfg)
        shutil.rmtree(folder / finetune_target.WORK, ignore_errors=True)  # max_steps leaves resumable state

    # The classic distillation: the target-tuned teacher (auto's `full` candidate) teaches the small
    # student on the target's own sequences, labels and soft targets both.
    kd_student = not only or STUDENT_KD in only
    if kd_student:
        folder = variant_run_dir(study / "runs" / STUDENT_KD, run_dir)
        teacher = study / "runs" / "auto" / FINETUNE.folder / "candidates" / "full"
        kd_cfg = cfg(f"run_dir={folder}", *caps("distill", args.kd_epochs), f"distill.teacher={teacher}",
                     "distill.data=target")
        if args.retrain or not trained_with(folder / DISTILL.folder, kd_cfg, "distill"):
            timed(STUDENT_KD, distill.run, kd_cfg)
            shutil.rmtree(folder / distill.WORK, ignore_errors=True)

    table, per_user, n_shared = evaluate_variants(base, run_dir, study, variants, kd_student)
    paired = paired_gains(per_user, seed=base.seed, n_samples=base.evaluate.bootstrap)
    teachers = {"teacher": run_dir / PRETRAIN.folder}
    teachers.update({label: Path(o.split("=", 1)[1]) for label, pairs in levers.items() for o in pairs
                     if o.startswith("finetune.init_from=")})
    write_tables(study, run_dir, table, n_shared, timings, args, paired, whitening_lines(run_dir, teachers))
    return 0


def whitening_lines(run_dir: Path, teachers: dict[str, Path]) -> str:
    """Where each teacher's moe whitening biases b_k ended up: their distance to the source and the
    target catalogues' mean text vectors (what `finetune.adaptor_init: whiten` moves them to)."""
    prepared = load_prepared(run_dir)
    text = torch.from_numpy(np.asarray(prepared.embeddings, dtype=np.float32))
    means = {}
    for role, names in (("source", prepared.source), ("target", [prepared.target])):
        rows = np.concatenate([np.arange(d.item_start, d.item_stop) for d in map(prepared.domain, names)])
        means[role] = text[rows].mean(0)
    lines = []
    for label, folder in teachers.items():
        if not is_checkpoint(folder):
            continue
        model, _ = load_checkpoint(folder)
        if not isinstance(model.adaptor, MoEAdaptor):
            continue
        bias = model.adaptor.bias.detach().float()
        dist = {role: float((bias - mean).norm(dim=1).mean()) for role, mean in means.items()}
        lines.append(f"- {label} ({folder}): mean |b_k| {float(bias.norm(dim=1).mean()):.3f}, mean |b_k − source "
                     f"mean| {dist['source']:.3f}, mean |b_k − target mean| {dist['target']:.3f} (|source mean − "
                     f"target mean| {float((means['source'] - means['target']).norm()):.3f})")
    if not lines:
        return ""
    return "Whitening biases of the moe adaptor, against the catalogues' mean text vectors:\n" + "\n".join(lines) + "\n"


def parse_lever(text: str) -> tuple[str, list[str]]:
    """`LABEL:KEY=VALUE[,KEY=VALUE]` -> (LABEL, ["KEY=VALUE", ...]): a --lever option."""
    label, _, overrides = text.partition(":")
    pairs = [o.strip() for o in overrides.split(",") if o.strip()]
    if not label.strip() or not pairs or not all("=" in o for o in pairs) or any(c in label for c in "[]@+/ "):
        raise ValueError(f"{text!r}: expected LABEL:KEY=VALUE[,KEY=VALUE], e.g. whiten:finetune.adaptor_init=whiten")
    return label.strip(), pairs


def variant_folder(name: str) -> str:
    """A variant's folder name under study/runs/: `full[whiten]+ids@0.1` -> `full_whiten_ids_frac0.1`."""
    return name.replace("@", "_frac").replace("+", "_").replace("[", "_").replace("]", "")


def trained_with(output: Path, cfg, section: str) -> bool:
    """Whether the stage folder `output` exists and was made with `cfg`'s `section` as it is now."""
    manifest = output / "manifest.json"
    return manifest.is_file() and read_json(manifest)["config"][section] == to_dict(cfg)[section]


def full_data_epoch_steps(cfg, run_dir: Path) -> int:
    """Optimizer steps in one fine-tuning epoch on all of the target's training users (the
    engine's own batching of them)."""
    prepared = load_prepared(run_dir)
    seqs = target_sequences(prepared, "target")
    users = seqs.training_users(1.0, cfg.seed)
    windows = domain_windows(seqs.domain, seqs.train.take(users), cfg.model.max_seq_len,
                             cfg.finetune.train, torch.device("cpu")).windows
    return max(1, len(epoch_batches([np.arange(len(windows))], cfg.finetune.train.batch_size, cfg.seed, 0)))


def variant_run_dir(folder: Path, run_dir: Path) -> Path:
    """A variant's own run folder, reading the run's prepared data through a link (never a copy)."""
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / PREPARE.folder
    if not link.exists():
        link.symlink_to(run_dir / PREPARE.folder, target_is_directory=True)
    return folder


def evaluate_variants(base, run_dir: Path, study: Path, variants: dict, kd_student: bool = True
                      ) -> tuple[pd.DataFrame, dict[str, np.ndarray], int]:
    """Test NDCG@10 / Recall@10 of every checkpoint, with the evaluate stage's users and scorers, each
    row's per-user NDCG@10 (the same users in the same order: paired comparisons), and how many of
    those users also have source interactions."""
    prepared = load_prepared(run_dir)
    users = eval_users(prepared, "test")
    n_items = prepared.domain(prepared.target, key="data.target").n_items
    device = resolve_device(base.device)
    # The slice user-profile transfer can help: test users who also have source interactions.
    shared = users.in_source if users.in_source is not None else np.zeros(len(users.targets), dtype=bool)
    rows, per_user_ndcg = [], {}

    inputs = ranking_inputs(prepared, users, device, base.evaluate.user_batch, base.evaluate.item_chunk)

    def test_metrics(system: Ranker, label: str) -> dict:
        scorer = make_scorer(system, inputs)
        _, top = M.full_ranking_topk(scorer.score_chunk, len(users.targets), n_items, 10, exclude=users.histories,
                                     user_batch=base.evaluate.user_batch, item_chunk=base.evaluate.item_chunk,
                                     device=scorer.device)
        per_user = M.ranking_metrics(top, users.targets, ks=(10,))
        per_user_ndcg[label] = np.asarray(per_user["ndcg@10"], dtype=np.float64)
        row = {f"test_{k}": float(np.nanmean(v)) for k, v in per_user.items() if k in ("ndcg@10", "recall@10")}
        row["shared_ndcg@10"] = float(np.nanmean(per_user["ndcg@10"][shared])) if shared.any() else float("nan")
        return row

    for name in variants:
        out = study / "runs" / variant_folder(name) / FINETUNE.folder
        manifest = FinetuneManifest.read(out)
        init = "student" if name == "student" else "teacher"
        kept = manifest.chosen
        checkpoints = {name: (out, kept)}
        if name.startswith("auto"):  # every candidate, and what auto kept
            suffix = name[len("auto"):]
            checkpoints = {s + (suffix if s in WITH_IDS else ""): (out / "candidates" / s, s)
                           for s in STRATEGY_NAMES if not suffix or s in WITH_IDS}
            checkpoints[f"{name} (kept {kept}{suffix if kept in WITH_IDS else ''})"] = (out, kept)
        for label, (folder, strategy) in checkpoints.items():
            cand = manifest.candidates[strategy]
            rows.append({"variant": label, "strategy": strategy,
                         "init_from": init if STRATEGIES[strategy].transfers else "none",
                         "history": manifest.history, "train_fraction": manifest.train_fraction,
                         "n_trainable": cand.n_trainable, "valid_ndcg@10": cand.valid["ndcg@10"],
                         **test_metrics(Ranker(label, folder), label), "train_s": cand.train_s})
    if kd_student:
        out = study / "runs" / STUDENT_KD / DISTILL.folder
        student = DistillManifest.read(out)
        label = "student (KD from full, on target)"
        rows.append({"variant": label, "strategy": "distill", "init_from": "full",
                     "history": "target", "train_fraction": 1.0, "n_trainable": student.n_parameters,
                     "valid_ndcg@10": student.metrics["ndcg@10"], **test_metrics(Ranker(STUDENT_KD, out), label),
                     "train_s": student.timings_s["train"]})
    for baseline in ("popularity", "item-knn"):
        rows.append({"variant": baseline, "strategy": baseline, "init_from": "none", "history": "target",
                     "train_fraction": 1.0, "n_trainable": 0, "valid_ndcg@10": float("nan"),
                     **test_metrics(Ranker(baseline), baseline), "train_s": 0.0})
    return pd.DataFrame(rows, columns=COLUMNS), per_user_ndcg, int(shared.sum())


def paired_gains(per_user: dict[str, np.ndarray], seed: int, n_samples: int = 1000) -> pd.DataFrame:
    """Every transfer row against the scratch row it is compared with (same fraction, same item
    tower: `full@0.1` and `full[whiten]@0.1` against `scratch@0.1`, `full+ids` against `scratch+ids`),
    and a lever's row against the plain transfer row (`full[whiten]@0.1` against `full@0.1`): the
    test users' mean NDCG@10 difference with its 95% paired-bootstrap CI (the same user resamples
    for both rows) and the relative gain."""
    rows = []
    for name in per_user:
        match = re.fullmatch(r"full(\[[^\]]+\])?(\+ids)?(@[0-9.]+)?", name)
        if not match:
            continue
        tail = f"{match.group(2) or ''}{match.group(3) or ''}"
        # A lever's row is also compared with the plain transfer row it changes.
        for baseline in [f"scratch{tail}"] + ([f"full{tail}"] if match.group(1) else []):
            if baseline not in per_user:
                continue
            delta = per_user[name] - per_user[baseline]
            if n_samples:
                lo, hi = (float(v[0]) for v in M.percentile_interval(M.bootstrap_means(delta, n_samples, seed)))
            else:
                lo = hi = float("nan")
            base = float(per_user[baseline].mean())
            rows.append({"transfer": name, "against": baseline, "transfer_ndcg@10": float(per_user[name].mean()),
                         "against_ndcg@10": base, "delta": float(delta.mean()), "ci_low": lo, "ci_high": hi,
                         "gain": float(delta.mean()) / base if base else float("nan"), "n_users": len(delta)})
    return pd.DataFrame(rows, columns=["transfer", "against", "transfer_ndcg@10", "against_ndcg@10", "delta",
                                       "ci_low", "ci_high", "gain", "n_users"])


def goals(table: pd.DataFrame) -> str:
    """The study's questions, answered from the table's test NDCG@10 (ratios, no thresholds applied)."""
    ndcg = dict(zip(table["variant"], table["test_ndcg@10"], strict=True))
    params = dict(zip(table["variant"], table["n_trainable"], strict=True))
    lines = ["What the table says (test NDCG@10):"]
    for name in [v for v in ndcg if v.startswith("auto")]:
        baselines = ["scratch", "scratch+ids", "id_only"] if "+ids" in name else ["scratch", "id_only"]
        lines.append(f"- {name}: {ndcg[name]:.4f}; " + ", ".join(f"{b} {ndcg[b]:.4f}" for b in baselines if b in ndcg))
    for fraction in sorted({v.split("@")[1] for v in ndcg if "@" in v}, key=float):
        pairs = [(f"full{ids}@{fraction}", f"scratch{ids}@{fraction}") for ids in ("", "+ids")]
        pairs = [(a, b) for a, b in pairs if a in ndcg and b in ndcg]
        if pairs:
            lines.append(f"- {float(fraction):.0%} of the target users: " + "; ".join(
                f"{a.split('@')[0]} {ndcg[a]:.4f} vs {b.split('@')[0]} {ndcg[b]:.4f} ({ndcg[a] / ndcg[b] - 1:+.0%})"
                for a, b in pairs))
    shared = dict(zip(table["variant"], table["shared_ndcg@10"], strict=True))
    for strategy in ("full", "scratch"):
        with_source, without = f"{strategy}+source_history", strategy
        if with_source in ndcg and without in ndcg:
            lines.append(f"- {strategy} reading the source history: {ndcg[with_source]:.4f} vs {ndcg[without]:.4f} "
                         f"(users also in the source: {shared[with_source]:.4f} vs {shared[without]:.4f})")
    for student in ("student", "student (KD from full, on target)"):
        if student in ndcg and "full" in ndcg:
            lines.append(f"- {student}: {ndcg[student] / ndcg['full']:.0%} of the fine-tuned teacher's (full) NDCG "
                         f"with {params[student] / params['full']:.0%} of its parameters")
    return "\n".join(lines) + "\n"


def paired_lines(paired: pd.DataFrame) -> str:
    """The paired comparisons as results.md lines."""
    if paired.empty:
        return ""
    lines = [f"Transfer − scratch (and a lever − plain transfer), paired over the {int(paired['n_users'].iloc[0]):,} "
             "test users (mean test NDCG@10 difference, 95% bootstrap CI):"]
    lines += [f"- {r['transfer']} {r['transfer_ndcg@10']:.4f} vs {r['against']} {r['against_ndcg@10']:.4f}: "
              f"{r['delta']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] ({r['gain']:+.1%})"
              for _, r in paired.iterrows()]
    return "\n".join(lines) + "\n"


def write_tables(study: Path, run_dir: Path, table: pd.DataFrame, n_shared: int, timings: dict, args,
                 paired: pd.DataFrame | None = None, notes: str = "") -> None:
    table = table.assign(exclude_seen=True)  # the rule of every test number here (test_metrics)
    write_parquet(pa.Table.from_pandas(table, preserve_index=False), study / "results.parquet")
    paired = paired if paired is not None else paired_gains({}, 0)
    write_parquet(pa.Table.from_pandas(paired.assign(exclude_seen=True), preserve_index=False),
                  study / "paired.parquet")
    shown = table.copy()
    for col in ("valid_ndcg@10", "test_ndcg@10", "test_recall@10", "shared_ndcg@10"):
        shown[col] = shown[col].map(lambda v: "" if pd.isna(v) else f"{v:.4f}")
    shown["n_trainable"] = shown["n_trainable"].map(lambda v: f"{v:,}")
    header = "| " + " | ".join(shown.columns) + " |\n|" + "---|" * len(shown.columns) + "\n"
    body = "".join("| " + " | ".join(str(v) for v in row) + " |\n" for row in shown.itertuples(index=False))
    def epochs(n: int | None) -> str:
        return f"{n} epochs" if n else "the config's epochs"

    only = {n.strip() for n in args.only.split(",") if n.strip()}
    trained = [f"teacher {epochs(args.pretrain_epochs)}" if "pretrain" in timings else "teacher reused from the run"]
    if not only or "student" in only:
        trained.append(f"student {epochs(args.distill_epochs)}" if "distill" in timings else "student reused from the run")
    if not only or STUDENT_KD in only:
        trained.append(f"student on the target {args.kd_epochs} epochs")
    caps = (f"{', '.join(trained)}, fine-tuning {epochs(args.epochs)} per variant (few-shot: ÷ fraction), "
            f"max_steps {args.max_steps or 'none'}")
    if args.overrides:
        caps += f"; overrides: {' '.join(args.overrides)}"
    if args.lever:
        caps += f"; levers: {' '.join(args.lever)}"
    times = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
    text = (f"# Transfer study: {run_dir.name}\n\nTest split of the target, full ranking, history items "
            f"excluded (the evaluate stage's code). Valid NDCG@10 is what `auto` chose by; shared_ndcg@10 is "
            f"test NDCG@10 on the {n_shared:,} users who also have source interactions.\n\n{header}{body}\n"
            f"{goals(table)}\n{paired_lines(paired)}\n{notes}\nBudget: {caps}.\n\nWall time (s): {times}; total {sum(timings.values()):.0f} s.\n")
    write_text(study / "results.md", text)
    # The few-shot curves: full and scratch, text only and +ids, at each fraction (auto's and
    # auto+ids's candidates at 1.0).
    fewshot = table[table["variant"].str.fullmatch(r"(full|scratch)(\+ids)?(@[0-9.]+)?")]
    curve = fewshot["variant"].str.split("@").str[0]
    long = pd.concat([pd.DataFrame({"train_fraction": fewshot["train_fraction"], "strategy": curve,
                                    "metric": metric, "k": 10, "value": fewshot[f"test_{metric}@10"],
                                    "exclude_seen": True})
                      for metric in ("ndcg", "recall")], ignore_index=True)
    write_parquet(pa.Table.from_pandas(long, preserve_index=False), run_dir / "fewshot" / "results.parquet")
    print(text)
    print(f"study_transfer: wrote {study / 'results.md'}, {study / 'results.parquet'} and "
          f"{run_dir / 'fewshot' / 'results.parquet'}")


if __name__ == "__main__":
    sys.exit(main())
