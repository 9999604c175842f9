"""`trec evaluate`: full ranking of the target catalogue by the run's latest model (or `--model`, or
the runs given with `--compare`) and two baselines, popularity and item-kNN, as a floor.

Writes `<run_dir>/eval/`: metrics.parquet (one row per run × slice × metric × K, with a bootstrap
95% CI), comparison.parquet (paired bootstrap against the first run), report.md and PNG plots.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from trecsys.artifacts import (
    MANIFEST,
    describe_file,
    run_lock,
    stage_output,
    verify_stage_folder,
    write_manifest,
    write_parquet,
)
from trecsys.config import ExperimentConfig, to_dict
from trecsys.console import log
from trecsys.errors import ArtifactError, ConfigError, DataError
from trecsys.model.checkpoint import (
    CHECKPOINT_STAGES,
    CONFIG,
    WEIGHTS,
    is_checkpoint,
    latest_checkpoint,
)
from trecsys.model.manifests import DistillManifest, FinetuneManifest
from trecsys.prepared.context import histories_for
from trecsys.prepared.identity import check_same_prepared, prepared_file_inputs
from trecsys.prepared.tables import PREPARED, Prepared, domain_split, load_prepared
from trecsys.rank import evaluation as E
from trecsys.rank import metrics as M
from trecsys.rank import report
from trecsys.rank.fusion import FUSION_FILE
from trecsys.rank.rankers import BASELINES, Ranker, RankingInputs, make_scorer
from trecsys.rank.scorers import item_counts, to_local
from trecsys.runtime import Threads, apply_threads, resolve_device
from trecsys.stage_table import DISTILL, EVALUATE, FINETUNE, PRETRAIN
from trecsys.track import tracking

EVAL = EVALUATE.folder


def run(cfg: ExperimentConfig, model: str | None = None, split: str = "test",
        compare: list[str] | None = None, verify: bool = False) -> None:
    if split not in ("valid", "test"):
        raise ConfigError(f"option --split: expected 'valid' or 'test', got {split!r}")
    threads = apply_threads(cfg.runtime.threads)
    run_dir = Path(cfg.run_dir)
    prepared = load_prepared(run_dir, verify=verify)
    systems = model_systems(run_dir, prepared, model, compare)
    if cfg.evaluate.task == "search":  # the run's model (or --model, --compare) beside the search floors
        from trecsys.stages.evaluate_search import FOLDER, evaluate_search

        for system in systems:
            verify_stage_folder(system.checkpoint, full_hash=verify)
        with run_lock(run_dir / FOLDER):
            evaluate_search(cfg, prepared, systems, split)
        return
    if not (model or compare) and cfg.evaluate.candidates and systems:
        systems += candidate_systems(systems[0]) + student_systems(run_dir)
    for system in systems:
        verify_stage_folder(system.checkpoint, full_hash=verify)
    with run_lock(run_dir / EVAL), tracking(cfg, EVALUATE.name) as tracker:
        metrics_df = evaluate(cfg, prepared, systems, split, threads)
        tracker.log_evaluation(metrics_df, split)
        tracker.log_artifacts(run_dir / EVAL)


# ---------------------------------------------------------------------------------------------
# Which models


def model_systems(run_dir: Path, prepared: Prepared, model: str | None, compare: list[str] | None
                  ) -> list[Ranker]:
    if compare:
        if model:
            raise ConfigError("options --model and --compare: give one or the other")
        return [_compare_system(entry, prepared) for entry in _split_entries(compare)]
    if model:
        folder = Path(model)
        if not is_checkpoint(folder):
            raise ArtifactError(f"--model {model}: no {WEIGHTS} and {CONFIG} in that folder")
        if (folder.parent / PREPARED).is_dir():
            check_same_prepared(folder.parent / PREPARED, prepared, f"--model {model}")
        return [Ranker(str(model), folder)]
    folder = latest_checkpoint(run_dir)
    if folder is None:
        return []  # baselines only: nothing is trained yet
    return [Ranker(run_model_label(folder), folder)]


def run_model_label(folder: Path) -> str:
    """`pretrain (zero-shot)`, `distill`, or `finetune/<strategy> (kept)` when finetune-target
    recorded which candidate it kept (its other candidates are `finetune/<strategy>`)."""
    if folder.name == PRETRAIN.folder:
        return f"{PRETRAIN.folder} (zero-shot)"
    chosen = kept_strategy(folder) if folder.name == FINETUNE.folder else None
    return f"{folder.name}/{chosen} (kept)" if chosen else folder.name


def kept_strategy(folder: Path) -> str | None:
    """The strategy finetune-target kept in `folder`, as its manifest records it (None without one)."""
    return FinetuneManifest.read(folder).chosen if (folder / MANIFEST).is_file() else None


def candidate_systems(kept: Ranker) -> list[Ranker]:
    """The `auto` candidates that finetune-target did not keep (chosen on validation), so that the
    test table shows transfer beside scratch and id_only."""
    if not (kept.checkpoint / MANIFEST).is_file() or not (kept.checkpoint / "candidates").is_dir():
        return []
    chosen = kept_strategy(kept.checkpoint)
    return [Ranker(f"{kept.checkpoint.name}/{folder.name}", folder)
            for folder in sorted((kept.checkpoint / "candidates").iterdir())
            if folder.name != chosen and is_checkpoint(folder)]


def student_systems(run_dir: Path) -> list[Ranker]:
    """The run's distilled student when its teacher is the run's fine-tuned model (`distill.teacher:
    finetune`): the compressed model beside the one it compresses."""
    student, teacher = Path(run_dir) / DISTILL.folder, Path(run_dir) / FINETUNE.folder
    if not (is_checkpoint(student) and is_checkpoint(teacher) and (student / MANIFEST).is_file()):
        return []
    if Path(DistillManifest.read(student).teacher).resolve() != teacher.resolve():
        return []
    return [Ranker(f"{DISTILL.folder} (student of {FINETUNE.folder})", student)]


def _split_entries(entries: list[str]) -> list[str]:
    return [part.strip() for entry in entries for part in str(entry).split(",") if part.strip()]


def _compare_system(entry: str, prepared: Prepared) -> Ranker:
    """A run folder (its latest model) or a stage/checkpoint folder, on the same prepared data as ours."""
    path = Path(entry)
    if is_checkpoint(path):
        folder, other_run = path, path.parent
    elif (path / PREPARED).is_dir() or any((path / s).is_dir() for s in CHECKPOINT_STAGES):
        folder, other_run = latest_checkpoint(path), path
    else:
        raise ArtifactError(f"--compare {entry}: not a run folder or a checkpoint folder ({WEIGHTS} + {CONFIG})")
    if (other_run / PREPARED).is_dir():
        check_same_prepared(other_run / PREPARED, prepared, f"--compare {entry}")
    if folder is None:
        raise ArtifactError(f"--compare {entry}: the run has no model in {', '.join(CHECKPOINT_STAGES)}/: train one first")
    label = entry if folder == path else f"{entry.rstrip('/')}/{folder.name}"
    return Ranker(label, folder)


# ---------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class EvalUsers:
    """The target domain's users that have held-out items in the split, catalogue-local."""

    split: str
    user_idx: np.ndarray
    histories_global: list[np.ndarray]
    histories: list[np.ndarray]
    targets: list[np.ndarray]
    train_lengths: np.ndarray
    in_source: np.ndarray | None  # None when the prepared data has no source domain
    train_sequences: list[np.ndarray]  # every target user's train items, for the baselines


