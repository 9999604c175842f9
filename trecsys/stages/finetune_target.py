"""`trec finetune-target`: adapt a checkpoint (`finetune.init_from`) to the target domain with one
`finetune.strategy`, or with `auto` try several and keep the best by VALIDATION NDCG@10, so that
transfer never does worse on validation than training from scratch (when scratch is a candidate).

Writes `<run_dir>/finetune/`: the chosen model, its train_log.jsonl, config.yaml, and a manifest
with every candidate's validation scores and trainable parameter counts; with `auto`, each
candidate's model is kept under `candidates/<strategy>/`. The test split is never read here.
Resumable state lives in `<run_dir>/.finetune.work/<strategy>/` until the run ends.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from trecsys.artifacts import (
    describe_file,
    read_json,
    run_lock,
    stage_output,
    write_json,
    write_text,
)
from trecsys.config import ExperimentConfig, to_dict
from trecsys.console import log
from trecsys.errors import ArtifactError, ConfigError
from trecsys.model.checkpoint import (
    PREPARED_KEY,
    WEIGHTS,
    checkpoint_files,
    checkpoint_folder,
    is_checkpoint,
    load_checkpoint,
    load_named,
    save_checkpoint,
    trained_on,
    weights_sha256,
)
from trecsys.model.manifests import CandidateResult, FinetuneManifest
from trecsys.model.seqrec import SeqRecModel, describe_parameters
from trecsys.model.strategies import Candidate, build_candidate, l2sp_penalty, transfers_any
from trecsys.prepared.context import TargetSequences, target_sequences
from trecsys.prepared.identity import prepared_input
from trecsys.prepared.tables import Prepared, load_prepared, seen_items
from trecsys.rank.fusion import FUSION_FILE, choose_weights
from trecsys.rank.scorers import ModelScorer, to_local
from trecsys.rank.validation import EvalCase, make_ranker
from trecsys.runtime import Threads, apply_threads
from trecsys.stage_table import FINETUNE
from trecsys.stages.common import MONITOR, check_prepared, check_target, metrics_line, write_stage_folder
from trecsys.track import tracking
from trecsys.train.engine import LOG, STATE, Dist, distributed, fit
from trecsys.train.next_item import ce_loss_fn, domain_windows, window_train_data

STAGE, OUTPUT = FINETUNE.name, FINETUNE.folder
WORK = ".finetune.work"
TRAIN_KEY = "finetune.train"
FUSION = "fusion"  # the candidate that fuses the best trained one with item-kNN and popularity
RESULT = "result.json"  # a finished candidate's summary in its work folder (a resume skips it)
NOT_TRAINED = "not_trained"  # `stopped` of a strategy that does not train (zero_shot): only validated
FUSED = "fused"  # `stopped` of the fusion candidate: its network is another candidate's, not trained again


def run(cfg: ExperimentConfig, resume: bool = False, verify: bool = False) -> None:
    threads = apply_threads(cfg.runtime.threads)
    with distributed(cfg.device) as dist:
        _run(cfg, resume, dist, verify, threads)


def _run(cfg: ExperimentConfig, resume: bool, dist: Dist, verify: bool, threads: Threads) -> None:
    run_dir = Path(cfg.run_dir)
    out, work = run_dir / OUTPUT, run_dir / WORK
    ft = cfg.finetune
    with run_lock(out) if dist.is_main else contextlib.nullcontext(), \
            tracking(cfg, STAGE, dist.is_main, fresh=not resume) as tracker:
        prepared = load_prepared(run_dir, verify=verify)
        check_prepared(prepared, cfg)
        domain = check_target(prepared, cfg)
        strategies = list(ft.candidates) if ft.strategy == "auto" else [ft.strategy]
        trained = [s for s in strategies if s != FUSION]  # fusion builds on them, after them
        init, init_dir = init_model(cfg, prepared, trained, verify)
        base = init.config if init is not None else cfg.model
        seqs = target_sequences(prepared, ft.history)
        train_users = seqs.training_users(ft.train_fraction, cfg.seed)
        validate = make_ranker([EvalCase(domain.name, domain, seqs.histories["valid"], seqs.targets["valid"])],
                               prepared.embeddings, ft.train.eval_user_batch, dist.device, key="data.target")
        context = {"stage": STAGE, "target": domain.name, "history": ft.history,
                   **trained_on(prepared), "init_from": str(init_dir) if init_dir else None}
        if dist.is_main:
            if not resume and work.exists():
                shutil.rmtree(work)
            source = f"from {init_dir}" if init_dir else f"architecture from config key 'model' ({ft.init_from!r} not found)"
            log(f"{STAGE}: {', '.join(strategies)} on {domain.name} ({len(train_users):,} of "
                  f"{int((seqs.n_target_train > 0).sum()):,} training users, history {ft.history}), {source}; {threads.line()}")
        dist.barrier()
        # An ID table only for the items in the training sequences (the target's, and with
        # history all_domains the source items read as context): other items are ranked by text.
        id_items = seen_items(seqs.train.take(train_users))
        results = []
        for strategy in trained:
            text = torch.from_numpy(prepared.embeddings)
            candidate = build_candidate(strategy, init, base, text, prepared.n_items, ft.item_ids, cfg.seed, id_items,
                                        ft.adaptor_init, text[domain.item_start:domain.item_stop])
            results.append(run_candidate(candidate, cfg, seqs, train_users, validate, work / strategy,
                                         {**context, "strategy": strategy}, init_dir, resume, dist,
                                         on_log=lambda record, s=strategy: tracker.log_training(record, s)))
        if FUSION in strategies and dist.is_main:
            results.append(run_fusion(results, cfg, prepared, seqs, work, dist.device))
            results.sort(key=lambda r: strategies.index(r.strategy))  # a tie keeps the earlier candidate
        if dist.is_main:
            chosen = choose(results)
            write_output(out, work, cfg, prepared, results, chosen, init_dir, seqs, train_users)
            tracker.log_artifacts(out)
            if all(r.stopped != "max_steps" for r in results):
                shutil.rmtree(work, ignore_errors=True)
            print(summary_table(results, chosen, domain.name))
            log(f"{STAGE}: kept {chosen.strategy} (valid {metrics_line(chosen.valid)}); trainable "
                  f"{describe_parameters(chosen.trainable_by_part)}; wrote {out}")
        dist.barrier()


def init_model(cfg: ExperimentConfig, prepared: Prepared, strategies: list[str], verify: bool = False
               ) -> tuple[SeqRecModel | None, Path | None]:
    """The init_from model; scratch and id_only alone may go without (the `model` section is used)."""
    run_dir, value = Path(cfg.run_dir), cfg.finetune.init_from
    if not transfers_any(strategies) and not is_checkpoint(checkpoint_folder(value, run_dir)):
        return None, None
    model, _, folder = load_named(value, run_dir, prepared, "finetune.init_from", verify)
    return model, folder


def run_candidate(candidate: Candidate, cfg: ExperimentConfig, seqs: TargetSequences, train_users: np.ndarray,
                  validate, work: Path, extra: dict, init_dir: Path | None, resume: bool,
                  dist: Dist, on_log=None) -> CandidateResult:
    """Train (or, for a strategy that does not train, only validate) one candidate; its best model
    lands in `work/best/`."""
    ft, model, spec = cfg.finetune, candidate.model, candidate.strategy
    done = work / RESULT
    if resume and done.is_file():
        try:
            return CandidateResult(**read_json(done))
        except TypeError:
            raise ArtifactError(f"{done}: not a finished candidate's record; run without --resume to start "
                                "over") from None
    save = lambda m, folder: save_checkpoint(m, folder, extra)  # noqa: E731
    if not spec.trains:
        t0 = time.perf_counter()
        metrics = None
        if dist.is_main:
            model.to(dist.device).eval()
            with torch.no_grad():
                metrics = {k: float(v) for k, v in validate(model).items()}
            with stage_output(work / "best") as folder:
                save(model, folder)
            write_text(work / LOG, json.dumps({"step": 0, "valid": metrics, "best_step": 0}) + "\n")
        result = CandidateResult(spec.name, metrics or {}, 0, 0, NOT_TRAINED, model.num_parameters(), 0,
                                 round(time.perf_counter() - t0, 3), model.parameter_counts(trainable_only=True))
    else:
        parts = [domain_windows(seqs.domain, seqs.train.take(train_users), model.config.max_seq_len,
                                ft.train, dist.device)]
        if len(parts[0].windows) == 0:
            raise ConfigError(
                f"config key 'finetune.train_fraction': the {len(train_users)} chosen target users give no "
                f"training pair (an item after another); raise it (now {ft.train_fraction})"
            )
        penalty = None
        if ft.l2sp > 0 and candidate.anchors:
            penalty = lambda m: l2sp_penalty(m, candidate.anchors, ft.l2sp)  # noqa: E731
        fingerprint = {
            "model": to_dict(model.config), "strategy": spec.name, "history": ft.history,
            "train_fraction": ft.train_fraction, "item_ids": ft.item_ids, "l2sp": ft.l2sp,
            "adaptor_init": ft.adaptor_init if spec.transfers else None,
            "prepared": extra[PREPARED_KEY],
            "init": weights_sha256(init_dir) if init_dir and spec.transfers else None,
        }
        fitted = fit(model, window_train_data(parts), ce_loss_fn(parts, ft.train, penalty), validate, ft.train,
                     work, seed=cfg.seed, dist=dist, save_model=save, monitor=MONITOR, config_key=TRAIN_KEY,
                     fingerprint=fingerprint, resume=resume and (work / "last" / STATE).is_file(),
                     resume_hint=f"run `trec {STAGE}` again with --resume to continue",
                     lr_scales=candidate.lr_scales(ft.new_params_lr_scale), label=spec.name,
                     on_log=on_log)
        result = CandidateResult(spec.name, fitted.best_metrics or {}, fitted.best_step, fitted.steps,
                                 fitted.stopped, model.num_parameters(), candidate.n_trainable(),
                                 round(fitted.elapsed_s, 3), model.parameter_counts(trainable_only=True))
    if dist.is_main and result.stopped != "max_steps":  # one cut short by max_steps resumes from last/
        write_json(done, asdict(result))
    return result


def run_fusion(results: list[CandidateResult], cfg: ExperimentConfig, prepared: Prepared,
               seqs: TargetSequences, work: Path, device: torch.device) -> CandidateResult:
    """The `fusion` candidate: the best trained candidate's scores + item-kNN + popularity (the
    baselines `trec evaluate` prints, from every target user's train split), weights chosen on
    validation (trecsys/rank/fusion.py). Its folder is the base model's plus fusion.json."""
    t0 = time.perf_counter()
    base = choose(results)
    base_dir = work / base.strategy / "best"
    model, _ = load_checkpoint(base_dir, map_location=device)
    domain = seqs.domain
    histories = seqs.histories["valid"]
    scorer = ModelScorer(model, histories, domain, prepared.embeddings, device,
                         user_batch=cfg.finetune.train.eval_user_batch)
    weights, grid = choose_weights(scorer, to_local(seqs.train, domain), to_local(histories, domain),
                                   to_local(seqs.targets["valid"], domain), domain.n_items)
    best = next(row for row in grid if all(row[c] == weights[c] for c in weights))
    valid = {k: v for k, v in best.items() if "@" in k}
    if best is grid[0]:
        # The model alone ranks exactly as its base: it gets the base's own numbers, so that `auto`'s tie
        # rule keeps the base. Its grid row averages the same users in another order, and a last-bit
        # difference (0.13523778104878150 vs ...148 on ml-100k) had `auto` keep a "fusion" of nothing.
        valid = dict(base.valid)
    with stage_output(work / FUSION / "best") as folder:
        for name, source in checkpoint_files(base_dir).items():
            shutil.copy2(source, folder / name)
        write_json(folder / FUSION_FILE, {"weights": weights, "base": base.strategy,
                                          "chosen_by": f"valid {MONITOR}", "grid": grid})
    shutil.copy2(work / base.strategy / LOG, work / FUSION / LOG)
    log(f"{STAGE}: fusion of {base.strategy} + item-knn + popularity, weights {weights} "
        f"(valid {metrics_line(valid)}; {base.strategy} alone {base.valid.get(MONITOR, float('nan')):.4f})")
    return CandidateResult(FUSION, valid, base.best_step, base.steps, FUSED, base.n_parameters, 0,
                           round(time.perf_counter() - t0, 3))


