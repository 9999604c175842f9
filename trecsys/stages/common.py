"""What the training stages share: checking the prepared data,
training windows with the next-item loss, full-ranking validation, and writing the stage folder.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trecsys.artifacts import MANIFEST, stage_output, write_manifest, write_text
from trecsys.config import ExperimentConfig, TrainConfig, to_dict, to_yaml
from trecsys.errors import ArtifactError, ConfigError
from trecsys.model.seqrec import SeqRecModel
from trecsys.prepared.tables import DomainRange, Prepared
from trecsys.rank.metrics import full_ranking_topk, ranking_metrics
from trecsys.rank.scorers import ModelScorer, to_local
from trecsys.train.engine import TrainData
from trecsys.train.losses import chunked_cross_entropy, proposal_log_q, sampled_softmax_loss
from trecsys.train.windows import label_counts, training_windows, trim_left_padding, window_tensors

MONITOR = "ndcg@10"
REPORTED = ("ndcg@10", "recall@10")

# ---------------------------------------------------------------------------------------------
# Prepared data


def check_prepared(prepared: Prepared, cfg: ExperimentConfig) -> list[str]:
    """Refuse prepared data made for another config; return its source domains."""
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
    return sources


def check_target(prepared: Prepared, cfg: ExperimentConfig) -> DomainRange:
    """The target domain's item range; `data.target` must be the prepared target."""
    domain = prepared.domain(cfg.data.target, key="data.target")
    if cfg.data.target != prepared.target:
        raise ArtifactError(
            f"{prepared.folder / MANIFEST}: prepared with target domain {prepared.target!r}, but config key "
            f"'data.target' is {cfg.data.target!r}: set it back or re-run `trec prepare`"
        )
    return domain


# ---------------------------------------------------------------------------------------------
# Training windows and the next-item loss


@dataclass
class DomainWindows:
    """Training windows whose labels are ranked against one domain's catalogue; items of other
    domains in them are context only (never labels)."""

    domain: DomainRange
    windows: np.ndarray
    new: np.ndarray  # labels per window that carry the loss, counted from its end (training_windows)
    log_q: torch.Tensor | None = None  # proposal of `loss: sampled`, over the domain's items

    def label_counts(self) -> np.ndarray:
        return label_counts(self.windows, self.domain.item_start, self.domain.item_stop, self.new)


def window_stride(train: TrainConfig, max_seq_len: int) -> int:
    """`train.window_stride` as the stride of training_windows (0 or above max_seq_len: max_seq_len)."""
    return max_seq_len if train.window_stride in (0, None) else min(train.window_stride, max_seq_len)


def domain_windows(domain: DomainRange, sequences: Sequence[np.ndarray], max_seq_len: int,
                   train: TrainConfig, device: torch.device) -> DomainWindows:
    """Windows of `sequences` that hold at least one label in `domain`."""
    windows, new = training_windows(list(sequences), max_seq_len, window_stride(train, max_seq_len))
    part = DomainWindows(domain, windows, new)
    has_label = part.label_counts() > 0
    part.windows, part.new = windows[has_label], new[has_label]
    if train.loss == "sampled":  # proposal from training popularity within the domain
        flat = np.concatenate(list(sequences)) if len(sequences) else np.zeros(0, dtype=np.int64)
        flat = flat[(flat >= domain.item_start) & (flat < domain.item_stop)] - domain.item_start
        part.log_q = proposal_log_q(np.bincount(flat, minlength=domain.n_items)).to(device)
    return part


def window_train_data(parts: list[DomainWindows]) -> TrainData:
    """Every part's windows; a batch holds one part's windows (so one catalogue per batch)."""
    windows = np.concatenate([p.windows for p in parts])
    new = np.concatenate([p.new for p in parts])
    groups = np.repeat(np.arange(len(parts)), [len(p.windows) for p in parts])
    n_terms = np.concatenate([p.label_counts() for p in parts])

    def make_batch(indices: np.ndarray) -> dict:
        return {"windows": trim_left_padding(torch.from_numpy(windows[indices])),
                "new": torch.from_numpy(new[indices]), "group": int(groups[indices[0]])}

    return TrainData(n_terms=n_terms, make_batch=make_batch, groups=groups)


def batch_inputs(parts: list[DomainWindows], batch: dict) -> tuple[DomainWindows, torch.Tensor, torch.Tensor]:
    """(part, inputs, catalogue-local labels) of a batch made by `window_train_data`."""
    part = parts[batch["group"]]
    inputs, labels = window_tensors(batch["windows"], part.domain.item_start, part.domain.item_stop, batch["new"])
    return part, inputs, labels


