"""Search over a prepared catalogue: the index, query embeddings, the personal scorers, and the
protocol of personalised product search (Van Gysel et al. 2016; Ai et al. 2017) that evaluates it and
chooses its mix: for each held-out purchase the query is the purchased item's category path (words
deduplicated, stop words dropped), the history is the user's earlier purchases, and the whole
catalogue is ranked. `trec evaluate` (evaluate.task: search) and `trec recommend --query` share it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from trecsys.config import ExperimentConfig, SearchConfig
from trecsys.errors import ConfigError, DataError
from trecsys.prepared.context import histories_for
from trecsys.prepared.tables import DomainRange, Prepared, domain_split
from trecsys.rank import search as S
from trecsys.rank.rankers import Ranker, RankingInputs, make_scorer
from trecsys.rank.scorers import PopularityScorer, Scorer, to_local

CATEGORY = "category"
NDCG_K = 10


def build_index(prepared: Prepared, domain: DomainRange, sc: SearchConfig) -> S.SearchIndex:
    items = prepared.items.iloc[domain.item_start:domain.item_stop]
    documents = S.search_documents(items, sc.fields)
    return S.SearchIndex(documents, prepared.embeddings[domain.item_start:domain.item_stop], k1=sc.k1, b=sc.b)


def embed_queries(cfg: ExperimentConfig, prepared: Prepared, queries: list[str], device: torch.device,
                  known: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """The queries' unit vectors from the encoder the catalogue was embedded with (refused otherwise).
    Queries stay out of the on-disk embedding cache; `known` remembers them within the process."""
    from trecsys.ingest.embed import embed_texts

    known = {} if known is None else known
    new = list(dict.fromkeys(q for q in queries if q not in known))
    if new:
        vectors, encoder = embed_texts(new, cfg.embedding, device=str(device), progress=False, cache=False)
        check_encoder(encoder, prepared)
        known.update(zip(new, vectors, strict=True))
    return np.stack([known[q] for q in queries]) if queries else np.zeros((0, prepared.embeddings.shape[1]), np.float32)


def check_encoder(encoder: dict, prepared: Prepared) -> None:
    """New texts must be embedded like the catalogue was, or they land in another space."""
    made = prepared.manifest.encoder_record
    keys = ("revision", "dim", "max_length", "pooling") if "revision" in made else ("name", "dim")
    for key in keys:
        if key in made and made[key] != encoder.get(key):
            raise ConfigError(
                f"config key 'embedding.encoder': it gives {key}={encoder.get(key)!r}, but the catalogue in "
                f"{prepared.folder} was embedded with {key}={made[key]!r}: use the encoder the run was prepared with"
            )


# ---------------------------------------------------------------------------------------------
# The protocol's queries


@dataclass
class ProtocolRows:
    """One row per (user, query) of a split's held-out purchases; items catalogue-local."""

    split: str
    queries: list[str]
    user_idx: np.ndarray
    histories_global: list[np.ndarray]  # the user's target-domain purchases before the split
    exclude: list[np.ndarray]  # the same, catalogue-local (evaluate.exclude_seen masks them)
    targets: list[np.ndarray]  # the held-out items whose category gives the row's query
    train_lengths: np.ndarray
    n_without_category: int  # held-out purchases left out: their item has no category

    def take(self, rows: np.ndarray) -> ProtocolRows:
        return ProtocolRows(self.split, [self.queries[r] for r in rows], self.user_idx[rows],
                            [self.histories_global[r] for r in rows], [self.exclude[r] for r in rows],
                            [self.targets[r] for r in rows], self.train_lengths[rows], self.n_without_category)


def category_queries(prepared: Prepared, domain: DomainRange) -> list[str]:
    """Each catalogue item's protocol query ("" without a category); refused when no item has one."""
    items = prepared.items.iloc[domain.item_start:domain.item_stop]
    where = f"{prepared.folder / 'items.parquet'}"
    if CATEGORY not in items.columns:
        raise DataError(f"{where}: the items of domain {domain.name!r} have no category column, so the search "
                        "protocol (a query per held-out purchase from its item's category path) cannot be run "
                        "on this dataset; use evaluate.task: recommend")
    categories = items[CATEGORY].astype(object).where(items[CATEGORY].notna(), "").astype(str).tolist()
    queries = [S.category_query(c) for c in categories]
    if not any(queries):
        raise DataError(f"{where}: no item of domain {domain.name!r} has a category path, so the search protocol "
                        "cannot be run on this dataset; use evaluate.task: recommend")
    return queries


