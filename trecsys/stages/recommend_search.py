"""`trec recommend --query/--queries` in search mode (recommend.query_mode: search): the items that match
each query, ordered for `--user` among the relevant ones only (trecsys/rank/search.py). Many queries run
in one warm process, encoded and ranked search.query_batch at a time; each query's latency is the time
of the batch it rode in (encoding, matching, personal mix and top-K).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from trecsys.config import ExperimentConfig
from trecsys.errors import DataError
from trecsys.prepared.tables import DomainRange, Prepared
from trecsys.rank import search as S
from trecsys.rank import search_protocol as P
from trecsys.rank.rankers import Ranker, make_scorer
from trecsys.rank.requests import Catalogue, Requests, user_requests
from trecsys.rank.rerank import WeightedSum, mmr_rerank


@dataclass
class SearchRun:
    mix: S.Mix
    how: str  # where the mix came from
    latencies: list[float] = field(default_factory=list)  # seconds per query
    seconds: float = 0.0  # encoding and ranking, all batches
    setup_seconds: float = 0.0  # the index, the user's scores and choosing the mix, before any query

    def summary(self, batch: int) -> str:
        lat = np.asarray(self.latencies) * 1000.0
        p50, p95, p99 = np.percentile(lat, [50, 95, 99]) if len(lat) else (0.0, 0.0, 0.0)
        rate = len(lat) / max(self.seconds, 1e-9)
        return (f"search: {len(lat):,} queries in {self.seconds:.2f} s ({rate:,.1f} queries/s, batches of {batch}); "
                f"latency per query p50 {p50:.1f} ms, p95 {p95:.1f} ms, p99 {p99:.1f} ms; "
                f"set up in {self.setup_seconds:.2f} s; mix {self.mix.describe()} ({self.how})")

    def context(self) -> dict:
        lat = np.asarray(self.latencies)
        pct = np.percentile(lat, [50, 95, 99]).round(5).tolist() if len(lat) else [0.0, 0.0, 0.0]
        return {"mix": self.mix.__dict__, "mix_from": self.how, "search_seconds": round(self.seconds, 3),
                "setup_seconds": round(self.setup_seconds, 3),
                "latency_p50_s": pct[0], "latency_p95_s": pct[1], "latency_p99_s": pct[2]}


def rank_queries(cfg: ExperimentConfig, prepared: Prepared, domain: DomainRange, rankers: list, requests: Requests,
                 allowed: np.ndarray | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, SearchRun]:
    """(queries, ≤k) scores and catalogue-local items, best first (-inf: an empty place), and timings."""
    from trecsys.stages.recommend import _empty_masked

    sc, rc = cfg.search, cfg.recommend
    setup = time.perf_counter()
    index = P.build_index(prepared, domain, sc)
    user = requests.users[0] if requests.users else None
    personal = user_scores(cfg, prepared, domain, rankers, user, device) if user is not None else None
    run = SearchRun(*choose_mix(cfg, prepared, domain, index, rankers, personal is not None, device))
    known: dict[str, np.ndarray] = {}  # a query asked again in the same run is not encoded again
    # recommend.diversity re-ranks the top of each result list by MMR, as it does users' lists.
    depth = max(rc.k, rc.diversity_candidates) if rc.diversity > 0 else rc.k
    unit = (torch.nn.functional.normalize(torch.from_numpy(prepared.embeddings[domain.item_start:domain.item_stop]),
                                          dim=1) if rc.diversity > 0 else None)
    P.embed_queries(cfg, prepared, ["warm up"], device)  # loading the encoder is not a query's time
    run.setup_seconds = time.perf_counter() - setup
    values, top_index = [], []
    for lo in range(0, len(requests.labels), sc.query_batch):
        hi = min(lo + sc.query_batch, len(requests.labels))
        started = time.perf_counter()
        queries = requests.labels[lo:hi]
        lexical, semantic = index.parts(queries, P.embed_queries(cfg, prepared, queries, device, known))
        mine = personal.expand(hi - lo, -1) if personal is not None else None
        exclude = requests.exclude[lo:hi]
        has_exclude = any(len(e) for e in exclude)
        v, i = S.search_topk(lexical, semantic, mine, run.mix, sc.max_candidates, depth,
                             exclude if has_exclude else None, allowed)
        v = _empty_masked(v, i, exclude, allowed)
        if unit is not None:
            v, i = mmr_rerank(v, i, unit, rc.k, rc.diversity)
        values.append(v)
        top_index.append(i)
        seconds = time.perf_counter() - started
        run.seconds += seconds
        run.latencies += [seconds] * (hi - lo)
    return torch.cat(values), torch.cat(top_index), run


def user_scores(cfg: ExperimentConfig, prepared: Prepared, domain: DomainRange, rankers: list, user: str,
                device: torch.device) -> torch.Tensor:
    """(1, n_items) the user's scores from recommend's rankers (fused as for their own list)."""
    from trecsys.stages.recommend import ranking_inputs

    mine = user_requests(Catalogue(prepared, domain), [user], None, cfg.recommend.exclude_seen)
    inputs = ranking_inputs(cfg, prepared, domain, mine.histories, mine, prepared.embeddings, device)
    fused = make_scorer(Ranker(WeightedSum.name, parts=rankers), inputs)
    with torch.no_grad():
        return fused.score_chunk(torch.zeros(1, dtype=torch.long), 0, domain.n_items).float().cpu()


def choose_mix(cfg: ExperimentConfig, prepared: Prepared, domain: DomainRange, index: S.SearchIndex, rankers: list,
               personal: bool, device: torch.device) -> tuple[S.Mix, str]:
    """The configured mix, with its null weights chosen on the protocol's validation queries (the
    run's first model as the personal score); defaults where the data cannot say."""
    sc = cfg.search
    if None not in (sc.lexical_weight, sc.threshold, sc.personal_weight) or (
            not personal and sc.lexical_weight is not None):
        return P.fixed_or_default(sc), "set in the config"
    if domain.name != prepared.target:
        return P.fixed_or_default(sc), f"defaults: validation queries exist for the target {prepared.target!r} only"
    try:
        valid = P.sample_rows(P.protocol_rows(prepared, "valid"), sc.tune_queries, cfg.seed)
    except DataError as exc:
        return P.fixed_or_default(sc), f"defaults: no validation queries ({str(exc).split(': ', 1)[-1][:90]}...)"
    unique = list(dict.fromkeys(valid.queries))
    vectors = dict(zip(unique, P.embed_queries(cfg, prepared, unique, device), strict=True))
    scorers = {}
    if personal:
        model = next((r for r in rankers if r.checkpoint is not None), None)
        scorers["personal"] = (P.model_scorer(model.checkpoint, prepared, valid, device, cfg.recommend.user_batch,
                                              model.label) if model else P.popularity_scorer(prepared))
    chosen = P.choose(index, valid, vectors, scorers, sc, cfg.recommend.exclude_seen)
    mix, ndcg = chosen["personal" if personal else "relevance"]
    return mix, f"chosen on {len(valid.queries):,} validation queries, NDCG@10 {ndcg:.3f}"