def next_item_loss(model: SeqRecModel, states: torch.Tensor, labels: torch.Tensor, part: DomainWindows,
                   train: TrainConfig, item_reps: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-item loss of the labelled positions: full softmax (chunked) or sampled.
    `item_reps`: the domain's item tower output when the caller has it already; the sampled loss
    otherwise runs the tower on its targets and negatives only."""
    start, stop = part.domain.item_start, part.domain.item_stop
    if train.loss == "full":
        reps = item_reps if item_reps is not None else model.item_reps(start, stop)
        return chunked_cross_entropy(states, labels, reps, model.score, train.loss_chunk_size)
    if item_reps is not None:
        reps_of = lambda items: item_reps.index_select(0, items)  # noqa: E731 (deterministic backward)
    else:
        reps_of = lambda items: model.item_reps_at(items + start)  # noqa: E731
    return sampled_softmax_loss(states, labels, reps_of, model.score, train.n_negatives, part.log_q)


def ce_loss_fn(parts: list[DomainWindows], train: TrainConfig,
               extra: Callable[[SeqRecModel], torch.Tensor] | None = None):
    """loss_fn for the engine: the summed next-item loss of a batch (+ `extra(model)` per label)."""

    def loss_fn(model: SeqRecModel, batch: dict) -> torch.Tensor:
        part, inputs, labels = batch_inputs(parts, batch)
        mean = next_item_loss(model, model.encode(inputs), labels, part, train)
        if extra is not None:
            mean = mean + extra(model)
        return mean * (labels >= 0).sum()  # the engine normalises by the global batch's label count

    return loss_fn


# ---------------------------------------------------------------------------------------------
# Full-ranking validation (and test numbers, with the same code)


@dataclass
class EvalCase:
    """Users to rank one domain's catalogue for: what each read (global item_idx, any domain) and
    their held-out items (global item_idx in `domain`)."""

    name: str
    domain: DomainRange
    histories: list[np.ndarray]
    targets: list[np.ndarray]


def make_ranker(cases: list[EvalCase], item_text: np.ndarray, user_batch: int, device: torch.device,
                ks: Sequence[int] = (10,), key: str = "data.source") -> Callable[[SeqRecModel], dict[str, float]]:
    """rank(model) -> NDCG/Recall@K pooled over every case's users with a held-out item, and per case
    ("<name>/ndcg@10"). Each case's full catalogue is ranked by trecsys.rank.scorers.ModelScorer (the
    scorer `trec evaluate` uses), the items in the user's history excluded."""
    prepared_cases = []
    for case in cases:
        # Users in order of history length, so a batch of them needs little padding.
        users = sorted((u for u, t in enumerate(case.targets) if len(t)), key=lambda u: len(case.histories[u]))
        histories = [case.histories[u] for u in users]
        prepared_cases.append((case, histories, to_local(histories, case.domain),
                               to_local([case.targets[u] for u in users], case.domain)))
    reported = [f"{m}@{k}" for k in ks for m in ("ndcg", "recall")]

    def rank(model: SeqRecModel) -> dict[str, float]:
        metrics: dict[str, float] = {}
        pooled: dict[str, list[np.ndarray]] = {k: [] for k in reported}
        for case, histories, exclude, targets in prepared_cases:
            if not targets:
                continue
            scorer = ModelScorer(model, histories, case.domain, item_text, device, user_batch=user_batch)
            _, top = full_ranking_topk(scorer.score_chunk, len(targets), case.domain.n_items, k=max(ks),
                                       exclude=exclude, user_batch=user_batch, device=device)
            per_user = ranking_metrics(top, targets, ks=ks)
            for name in reported:
                metrics[f"{case.name}/{name}"] = float(np.nanmean(per_user[name]))
                pooled[name].append(per_user[name])
        if not pooled[reported[0]]:
            raise ConfigError(f"config key '{key}': no user has a held-out item to rank")
        metrics.update({name: float(np.nanmean(np.concatenate(v))) for name, v in pooled.items()})
        return metrics

    return rank


def n_ranked_users(cases: list[EvalCase]) -> int:
    return sum(1 for case in cases for t in case.targets if len(t))


# ---------------------------------------------------------------------------------------------
# The stage folder


def write_stage_folder(out: Path, files: dict[str, Path], cfg: ExperimentConfig, stage: str,
                       inputs: list[dict], extra: dict) -> None:
    """Copy `files` ({relative destination: source}) into a fresh `out`, with config.yaml and a
    manifest, swapped in atomically by `stage_output`."""
    with stage_output(out) as folder:
        for destination, source in files.items():
            (folder / destination).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, folder / destination)
        write_text(folder / "config.yaml", to_yaml(cfg))
        write_manifest(folder, stage, to_dict(cfg), inputs=inputs, extra=extra)


def metrics_line(metrics: dict | None) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in (metrics or {}).items() if "/" not in k)