def choose(results: list[CandidateResult]) -> CandidateResult:
    """The best validation NDCG@10; a tie keeps the earlier candidate (candidates order)."""
    best = results[0]
    for result in results[1:]:
        if result.valid[MONITOR] > best.valid[MONITOR]:
            best = result
    return best


def write_output(out: Path, work: Path, cfg: ExperimentConfig, prepared: Prepared, results: list[CandidateResult],
                 chosen: CandidateResult, init_dir: Path | None, seqs: TargetSequences,
                 train_users: np.ndarray) -> None:
    files = {**model_files(work / chosen.strategy / "best"), LOG: work / chosen.strategy / LOG}
    if len(results) > 1:
        for r in results:
            files.update(model_files(work / r.strategy / "best", f"candidates/{r.strategy}/"))
            files[f"candidates/{r.strategy}/{LOG}"] = work / r.strategy / LOG
    inputs = [prepared_input(prepared, Path(cfg.run_dir))]
    if init_dir is not None:
        inputs.append(describe_file(init_dir / WEIGHTS))
    ft = cfg.finetune
    write_stage_folder(out, files, cfg, STAGE, inputs, extra=FinetuneManifest(
        seed=cfg.seed, target=seqs.domain.name, strategy=ft.strategy, chosen=chosen.strategy,
        chosen_by=f"valid {MONITOR}", metrics=chosen.valid, candidates={r.strategy: r for r in results},
        init_from=str(init_dir) if init_dir else None, history=ft.history, train_fraction=ft.train_fraction,
        n_train_users=len(train_users), n_parameters=chosen.n_parameters, n_trainable=chosen.n_trainable,
        timings_s={"train": round(sum(r.train_s for r in results), 3)},
        n_trainable_by_part=chosen.trainable_by_part,
    ).to_json())


def model_files(folder: Path, prefix: str = "") -> dict[str, Path]:
    """A candidate's checkpoint files, with fusion.json when it is the fused model."""
    files = checkpoint_files(folder, prefix)
    if (folder / FUSION_FILE).is_file():
        files[f"{prefix}{FUSION_FILE}"] = folder / FUSION_FILE
    return files


def summary_table(results: list[CandidateResult], chosen: CandidateResult, target: str) -> str:
    lines = [f"{STAGE}: validation on {target} (chosen by valid {MONITOR}; test is never read here)",
             f"  {'strategy':<10} {'ndcg@10':>8} {'recall@10':>9} {'trainable':>10} {'steps':>6} {'train_s':>8}"]
    for r in results:
        mark = " *" if r is chosen else ""
        lines.append(f"  {r.strategy:<10} {r.valid.get('ndcg@10', float('nan')):>8.4f} "
                     f"{r.valid.get('recall@10', float('nan')):>9.4f} {r.n_trainable:>10,} {r.steps:>6} "
                     f"{r.train_s:>8.1f}{mark}")
    return "\n".join(lines)

