"""The one training loop every training stage uses: a `Trainer` whose `fit` calls `step`, `validate`,
`log` and `save` (torchtune's recipe shape; DDP is nanoGPT-style `if ddp:` branches in them).

AdamW with linear warm-up + cosine decay, gradient clipping and accumulation, autocast (bf16, or fp16
with loss scaling), DDP under torchrun, validation with early stopping, a `best/` checkpoint and a
resumable `last/` checkpoint. A stage supplies the model, its examples, a loss and a validate function.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn
from tqdm import tqdm

from trecsys.artifacts import atomic_path, open_append, stage_output
from trecsys.config import TrainConfig
from trecsys.errors import ArtifactError, ConfigError, DivergedError, InterruptedRun, OutOfMemoryError
from trecsys.model.checkpoint import load_weights, save_weights
from trecsys.runtime import StopRequest, resolve_device, seed_everything

STATE = "train_state.pt"  # optimizer, scaler, position in the data, RNG states, early-stopping state
LAST, BEST, LOG = "last", "best", "train_log.jsonl"
STATE_FORMAT = 1
# Keys that may change between an interrupted run and its resume: they do not change the weights.
_RESUME_FREE_KEYS = ("max_steps", "checkpoint_every_steps", "eval_user_batch")

# loss_fn(model, batch) -> (sum of the batch's loss terms, 0-dim tensor). The engine divides by the
# number of terms in the whole global batch, so any split over processes/micro-batches gives the
# same gradient as one big batch.
LossFn = Callable[[nn.Module, Any], torch.Tensor]
# validate(model) -> {"ndcg@10": ..., ...}; called on rank 0 in eval mode under no_grad.
ValidateFn = Callable[[nn.Module], dict[str, float]]


# ---------------------------------------------------------------------------------------------
# Devices and processes


@dataclass
class Dist:
    """Where this process trains: its rank among `world_size` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def ddp(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.ddp:
            torch_dist.barrier()


def setup_distributed(device: str = "auto") -> Dist:
    """One process, or one rank of a torchrun launch (WORLD_SIZE > 1): init the process group once."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    resolved = resolve_device(device)
    if world_size <= 1:
        return Dist(device=resolved)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if resolved.type == "cuda":
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    if not torch_dist.is_initialized():
        # Rank 0 validates alone while the others wait: allow a long validation.
        torch_dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo",
                                      timeout=datetime.timedelta(hours=1))
    return Dist(rank, world_size, local_rank, resolved)


def teardown_distributed() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


@contextlib.contextmanager
def distributed(device: str = "auto") -> Iterator[Dist]:
    """`with distributed(cfg.device) as dist:` — every training stage's process group, torn down
    however the stage ends (so a failed stage never leaves a torchrun peer waiting)."""
    dist = setup_distributed(device)
    try:
        yield dist
    finally:
        teardown_distributed()


def autocast_setup(precision: str, device: torch.device, key: str = "train.precision"
                   ) -> tuple[contextlib.AbstractContextManager, torch.amp.GradScaler, str]:
    """(autocast context, GradScaler, resolved precision); the scaler is live only for fp16."""
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"
    if precision == "fp16" and device.type not in ("cuda", "cpu"):
        raise ConfigError(f"config key '{key}': fp16 is not supported on {device.type}; use bf16 or fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    ctx = contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    return ctx, scaler, precision


# ---------------------------------------------------------------------------------------------
# Data order


@dataclass
class TrainData:
    """What the engine needs from a stage's training examples (e.g. sequence windows)."""

    n_terms: np.ndarray  # loss terms each example contributes (e.g. its target positions)
    make_batch: Callable[[np.ndarray], Any]  # example indices -> one micro-batch for loss_fn
    groups: np.ndarray | None = None  # a group id per example; every batch is drawn from one group

    @property
    def n_examples(self) -> int:
        return len(self.n_terms)

    def group_members(self) -> list[np.ndarray]:
        if self.groups is None:
            return [np.arange(self.n_examples)]
        return [np.flatnonzero(self.groups == g) for g in np.unique(self.groups)]


def epoch_batches(members: list[np.ndarray], batch_size: int, seed: int, epoch: int,
                  min_size: int = 1) -> list[np.ndarray]:
    """The global batches of one epoch, a pure function of (seed, epoch) so a resume sees the same.

    Each group is shuffled and cut into ceil(n / batch_size) batches of near-equal size (no tiny last
    batch); a batch smaller than `min_size` (processes x accumulation steps) can only come from a
    group that small and is left out. The batches of all groups are then shuffled together.
    """
    rng = np.random.default_rng([seed, epoch])
    batches = []
    for group in members:
        shuffled = group[rng.permutation(len(group))]
        n_batches = -(-len(shuffled) // batch_size)
        batches.extend(b for b in np.array_split(shuffled, n_batches) if len(b) >= min_size)
    return [batches[i] for i in rng.permutation(len(batches))]


def shard(batch: np.ndarray, rank: int, world_size: int, accum_steps: int) -> list[np.ndarray]:
    """This rank's micro-batches of a global batch: world_size x accum_steps near-equal parts."""
    parts = np.array_split(batch, world_size * accum_steps)
    return parts[rank * accum_steps:(rank + 1) * accum_steps]


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warm-up over warmup_fraction of the steps, then cosine decay to lr * min_lr_fraction."""
    warmup = round(cfg.warmup_fraction * total_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / (warmup + 1)
    progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
    min_lr = cfg.lr * cfg.min_lr_fraction
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device,
                   lr_scales: dict[str, float] | None = None) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only: not on norms, biases or embedding tables.

    Frozen parameters (requires_grad False) are left out. `lr_scales` maps parameter names to a
    multiple of the scheduled lr (e.g. new layers on a pretrained model); the rest get 1.
    """
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decay = p.ndim >= 2 and id(p) not in embedding_weights
            groups.setdefault((decay, float((lr_scales or {}).get(name, 1.0))), []).append(p)
    param_groups = [
        {"params": params, "weight_decay": cfg.weight_decay if decay else 0.0, "lr_scale": scale}
        for (decay, scale), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))
    ]
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(0.9, 0.98), fused=device.type == "cuda")


