"""The one model family of trecsys, top to bottom: item tower, sequence tower, score (checkpoints:
trecsys.model.checkpoint).

Items are represented from their frozen text embedding (and optionally a learned ID); a causal
Transformer reads a user's left-padded item sequence and gives the state after every prefix; the
score of a state and an item is a dot product or a scaled cosine. Sizes come from `ModelConfig`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from trecsys.config import ModelConfig
from trecsys.errors import ArtifactError, ConfigError

PAD = -1  # the item index of padding: sequences are left-padded with it
MIN_ROWS = 4  # user_state's smallest batch (see there)
# model.seen_bias's offset is this times its parameter: AdamW moves a parameter by about the learning
# rate per step whatever its gradient, and the offset has to travel several logits (~-10 on ml-100k)
# in a few hundred steps; a scale gives it that reach without a learning rate of its own.
SEEN_SCALE = 10.0


class Dropout(nn.Dropout):
    """nn.Dropout, drawing its mask from torch.rand on CPU: `bernoulli_` there is ~4x slower and
    was the largest single cost of a CPU training step. On GPU the fused kernel is used."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu":
            return super().forward(x)
        return x * ((torch.rand_like(x) >= self.p) * (1.0 / (1.0 - self.p))).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Item tower: text embedding -> adaptor (+ ID embedding) -> LayerNorm -> dropout


class MoEAdaptor(nn.Module):
    """UniSRec's MoE adaptor: expert k whitens the text embedding as (x - b_k) W_k; a softmax gate
    computed from x mixes the experts. Several experts let domains use different projections."""

    def __init__(self, text_dim: int, d_model: int, n_experts: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(n_experts, text_dim))
        self.weight = nn.Parameter(torch.randn(n_experts, text_dim, d_model) * 0.02)
        # A zero gate starts as a uniform mixture, as in UniSRec.
        self.gate = nn.Linear(text_dim, n_experts, bias=False)
        nn.init.zeros_(self.gate.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_experts, text_dim, d_model = self.weight.shape
        # (x - b_k) W_k = x W_k - b_k W_k: all experts in one matmul.
        experts = (x @ self.weight.transpose(0, 1).reshape(text_dim, n_experts * d_model))
        experts = experts.view(-1, n_experts, d_model) - torch.einsum("kt,ktd->kd", self.bias, self.weight)
        gates = torch.softmax(self.gate(x), dim=-1)
        return torch.einsum("nk,nkd->nd", gates, experts)


def make_adaptor(kind: str, text_dim: int, d_model: int, n_experts: int) -> nn.Module:
    if kind == "moe":
        return MoEAdaptor(text_dim, d_model, n_experts)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(text_dim, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
    if kind == "linear":
        return nn.Linear(text_dim, d_model)
    raise ConfigError(f"config key 'model.adaptor': unknown adaptor {kind!r}")


# ---------------------------------------------------------------------------------------------
# Sequence tower: pre-norm causal Transformer blocks


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """(B, L, d) -> (B, L, d); with `last_only`, (B, 1, d): the last position's output alone."""
        B, L, d = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0
        )
        if last_only:
            # Attention still runs for every query: with one query, SDPA's CPU kernel rounds
            # differently (last bits), and states must not depend on this shortcut.
            y, L = y[:, :, -1:], 1
        return self.proj(y.transpose(1, 2).reshape(B, L, d))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(), nn.Linear(4 * cfg.d_model, cfg.d_model)
        )
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """With `last_only`, only the last position's output (B, 1, d): attention runs over every
        position, the projection and the MLP for the last one alone."""
        h = self.attn(self.norm1(x), allowed, last_only)
        x = (x[:, -1:] if last_only else x) + self.drop(h)
        return x + self.drop(self.mlp(self.norm2(x)))


# ---------------------------------------------------------------------------------------------
# The model