def protocol_rows(prepared: Prepared, split: str) -> ProtocolRows:
    ds = domain_split(prepared, prepared.target)
    domain = ds.domain
    item_query = category_queries(prepared, domain)
    histories = ds.history(split)
    held = ds.targets(split)
    rows: dict[str, list] = {k: [] for k in ("queries", "user", "targets")}
    missing = 0
    for u, items in enumerate(held):
        by_query: dict[str, list[int]] = {}
        for item in to_local([items], domain)[0]:
            query = item_query[item]
            if query:
                by_query.setdefault(query, []).append(int(item))
            else:
                missing += 1
        for query, targets in by_query.items():
            rows["queries"].append(query)
            rows["user"].append(u)
            rows["targets"].append(np.array(targets, dtype=np.int64))
    if not rows["queries"]:
        raise DataError(f"{prepared.folder / 'interactions.parquet'}: the {split} split of {domain.name!r} has no "
                        "held-out purchase of an item with a category path: nothing to evaluate search on")
    users = np.array(rows["user"], dtype=np.int64)
    hist = [histories[u] for u in users]
    return ProtocolRows(
        split=split, queries=rows["queries"], user_idx=ds.user_idx[users], histories_global=hist,
        exclude=to_local(hist, domain), targets=rows["targets"],
        train_lengths=np.array([len(ds.train[u]) for u in users], dtype=np.int64), n_without_category=missing,
    )


def sample_rows(rows: ProtocolRows, limit: int, seed: int) -> ProtocolRows:
    """At most `limit` rows, a seeded sample in row order."""
    if len(rows.queries) <= limit:
        return rows
    keep = np.sort(np.random.default_rng([seed, 18]).choice(len(rows.queries), size=limit, replace=False))
    return rows.take(keep)


# ---------------------------------------------------------------------------------------------
# Personal scores


def model_scorer(checkpoint, prepared: Prepared, rows: ProtocolRows, device: torch.device, user_batch: int,
                 name: str) -> Scorer:
    """The sequence model over each row's history (with the source domains interleaved when the model
    was fine-tuned reading them, as it was trained)."""
    inputs = RankingInputs(
        prepared, prepared.domain(prepared.target, key="data.target"), rows.histories_global,
        counted=lambda: popularity_train(prepared),
        model_histories=lambda history: histories_for(prepared, history, rows.split, rows.user_idx),
        item_text=prepared.embeddings, device=device, user_batch=user_batch,
    )
    return make_scorer(Ranker(name, checkpoint), inputs)


def popularity_train(prepared: Prepared) -> list[np.ndarray]:
    """Every target user's training purchases (catalogue-local): what popularity counts."""
    ds = domain_split(prepared, prepared.target)
    return to_local(ds.train, ds.domain)


def popularity_scorer(prepared: Prepared) -> PopularityScorer:
    domain = prepared.domain(prepared.target, key="data.target")
    return PopularityScorer(popularity_train(prepared), domain.n_items)


def in_source(prepared: Prepared, rows: ProtocolRows) -> np.ndarray | None:
    """Per row: does the user also shop in a source domain (None without source domains)."""
    if not prepared.source:
        return None
    return np.isin(rows.user_idx, prepared.users_of(prepared.source))


# ---------------------------------------------------------------------------------------------
# Ranking the protocol's rows


def row_blocks(index: S.SearchIndex, rows: ProtocolRows, query_vectors: dict[str, np.ndarray],
               scorers: dict[str, Scorer], batch: int, exclude_seen: bool) -> Iterator[S.Block]:
    """The rows in blocks of `batch`: their relevance parts and every scorer's personal scores."""
    n = index.n_items
    for lo in range(0, len(rows.queries), batch):
        hi = min(lo + batch, len(rows.queries))
        queries = rows.queries[lo:hi]
        lexical, semantic = index.parts(queries, np.stack([query_vectors[q] for q in queries]))
        user_rows = torch.arange(lo, hi)
        personal = {name: s.score_chunk(user_rows, 0, n).float().cpu() for name, s in scorers.items()}
        yield S.Block(lexical, semantic, personal, rows.targets[lo:hi], rows.exclude[lo:hi] if exclude_seen else None)


def choose(index: S.SearchIndex, rows: ProtocolRows, query_vectors: dict[str, np.ndarray],
           scorers: dict[str, Scorer], sc: SearchConfig, exclude_seen: bool) -> dict[str, tuple[S.Mix, float]]:
    """Each personal scorer's mix (and "relevance", without one) chosen on `rows` by NDCG@10."""
    k = min(NDCG_K, index.n_items)
    grids = {"relevance": S.mix_grid(sc.lexical_weight, sc.threshold, sc.personal_weight, with_personal=False)}
    grids.update({name: S.mix_grid(sc.lexical_weight, sc.threshold, sc.personal_weight, with_personal=True)
                  for name in scorers})
    blocks = row_blocks(index, rows, query_vectors, scorers, sc.query_batch, exclude_seen)
    return S.choose_mixes(blocks, grids, sc.max_candidates, k)


def fixed_or_default(sc: SearchConfig) -> S.Mix:
    """The configured mix where nothing is left to validation; null weights take the middle of their grid."""
    return S.Mix(0.5 if sc.lexical_weight is None else sc.lexical_weight,
                 0.7 if sc.threshold is None else sc.threshold,
                 0.4 if sc.personal_weight is None else sc.personal_weight)