# ---------------------------------------------------------------------------------------------
# Resume state


def _rng_state(device: torch.device) -> dict:
    """RNG states as tensors and plain lists, so `torch.load(weights_only=True)` reads them back."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"].tolist()), p["gauss_next"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _all_rng_states(dist: Dist) -> list[dict]:
    """Every rank's RNG state (each rank draws its own dropout masks), gathered on all ranks."""
    mine = _rng_state(dist.device)
    if not dist.ddp:
        return [mine]
    gathered: list = [None] * dist.world_size
    torch_dist.all_gather_object(gathered, mine)
    return gathered


def _resume_key(cfg: TrainConfig, config_key: str, fingerprint: dict) -> dict:
    """Flat {dotted key: value} of everything that must match for a resume to continue exactly."""
    key = {f"{config_key}.{k}": v for k, v in asdict(cfg).items() if k not in _RESUME_FREE_KEYS}
    key.update(_flatten(fingerprint))
    return key


def _flatten(obj: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in obj.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_resume_key(saved_json: str, current: dict, state_path: Path) -> None:
    saved = json.loads(saved_json)
    current = json.loads(json.dumps(current, default=str))  # same normal form as what was saved
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            raise ArtifactError(
                f"cannot resume from {state_path}: '{key}' was {saved.get(key)!r} there and is "
                f"{current.get(key)!r} now; set it back, or run without --resume to start over"
            )


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class FitResult:
    steps: int
    stopped: str  # "completed", "early_stop" or "max_steps"
    best_metrics: dict[str, float] | None
    best_step: int | None
    best_dir: Path
    elapsed_s: float
    precision: str


class _LossModule(nn.Module):
    """The loss as a module's forward, so DDP's gradient hooks see it."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


@dataclass
class _Window:
    """Training since the last log line: loss sum, loss terms, sequences, seconds of steps."""

    loss: float = 0.0
    terms: int = 0
    sequences: int = 0
    seconds: float = 0.0

    def add(self, loss: float, terms: int, sequences: int, seconds: float) -> None:
        self.loss, self.terms = self.loss + loss, self.terms + terms
        self.sequences, self.seconds = self.sequences + sequences, self.seconds + seconds


@dataclass
class _Progress:
    """What a resume needs besides the weights and the optimizer."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # global batches of `epoch` already done
    best_metric: float = -math.inf
    best_step: int = -1
    best_metrics: dict = field(default_factory=dict)
    bad_evals: int = 0
    elapsed_s: float = 0.0


def fit(model: nn.Module, data: TrainData, loss_fn: LossFn, validate: ValidateFn, cfg: TrainConfig,
        work_dir: Path, *, seed: int, dist: Dist | None = None, resume: bool = False, **options: Any) -> FitResult:
    """Train `model` in place; `work_dir` receives `last/`, `best/` and `train_log.jsonl` (rank 0).

    The best model by `validate(model)[monitor]` (higher is better) is in `work_dir/best/`; the
    in-memory model holds the last weights. See `Trainer` for the options.
    """
    return Trainer(model, data, loss_fn, validate, cfg, work_dir, seed=seed, dist=dist, resume=resume,
                   **options).fit()


@dataclass
class StepResult:
    loss_sum: float  # the global batch's summed loss (all processes)
    n_terms: int  # its loss terms
    lr: float  # the scheduled lr of the step
    seconds: float
    stop_now: bool  # a process was asked to stop (SIGINT/SIGTERM)


class Trainer:
    """One training run: the model, its optimizer, loss scaler, schedule and progress, held together
    (torchtune's recipe shape). `step`, `validate`, `save` and `log` are one step, one validation, one
    `last/` checkpoint and one log line; `fit` is the loop that calls them.

    `fingerprint` (model config, data hashes, ...) must match for `resume=True` to continue from
    `work_dir/last/` (read back by `load_model`, the inverse of `save_model`). Only parameters with
    requires_grad train; `lr_scales` gives named parameters a multiple of the scheduled lr (see
    `make_optimizer`). `config_key` names the config section in error messages.
    """

    def __init__(self, model: nn.Module, data: TrainData, loss_fn: LossFn, validate: ValidateFn, cfg: TrainConfig,
                 work_dir: Path, *, seed: int, dist: Dist | None = None,
                 save_model: Callable[[nn.Module, Path], None] = save_weights,
                 load_model: Callable[[nn.Module, Path], None] = load_weights, monitor: str = "ndcg@10",
                 config_key: str = "train", fingerprint: dict | None = None, resume: bool = False,
                 resume_hint: str = "re-run with --resume", lr_scales: dict[str, float] | None = None,
                 label: str = "", on_log: Callable[[dict], None] | None = None):
        # `label` (a fine-tuning candidate's name) starts every progress and log line on the terminal;
        # `on_log` receives each train_log.jsonl record as it is written (experiment tracking).
        self.shown_label, self.on_log = (f"{label}: " if label else ""), on_log
        self.model, self.data, self.validate_fn, self.cfg, self.seed = model, data, validate, cfg, seed
        self.dist = dist = dist or Dist()
        self.save_model, self.monitor, self.config_key, self.resume_hint = save_model, monitor, config_key, resume_hint
        self.work_dir = work_dir = Path(work_dir)
        self.last_dir, self.best_dir, self.log_path = work_dir / LAST, work_dir / BEST, work_dir / LOG
        model.to(dist.device)
        self.members = data.group_members()
        self.min_size = dist.world_size * cfg.grad_accum_steps
        self.n_batches = len(epoch_batches(self.members, cfg.batch_size, seed, 0, self.min_size))
        if self.n_batches == 0:
            raise ConfigError(
                f"config key '{config_key}.batch_size': no training batch of at least {self.min_size} examples "
                f"(processes x {config_key}.grad_accum_steps) can be formed from {data.n_examples} examples"
            )
        self.total_steps = cfg.epochs * self.n_batches
        self.autocast, self.scaler, self.precision = autocast_setup(cfg.precision, dist.device, f"{config_key}.precision")
        self.optimizer = make_optimizer(model, cfg, dist.device, lr_scales)
        self.resume_key = _resume_key(cfg, config_key, {**(fingerprint or {}), "seed": seed,
                                                         "lr_scales": lr_scales or {}})
        self.progress, self.window = _Progress(), _Window()
        self.stop_request = StopRequest()  # listens for SIGINT/SIGTERM while `fit` runs
        if resume:
            self.progress = _load_resume_state(model, self.optimizer, self.scaler, self.last_dir, self.resume_key,
                                               dist, load_model)
            if dist.is_main:
                _truncate_log(self.log_path, self.progress.step)
        else:
            seed_everything(int(np.random.SeedSequence([seed, dist.rank]).generate_state(1)[0]))
            if dist.is_main:
                _clear(work_dir, self.shown_label)
        dist.barrier()
        # Wrapped after a resume has loaded the weights: DDP broadcasts rank 0's at construction.
        self.wrapped: nn.Module = _LossModule(model, loss_fn)
        if dist.ddp:
            self.wrapped = nn.parallel.DistributedDataParallel(
                self.wrapped, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
                # The frozen item-text buffer is identical everywhere: do not re-send it every step.
                broadcast_buffers=False,
            )

    def step(self, batch: np.ndarray) -> StepResult:
        """One optimizer step on a global batch (example indices): this rank's share forward and
        backward, one all-reduce of the loss (and of whether any rank was asked to stop), clipping."""
        cfg, dist, optimizer, scaler, progress = self.cfg, self.dist, self.optimizer, self.scaler, self.progress
        t0 = time.perf_counter()
        lr = lr_at(progress.step, self.total_steps, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        n_terms = int(self.data.n_terms[batch].sum())
        micro_batches = shard(batch, dist.rank, dist.world_size, cfg.grad_accum_steps)
        try:
            local_loss = _step_backward(self.wrapped, self.data, micro_batches, n_terms, dist, self.autocast, scaler)
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            raise OutOfMemoryError(
                f"out of {dist.device.type} memory at step {progress.step + 1} with about "
                f"{len(batch) // self.min_size} windows per micro-batch: lower '{self.config_key}.batch_size' "
                f"(now {cfg.batch_size}) or raise '{self.config_key}.grad_accum_steps' (now {cfg.grad_accum_steps})"
            ) from None
        asked = self.stop_request.signum is not None  # read after the backward, which may take long
        stats = torch.stack([local_loss.double(), torch.tensor(float(asked), dtype=torch.float64, device=dist.device)])
        if dist.ddp:
            torch_dist.all_reduce(stats)
        loss_sum, stop_now = float(stats[0]), bool(stats[1] > 0)
        if not math.isfinite(loss_sum):
            optimizer.zero_grad(set_to_none=True)
            self._diverged(f"the training loss became {loss_sum}", lr)
        scaler.unscale_(optimizer)
        if cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            if not scaler.is_enabled() and not torch.isfinite(norm):
                optimizer.zero_grad(set_to_none=True)
                self._diverged(f"the gradient norm became {float(norm)}", lr)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        progress.step += 1
        seconds = time.perf_counter() - t0
        self.window.add(loss_sum, n_terms, len(batch), seconds)
        return StepResult(loss_sum, n_terms, lr, seconds, stop_now)

    def validate(self) -> tuple[dict | None, bool]:
        """Validate on rank 0 and keep `best/`; returns (metrics on rank 0, patience ran out)."""
        progress, stop, metrics = self.progress, 0, None
        if self.dist.is_main:
            self.model.eval()
            try:
                with torch.no_grad(), self.autocast:
                    metrics = {k: float(v) for k, v in self.validate_fn(self.model).items()}
            except torch.OutOfMemoryError:
                raise OutOfMemoryError(
                    f"out of {self.dist.device.type} memory while validating at step {progress.step}: lower "
                    f"'{self.config_key}.eval_user_batch' (now {self.cfg.eval_user_batch})"
                ) from None
            self.model.train()
            if self.monitor not in metrics:
                raise KeyError(f"validate() returned {sorted(metrics)}, without the monitored {self.monitor!r}")
            if metrics[self.monitor] > progress.best_metric:
                progress.best_metric, progress.best_step = metrics[self.monitor], progress.step
                progress.best_metrics, progress.bad_evals = metrics, 0
                with stage_output(self.best_dir) as tmp:
                    self.save_model(self.model, tmp)
            else:
                progress.bad_evals += 1
            stop = int(self.cfg.patience > 0 and progress.bad_evals >= self.cfg.patience)
        if self.dist.ddp:
            flag = torch.tensor([stop], device=self.dist.device)
            torch_dist.broadcast(flag, src=0)
            stop = int(flag.item())
        return metrics, bool(stop)

    def save(self) -> None:
        """`last/`: the weights and everything a resume needs (every rank's RNG state)."""
        rng = _all_rng_states(self.dist)
        if self.dist.is_main:
            state = {
                "format": STATE_FORMAT, **asdict(self.progress),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng,
                "resume_key": json.dumps(self.resume_key, default=str),
            }
            with stage_output(self.last_dir) as tmp:
                self.save_model(self.model, tmp)
                torch.save(state, tmp / STATE)
        self.dist.barrier()

    def log(self, metrics: dict | None) -> None:
        """One train_log.jsonl line (rank 0): training since the previous line, and validation if any."""
        progress, window = self.progress, self.window
        if self.dist.is_main:
            group = self.optimizer.param_groups[0]
            train_loss = window.loss / max(window.terms, 1)
            record = {
                "step": progress.step, "epoch": progress.epoch + progress.batch_in_epoch / self.n_batches,
                "loss": train_loss, "lr": group["lr"] / group["lr_scale"],
                "sequences_per_s": window.sequences / max(window.seconds, 1e-9),
                "elapsed_s": round(progress.elapsed_s, 3),
            }
            shown = f"{self.shown_label}step {progress.step}: train loss {train_loss:.4f}"
            if metrics is not None:
                record.update(valid=metrics, best_step=progress.best_step)
                shown += ", valid " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if "/" not in k)
                shown += " (best)" if progress.best_step == progress.step else ""
            _append_log(self.log_path, record)
            if self.on_log is not None:
                self.on_log(record)
            tqdm.write(shown, file=sys.stderr)
        self.window = _Window()

    def fit(self) -> FitResult:
        """Epochs of steps from where the progress stands; validation, logging and `last/` when due."""
        cfg, progress = self.cfg, self.progress
        stopped = "completed"
        self._clock = time.perf_counter()
        self.model.train()
        with self.stop_request as stop_request:
            for epoch in range(progress.epoch, cfg.epochs):
                batches = epoch_batches(self.members, cfg.batch_size, self.seed, epoch, self.min_size)
                bar = tqdm(total=self.n_batches, initial=progress.batch_in_epoch,
                           desc=f"{self.shown_label}epoch {epoch + 1}/{cfg.epochs}", file=sys.stderr, disable=not self.dist.is_main,
                           dynamic_ncols=True, mininterval=0.5, leave=False)
                for b in range(progress.batch_in_epoch, self.n_batches):
                    if self._hit_max_steps():
                        break
                    result = self.step(batches[b])
                    progress.batch_in_epoch = b + 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{result.loss_sum / max(result.n_terms, 1):.4f}", lr=f"{result.lr:.2e}",
                                    seq_s=f"{len(batches[b]) / max(result.seconds, 1e-9):.0f}", refresh=False)
                    early_stop = self._after_step(epoch, result.stop_now)
                    if result.stop_now:
                        bar.close()
                        raise InterruptedRun(f"stopped by {stop_request.name} after step {progress.step}; the state is saved "
                                             f"in {self.last_dir}: {self.resume_hint}")
                    if early_stop:
                        stopped = "early_stop"
                        break
                bar.close()
                if stopped == "early_stop" or self._hit_max_steps():
                    break
        if stopped != "early_stop" and progress.step < self.total_steps:
            stopped = "max_steps"
        return FitResult(
            steps=progress.step, stopped=stopped,
            best_metrics=(progress.best_metrics or None) if self.dist.is_main else None,
            best_step=progress.best_step if progress.best_step >= 0 else None,
            best_dir=self.best_dir, elapsed_s=progress.elapsed_s, precision=self.precision,
        )

    def _after_step(self, epoch: int, stop_now: bool) -> bool:
        """Validate, log and save `last/` as the config asks after this step; True when patience ran out."""
        cfg, progress = self.cfg, self.progress
        epoch_end = progress.batch_in_epoch == self.n_batches
        if epoch_end:
            progress.epoch, progress.batch_in_epoch = epoch + 1, 0
        hit_max = self._hit_max_steps()
        due = (progress.step % cfg.eval_every_steps == 0) if cfg.eval_every_steps else epoch_end
        validating = not stop_now and (due or hit_max or progress.step == self.total_steps)
        checkpoint_due = bool(cfg.checkpoint_every_steps) and progress.step % cfg.checkpoint_every_steps == 0
        checkpointing = stop_now or epoch_end or hit_max or checkpoint_due
        metrics, early_stop = self.validate() if validating else (None, False)
        now = time.perf_counter()
        progress.elapsed_s, self._clock = progress.elapsed_s + now - self._clock, now
        if validating or checkpointing:
            self.log(metrics)
        if checkpointing or early_stop:
            self.save()
        return early_stop

    def _hit_max_steps(self) -> bool:
        return bool(self.cfg.max_steps) and self.progress.step >= self.cfg.max_steps

    def _diverged(self, what: str, lr: float) -> None:
        last = f"the last good checkpoint is kept in {self.last_dir}" if self.last_dir.is_dir() else \
            "no checkpoint was written yet"
        hint = f"lower '{self.config_key}.lr'"
        if self.precision == "fp16":
            hint += f" or set '{self.config_key}.precision' to bf16/fp32"
        raise DivergedError(f"training diverged at step {self.progress.step + 1} (lr {lr:.3g}): {what}; {last}; {hint}")


