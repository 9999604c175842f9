"""`trec evaluate` with evaluate.task: search — the personalised product search protocol (Van Gysel et
al. 2016; Ai et al. 2017; see trecsys/rank/search_protocol.py) on the target domain, the run's models
beside the floors, each mix chosen on validation queries.

Writes `<run_dir>/eval_search/`: metrics.parquet and comparison.parquet (the columns of eval/, one row
per query instead of per user, paired against the first run) and report.md.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from trecsys.artifacts import describe_file, stage_output, write_manifest, write_parquet, write_text
from trecsys.config import ExperimentConfig, to_dict
from trecsys.model.checkpoint import WEIGHTS
from trecsys.prepared.identity import prepared_file_inputs
from trecsys.prepared.tables import Prepared
from trecsys.rank import evaluation as E
from trecsys.rank import metrics as M
from trecsys.rank import report
from trecsys.rank import search as S
from trecsys.rank import search_protocol as P
from trecsys.rank.scorers import item_counts
from trecsys.runtime import resolve_device
from trecsys.stage_table import EVALUATE

FOLDER = EVALUATE.search_folder
POPULARITY = "relevance + popularity"
RELEVANCE = "relevance (bm25 + encoder)"
BM25 = "bm25"
ENCODER = "text encoder"


def evaluate_search(cfg: ExperimentConfig, prepared: Prepared, systems: list, split: str) -> None:
    ev, sc = cfg.evaluate, cfg.search
    domain = prepared.domain(prepared.target, key="data.target")
    ks = M.check_ks(ev.ks, domain.n_items)
    device = resolve_device(cfg.device)
    started = time.perf_counter()
    index = P.build_index(prepared, domain, sc)
    rows = P.protocol_rows(prepared, split)
    valid = P.sample_rows(P.protocol_rows(prepared, "valid"), sc.tune_queries, cfg.seed)
    unique = list(dict.fromkeys([*rows.queries, *valid.queries]))
    vectors = dict(zip(unique, P.embed_queries(cfg, prepared, unique, device), strict=True))
    popularity = P.popularity_scorer(prepared)

    def scorers(on: P.ProtocolRows) -> dict:
        models = {s.label: P.model_scorer(s.checkpoint, prepared, on, device, ev.user_batch, s.label) for s in systems}
        return {**models, POPULARITY: popularity}

    chosen = P.choose(index, valid, vectors, scorers(valid), sc, ev.exclude_seen)
    runs = [(f"{s.label} + relevance", s.label, chosen[s.label][0]) for s in systems]
    runs += [(POPULARITY, POPULARITY, chosen[POPULARITY][0]), (RELEVANCE, None, chosen["relevance"][0]),
             (BM25, None, S.Mix(1.0, S.THRESHOLD_GRID[0], 0.0)), (ENCODER, None, S.Mix(0.0, S.THRESHOLD_GRID[0], 0.0))]
    tuned_seconds = round(time.perf_counter() - started, 3)

    tops: dict[str, list[np.ndarray]] = {label: [] for label, _, _ in runs}
    for block in P.row_blocks(index, rows, vectors, scorers(rows), sc.query_batch, ev.exclude_seen):
        for label, personal, mix in runs:
            _, top = S.search_topk(block.lexical, block.semantic, block.personal.get(personal) if personal else None,
                                   mix, sc.max_candidates, max(ks), block.exclude)
            tops[label].append(top.numpy())
    topks = [np.concatenate(tops[label]) for label, _, _ in runs]

    counts = item_counts(P.popularity_train(prepared), domain.n_items)
    slices = E.build_slices(rows.targets, rows.train_lengths, P.in_source(prepared, rows), counts,
                            ev.history_buckets, ev.cold_item_interactions)
    item_text = prepared.embeddings[domain.item_start:domain.item_stop]
    percentile = M.popularity_percentile(counts)
    per_row = [E.per_user_metrics(top, slices, ks, item_text, percentile) for top in topks]
    labels = [label for label, _, _ in runs]
    metric_rows, comparison_rows = E.summarise(labels, per_row, topks, ks, domain.n_items, split, ev.bootstrap,
                                               cfg.seed)
    metrics_df = pd.DataFrame(metric_rows, columns=list(E.METRICS_COLUMNS))
    comparison_df = pd.DataFrame(comparison_rows, columns=list(E.COMPARISON_COLUMNS))
    mixes = {label: mix.describe() for label, personal, mix in runs}
    context = report.SearchContext(task="search", run_dir=str(cfg.run_dir), target=prepared.target, split=split,
                   n_users=len(rows.queries), n_queries=len(rows.queries), n_distinct_queries=len(set(rows.queries)),
                   n_without_category=rows.n_without_category, n_items=domain.n_items, ks=ks,
                   exclude_seen=ev.exclude_seen, bootstrap=ev.bootstrap, seed=cfg.seed,
                   cold_item_interactions=ev.cold_item_interactions, history_buckets=ev.history_buckets,
                   models={s.label: str(s.checkpoint) for s in systems}, mixes=mixes,
                   valid_ndcg={name: round(v, 4) for name, (_, v) in chosen.items()}, n_valid_queries=len(valid.queries),
                   fields=list(sc.fields), max_candidates=sc.max_candidates,
                   seconds=round(time.perf_counter() - started, 3), choose_seconds=tuned_seconds)
    final = Path(cfg.run_dir) / FOLDER
    with stage_output(final) as out:
        meta = {"split": split, "target": prepared.target, "task": "search"}
        write_parquet(pa.Table.from_pandas(metrics_df, preserve_index=False), out / "metrics.parquet", meta)
        write_parquet(pa.Table.from_pandas(comparison_df, preserve_index=False), out / "comparison.parquet", meta)
        write_text(out / "report.md", search_report(metrics_df, comparison_df, context))
        inputs = prepared_file_inputs(prepared)
        inputs += [describe_file(s.checkpoint / WEIGHTS) for s in systems]
        write_manifest(out, EVALUATE.name, to_dict(cfg), inputs, {"context": context.to_json()})
    print(report.terminal_table(metrics_df, context))
    if not comparison_df.empty:
        print(comparison_lines(comparison_df, labels[0], report.headline_k(ks)))
    print(f"wrote {final}: metrics.parquet, comparison.parquet, report.md")


def comparison_lines(comparison: pd.DataFrame, reference: str, k: int) -> str:
    rows = comparison[(comparison["slice"] == "all") & (comparison["k"] == k) & (comparison["metric"] == "ndcg")]
    lines = [f"paired against {reference!r}, ndcg@{k} (delta [95% CI], p):"]
    for r in rows.itertuples(index=False):
        lines.append(f"  {r.run}: {r.delta:+.4f} [{r.ci_low:+.4f}, {r.ci_high:+.4f}]  p={r.p_value:.3g}")
    return "\n".join(lines)


def search_report(metrics: pd.DataFrame, comparison: pd.DataFrame, context: report.SearchContext) -> str:
    k = report.headline_k(context.ks)
    runs = list(dict.fromkeys(metrics["run"]))
    cells = metrics[(metrics["slice"] == "all") & (metrics["k"] == k)].set_index(["run", "metric"])

    def cell(run: str, metric: str) -> str:
        r = cells.loc[(run, metric)]
        return f"{r.value:.4f} [{r.ci_low:.4f}, {r.ci_high:.4f}]"

    out = [
        f"# Search evaluation: {context.run_dir}",
        "",
        f"Personalised product search protocol (Van Gysel et al. 2016; Ai et al. 2017) on **{context.target}**, "
        f"split **{context.split}**: for each held-out purchase the query is the purchased item's category path "
        f"(words deduplicated, stop words dropped), the history is the user's earlier purchases, and all "
        f"{context.n_items} items are ranked{', history items excluded' if context.exclude_seen else ''}. "
        f"{context.n_queries} queries ({context.n_distinct_queries} distinct); "
        f"{context.n_without_category} held-out purchases had no category and were left out. "
        f"Intervals: 95% bootstrap over queries ({context.bootstrap} resamples, seed {context.seed}).",
        "",
        f"Lexical index over item fields {context.fields}; at most {context.max_candidates} candidates per "
        f"query. Mixes chosen on {context.n_valid_queries} validation queries by NDCG@10"
        f"{' (the evaluated split itself: optimistic)' if context.split == 'valid' else ''}:",
        "",
    ]
    out += [f"- `{run}`: {mix}" for run, mix in context.mixes.items()]
    out += ["", f"## All queries, K={k}", "", "| run | ndcg | recall | mrr |", "|---|---|---|---|"]
    out += [f"| {run} | {cell(run, 'ndcg')} | {cell(run, 'recall')} | {cell(run, 'mrr')} |" for run in runs]
    if not comparison.empty:
        rows = comparison[(comparison["slice"] == "all") & (comparison["k"] == k)
                          & comparison["metric"].isin(["ndcg", "recall", "mrr"])]
        out += ["", f"## Paired comparison against `{runs[0]}` (K={k})", "",
                "| run | metric | delta [95% CI] | p |", "|---|---|---|---|"]
        out += [f"| {r.run} | {r.metric}@{r.k} | {r.delta:+.4f} [{r.ci_low:+.4f}, {r.ci_high:+.4f}] | {r.p_value:.3g} |"
                for r in rows.itertuples(index=False)]
    out += ["", f"Seconds: {context.seconds} (choosing the mixes: {context.choose_seconds}).", ""]
    return "\n".join(out)