class SeqRecModel(nn.Module):
    """Item tower + causal sequence tower. `n_items` is the prepared catalogue size (all domains).

    With `model.item_ids` the ID table has a row only for `id_items` (the items the model trains on;
    default every item) plus row 0, a fixed zero: `id_row` maps each item_idx to its row, 0 for none,
    so an item never seen in training is represented by its text alone (and an ID-only model cannot
    tell such items apart: `items_without_representation`).
    """

    def __init__(self, cfg: ModelConfig, text_dim: int, n_items: int, id_items: Sequence[int] | None = None):
        super().__init__()
        cfg.validate()
        self.config, self.text_dim, self.n_items = cfg, int(text_dim), int(n_items)
        d = cfg.d_model
        self.adaptor = make_adaptor(cfg.adaptor, text_dim, d, cfg.n_experts) if cfg.item_text else None
        self.item_id = None
        if cfg.item_ids:
            id_items = range(n_items) if id_items is None else id_items
            id_items = (torch.arange(id_items.start, id_items.stop) if isinstance(id_items, range)
                        else torch.as_tensor(id_items, dtype=torch.long))
            self.item_id = nn.Embedding(len(id_items) + 1, d, padding_idx=0)
            nn.init.normal_(self.item_id.weight, std=0.02)
            with torch.no_grad():
                self.item_id.weight[0].zero_()
            id_row = torch.zeros(n_items, dtype=torch.long)
            id_row[id_items] = torch.arange(1, len(id_items) + 1)
            self.register_buffer("id_row", id_row)
        self.item_norm = nn.LayerNorm(d)
        self.position = nn.Embedding(cfg.max_seq_len, d)
        nn.init.normal_(self.position.weight, std=0.02)
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(d)
        # States and item reps both leave a LayerNorm with norm ≈ √d, so a dot product would start
        # at ±d and saturate the softmax (initial loss 32 vs log n = 7.8 on Amazon Office, and no
        # learning in 10 epochs). A final gain of 1/√d starts the logits at unit scale.
        nn.init.constant_(self.final_norm.weight, d ** -0.5)
        # model.seen_bias: starts at 0 (the history changes no score) and is learned with the loss.
        self.seen_bias = nn.Parameter(torch.zeros(())) if cfg.seen_bias else None
        # Frozen text embeddings live outside the checkpoint; set_item_text() fills this.
        self.register_buffer("item_text", None, persistent=False)

    def set_item_text(self, emb: torch.Tensor) -> None:
        """Attach the prepared text embeddings (n_items, text_dim), row i = item_idx i."""
        emb = torch.as_tensor(emb)
        if emb.ndim != 2 or emb.shape[1] != self.text_dim:
            raise ArtifactError(
                f"item text embeddings have shape {tuple(emb.shape)}, the model expects (n, {self.text_dim}): "
                "the checkpoint was trained with another encoder; re-run with the same embedding.encoder"
            )
        # A text-only model scores any catalogue (inductive); an ID table fixes the catalogue size.
        if self.item_id is not None and emb.shape[0] != self.n_items:
            raise ArtifactError(
                f"item text embeddings cover {emb.shape[0]} items, the model's ID table {self.n_items}: "
                "use the prepared data the checkpoint was trained on"
            )
        self.item_text = emb.to(device=self.position.weight.device, dtype=torch.float32)

    def _item_features(self, idx: torch.Tensor, text_drop: float = 0.0) -> torch.Tensor:
        """Item tower before dropout, for any valid item indices; `text_drop`: dropout on the text
        vectors first (in training mode; an augmented view for a contrastive objective)."""
        x = 0
        if self.adaptor is not None:
            if self.item_text is None:
                raise RuntimeError("call model.set_item_text(embeddings) before using a text item tower")
            text = self.item_text[idx]
            if text_drop > 0.0 and self.training:
                text = Dropout(text_drop)(text)
            x = self.adaptor(text)
        if self.item_id is not None:
            x = x + self.item_id(self.id_row[idx])
        return self.item_norm(x)

    def item_reps(self, start: int, stop: int) -> torch.Tensor:
        """Item tower output for the catalogue range [start, stop) (a domain's items are contiguous)."""
        return self.item_reps_at(torch.arange(start, stop, device=self.position.weight.device))

    def item_reps_at(self, idx: torch.Tensor) -> torch.Tensor:
        """Item tower output for the given global item indices (what a sampled loss needs)."""
        return self.drop(self._item_features(idx))

    def encode(self, seq: torch.Tensor, item_table: torch.Tensor | None = None, text_drop: float = 0.0,
               last_only: bool = False) -> torch.Tensor:
        """States after every prefix: (B, L) left-padded item_idx (-1 = padding) -> (B, L, d_model).

        Padding is inert: real positions never attend to it, positions count from the first real
        item, and padded positions return zeros — so an all-padding row (no history) is all zeros.
        With `item_table` (the item tower's output, in eval mode, for every item `seq` holds), `seq`
        holds row numbers of that table instead of item_idx: ranking encodes many batches over the
        same items and computes their tower once. `text_drop`: see `_item_features`. With `last_only`,
        (B, 1, d_model): the state after the whole sequence alone (`user_state`), its last block run
        for the last position only.
        """
        B, L = seq.shape
        if L > self.config.max_seq_len:
            raise ValueError(f"sequence length {L} exceeds model.max_seq_len={self.config.max_seq_len}")
        valid = seq != PAD
        # The tower runs once per distinct item in the batch, not once per position (~10x less work).
        unique, inverse = torch.unique(seq.clamp(min=0), return_inverse=True)
        # index_select, not `[inverse]`: the backward of advanced indexing adds a repeated item's
        # gradients with atomic adds on several CPU threads, in an order that changes from run to run.
        features = self._item_features(unique, text_drop) if item_table is None else item_table.index_select(0, unique)
        x = self.drop(features.index_select(0, inverse.flatten()).view(B, L, -1))
        positions = (valid.cumsum(dim=1) - 1).clamp(min=0)
        x = x + self.position(positions)
        # Causal, and never a padded key — except a padded query's own key, so no softmax row is empty.
        causal = torch.ones(L, L, dtype=torch.bool, device=seq.device).tril()
        diagonal = torch.eye(L, dtype=torch.bool, device=seq.device)
        allowed = (causal & (valid[:, None, :] | diagonal))[:, None]  # (B, 1, L, L) over heads
        for i, block in enumerate(self.blocks):
            x = block(x, allowed, last_only and i == len(self.blocks) - 1)
        return self.final_norm(x) * valid[:, -x.shape[1]:, None]

    def user_state(self, seq: torch.Tensor, item_table: torch.Tensor | None = None) -> torch.Tensor:
        """State after the whole (left-padded) history: (B, L) -> (B, d_model); zeros for no history.

        The last block's projection and MLP run for the last position only (what ranking encodes
        every user with); the result is `encode(seq)[:, -1]` bit for bit. A user's state does not
        depend on who shares the batch: on CPU a matrix product over 1-3 rows rounds differently
        from one over more (MKL's sgemm, measured), so a smaller batch gets empty rows.
        """
        n = len(seq)
        if n < MIN_ROWS:
            seq = torch.cat([seq, seq.new_full((MIN_ROWS - n, seq.shape[1]), PAD)])
        return self.encode(seq, item_table, last_only=True)[:n, -1]

    def score(self, states: torch.Tensor, item_reps: torch.Tensor, out: torch.Tensor | None = None
              ) -> torch.Tensor:
        """(B, d) states × (n, d) items -> (B, n): dot product, or cosine / temperature.

        Leading batch dimensions broadcast like matmul: (N, 1, d) × (N, 1, d) -> (N, 1, 1) pairs.
        With `out`, the same scores are written into it (and it is returned).
        """
        if self.config.score == "cosine":
            states, item_reps = F.normalize(states, dim=-1), F.normalize(item_reps, dim=-1)
            if out is None:
                return states @ item_reps.mT / self.config.temperature
            return torch.matmul(states, item_reps.mT, out=out).div_(self.config.temperature)
        return states @ item_reps.mT if out is None else torch.matmul(states, item_reps.mT, out=out)

    def seen_offset(self) -> torch.Tensor | None:
        """The score offset of an item already in the user's history (model.seen_bias), else None."""
        return None if self.seen_bias is None else self.seen_bias * SEEN_SCALE

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def parameter_counts(self, trainable_only: bool = False) -> dict[str, int]:
        """Parameters per part: the text tower (adaptor), the ID table, the rest (positions,
        Transformer blocks, norms: the sequence tower)."""
        parts = {"text": 0, "ids": 0, "sequence": 0}
        for name, p in self.named_parameters():
            if p.requires_grad or not trainable_only:
                part = "text" if name.startswith("adaptor.") else "ids" if name.startswith("item_id.") else "sequence"
                parts[part] += p.numel()
        return parts

    def id_items(self) -> torch.Tensor:
        """The item_idx values that have an ID row (empty without an ID table)."""
        if self.item_id is None:
            return torch.zeros(0, dtype=torch.long)
        rows = self.id_row.cpu()
        items = torch.nonzero(rows).flatten()
        return items[torch.argsort(rows[items])]  # in table order

    def items_without_representation(self, start: int, stop: int) -> int:
        """Items of [start, stop) an ID-only model has no embedding for (never in its training data):
        they all get the same representation, so it cannot rank them against each other."""
        if self.adaptor is not None or self.item_id is None:
            return 0
        return int((self.id_row[start:stop] == 0).sum())


def describe_parameters(counts: dict[str, int]) -> str:
    """`1,234 parameters (text tower 800, IDs 0, sequence tower 434)`."""
    return (f"{sum(counts.values()):,} parameters (text tower {counts.get('text', 0):,}, IDs "
            f"{counts.get('ids', 0):,}, sequence tower {counts.get('sequence', 0):,})")