def _step_backward(wrapped: nn.Module, data: TrainData, micro_batches: list[np.ndarray], n_terms: int,
                   dist: Dist, ctx: contextlib.AbstractContextManager, scaler: torch.amp.GradScaler
                   ) -> torch.Tensor:
    """Forward and backward every micro-batch of this rank; returns this rank's summed loss.

    Each micro-batch's loss sum is divided by the global batch's term count and multiplied by the
    number of processes (DDP averages gradients over them), so the gradient is the global mean.
    """
    total = torch.zeros((), dtype=torch.float64, device=dist.device)
    scale = dist.world_size / max(n_terms, 1)
    for i, indices in enumerate(micro_batches):
        sync = not dist.ddp or i == len(micro_batches) - 1
        with contextlib.nullcontext() if sync else wrapped.no_sync():
            with ctx:
                loss_sum = wrapped(to_device(data.make_batch(indices), dist.device))
            scaler.scale(loss_sum.float() * scale).backward()
        total += loss_sum.detach().double()  # stays on the device: no sync per micro-batch
    return total


def _load_resume_state(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                       last_dir: Path, resume_key: dict, dist: Dist,
                       load_model: Callable[[nn.Module, Path], None] = load_weights) -> _Progress:
    state_path = last_dir / STATE
    if not state_path.is_file():
        raise ArtifactError(f"nothing to resume: {state_path} does not exist; run without --resume")
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable state file means the same to the user
        raise ArtifactError(f"{state_path}: unreadable training state ({type(exc).__name__}); "
                            "run without --resume to start over") from None
    if state.get("format") != STATE_FORMAT:
        raise ArtifactError(f"{state_path}: training state format {state.get('format')!r}, expected {STATE_FORMAT}")
    _check_resume_key(state["resume_key"], resume_key, state_path)
    load_model(model, last_dir)
    model.to(dist.device)
    optimizer.load_state_dict(state["optimizer"])
    if scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    rng = state["rng"]
    _set_rng_state(rng[dist.rank] if dist.rank < len(rng) else rng[0], dist.device)
    names = {f.name for f in _Progress.__dataclass_fields__.values()}
    return _Progress(**{k: v for k, v in state.items() if k in names})


def _clear(work_dir: Path, shown_label: str = "") -> None:
    if (work_dir / LAST / STATE).is_file():
        tqdm.write(f"{shown_label}note: starting over; the unfinished run in {work_dir / LAST} is discarded "
                   "(--resume would have continued it)", file=sys.stderr)
    for name in (LAST, BEST, LOG):
        path = work_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    work_dir.mkdir(parents=True, exist_ok=True)


def _append_log(path: Path, record: dict) -> None:
    with open_append(path) as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint a resume starts from."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines()
             if line.strip() and json.loads(line)["step"] <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def read_log(path: Path) -> Iterator[dict]:
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            yield json.loads(line)