def eval_users(prepared: Prepared, split: str) -> EvalUsers:
    target = prepared.target
    ds = domain_split(prepared, target)
    domain = ds.domain
    targets = ds.targets(split)
    has_target = np.fromiter((len(t) > 0 for t in targets), dtype=bool, count=len(targets))
    if not has_target.any():
        raise DataError(
            f"{prepared.folder / 'interactions.parquet'}: the {split} split of target domain {target!r} has "
            "no held-out interactions: evaluate another --split or check data.split"
        )
    keep = np.flatnonzero(has_target)
    all_histories = ds.history(split)
    histories_global = [all_histories[u] for u in keep]
    source_users = prepared.users_of(prepared.source)
    return EvalUsers(
        split=split,
        user_idx=ds.user_idx[keep],
        histories_global=histories_global,
        histories=to_local(histories_global, domain),
        targets=to_local([targets[u] for u in keep], domain),
        train_lengths=np.array([len(ds.train[u]) for u in keep]),
        in_source=np.isin(ds.user_idx[keep], source_users) if prepared.source else None,
        train_sequences=to_local(ds.train, domain),
    )


def evaluate(cfg: ExperimentConfig, prepared: Prepared, systems: list[Ranker], split: str,
             threads: Threads) -> pd.DataFrame:
    ev = cfg.evaluate
    domain = prepared.domain(prepared.target, key="data.target")
    n_items = domain.n_items
    ks = M.check_ks(ev.ks, n_items)
    users = eval_users(prepared, split)
    counts = item_counts(users.train_sequences, n_items)
    slices = E.build_slices(users.targets, users.train_lengths, users.in_source, counts,
                            ev.history_buckets, ev.cold_item_interactions)
    item_text = prepared.embeddings[domain.item_start:domain.item_stop]
    percentile = M.popularity_percentile(counts)

    inputs = ranking_inputs(prepared, users, resolve_device(cfg.device), ev.user_batch, ev.item_chunk)
    labels, per_user, topks, timings = [], [], [], {}
    for system in [*systems, *(Ranker(name) for name in BASELINES)]:
        t0 = time.perf_counter()
        scorer = make_scorer(system, inputs)
        _, topk = M.full_ranking_topk(
            scorer.score_chunk, len(users.targets), n_items, max(ks),
            exclude=users.histories if ev.exclude_seen else None,
            user_batch=ev.user_batch, item_chunk=ev.item_chunk, device=scorer.device,
            score_into=getattr(scorer, "score_into", None),
        )
        topk = topk.numpy()
        labels.append(_unique_label(system.label, labels))
        per_user.append(E.per_user_metrics(topk, slices, ks, item_text, percentile))
        topks.append(topk)
        timings[labels[-1]] = round(time.perf_counter() - t0, 3)
        del scorer

    metric_rows, comparison_rows = E.summarise(labels, per_user, topks, ks, n_items, split, ev.bootstrap, cfg.seed)
    metrics_df = pd.DataFrame(metric_rows, columns=list(E.METRICS_COLUMNS))
    comparison_df = pd.DataFrame(comparison_rows, columns=list(E.COMPARISON_COLUMNS))
    for frame in (metrics_df, comparison_df):  # every row says which rule made it
        frame.insert(frame.columns.get_loc("split") + 1, "exclude_seen", ev.exclude_seen)
    context = report.EvalContext(run_dir=str(cfg.run_dir), target=prepared.target, split=split, n_users=len(users.targets),
                   n_items=n_items, ks=ks, exclude_seen=ev.exclude_seen, bootstrap=ev.bootstrap, seed=cfg.seed,
                   cold_item_interactions=ev.cold_item_interactions, history_buckets=ev.history_buckets,
                   models={s.label: str(s.checkpoint) for s in systems}, seconds=timings)
    run_dirs = [Path(cfg.run_dir), *{s.checkpoint.parent for s in systems if s.checkpoint is not None}]
    final = Path(cfg.run_dir) / EVAL
    with stage_output(final) as out:
        meta = {"split": split, "target": prepared.target, "exclude_seen": str(ev.exclude_seen).lower()}
        write_parquet(pa.Table.from_pandas(metrics_df, preserve_index=False), out / "metrics.parquet", meta)
        write_parquet(pa.Table.from_pandas(comparison_df, preserve_index=False), out / "comparison.parquet", meta)
        plots = report.write_plots(out, metrics_df, run_dirs, ks, ev.exclude_seen)
        report.write_report(out / "report.md", metrics_df, comparison_df, context, plots)
        inputs = prepared_file_inputs(prepared)
        inputs += [describe_file(s.checkpoint / WEIGHTS) for s in systems if s.checkpoint is not None]
        inputs += [describe_file(s.checkpoint / FUSION_FILE) for s in systems
                   if s.checkpoint is not None and (s.checkpoint / FUSION_FILE).is_file()]
        write_manifest(out, EVALUATE.name, to_dict(cfg), inputs, {"context": context.to_json()})
    print(report.terminal_table(metrics_df, context))
    log(f"wrote {final}: metrics.parquet, comparison.parquet, report.md, {len(plots)} plots; {threads.line()}")
    return metrics_df


def ranking_inputs(prepared: Prepared, users: EvalUsers, device: torch.device, user_batch: int,
                   item_chunk: int) -> RankingInputs:
    """The evaluated users as every scorer reads them: baselines count the target's train split."""
    return RankingInputs(
        prepared, prepared.domain(prepared.target, key="data.target"), users.histories_global,
        counted=lambda: users.train_sequences,
        model_histories=lambda history: histories_for(prepared, history, users.split, users.user_idx),
        item_text=prepared.embeddings, device=device, user_batch=user_batch, item_chunk=item_chunk,
    )


def _unique_label(label: str, taken: list[str]) -> str:
    candidate, n = label, 2
    while candidate in taken:
        candidate, n = f"{label} #{n}", n + 1
    return candidate
