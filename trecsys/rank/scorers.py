"""What ranks a domain's catalogue for a domain's users: a trained model or a simple baseline.

Every scorer has the same shape, `score_chunk(user_rows, start, stop)` -> (len(user_rows), stop - start)
scores, with user rows indexing the histories it was built with and catalogue-local item indices,
so `metrics.full_ranking_topk` (evaluate) and the recommend stage can rank with any of them.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import scipy.sparse as sp
import torch

from trecsys.prepared.tables import DomainRange


class Scorer(Protocol):
    name: str
    # Where score_chunk returns its tensors, so the top-K runs there too.
    device: torch.device

    def score_chunk(self, user_rows: torch.Tensor, start: int, stop: int) -> torch.Tensor: ...


def to_local(sequences: Sequence[np.ndarray], domain: DomainRange) -> list[np.ndarray]:
    """Global item_idx -> catalogue-local indices, dropping items of other domains."""
    out = []
    for seq in sequences:
        seq = np.asarray(seq, dtype=np.int64)
        out.append(seq[(seq >= domain.item_start) & (seq < domain.item_stop)] - domain.item_start)
    return out


def item_counts(sequences: Sequence[np.ndarray], n_items: int) -> np.ndarray:
    """Interactions per catalogue-local item over all `sequences`."""
    flat = np.concatenate(list(sequences)) if len(sequences) else np.zeros(0, dtype=np.int64)
    return np.bincount(flat.astype(np.int64), minlength=n_items)[:n_items]


class PopularityScorer:
    """Everyone gets the same list: items by training interaction count (ties: lower index first)."""

    name = "popularity"

    def __init__(self, train_sequences: Sequence[np.ndarray], n_items: int):
        self.device = torch.device("cpu")
        self.counts = torch.from_numpy(item_counts(train_sequences, n_items).astype(np.float32))

    def score_chunk(self, user_rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return self.counts[start:stop].expand(len(user_rows), -1).clone()


class ItemKNNScorer:
    """Item-based kNN: score(u, j) = Σ_{i in history(u)} cos(i, j), the cosine of the items' user columns
    in the binary (train user × item) matrix, with self-similarity removed."""

    name = "item-knn"
    # Similarity columns computed per product: one product of the whole catalogue builds its result
    # with 64-bit indices and then converts it, about 2.7x the finished matrix at once (4.2 GiB for
    # the 206M similarities of bench-scale's 10M target); blocks of columns peak near the matrix itself.
    block_items = 4096

    def __init__(self, train_sequences: Sequence[np.ndarray], histories: Sequence[np.ndarray], n_items: int):
        self.device = torch.device("cpu")
        interactions = _binary_rows(train_sequences, n_items)
        norms = np.sqrt(np.asarray(interactions.multiply(interactions).sum(axis=0)).ravel())
        inverse = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0).astype(np.float32)
        unit_columns = (interactions @ sp.diags(inverse)).tocsc()  # each item's user column scaled to length 1
        transposed = unit_columns.T.tocsr()
        # Each entry is the same sum in the same order as in one whole product (a column block
        # only restricts which columns are computed), so the scores are identical.
        self.blocks: list[tuple[int, sp.csc_matrix]] = []
        for begin in range(0, n_items, self.block_items):
            end = min(begin + self.block_items, n_items)
            block = (transposed @ unit_columns[:, begin:end]).tocsc().astype(np.float32)
            block.setdiag(0.0, k=-begin)  # self-similarity: row begin + j of column j
            block.eliminate_zeros()
            self.blocks.append((begin, block))
        self.histories = _binary_rows(histories, n_items)
        self._columns: tuple[int, int, sp.csc_matrix] | None = None

    @property
    def n_similarities(self) -> int:
        return sum(block.nnz for _, block in self.blocks)

    def _similarity_columns(self, start: int, stop: int) -> sp.csc_matrix:
        parts = [block[:, max(start - begin, 0):min(stop - begin, block.shape[1])]
                 for begin, block in self.blocks if begin < stop and begin + block.shape[1] > start]
        return parts[0] if len(parts) == 1 else sp.hstack(parts, format="csc")

    def score_chunk(self, user_rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        # Every user batch asks for the same item chunks: keep the last column slice.
        if self._columns is None or self._columns[:2] != (start, stop):
            self._columns = (start, stop, self._similarity_columns(start, stop))
        rows = self.histories[user_rows.cpu().numpy()]
        scores = (rows @ self._columns[2]).toarray()
        return torch.from_numpy(scores.astype(np.float32, copy=False))


def _binary_rows(sequences: Sequence[np.ndarray], n_items: int) -> sp.csr_matrix:
    lengths = [len(s) for s in sequences]
    cols = np.concatenate(list(sequences)).astype(np.int64) if sum(lengths) else np.zeros(0, dtype=np.int64)
    rows = np.repeat(np.arange(len(sequences)), lengths)
    matrix = sp.csr_matrix((np.ones(len(cols), dtype=np.float32), (rows, cols)),
                           shape=(len(sequences), n_items))
    matrix.sum_duplicates()
    matrix.data[:] = 1.0  # an item repeated in a sequence counts once
    return matrix


class SeenItems:
    """Each user's distinct catalogue-local items (CSR), to add model.seen_bias's offset to their scores."""

    def __init__(self, histories: Sequence[np.ndarray], domain: DomainRange):
        local = to_local(histories, domain)
        lengths = np.fromiter((len(h) for h in local), dtype=np.int64, count=len(local))
        rows = np.repeat(np.arange(len(local), dtype=np.int64), lengths)
        items = np.concatenate(local) if len(local) else np.zeros(0, dtype=np.int64)
        pairs = np.unique(rows * max(domain.n_items, 1) + items)  # distinct (user, item), by user
        self.items = pairs % max(domain.n_items, 1)
        self.indptr = np.searchsorted(pairs // max(domain.n_items, 1), np.arange(len(local) + 1))

    def lists(self, user_rows: torch.Tensor) -> list[np.ndarray]:
        """Each row's distinct seen items, catalogue-local."""
        return [self.items[self.indptr[r]:self.indptr[r + 1]] for r in user_rows.cpu().numpy()]

    def add(self, scores: torch.Tensor, user_rows: torch.Tensor, start: int, stop: int, offset: float) -> None:
        """scores[i, j - start] += offset for each item j in [start, stop) user_rows[i] has seen."""
        rows = user_rows.cpu().numpy()
        first, lengths = self.indptr[rows], self.indptr[rows + 1] - self.indptr[rows]
        at = np.repeat(first - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
        items, row = self.items[at], np.repeat(np.arange(len(rows)), lengths)
        inside = (items >= start) & (items < stop)
        index = (torch.from_numpy(row[inside]).to(scores.device), torch.from_numpy(items[inside] - start).to(scores.device))
        scores.index_put_(index, torch.full((int(inside.sum()),), offset, dtype=scores.dtype, device=scores.device),
                          accumulate=True)


class ModelScorer:
    """A trained SeqRecModel: user states from the histories, item reps over the domain's range.

    Both are computed once up front (n_users × d and n_items × d are small), in bf16 autocast on
    CUDA; score_chunk is then one fp32 matrix product per block, plus the model's seen_bias offset
    on the items each user's history holds (model.seen_bias; it matters where seen items are ranked).
    """

    def __init__(self, model, histories: Sequence[np.ndarray], domain: DomainRange,
                 item_text: np.ndarray, device: torch.device, name: str = "model", user_batch: int = 1024):
        from trecsys.train.windows import history_batch

        self.name, self.device, self.model = name, torch.device(device), model.to(device).eval()
        model.set_item_text(torch.from_numpy(np.asarray(item_text, dtype=np.float32)))
        blind = model.items_without_representation(domain.item_start, domain.item_stop)
        if blind:
            print(f"note: {name} is an ID-only model and has no embedding for {blind:,} of {domain.n_items:,} "
                  f"{domain.name} items (not in its training data): it cannot rank them, they share one score",
                  file=sys.stderr)
        with torch.no_grad(), self._autocast():
            self.reps = _item_tower(model, torch.arange(domain.item_start, domain.item_stop, device=self.device))
            # The tower's output for every item of the histories, once: batch by batch it would run
            # again for the items each batch shares with the others (~8x the catalogue on Kitchen).
            held = _union(histories)
            inside = (held >= domain.item_start) & (held < domain.item_stop)
            table = torch.empty(len(held), self.reps.shape[1], device=self.device)
            table[torch.from_numpy(inside).to(self.device)] = self.reps[torch.from_numpy(held[inside] - domain.item_start)
                                                                         .to(self.device)]
            table[torch.from_numpy(~inside).to(self.device)] = _item_tower(model, torch.from_numpy(held[~inside])
                                                                           .to(self.device))
            row_of = np.full(int(held.max(initial=-1)) + 1, -1, dtype=np.int64)
            row_of[held] = np.arange(len(held))
            self.states = torch.zeros(len(histories), self.reps.shape[1], device=self.device)
            # Users are encoded in groups of similar history length, each padded only to its group's
            # width (a power of two): padding is inert, and most histories are far shorter than
            # max_seq_len, so full-width batches would spend most of their time on padding. A user's
            # width depends on their own history only, so the result does not depend on user_batch.
            for width, members in _width_groups(histories, model.config.max_seq_len):
                for lo in range(0, len(members), user_batch):
                    rows = members[lo:lo + user_batch]
                    seq = history_batch([row_of[np.asarray(histories[r], dtype=np.int64)] for r in rows],
                                        width).to(self.device)
                    self.states[torch.from_numpy(rows).to(self.device)] = model.user_state(seq, table).float()

        offset = model.seen_offset()
        self.seen_offset = 0.0 if offset is None else float(offset.detach())
        self.seen = SeenItems(histories, domain) if self.seen_offset else None

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def score_chunk(self, user_rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        # The towers ran in bf16; the final product stays fp32 (it is cheap at this width), because
        # bf16's 8-bit mantissa would turn close scores into ties and reorder the top of the list.
        with torch.no_grad():
            scores = self.model.score(self.states[user_rows.to(self.device)], self.reps[start:stop]).float()
        if self.seen is not None:
            self.seen.add(scores, user_rows, start, stop, self.seen_offset)
        return scores

    def score_into(self, user_rows: torch.Tensor, start: int, stop: int, out: torch.Tensor) -> None:
        """score_chunk's scores, bit for bit, written into `out` (float32): full_ranking_topk's buffer."""
        with torch.no_grad():
            self.model.score(self.states[user_rows.to(self.device)], self.reps[start:stop], out=out)
        if self.seen is not None:
            self.seen.add(out, user_rows, start, stop, self.seen_offset)


# Items through the item tower at once: bounds the tower's activations for any catalogue size.
TOWER_CHUNK = 16384


def _item_tower(model, idx: torch.Tensor) -> torch.Tensor:
    """The item tower's float32 output for global item indices, TOWER_CHUNK at a time (eval mode)."""
    out = torch.empty(len(idx), model.config.d_model, device=idx.device)
    for lo in range(0, len(idx), TOWER_CHUNK):
        out[lo:lo + TOWER_CHUNK] = model.item_reps_at(idx[lo:lo + TOWER_CHUNK]).float()
    return out


def _union(histories: Sequence[np.ndarray]) -> np.ndarray:
    """The distinct item_idx of all histories, sorted."""
    if not len(histories):
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.concatenate([np.asarray(h, dtype=np.int64) for h in histories]))


def _width_groups(histories: Sequence[np.ndarray], max_seq_len: int) -> list[tuple[int, np.ndarray]]:
    """(width, user rows) with width the next power of two of the history length, at most max_seq_len."""
    lengths = np.fromiter((min(len(h), max_seq_len) for h in histories), dtype=np.int64, count=len(histories))
    widths = np.minimum(max_seq_len, 1 << np.ceil(np.log2(np.maximum(lengths, 1))).astype(np.int64))
    return [(int(w), np.flatnonzero(widths == w)) for w in np.unique(widths)]
