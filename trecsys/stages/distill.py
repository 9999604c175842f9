"""`trec distill`: train a smaller student (`distill.student`) from a teacher checkpoint's soft targets.

Loss per labelled position = (1 − kd_ratio)·CE(label) + kd_ratio·T²·KL(softmax(teacher/T) ‖
softmax(student/T)) over the batch's domain catalogue (chunked, `losses.chunked_kd_loss`), plus
`hidden_weight`·MSE(project(student state), teacher state) when asked. `distill.data` picks whose
train sequences: the source domains, the target (every position of a target sequence has a label in
our data, so CE applies too; kd_ratio 1 treats them as unlabelled), or both. Writes
`<run_dir>/distill/` with the best student by validation NDCG@10 on those domains, and reports
teacher and student side by side: parameters, checkpoint size, scoring speed, validation quality.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from trecsys.artifacts import describe_file, run_lock
from trecsys.config import ExperimentConfig, to_dict
from trecsys.console import log
from trecsys.errors import ConfigError
from trecsys.model.checkpoint import (
    WEIGHTS,
    checkpoint_files,
    load_checkpoint,
    load_named,
    load_weights,
    save_checkpoint,
    save_weights,
    trained_on,
)
from trecsys.model.manifests import DistillManifest
from trecsys.model.seqrec import SeqRecModel, describe_parameters
from trecsys.prepared.identity import prepared_fingerprint, prepared_input
from trecsys.prepared.tables import domain_split, load_prepared, seen_items
from trecsys.rank.validation import EvalCase, make_ranker, n_ranked_users
from trecsys.runtime import Threads, apply_threads, seed_everything
from trecsys.stage_table import DISTILL
from trecsys.stages.common import MONITOR, check_prepared, check_target, metrics_line, write_stage_folder
from trecsys.track import tracking
from trecsys.train.engine import LOG, Dist, distributed, fit
from trecsys.train.losses import chunked_kd_loss
from trecsys.train.next_item import batch_inputs, domain_windows, next_item_loss, window_train_data

STAGE, OUTPUT = DISTILL.name, DISTILL.folder
WORK = ".distill.work"
TRAIN_KEY = "distill.train"
PROJECTION = "projection.safetensors"  # the hidden-state projection, kept in `last/` for --resume


class Distillation(nn.Module):
    """What trains: the student, and the projection of its states to the teacher's width for hidden-
    state matching. The teacher stays outside (never trained, never in the optimizer or DDP)."""

    def __init__(self, student: SeqRecModel, teacher_dim: int, hidden: bool):
        super().__init__()
        self.student = student
        self.project = nn.Linear(student.config.d_model, teacher_dim) if hidden else None


def save_distillation(module: Distillation, folder: Path, extra: dict) -> None:
    """The student as an ordinary checkpoint (what later stages load), the projection beside it."""
    save_checkpoint(module.student, folder, extra)
    if module.project is not None:
        save_weights(module.project, folder, PROJECTION)


def load_distillation(module: Distillation, folder: Path) -> None:
    load_weights(module.student, folder)
    if module.project is not None:
        load_weights(module.project, folder, PROJECTION)


def run(cfg: ExperimentConfig, resume: bool = False, verify: bool = False) -> None:
    threads = apply_threads(cfg.runtime.threads)
    with distributed(cfg.device) as dist:
        _run(cfg, resume, dist, verify, threads)


def _run(cfg: ExperimentConfig, resume: bool, dist: Dist, verify: bool, threads: Threads) -> None:
    run_dir = Path(cfg.run_dir)
    out, work = run_dir / OUTPUT, run_dir / WORK
    dc = cfg.distill
    with run_lock(out) if dist.is_main else contextlib.nullcontext(), \
            tracking(cfg, STAGE, dist.is_main, fresh=not resume) as tracker:
        prepared = load_prepared(run_dir, verify=verify)
        sources = check_prepared(prepared, cfg)
        target = check_target(prepared, cfg).name
        teacher, _, teacher_dir = load_named(dc.teacher, run_dir, prepared, "distill.teacher", verify)
        check_student(cfg, teacher)
        names = {"source": sources, "target": [target], "both": [*sources, target]}[dc.data]
        if not names:
            raise ConfigError("config key 'distill.data': 'source' but the prepared data has no source domain")
        splits = [domain_split(prepared, name) for name in names]
        parts = [domain_windows(s.domain, s.train, dc.student.max_seq_len, dc.train, dist.device) for s in splits]
        parts = [p for p in parts if len(p.windows)]
        if not parts:
            raise ConfigError(f"config key 'distill.data': the {dc.data} domains have no user with 2+ training items")
        cases = [EvalCase(s.domain.name, s.domain, s.train, s.valid) for s in splits]
        rank = make_ranker(cases, prepared.embeddings, dc.train.eval_user_batch, dist.device, key="distill.data")

        seed_everything(cfg.seed)
        student = SeqRecModel(dc.student, prepared.embeddings.shape[1], prepared.n_items,
                              id_items=seen_items([seen_items(s.train) for s in splits]))
        student.set_item_text(torch.from_numpy(prepared.embeddings))
        if student.seen_bias is not None and teacher.seen_bias is not None:
            # The KL matches the networks' scores; the seen offset is added after them, so the
            # student starts from the teacher's (and the label loss, if any, trains it on).
            with torch.no_grad():
                student.seen_bias.copy_(teacher.seen_bias)
        if student.seen_bias is not None and dc.kd_ratio >= 1.0:
            # No label loss: nothing trains the offset, and DDP wants every trained parameter in the loss.
            student.seen_bias.requires_grad_(False)
        module = Distillation(student, teacher.config.d_model, dc.hidden_weight > 0)
        teacher.to(dist.device).eval().requires_grad_(False)
        prepared_sha = prepared_fingerprint(prepared)
        extra = {"stage": STAGE, "teacher": str(teacher_dir), "data": names, "source": sources,
                 **trained_on(prepared)}
        if dist.is_main:
            log(f"{STAGE}: teacher {teacher.num_parameters():,} parameters ({teacher_dir}) -> student "
                  f"{describe_parameters(student.parameter_counts())}; {sum(len(p.windows) for p in parts):,} windows from "
                  f"{', '.join(names)}; kd_ratio {dc.kd_ratio}, T {dc.temperature}; {threads.line()}")
        result = fit(
            module, window_train_data(parts), distill_loss_fn(parts, teacher, cfg), lambda m: rank(m.student),
            dc.train, work, seed=cfg.seed, dist=dist, save_model=lambda m, folder: save_distillation(m, folder, extra),
            load_model=load_distillation, monitor=MONITOR, config_key=TRAIN_KEY,
            fingerprint={"student": to_dict(dc.student), "teacher": str(teacher_dir), "data": names,
                         "kd_ratio": dc.kd_ratio, "temperature": dc.temperature,
                         "hidden_weight": dc.hidden_weight, "prepared": prepared_sha},
            resume=resume, resume_hint=f"run `trec {STAGE}` again with --resume to continue",
            on_log=tracker.log_training,
        )
        if dist.is_main:
            best, _ = load_checkpoint(result.best_dir, map_location=dist.device)
            best.set_item_text(torch.from_numpy(prepared.embeddings))
            side = {"teacher": measure(teacher, teacher_dir / WEIGHTS, rank, cases),
                    "student": measure(best, result.best_dir / WEIGHTS, rank, cases)}
            write_stage_folder(
                out, {**checkpoint_files(result.best_dir), LOG: work / LOG}, cfg, STAGE,
                inputs=[prepared_input(prepared, run_dir), describe_file(teacher_dir / WEIGHTS)],
                extra=DistillManifest(
                    seed=cfg.seed, teacher=str(teacher_dir), data=names, metrics=result.best_metrics,
                    best_step=result.best_step, steps=result.steps, stopped=result.stopped,
                    n_parameters=best.num_parameters(), comparison=side, precision=result.precision,
                    world_size=dist.world_size, timings_s={"train": round(result.elapsed_s, 3)},
                ).to_json())
            tracker.log_artifacts(out)
            if result.stopped != "max_steps":
                shutil.rmtree(work, ignore_errors=True)
            print(comparison_table(side, names))
            log(f"{STAGE}: best valid {metrics_line(result.best_metrics)} at step {result.best_step} of "
                  f"{result.steps} ({result.stopped}); wrote {out}")
        dist.barrier()


def check_student(cfg: ExperimentConfig, teacher: SeqRecModel) -> None:
    """The student reads the same windows as the teacher, so it cannot read longer ones."""
    student = cfg.distill.student
    if student.max_seq_len > teacher.config.max_seq_len:
        raise ConfigError(
            f"config key 'distill.student.max_seq_len': {student.max_seq_len} is longer than the teacher's "
            f"max_seq_len {teacher.config.max_seq_len}; expected at most that"
        )


def distill_loss_fn(parts, teacher: SeqRecModel, cfg: ExperimentConfig):
    dc = cfg.distill

    def loss_fn(module: Distillation, batch: dict) -> torch.Tensor:
        part, inputs, labels = batch_inputs(parts, batch)
        student = module.student
        start, stop = part.domain.item_start, part.domain.item_stop
        states, reps = student.encode(inputs), student.item_reps(start, stop)
        with torch.no_grad():
            teacher_states, teacher_reps = teacher.encode(inputs), teacher.item_reps(start, stop)
        labelled = labels >= 0
        loss = states.new_zeros(())
        if dc.kd_ratio < 1.0:
            loss = loss + (1.0 - dc.kd_ratio) * next_item_loss(student, inputs, states, labels, part, dc.train, reps)
        if dc.kd_ratio > 0.0:
            loss = loss + dc.kd_ratio * chunked_kd_loss(states, reps, student.score, teacher_states, teacher_reps,
                                                        teacher.score, labelled, dc.temperature,
                                                        dc.train.loss_chunk_size)
        if module.project is not None and labelled.any():
            matched = module.project(states[labelled]) - teacher_states[labelled]
            loss = loss + dc.hidden_weight * matched.pow(2).mean()
        return loss * labelled.sum()  # the engine normalises by the global batch's label count

    return loss_fn


def measure(model: SeqRecModel, weights: Path, rank, cases: list[EvalCase]) -> dict:
    """Size, speed and quality of one model: validation users ranked per second over full catalogues
    (the second of two runs, so both models are timed warm)."""
    model.eval()
    with torch.no_grad():
        rank(model)
        t0 = time.perf_counter()
        metrics = rank(model)
        seconds = time.perf_counter() - t0
    return {"n_parameters": model.num_parameters(), "checkpoint_mib": round(weights.stat().st_size / 2**20, 3),
            "users_per_s": round(n_ranked_users(cases) / max(seconds, 1e-9), 1),
            "valid": {k: v for k, v in metrics.items() if "/" not in k}}


def comparison_table(side: dict, names: list[str]) -> str:
    rows = [("parameters", lambda m: f"{m['n_parameters']:,}"),
            ("checkpoint MiB", lambda m: f"{m['checkpoint_mib']:.3f}"),
            ("users/s", lambda m: f"{m['users_per_s']:,.0f}"),
            ("valid ndcg@10", lambda m: f"{m['valid']['ndcg@10']:.4f}"),
            ("valid recall@10", lambda m: f"{m['valid']['recall@10']:.4f}")]
    lines = [f"{STAGE}: teacher vs student on {', '.join(names)} validation",
             f"  {'':<16} {'teacher':>12} {'student':>12}"]
    lines += [f"  {label:<16} {show(side['teacher']):>12} {show(side['student']):>12}" for label, show in rows]
    return "\n".join(lines)
