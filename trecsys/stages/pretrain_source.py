"""`trec pretrain-source`: train the teacher on the train splits `pretrain.data` names (every source
domain's by default; the target's; or both), keep the best model by validation NDCG@10 over those
domains, and write `<run_dir>/pretrain/`.

Batching: every batch holds training windows of ONE source domain (the domains are mixed across
batches, in proportion to their size), so each label is scored against its own domain's catalogue
and the item tower runs once per batch. Validation ranks each domain's full catalogue, items in the
user's history excluded. The resumable state lives in `<run_dir>/.pretrain.work/` until the run ends.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import numpy as np
import torch

from trecsys.artifacts import run_lock
from trecsys.config import ExperimentConfig, to_dict
from trecsys.console import log
from trecsys.errors import ConfigError
from trecsys.model.checkpoint import checkpoint_files, save_checkpoint, trained_on
from trecsys.model.seqrec import SeqRecModel, describe_parameters
from trecsys.prepared.identity import prepared_fingerprint, prepared_input
from trecsys.prepared.tables import DomainSplit, domain_split, load_prepared, seen_items
from trecsys.rank.validation import EvalCase, make_ranker
from trecsys.runtime import Threads, apply_threads, seed_everything
from trecsys.stage_table import PRETRAIN
from trecsys.stages.common import MONITOR, check_prepared, metrics_line, write_stage_folder
from trecsys.track import tracking
from trecsys.train.engine import LOG, Dist, distributed, fit
from trecsys.train.next_item import ce_loss_fn, domain_windows, window_train_data

STAGE, OUTPUT = PRETRAIN.name, PRETRAIN.folder
WORK = ".pretrain.work"
TRAIN_KEY = "pretrain.train"


def run(cfg: ExperimentConfig, resume: bool = False, verify: bool = False) -> None:
    threads = apply_threads(cfg.runtime.threads)
    with distributed(cfg.device) as dist:
        _run(cfg, resume, dist, verify, threads)


def _run(cfg: ExperimentConfig, resume: bool, dist: Dist, verify: bool, threads: Threads) -> None:
    run_dir = Path(cfg.run_dir)
    out, work = run_dir / OUTPUT, run_dir / WORK
    # Only rank 0 writes, so only rank 0 holds the lock against a second run on the same run_dir.
    with run_lock(out) if dist.is_main else contextlib.nullcontext(), \
            tracking(cfg, STAGE, dist.is_main, fresh=not resume) as tracker:
        prepared = load_prepared(run_dir, verify=verify)
        sources = check_prepared(prepared, cfg)
        domains = {"source": sources, "target": [prepared.target], "both": [*sources, prepared.target]}[
            cfg.pretrain.data]
        if not sources and cfg.pretrain.data == "source":
            raise ConfigError("config key 'data.source': no source domain to pretrain on; name at least one "
                              "(or set pretrain.data=target)")
        splits = {name: domain_split(prepared, name) for name in domains}
        data, loss_fn = training_setup(splits, cfg, dist.device)
        validate = make_validate(splits, prepared.embeddings, cfg.pretrain.train.eval_user_batch, dist.device)

        seed_everything(cfg.seed)
        # IDs only for the items it trains on: other items are ranked by their text.
        model = SeqRecModel(cfg.model, prepared.embeddings.shape[1], prepared.n_items,
                            id_items=seen_items([seen_items(s.train) for s in splits.values()]))
        model.set_item_text(torch.from_numpy(prepared.embeddings))
        prepared_sha = prepared_fingerprint(prepared)
        extra = {"stage": STAGE, "source": sources, "domains": domains, **trained_on(prepared)}
        if dist.is_main:
            log(f"{STAGE}: {data.n_examples:,} training windows from {', '.join(domains)}; "
                  f"{describe_parameters(model.parameter_counts())}; {threads.line()}")
        result = fit(
            model, data, loss_fn, validate, cfg.pretrain.train, work, seed=cfg.seed, dist=dist,
            save_model=lambda m, folder: save_checkpoint(m, folder, extra), monitor=MONITOR,
            config_key=TRAIN_KEY, fingerprint={"model": to_dict(cfg.model), "data.source": sources,
                                               "prepared": prepared_sha, "objectives": objectives(cfg)},
            resume=resume, resume_hint=f"run `trec {STAGE}` again with --resume to continue",
            on_log=tracker.log_training,
        )
        if dist.is_main:
            write_stage_folder(
                out, {**checkpoint_files(result.best_dir), LOG: work / LOG}, cfg, STAGE,
                inputs=[prepared_input(prepared, run_dir)],
                extra={
                    "seed": cfg.seed, "source": sources, "domains": domains, "metrics": result.best_metrics,
                    "best_step": result.best_step, "steps": result.steps,
                    "stopped": result.stopped, "n_parameters": model.num_parameters(),
                    "n_parameters_by_part": model.parameter_counts(),
                    "precision": result.precision, "world_size": dist.world_size,
                    "timings_s": {"train": round(result.elapsed_s, 3)},
                })
            tracker.log_artifacts(out)
            # A run cut short by max_steps keeps its state so that --resume can finish it.
            if result.stopped != "max_steps":
                shutil.rmtree(work, ignore_errors=True)
            log(summary(result.best_metrics, result.best_step, result.steps, result.stopped,
                          model.num_parameters(), out))
        dist.barrier()


def training_setup(splits: dict[str, DomainSplit], cfg: ExperimentConfig, device: torch.device):
    """Training windows of every source domain (a batch holds one domain's) and the loss over a batch."""
    train = cfg.pretrain.train
    parts = [domain_windows(split.domain, split.train, cfg.model.max_seq_len, train, device)
             for split in splits.values()]
    if not any(len(p.windows) for p in parts):
        raise ConfigError("config key 'data.source': the source domains have no user with 2+ training items")
    parts = [p for p in parts if len(p.windows)]
    return window_train_data(parts), ce_loss_fn(parts, train, contrastive=cfg.pretrain)


def objectives(cfg: ExperimentConfig) -> dict:
    """The pretrain keys besides `train` (the contrastive objectives): a resume must keep them."""
    return {k: v for k, v in to_dict(cfg.pretrain).items() if k != "train"}


def make_validate(splits: dict[str, DomainSplit], item_text: np.ndarray, user_batch: int, device: torch.device):
    """validate(model) -> NDCG@10/Recall@10 pooled over every source user with a valid item, and per domain."""
    cases = [EvalCase(name, split.domain, split.train, split.valid) for name, split in splits.items()]
    return make_ranker(cases, item_text, user_batch, device, key="data.source")


def summary(metrics: dict | None, best_step: int | None, steps: int, stopped: str, n_parameters: int,
            out: Path) -> str:
    domains = "; ".join(f"{k} {v:.4f}" for k, v in (metrics or {}).items() if "/" in k)
    return (f"{STAGE}: best valid {metrics_line(metrics)} at step {best_step} of {steps} ({stopped}); {domains}\n"
            f"{STAGE}: {n_parameters:,} parameters; wrote {out}")
