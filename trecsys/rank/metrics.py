"""Full-ranking metrics in one place: exact top-K over the catalogue, accuracy and beyond-accuracy
metrics from it, and bootstrap confidence intervals / paired tests over users.

Tie rule (documented, deterministic): a higher score ranks first; equal scores rank by the lower
item index. NaN scores count as -inf, like excluded items: they rank last, by index among
themselves. The result is the same for any user batch or item chunk size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from trecsys.errors import ConfigError

# score_chunk(user_rows, item_start, item_stop) -> (len(user_rows), item_stop - item_start) scores,
# where user_rows index the users being ranked and item indices are catalogue-local.
ScoreChunk = Callable[[torch.Tensor, int, int], torch.Tensor]
# score_into(user_rows, item_start, item_stop, out): the same scores, written into `out` (float32).
ScoreInto = Callable[[torch.Tensor, int, int, torch.Tensor], None]

ACCURACY_METRICS = ("recall", "hit", "ndcg", "mrr", "precision")


# ---------------------------------------------------------------------------------------------
# Exact top-K


def chunk_topk(scores: torch.Tensor, k: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of each row by (score desc, index asc), NaN as -inf; indices shifted by `offset`."""
    return _exact_topk(scores.to(torch.float32, copy=True), k, offset)


def _exact_topk(scores: torch.Tensor, k: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """chunk_topk on a float32 tensor it may change: rows holding NaN are cleaned in place."""
    k = min(k, scores.shape[1])
    # One extra place shows whether the k-th score is tied with an item left out; only such rows
    # (rare for learned scores, common for counts) need the exact pass over the whole row.
    probe = min(k + 1, scores.shape[1])
    values, index = torch.topk(scores, probe, dim=1, sorted=True)
    # torch.topk ranks NaN above everything, so a row with a NaN shows one first: clean and redo
    # only those rows, rather than a pass over every score.
    nan_rows = values[:, 0].isnan().nonzero().squeeze(1)
    if len(nan_rows):
        clean = scores[nan_rows].nan_to_num_(nan=-torch.inf, posinf=torch.inf, neginf=-torch.inf)
        scores[nan_rows] = clean
        values[nan_rows], index[nan_rows] = torch.topk(clean, probe, dim=1, sorted=True)
    crowded = (values[:, k] == values[:, k - 1]).nonzero().squeeze(1) if probe > k else None
    if crowded is not None and len(crowded) == len(scores):  # e.g. counts: skip the row copies
        values[:, :k], index[:, :k] = _exact_topk_of_tied_rows(scores, values, index, k)
    elif crowded is not None and len(crowded):
        values[crowded, :k], index[crowded, :k] = _exact_topk_of_tied_rows(
            scores[crowded], values[crowded], index[crowded], k)
    values, index = values[:, :k], index[:, :k]
    # topk sorts by score only: rows with equal scores inside the list need the index order.
    if k > 1 and bool((values[:, 1:] == values[:, :-1]).any()):
        values, index = _by_score_then_index(values, index)
    return values, index + offset


def _by_score_then_index(values: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    by_index = torch.sort(index, dim=1, stable=True).indices
    values, index = values.gather(1, by_index), index.gather(1, by_index)
    by_score = torch.sort(values, dim=1, descending=True, stable=True).indices
    return values.gather(1, by_score), index.gather(1, by_score)


def _exact_topk_of_tied_rows(scores: torch.Tensor, values: torch.Tensor, index: torch.Tensor, k: int
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose k-th score is tied with an item torch.topk left out, which it picks arbitrarily.

    The items above the k-th score are all in topk's list (its first places); the places left go
    to the lowest indices among the items equal to the k-th score.
    """
    kth = values[:, k - 1:k]
    n_above = (values[:, :k] > kth).sum(dim=1, keepdim=True)
    positions = torch.arange(scores.shape[1], dtype=torch.int32, device=scores.device)
    tie_key = torch.where(scores == kth, -positions, torch.iinfo(torch.int32).min)
    lowest_ties = torch.topk(tie_key, k, dim=1, sorted=True).indices
    slot = torch.arange(k, device=scores.device).expand(len(scores), k)
    chosen = torch.where(slot < n_above, index[:, :k], lowest_ties.gather(1, (slot - n_above).clamp(min=0)))
    return _by_score_then_index(scores.gather(1, chosen), chosen)


def merge_topk(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor],
               k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two per-row top lists under the same tie rule."""
    values = torch.cat([a[0], b[0]], dim=1)
    index = torch.cat([a[1], b[1]], dim=1)
    by_index = torch.sort(index, dim=1, stable=True).indices
    values, index = values.gather(1, by_index), index.gather(1, by_index)
    by_score = torch.sort(values, dim=1, descending=True, stable=True).indices[:, :k]
    return values.gather(1, by_score), index.gather(1, by_score)


def _merge_ascending_chunks(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor],
                            k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """merge_topk when every index in `a` is below every index in `b` (chunks in catalogue order):
    both lists are already (score desc, index asc), so one stable sort by score keeps the tie rule."""
    values = torch.cat([a[0], b[0]], dim=1)
    index = torch.cat([a[1], b[1]], dim=1)
    by_score = torch.sort(values, dim=1, descending=True, stable=True).indices[:, :k]
    return values.gather(1, by_score), index.gather(1, by_score)


def full_ranking_topk(score_chunk: ScoreChunk, n_users: int, n_items: int, k: int,
                      exclude: Sequence[np.ndarray] | None = None, user_batch: int = 1024,
                      item_chunk: int = 4096, device: str | torch.device = "cpu",
                      score_into: ScoreInto | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k catalogue-local item indices for every user, with `exclude[u]` items masked out.

    Masked items score -inf: they rank after every other item, so they appear only when fewer than
    k items remain. The catalogue is scored one (user_batch × item_chunk) block at a time, in
    catalogue order, into a running top-k (RunningTopK): memory is O(user_batch × item_chunk),
    whatever the number of users and items. `score_chunk` must return a tensor it does not keep:
    it is masked in place. With `score_into` (same scores, written into a given float32 tensor), every
    block is scored into one buffer instead: no new (user_batch × item_chunk) tensor per block.
    """
    if k < 1:
        raise ValueError("k must be >= 1")
    masks = ExclusionMasks(exclude) if exclude is not None else None
    # The lists go straight into tensors made before any block: tensors that outlive the blocks,
    # made between them, would pin the allocator's freed blocks apart and make it take new ones
    # (+0.3-0.5 GiB over a Kitchen evaluation with glibc's malloc, scripts/bench_rank.py).
    width = min(k, n_items)
    out_values = torch.empty(n_users, width)
    out_index = torch.empty(n_users, width, dtype=torch.long)
    # Made before the blocks too. Each block's rows are laid out a whole number of segments wide, the
    # columns past the chunk's end set to -inf: RunningTopK reads the block in place, with no copy
    # to pad it, and those columns never enter a list (they rank after every item of the chunk,
    # and a chunk narrower than k is not padded).
    buffer = (torch.empty(min(user_batch, n_users) * _padded(min(item_chunk, n_items), k), device=device)
              if score_into is not None else None)
    for lo in range(0, n_users, user_batch):
        hi = min(lo + user_batch, n_users)
        rows = torch.arange(lo, hi, device=device)
        block_masks = masks.block(lo, hi, device) if masks is not None else None
        top = RunningTopK(k)
        for start in range(0, n_items, item_chunk):
            stop = min(start + item_chunk, n_items)
            if buffer is not None:
                block = buffer[:(hi - lo) * _padded(stop - start, k)].view(hi - lo, -1)
                scores = block[:, :stop - start]
                block[:, stop - start:] = -torch.inf
                score_into(rows, start, stop, scores)
            else:
                # Changed in place: score_chunk hands over a tensor of its own (never shared state).
                block = scores = score_chunk(rows, start, stop).float()
            if block_masks is not None:
                block_masks.apply(scores, start, stop)
            top.add(block, start)
        out_values[lo:hi], out_index[lo:hi] = top.values.cpu(), top.index.cpu()
    return out_values, out_index


# Columns per segment of a block whose maximum decides whether any of them can enter a top list.
SEGMENT = 64


def _padded(width: int, k: int) -> int:
    """A chunk's width rounded up to whole segments (not when narrower than k)."""
    return width if width < k else -(-width // SEGMENT) * SEGMENT


class RunningTopK:
    """The exact top-k of rows over score blocks added in catalogue order (each block's items after
    every earlier block's), under the tie rule of this module.

    Once a row holds k items, a later item can only enter by beating the row's k-th score strictly
    (an equal score loses the tie: its index is higher). Most of a block cannot, so a block is read
    once for the maxima of its segments of SEGMENT columns (a vectorised pass costing a fraction of
    the score product); only segments whose maximum beats their row's k-th score are gathered, and
    their entering items are merged into the rows they belong to. The first block has no list yet:
    its k-th largest segment maximum bounds its k-th score from below (k segments reach it), so only
    items at or above that bound are gathered. NaN counts as -inf and never enters. When many items
    enter (scores rising along the catalogue), or the first block's bound is not finite, the block
    goes through the plain exact top-k instead; every path gives the same lists.
    """

    def __init__(self, k: int):
        self.k = k
        self.values: torch.Tensor | None = None
        self.index: torch.Tensor | None = None

    def add(self, scores: torch.Tensor, start: int) -> None:
        """Merge a (rows × items) float32 block whose items are start, start + 1, ... (changed in place)."""
        n_rows, width = scores.shape
        n_segments = -(-width // SEGMENT)
        first = self.values is None
        if (first and n_segments < self.k) or (not first and self.values.shape[1] < self.k):
            self._merge_block(scores, start)
            return
        segmented = scores
        if width != n_segments * SEGMENT or not scores.is_contiguous():
            # Padding scores -inf, which never enters a full list nor reaches a finite bound.
            segmented = scores.new_full((n_rows, n_segments * SEGMENT), -torch.inf)
            segmented[:, :width] = scores
        segments = segmented.view(n_rows * n_segments, SEGMENT)
        maxima = segments.amax(dim=1).view(n_rows, n_segments)
        if first:
            bound = torch.topk(maxima, self.k, dim=1).values[:, -1:]
            # A NaN maximum hides the rest of its segment, and a bound of ±inf lets -inf or NaN in.
            if not bool(bound.isfinite().all()) or bool(maxima.isnan().any()):
                self._merge_block(scores, start)
                return
            hot_rows, hot_segments = (maxima >= bound).nonzero(as_tuple=True)
        else:
            bound = self.values[:, -1:]
            # Not (maximum <= bound): above it, or NaN, which hides the rest of its segment.
            hot_rows, hot_segments = (maxima <= bound).logical_not_().nonzero(as_tuple=True)
            if not len(hot_rows):
                return
        values = segments.index_select(0, hot_rows * n_segments + hot_segments)
        # Row-major: each row's entering items come out in catalogue order.
        which, place = ((values >= bound[hot_rows]) if first else (values > bound[hot_rows])).nonzero(as_tuple=True)
        if not len(which):
            return
        rows = hot_rows[which]
        counts = torch.bincount(rows, minlength=n_rows)
        # Rows where many items enter (scores rising along the catalogue, or close together) take the
        # plain top-k of their own row of the block; the others are merged below. One heavy row no
        # longer sends the whole block down the plain path.
        heavy = counts > 4 * self.k
        if bool(heavy.all()) or (not first and bool((heavy | (counts == 0)).all())):
            self._merge_block(scores, start, None if first else counts.nonzero().squeeze(1))
            return
        heavy_rows = heavy.nonzero().squeeze(1)
        if len(heavy_rows):
            light = ~heavy[rows]
            rows, which, place, counts = rows[light], which[light], place[light], counts.masked_fill(heavy, 0)
            if first:
                heavy_top = _exact_topk(scores[heavy_rows], self.k, offset=start)
        most = int(counts.max())
        # Each row's list, then its entering items in catalogue order (padding -inf after them), sorted
        # by score, stably: equal scores keep the lower index first. The first block has no list, and
        # at least k entering items a row; later rows hold k items, so padding is never chosen.
        held = 0 if first else self.k
        position = held + torch.arange(len(rows), device=scores.device) - (torch.cumsum(counts, dim=0) - counts)[rows]
        merged_values = torch.full((n_rows, held + most), -torch.inf, device=scores.device)
        merged_index = torch.zeros((n_rows, held + most), dtype=torch.long, device=scores.device)
        if not first:
            merged_values[:, :held], merged_index[:, :held] = self.values, self.index
        merged_values[rows, position] = values[which, place]
        merged_index[rows, position] = hot_segments[which] * SEGMENT + place + start
        by_score = torch.sort(merged_values, dim=1, descending=True, stable=True).indices[:, :self.k]
        self.values, self.index = merged_values.gather(1, by_score), merged_index.gather(1, by_score)
        if len(heavy_rows) and first:  # no list before this block: the heavy rows' own top-k
            self.values[heavy_rows], self.index[heavy_rows] = heavy_top
        elif len(heavy_rows):  # their lists are unchanged above: merged with the block's top-k
            self._merge_block(scores, start, heavy_rows)

    def _merge_block(self, scores: torch.Tensor, start: int, rows: torch.Tensor | None = None) -> None:
        """The plain path: the block's own exact top-k, merged (for `rows` only, when given)."""
        if rows is None or len(rows) == len(scores):
            part = _exact_topk(scores, self.k, offset=start)
            self.values, self.index = part if self.values is None else _merge_ascending_chunks(
                (self.values, self.index), part, self.k)
            return
        part = _exact_topk(scores[rows], self.k, offset=start)
        self.values[rows], self.index[rows] = _merge_ascending_chunks((self.values[rows], self.index[rows]), part,
                                                                      self.k)


class ExclusionMasks:
    """Each user's excluded items in one CSR layout, so masking a block costs no per-user Python loop."""

    def __init__(self, exclude: Sequence[np.ndarray]):
        lengths = np.fromiter((len(e) for e in exclude), dtype=np.int64, count=len(exclude))
        self.indptr = np.concatenate([[0], np.cumsum(lengths)])
        self.items = (np.concatenate([np.asarray(e, dtype=np.int64) for e in exclude])
                      if len(exclude) else np.zeros(0, dtype=np.int64))
        self.rows = np.repeat(np.arange(len(exclude), dtype=np.int64), lengths)

    def block(self, first_user: int, last_user: int, device: str | torch.device = "cpu") -> BlockMasks:
        """The excluded (row, item) pairs of users [first_user, last_user), ordered by item."""
        lo, hi = self.indptr[first_user], self.indptr[last_user]
        items, rows = self.items[lo:hi], self.rows[lo:hi] - first_user
        order = np.argsort(items, kind="stable")
        return BlockMasks(items[order], torch.from_numpy(rows[order]).to(device),
                          torch.from_numpy(items[order]).to(device))

    def apply(self, scores: torch.Tensor, first_user: int, last_user: int, start: int, stop: int) -> None:
        """Set the excluded items of users [first_user, last_user) among items [start, stop) to -inf."""
        self.block(first_user, last_user, scores.device).apply(scores, start, stop)


class BlockMasks:
    """One user block's excluded pairs sorted by item: an item chunk's pairs are one slice."""

    def __init__(self, sorted_items: np.ndarray, rows: torch.Tensor, items: torch.Tensor):
        self.sorted_items, self.rows, self.items = sorted_items, rows, items

    def apply(self, scores: torch.Tensor, start: int, stop: int) -> None:
        lo, hi = np.searchsorted(self.sorted_items, [start, stop])
        if hi > lo:
            scores[self.rows[lo:hi], self.items[lo:hi] - start] = -torch.inf


def check_ks(ks: Sequence[int], n_items: int, key: str = "evaluate.ks") -> list[int]:
    """Sorted unique cut-offs, refused when empty, below 1 or beyond the catalogue."""
    if not ks:
        raise ConfigError(f"config key '{key}' is empty: give at least one cut-off, e.g. [10]")
    bad = [k for k in ks if k < 1]
    if bad:
        raise ConfigError(f"config key '{key}': cut-offs must be >= 1, got {bad}")
    too_big = [k for k in ks if k > n_items]
    if too_big:
        raise ConfigError(
            f"config key '{key}': K={max(too_big)} is larger than the target catalogue of {n_items} items; "
            f"use cut-offs <= {n_items}"
        )
    return sorted(set(ks))


def in_row_lists(index: np.ndarray, lists: Sequence[np.ndarray]) -> np.ndarray:
    """(rows, C) bool: whether index[i, j] is one of lists[i]; entries < 0 (holes) never are.
    One (row, item) key per pair turns the per-row membership test into one np.isin."""
    index = np.asarray(index, dtype=np.int64)
    lengths = [len(x) for x in lists]
    if not sum(lengths):
        return np.zeros(index.shape, dtype=bool)
    flat = np.concatenate([np.asarray(x, dtype=np.int64) for x in lists])
    width = int(max(index.max(initial=0), flat.max())) + 1
    held = np.repeat(np.arange(len(lists), dtype=np.int64), lengths) * width + flat
    asked = np.arange(len(lists), dtype=np.int64)[:, None] * width + np.maximum(index, 0)
    return np.isin(asked, held) & (index >= 0)


# ---------------------------------------------------------------------------------------------
# Accuracy


def hit_matrix(topk_index: torch.Tensor | np.ndarray, targets: Sequence[np.ndarray]
               ) -> tuple[np.ndarray, np.ndarray]:
    """(n_users, depth) bool: is the ranked item a target; and each user's number of distinct targets."""
    topk = np.asarray(topk_index, dtype=np.int64)
    n_users = topk.shape[0]
    lengths = np.fromiter((len(t) for t in targets), dtype=np.int64, count=len(targets))
    if len(targets) != n_users:
        raise ValueError(f"{n_users} ranked users but {len(targets)} target sets")
    flat = (np.concatenate([np.asarray(t, dtype=np.int64) for t in targets])
            if n_users else np.zeros(0, dtype=np.int64))
    # One (user, item) key per pair turns the per-user membership test into one np.isin.
    width = int(max(topk.max(initial=-1), flat.max(initial=-1))) + 1
    target_keys = np.unique(np.repeat(np.arange(n_users, dtype=np.int64), lengths) * width + flat)
    n_targets = np.bincount(target_keys // max(width, 1), minlength=n_users)
    hits = np.isin(np.arange(n_users, dtype=np.int64)[:, None] * width + topk, target_keys)
    return hits, n_targets


def ranking_metrics(topk_index: torch.Tensor | np.ndarray, targets: Sequence[np.ndarray], ks: Sequence[int]
                    ) -> dict[str, np.ndarray]:
    """Per-user Recall/HR/NDCG/MRR/Precision at each K from top lists and held-out target sets.

    Returns {"recall@10": array(n_users), ...}. Users without targets get NaN (callers drop them).
    Repeated targets count once. NDCG uses binary gains, log2(rank + 1) discounts, and the ideal
    DCG of min(|targets|, K) hits.
    """
    hits, n_targets = hit_matrix(topk_index, targets)
    depth = hits.shape[1]
    discounts = 1.0 / np.log2(np.arange(2, depth + 2))
    ideal_by_count = np.concatenate([[0.0], np.cumsum(discounts)])
    first_hit = np.where(hits.any(axis=1), hits.argmax(axis=1), depth)
    valid = n_targets > 0
    out: dict[str, np.ndarray] = {}
    for k in ks:
        if k > depth:
            raise ValueError(f"K={k} is larger than the ranked depth {depth}")
        n_hit = hits[:, :k].sum(axis=1)
        ideal = ideal_by_count[np.minimum(n_targets, k)]
        with np.errstate(invalid="ignore", divide="ignore"):
            metrics = {
                "recall": n_hit / n_targets,
                "hit": (n_hit > 0).astype(float),
                "ndcg": (hits[:, :k] @ discounts[:k]) / ideal,
                "mrr": np.where(first_hit < k, 1.0 / (first_hit + 1), 0.0),
                "precision": n_hit / k,
            }
        for name, values in metrics.items():
            out[f"{name}@{k}"] = np.where(valid, values, np.nan)
    return out


# ---------------------------------------------------------------------------------------------
# Beyond accuracy


def catalogue_coverage(topk_index: torch.Tensor | np.ndarray, n_items: int, ks: Sequence[int]
                       ) -> dict[str, float]:
    """Fraction of the catalogue that appears in at least one user's top-K."""
    topk = np.asarray(topk_index, dtype=np.int64)
    return {f"coverage@{k}": len(np.unique(topk[:, :k])) / n_items for k in ks}


def intra_list_diversity(topk_index: torch.Tensor | np.ndarray, item_embeddings: np.ndarray,
                         ks: Sequence[int], user_batch: int = 8192) -> dict[str, np.ndarray]:
    """Per-user mean pairwise (1 − cosine) of the top-K items' text embeddings (K >= 2 only).

    With unit rows r_i, Σ_{i≠j} cos_ij = ‖Σ r_i‖² − Σ ‖r_i‖², so only the sum of each list's
    vectors is needed: embedding_bag forms it without materialising (users × K × dim).
    """
    topk = torch.as_tensor(np.asarray(topk_index, dtype=np.int64))
    norms = np.linalg.norm(item_embeddings, axis=1, keepdims=True)
    unit = torch.from_numpy(np.divide(item_embeddings, norms, out=np.zeros_like(item_embeddings),
                                      where=norms > 0).astype(np.float32))
    has_text = torch.from_numpy((norms[:, 0] > 0).astype(np.float64))  # ‖r_i‖², 0 for an item without text
    ks = sorted(k for k in ks if k >= 2)
    out = {f"diversity@{k}": np.empty(len(topk)) for k in ks}
    for lo in range(0, len(topk), user_batch):
        block = topk[lo:lo + user_batch]
        squares = torch.cumsum(has_text[block], dim=1)
        total, done = torch.zeros(len(block), unit.shape[1], dtype=torch.float64), 0
        for k in ks:  # each K adds the items after the previous K
            total += F.embedding_bag(block[:, done:k], unit, mode="sum").double()
            done = k
            pair_cos = (total * total).sum(dim=1) - squares[:, k - 1]
            out[f"diversity@{k}"][lo:lo + user_batch] = (1.0 - pair_cos / (k * (k - 1))).numpy()
    return out


def popularity_percentile(counts: np.ndarray) -> np.ndarray:
    """Each item's popularity as a percentile (0–100) of the catalogue; equal counts share the mean rank."""
    counts = np.asarray(counts)
    if len(counts) < 2:
        return np.full(len(counts), 100.0)
    order = np.argsort(counts, kind="stable")
    ranks = np.empty(len(counts))
    sorted_counts = counts[order]
    # Average rank within each group of equal counts, like scipy.stats.rankdata(method="average").
    _, first, group_size = np.unique(sorted_counts, return_index=True, return_counts=True)
    mean_rank = first + (group_size - 1) / 2.0
    ranks[order] = np.repeat(mean_rank, group_size)
    return 100.0 * ranks / (len(counts) - 1)


def average_popularity(topk_index: torch.Tensor | np.ndarray, percentile: np.ndarray, ks: Sequence[int]
                       ) -> dict[str, np.ndarray]:
    """Per-user mean popularity percentile of the top-K items (higher: a more popularity-biased list)."""
    topk = np.asarray(topk_index, dtype=np.int64)
    pct = percentile[topk]
    running = np.cumsum(pct, axis=1)
    return {f"popularity@{k}": running[:, k - 1] / k for k in ks}


# ---------------------------------------------------------------------------------------------
# Bootstrap over users


def resample_counts(n_users: int, n_samples: int, seed: int) -> Iterator[np.ndarray]:
    """Blocks of bootstrap resamples as per-user multiplicities (block, n_users), in a seeded order.

    The same (n_users, n_samples, seed) gives the same resamples, so two systems scored on the
    same users share them: that is what makes the comparison paired. The block size depends on
    n_users only (the random stream depends on it), and bounds memory to ~4M counts.
    """
    rng = np.random.default_rng(seed)
    block = max(1, (1 << 22) // max(n_users, 1))
    for lo in range(0, n_samples, block):
        size = min(block, n_samples - lo)
        draws = rng.integers(0, n_users, size=(size, n_users))
        flat = (draws + np.arange(size)[:, None] * n_users).ravel()
        yield np.bincount(flat, minlength=size * n_users).reshape(size, n_users)


def bootstrap_means(values: np.ndarray, n_samples: int, seed: int) -> np.ndarray:
    """(n_samples, n_columns) means of `values` (n_users, n_columns) over resampled users."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    n_users = len(values)
    blocks = [counts @ values / n_users for counts in resample_counts(n_users, n_samples, seed)]
    return np.concatenate(blocks) if blocks else np.zeros((0, values.shape[1]))


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    tail = (1.0 - level) / 2.0 * 100.0
    return np.percentile(samples, tail, axis=0), np.percentile(samples, 100.0 - tail, axis=0)


def paired_p_value(deltas: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """Two-sided paired bootstrap p-value of a mean difference: how often a resampled difference,
    re-centred on zero (the null), is at least as far from zero as the observed one."""
    deltas = np.atleast_2d(np.asarray(deltas, dtype=np.float64).T).T
    extreme = (np.abs(deltas - observed) >= np.abs(observed) - 1e-12).sum(axis=0)
    return (extreme + 1.0) / (len(deltas) + 1.0)
