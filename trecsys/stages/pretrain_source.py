"""`trec pretrain-source`: train the teacher on every source domain's train split, keep the best model
by validation NDCG@10 over the source domains, and write `<run_dir>/pretrain/`.

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
from torch import nn

from trecsys.artifacts import (
    MANIFEST,
    describe_file,
    run_lock,
    sha256_file,
    stage_output,
    write_manifest,
    write_text,
)
from trecsys.config import ExperimentConfig, to_dict, to_yaml
from trecsys.data.prepared import DomainRange, DomainSplit, Prepared, domain_split, load_prepared
from trecsys.data.sequences import training_windows, trim_left_padding, window_tensors
from trecsys.engine import LOG, Dist, TrainData, fit, seed_everything, setup_distributed, teardown_distributed
from trecsys.errors import ArtifactError, ConfigError
from trecsys.losses import chunked_cross_entropy, proposal_log_q, sampled_softmax_loss
from trecsys.metrics import full_ranking_topk, ranking_metrics
from trecsys.model import CONFIG, WEIGHTS, SeqRecModel, save_checkpoint
from trecsys.scorers import ModelScorer, to_local

STAGE = "pretrain-source"
OUTPUT = "pretrain"
WORK = ".pretrain.work"
TRAIN_KEY = "pretrain.train"
MONITOR = "ndcg@10"
REPORTED = ("ndcg@10", "recall@10")


def run(cfg: ExperimentConfig, resume: bool = False, verify: bool = False) -> None:
    dist = setup_distributed(cfg.device)
    try:
        _run(cfg, resume, dist, verify)
    finally:
        teardown_distributed()


def _run(cfg: ExperimentConfig, resume: bool, dist: Dist, verify: bool = False) -> None:
    run_dir = Path(cfg.run_dir)
    out, work = run_dir / OUTPUT, run_dir / WORK
    # Only rank 0 writes, so only rank 0 holds the lock against a second run on the same run_dir.
    with run_lock(out) if dist.is_main else contextlib.nullcontext():
        prepared = load_prepared(run_dir, verify=verify)
        sources = check_prepared(prepared, cfg)
        splits = {name: domain_split(prepared, name) for name in sources}
        data, loss_fn = training_setup(splits, cfg, dist.device)
        validate = make_validate(splits, prepared.embeddings, cfg.pretrain.train.eval_user_batch, dist.device)

        seed_everything(cfg.seed)
        model = SeqRecModel(cfg.model, prepared.embeddings.shape[1], prepared.n_items)
        model.set_item_text(torch.from_numpy(prepared.embeddings))
        prepared_sha = sha256_file(prepared.folder / MANIFEST)
        extra = {"stage": STAGE, "source": sources, "prepared_manifest_sha256": prepared_sha}
        if dist.is_main:
            print(f"{STAGE}: {data.n_examples:,} training windows from {', '.join(sources)}; "
                  f"{model.num_parameters():,} parameters")
        result = fit(
            model, data, loss_fn, validate, cfg.pretrain.train, work, seed=cfg.seed, dist=dist,
            save_model=lambda m, folder: save_checkpoint(m, folder, extra), monitor=MONITOR,
            config_key=TRAIN_KEY, fingerprint={"model": to_dict(cfg.model), "data.source": sources,
                                               "prepared": prepared_sha},
            resume=resume, resume_hint=f"run `trec {STAGE}` again with --resume to continue",
        )
        if dist.is_main:
            with stage_output(out) as folder:
                for name in (WEIGHTS, CONFIG):
                    shutil.copy2(result.best_dir / name, folder / name)
                shutil.copy2(work / LOG, folder / LOG)
                write_text(folder / "config.yaml", to_yaml(cfg))
                write_manifest(folder, STAGE, to_dict(cfg),
                               inputs=[describe_file(prepared.folder / MANIFEST, root=run_dir)],
                               extra={
                                   "seed": cfg.seed, "source": sources, "metrics": result.best_metrics,
                                   "best_step": result.best_step, "steps": result.steps,
                                   "stopped": result.stopped, "n_parameters": model.num_parameters(),
                                   "precision": result.precision, "world_size": dist.world_size,
                                   "timings_s": {"train": round(result.elapsed_s, 3)},
                               })
            # A run cut short by max_steps keeps its state so that --resume can finish it.
            if result.stopped != "max_steps":
                shutil.rmtree(work, ignore_errors=True)
            print(summary(result.best_metrics, result.best_step, result.steps, result.stopped,
                          model.num_parameters(), out))
        dist.barrier()


def check_prepared(prepared: Prepared, cfg: ExperimentConfig) -> list[str]:
    """Refuse prepared data made for another config; return the source domains to train on."""
    encoder = prepared.manifest.get("encoder")
    made_with = encoder.get("name") if isinstance(encoder, dict) else encoder
    if made_with != cfg.embedding.encoder:
        raise ArtifactError(
            f"{prepared.folder / MANIFEST}: the item embeddings were made with encoder {made_with!r}, but config "
            f"key 'embedding.encoder' is {cfg.embedding.encoder!r}: re-run `trec prepare` or set it back"
        )
    sources = prepared.source
    if cfg.data.source and list(cfg.data.source) != sources:
        raise ArtifactError(
            f"{prepared.folder / MANIFEST}: prepared with source domains {sources}, but config key "
            f"'data.source' is {list(cfg.data.source)}: re-run `trec prepare`"
        )
    if not sources:
        raise ConfigError("config key 'data.source': no source domain to pretrain on; name at least one")
    return sources


def training_setup(splits: dict[str, DomainSplit], cfg: ExperimentConfig, device: torch.device):
    """Training windows of every source domain (grouped by domain) and the loss over a batch."""
    train = cfg.pretrain.train
    parts = [training_windows(split.train, cfg.model.max_seq_len) for split in splits.values()]
    windows = np.concatenate(parts)
    groups = np.repeat(np.arange(len(parts)), [len(p) for p in parts])
    if len(windows) == 0:
        raise ConfigError("config key 'data.source': the source domains have no user with 2+ training items")
    domains: list[DomainRange] = [split.domain for split in splits.values()]
    log_q = []
    if train.loss == "sampled":  # proposal from training popularity, per domain
        for split in splits.values():
            d = split.domain
            counts = np.bincount(np.concatenate(split.train) - d.item_start, minlength=d.n_items)
            log_q.append(proposal_log_q(counts).to(device))

    def make_batch(indices: np.ndarray) -> dict:
        return {"windows": trim_left_padding(torch.from_numpy(windows[indices])), "group": int(groups[indices[0]])}

    def loss_fn(model: nn.Module, batch: dict) -> torch.Tensor:
        domain = domains[batch["group"]]
        inputs, labels = window_tensors(batch["windows"], domain.item_start)
        states = model.encode(inputs)
        reps = model.item_reps(domain.item_start, domain.item_stop)
        if train.loss == "full":
            mean = chunked_cross_entropy(states, labels, reps, model.score, train.loss_chunk_size)
        else:
            mean = sampled_softmax_loss(states, labels, reps, model.score, train.n_negatives, log_q[batch["group"]])
        return mean * (labels >= 0).sum()  # the engine normalises by the global batch's label count

    n_terms = ((windows[:, :-1] >= 0) & (windows[:, 1:] >= 0)).sum(axis=1)
    return TrainData(n_terms=n_terms, make_batch=make_batch, groups=groups), loss_fn


def make_validate(splits: dict[str, DomainSplit], item_text: np.ndarray, user_batch: int, device: torch.device):
    """validate(model) -> NDCG@10/Recall@10 pooled over every source user with a valid item, and per domain.

    Each domain's full catalogue is ranked (trecsys.scorers.ModelScorer, the scorer `trec evaluate`
    uses), the items in the user's train history excluded.
    """
    cases = []
    for name, split in splits.items():
        # Users in order of history length, so a batch of them needs little padding.
        users = sorted((u for u, items in enumerate(split.valid) if len(items)), key=lambda u: len(split.train[u]))
        histories = [split.train[u] for u in users]
        cases.append((name, split.domain, histories, to_local(histories, split.domain),
                      to_local([split.valid[u] for u in users], split.domain)))

    def validate(model: SeqRecModel) -> dict[str, float]:
        metrics: dict[str, float] = {}
        pooled: dict[str, list[np.ndarray]] = {k: [] for k in REPORTED}
        for name, domain, histories, exclude, targets in cases:
            if not targets:
                continue
            scorer = ModelScorer(model, histories, domain, item_text, device, user_batch=user_batch)
            _, top = full_ranking_topk(scorer.score_chunk, len(targets), domain.n_items, k=10, exclude=exclude,
                                       user_batch=user_batch, device=device)
            per_user = ranking_metrics(top, targets, ks=(10,))
            for key in REPORTED:
                metrics[f"{name}/{key}"] = float(np.nanmean(per_user[key]))
                pooled[key].append(per_user[key])
        if not pooled[MONITOR]:
            raise ConfigError("config key 'data.source': no source user has a valid item to validate on")
        metrics.update({key: float(np.nanmean(np.concatenate(v))) for key, v in pooled.items()})
        return metrics

    return validate


def summary(metrics: dict | None, best_step: int | None, steps: int, stopped: str, n_parameters: int,
            out: Path) -> str:
    shown = ", ".join(f"{k} {v:.4f}" for k, v in (metrics or {}).items() if "/" not in k)
    domains = "; ".join(f"{k} {v:.4f}" for k, v in (metrics or {}).items() if "/" in k)
    return (f"{STAGE}: best valid {shown} at step {best_step} of {steps} ({stopped}); {domains}\n"
            f"{STAGE}: {n_parameters:,} parameters; wrote {out}")
