"""`trec recommend`: top-K items of a catalogue per user (or per text query), ranked by the run's latest
model, `--model`, or a fusion of rankers, with the exact chunked top-K that evaluation uses; written to
Parquet so that cron can run it: under a lock, through a temporary file renamed into place.

Output (`--output`): a .parquet file, or a folder that gets `<folder>/date=YYYY-MM-DD/<name>.parquet`
(default `<run_dir>/recommend/`, `<run_dir>/queries/` for queries). Columns: user_id, rank, item_id,
score (query mode adds `query` first), with the original ids; the models, their sha256 and the
creation time are in the file's metadata. Beside it: `_<name>.unknown_users.txt` (requested users the
run does not know, when there are any) and `_<name>.manifest.json`; the leading underscore makes
Parquet dataset readers (pandas, pyarrow, Spark) skip them when reading the date-partitioned folder.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from trecsys import __version__
from trecsys.artifacts import (
    describe_file,
    read_parquet,
    run_lock,
    verify_stage_folder,
    write_manifest,
    write_parquet,
    write_text,
)
from trecsys.config import ExperimentConfig, to_dict
from trecsys.console import log
from trecsys.errors import ArtifactError, ConfigError, DataError
from trecsys.model.checkpoint import (
    CONFIG,
    WEIGHTS,
    is_checkpoint,
    latest_checkpoint,
    read_info,
    weights_sha256,
)
from trecsys.prepared.context import histories_for
from trecsys.prepared.identity import check_same_prepared, prepared_file_inputs
from trecsys.prepared.tables import PREPARED, DomainRange, Prepared, domain_split, load_prepared
from trecsys.rank.ann import HNSWIndex
from trecsys.rank.metrics import full_ranking_topk, in_row_lists
from trecsys.rank.rankers import Ranker, RankingInputs, make_scorer
from trecsys.rank.requests import (
    Catalogue,
    Requests,
    query_requests,
    read_histories,
    read_queries,
    read_user_ids,
    user_requests,
)
from trecsys.rank.rerank import Part, WeightedSum, category_mask, masked, mmr_rerank
from trecsys.rank.scorers import ModelScorer, to_local
from trecsys.rank.search_protocol import check_encoder
from trecsys.runtime import apply_threads, resolve_device
from trecsys.stage_table import RECOMMEND
from trecsys.stages.recommend_shards import is_sharded, run_sharded

STAGE = RECOMMEND.name
DEFAULT_FOLDERS = {"users": RECOMMEND.folder, "queries": RECOMMEND.search_folder}
FILE_NAMES = {"users": "recommendations.parquet", "queries": "queries.parquet"}
METADATA_KEY = "trecsys.recommend"
# recommend.fusion's names for the baselines -> their rankers' labels.
BASELINE_NAMES = {"popularity": "popularity", "itemknn": "item-knn", "item-knn": "item-knn"}


@dataclass
class Output:
    """Where one recommend run writes: the Parquet file and its two companions."""

    parquet: Path
    unknown_users: Path
    manifest: Path


def run(cfg: ExperimentConfig, model: str | None = None, users: str | None = None, histories: str | None = None,
        query: list[str] | None = None, queries: str | None = None, user: str | None = None,
        output: str | None = None, wait: float = 0.0, strict: bool = False, show: int | None = None,
        as_of: str | None = None, verify: bool = False) -> Output:
    threads = apply_threads(cfg.runtime.threads)
    if is_sharded():  # under torchrun: each rank ranks a share of the users (recommend_shards.py)
        if as_of:
            raise ConfigError("option --as-of ranks on one process for offline scoring; run it without torchrun")
        return run_sharded(cfg, model, users, histories, output, wait, strict, verify, bool(query or queries))
    query_texts = _query_texts(query, queries)
    mode = "queries" if query_texts else "users"
    _check_as_of(as_of, histories, query_texts)
    if query_texts and (users or histories):
        raise ConfigError("options --query/--queries rank items for a text, not for --users/--histories: give one or the other")
    if user is not None and not query_texts:
        raise ConfigError("option --user blends a user into --query/--queries; for users' lists use --users FILE")
    out = output_paths(cfg, output, mode)
    with run_lock(out.parquet, wait_s=wait):
        started = time.perf_counter()
        prepared = load_prepared(cfg.run_dir, verify=verify)
        rc = cfg.recommend
        domain = prepared.domain(rc.domain or prepared.target, key="recommend.domain")
        search = bool(query_texts) and rc.query_mode == "search"
        # Search without --user ranks by relevance alone: no model needed.
        rankers = [] if search and user is None and model is None else resolve_rankers(cfg, model, prepared)
        for ranker in rankers:
            if ranker.checkpoint is not None:
                verify_stage_folder(ranker.checkpoint, full_hash=verify)
        if as_of and domain.name != prepared.target:
            raise ConfigError(f"option --as-of ranks the target domain {prepared.target!r} as `trec evaluate` "
                              f"does; recommend.domain is {domain.name!r}")
        catalogue = Catalogue(prepared, domain, as_of)
        if query_texts:
            requests = query_requests(catalogue, query_texts, user, rc.exclude_seen)
        else:
            user_ids = read_user_ids(Path(users)) if users else None
            given = read_histories(Path(histories)) if histories else None
            requests = user_requests(catalogue, user_ids, given, rc.exclude_seen)
            _check_users(requests, users, strict)
        items = prepared.items.iloc[domain.item_start:domain.item_stop].reset_index(drop=True)
        allowed = category_mask(items, rc.include_categories, rc.exclude_categories, domain.name)
        device = resolve_device(cfg.device)
        ranking_started, ranking_cpu = time.perf_counter(), time.process_time()
        if search:
            from trecsys.stages.recommend_search import rank_queries

            values, index, searched = rank_queries(cfg, prepared, domain, rankers, requests, allowed, device)
        else:
            values, index = rank(cfg, prepared, domain, rankers, requests, allowed, device)
        rank_seconds = time.perf_counter() - ranking_started
        rank_cpu_seconds = time.process_time() - ranking_cpu
        if search:  # what queries/s measures: the batches, not the index or choosing the mix
            rank_seconds = searched.seconds
        table = output_table(requests, mode, values, index, items["item_id"].astype(str).to_numpy())
        seconds = time.perf_counter() - started
        context = _context(cfg, domain, rankers, requests, mode, seconds, rank_seconds, rank_cpu_seconds)
        if query_texts:
            context["query_mode"] = rc.query_mode
            if search:
                context.update(searched.context())
        write_output(out, table, requests, cfg, prepared, rankers, context)
    if requests.unknown:
        print(f"warning: {len(requests.unknown):,} of {len(requests.unknown) + len(requests.labels):,} requested "
              f"user ids are not in the prepared data; they got no list (listed in {out.unknown_users})",
              file=sys.stderr)
    n_shown = show if show is not None else (min(len(requests.labels), 5) if query_texts else 0)
    if n_shown:
        histories = history_titles(prepared, requests, n_shown) if mode == "users" else None
        print(show_lists(table, item_titles(items), n_shown, histories))
    if search:
        print(searched.summary(cfg.search.query_batch))
    what, rate = ("queries" if query_texts else "users"), len(requests.labels) / max(rank_seconds, 1e-9)
    log(f"recommend: {len(requests.labels):,} {what} × {domain.n_items:,} items of {domain.name} in "
          f"{seconds:.1f} s ({rate:,.{0 if rate >= 100 else 1}f} {what}/s ranking), "
          f"{table.num_rows:,} rows → {out.parquet}; {threads.line()}")
    return out


def _check_as_of(as_of: str | None, histories: str | None, query_texts: list[str]) -> None:
    """--as-of replays the prepared users at a split; new users and queries have no split."""
    if as_of is None:
        return
    if as_of not in ("valid", "test"):
        raise ConfigError(f"option --as-of: {as_of!r} is not a held-out split; use valid or test")
    if histories or query_texts:
        raise ConfigError("option --as-of ranks the prepared users as of a split; it does not combine with "
                          "--histories, --query or --queries")


def _query_texts(query: list[str] | None, queries: str | None) -> list[str]:
    texts = [q.strip() for q in query or [] if q.strip()]
    if query and not texts:
        raise ConfigError("option --query: the query is empty")
    if queries:
        texts += read_queries(Path(queries))
    return texts


# ---------------------------------------------------------------------------------------------
# Where to write, and what is known about the users asked for


def output_paths(cfg: ExperimentConfig, output: str | None, mode: str = "users", date: str | None = None) -> Output:
    """`--output` as a .parquet file, or a folder partitioned by (local) date; default under run_dir."""
    if output is not None and Path(output).suffix.lower() == ".parquet":
        parquet = Path(output)
    else:
        folder = Path(output) if output is not None else Path(cfg.run_dir) / DEFAULT_FOLDERS[mode]
        parquet = folder / f"date={date or time.strftime('%Y-%m-%d')}" / FILE_NAMES[mode]
    stem = parquet.name[: -len(".parquet")]
    return Output(parquet, parquet.with_name(f"_{stem}.unknown_users.txt"), parquet.with_name(f"_{stem}.manifest.json"))


def _check_users(requests: Requests, users: str | None, strict: bool) -> None:
    unknown = requests.unknown
    source = f"--users {users}" if users else "--histories"
    if not requests.labels:
        if unknown:
            raise DataError(f"{source}: none of its {len(unknown):,} user ids is in the prepared data "
                            f"(e.g. {', '.join(map(repr, unknown[:3]))}): check the ids or the run_dir")
        raise DataError("no users to recommend for: the recommended domain has no users in the prepared data")
    if unknown and strict:
        raise DataError(f"{source}: {len(unknown):,} user id(s) are not in the prepared data (e.g. "
                        f"{', '.join(map(repr, unknown[:3]))}); nothing was written (--strict)")


# ---------------------------------------------------------------------------------------------
# Rankers


def resolve_rankers(cfg: ExperimentConfig, model: str | None, prepared: Prepared) -> list[Ranker]:
    """recommend.fusion, or the model alone; `latest` is --model, else the run's latest checkpoint."""
    from trecsys.config import FusionComponent

    parts = cfg.recommend.fusion or [FusionComponent("latest")]
    if model and not any(p.model == "latest" for p in parts):
        raise ConfigError("option --model: recommend.fusion has no `model: latest` entry for it to fill")
    rankers = []
    for i, part in enumerate(parts):
        name = part.model.strip()
        if name.lower() in BASELINE_NAMES:
            rankers.append(Ranker(BASELINE_NAMES[name.lower()], weight=part.weight))
            continue
        if name == "latest" and model:
            folder, where = Path(model), f"--model {model}"
        elif name == "latest":
            folder, where = latest_checkpoint(Path(cfg.run_dir)), "recommend"
            if folder is None:
                raise ArtifactError(
                    f"{cfg.run_dir} has no trained model (finetune/, distill/ or pretrain/): train one with "
                    "`trec run`, pass --model, or rank by popularity with recommend.fusion=[{model: popularity}]"
                )
        else:
            folder, where = Path(name).expanduser(), f"config key 'recommend.fusion[{i}].model'"
        if not is_checkpoint(folder):
            raise ArtifactError(f"{where}: {folder} is not a checkpoint folder ({WEIGHTS} and {CONFIG}), "
                                "nor popularity, itemknn or latest")
        if (folder.parent / PREPARED).is_dir():
            check_same_prepared(folder.parent / PREPARED, prepared, where, files=("items.parquet",),
                                what_to_do="use a model trained on this run's catalogue")
        rankers.append(Ranker(str(folder), folder, part.weight))
    return rankers


def rank(cfg: ExperimentConfig, prepared: Prepared, domain: DomainRange, rankers: list[Ranker], requests: Requests,
         allowed: np.ndarray | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, ≤k) scores and catalogue-local items, best first; -inf marks an empty place."""
    rc = cfg.recommend
    histories = requests.histories + (requests.user_histories or [])
    item_text = _item_text(cfg, prepared, requests, rankers, device)
    fused = make_scorer(Ranker(WeightedSum.name, parts=rankers),
                        ranking_inputs(cfg, prepared, domain, histories, requests, item_text, device))
    n_rows = len(requests.histories)
    if requests.user_histories is not None:
        fused = _blend_with_user(fused, n_rows, rc.query_user_weight, domain.n_items, rc.item_chunk)
    score = masked(fused.score_chunk, allowed)
    into = _score_into(fused, allowed, requests)
    approximate = _hnsw_index(cfg, fused, allowed, requests)
    depth = max(rc.k, rc.diversity_candidates) if rc.diversity > 0 else rc.k
    unit = None
    if rc.diversity > 0:
        emb = torch.from_numpy(prepared.embeddings[domain.item_start:domain.item_stop]).to(fused.device)
        unit = torch.nn.functional.normalize(emb, dim=1)
    values, index = [], []
    bar = tqdm(total=n_rows, desc="recommend", unit="users", file=sys.stderr, mininterval=0.5,
               disable=n_rows < rc.user_batch)
    with bar, torch.no_grad():
        for lo in range(0, n_rows, rc.user_batch):
            hi = min(lo + rc.user_batch, n_rows)
            exclude = requests.exclude[lo:hi]
            if approximate is not None:
                top_values, top_index = approximate.topk(torch.arange(lo, hi), depth, exclude)
            else:
                top_values, top_index = full_ranking_topk(
                    lambda rows, start, stop, lo=lo: score(rows + lo, start, stop), hi - lo, domain.n_items, depth,
                    exclude=exclude if any(len(e) for e in exclude) else None,
                    user_batch=hi - lo, item_chunk=rc.item_chunk, device=fused.device,
                    score_into=None if into is None else (lambda rows, start, stop, out, lo=lo: into(rows + lo, start, stop, out)),
                )
            top_values = _empty_masked(top_values, top_index, exclude, allowed)
            if unit is not None:
                top_values, top_index = mmr_rerank(top_values.to(unit.device), top_index.to(unit.device), unit,
                                                   rc.k, rc.diversity)
            values.append(top_values.cpu())
            index.append(top_index.cpu())
            bar.update(hi - lo)
    return torch.cat(values), torch.cat(index)


def _scorer_as_is(fused, allowed: np.ndarray | None, requests: Requests):
    """The one scorer recommend ranks as it is (no category filter, no fusion, no query blend), else None."""
    if allowed is not None or requests.user_histories is not None or not getattr(fused, "passthrough", False):
        return None
    return fused.parts[0].scorer


def _score_into(fused, allowed: np.ndarray | None, requests: Requests):
    """The model's own `score_into` when recommend ranks one scorer as it is: the ranking then writes
    every block into one buffer, as evaluate does (the same scores, so the same lists). None otherwise."""
    scorer = _scorer_as_is(fused, allowed, requests)
    return getattr(scorer, "score_into", None) if scorer is not None and scorer.device == fused.device else None


def _hnsw_index(cfg: ExperimentConfig, fused, allowed: np.ndarray | None, requests: Requests):
    """recommend.index hnsw: the model's item vectors in an approximate index (trecsys/rank/ann.py);
    None for exact. The index ranks one model as it is: a fusion, a category filter or a query blend
    is refused, naming the key."""
    if cfg.recommend.index == "exact":
        return None
    scorer = _scorer_as_is(fused, allowed, requests)
    if not isinstance(scorer, ModelScorer):
        raise ConfigError("config key 'recommend.index': hnsw ranks one model as it is; it cannot serve a fusion, "
                          "a baseline, category filters or --user with --query (use exact)")
    return HNSWIndex(scorer, cfg.recommend.hnsw_ef_search)


def _empty_masked(values: torch.Tensor, index: torch.Tensor, exclude: list[np.ndarray], allowed: np.ndarray | None
                  ) -> torch.Tensor:
    """-inf for the places taken by seen or filtered items: the top-K ranks masked items after all others
    (with the lowest finite score), so they fill a list only when too few items are left."""
    index_np = index.numpy()
    drop = ~np.isfinite(values.numpy())
    if allowed is not None:
        drop |= ~allowed[index_np]
    drop |= in_row_lists(index_np, exclude)
    return values.masked_fill(torch.from_numpy(drop), -torch.inf)


def _blend_with_user(fused: WeightedSum, n_rows: int, user_weight: float, n_items: int, item_chunk: int
                     ) -> WeightedSum:
    """Query rows are 0..n-1 and the user's rows n..2n-1 of `fused`: mix them by recommend.query_user_weight."""
    query_rows, user_rows = torch.arange(n_rows), torch.arange(n_rows, 2 * n_rows)
    if user_weight == 0.0:
        parts = [Part(fused, 1.0, query_rows)]
    elif user_weight == 1.0:
        parts = [Part(fused, 1.0, user_rows)]
    else:
        parts = [Part(fused, 1.0 - user_weight, query_rows), Part(fused, user_weight, user_rows)]
    return WeightedSum(parts, n_items, item_chunk, fused.device)


def ranking_inputs(cfg: ExperimentConfig, prepared: Prepared, domain: DomainRange, histories: list[np.ndarray],
                   requests: Requests, item_text: np.ndarray, device: torch.device) -> RankingInputs:
    """`histories` (one row per list) as recommend's scorers read them: the baselines count every
    interaction of the domain (with --as-of: the train split, what every model was trained on, as
    `trec evaluate` counts); a model reads known users as it was trained (`model_histories`)."""
    counted = (lambda: train_interactions(prepared, domain)) if requests.as_of else (
        lambda: every_interaction(prepared, domain))
    return RankingInputs(
        prepared, domain, histories, counted=counted,
        model_histories=lambda history: model_histories(prepared, domain, histories, requests, history),
        item_text=item_text, device=device, user_batch=cfg.recommend.user_batch, item_chunk=cfg.recommend.item_chunk,
    )


def every_interaction(prepared: Prepared, domain: DomainRange) -> list[np.ndarray]:
    """What the baselines count when recommending: every interaction of the domain, all splits."""
    ds = domain_split(prepared, domain.name)
    return to_local([np.concatenate([h, v, s]) for h, v, s in zip(ds.history("valid"), ds.valid, ds.test, strict=True)],
                    domain)


def train_interactions(prepared: Prepared, domain: DomainRange) -> list[np.ndarray]:
    """What the baselines count with --as-of: the train split (evaluate's rule)."""
    return to_local(domain_split(prepared, domain.name).train, domain)


def model_histories(prepared: Prepared, domain: DomainRange, histories: list[np.ndarray], requests: Requests,
                    history: str) -> list[np.ndarray]:
    """The rows as a model fine-tuned with `finetune.history: all_domains` reads them: a known user's
    history with the source domains interleaved, as it was trained (given histories stay as they are);
    with --as-of exactly as evaluate reads them before that split."""
    if not any(requests.read_from):
        return histories
    catalogue = Catalogue(prepared, domain, requests.as_of)
    if requests.as_of:
        known = [i for i, user in enumerate(requests.read_from) if user is not None and catalogue.in_domain(user)]
        users = catalogue.user_idx([requests.read_from[i] for i in known])
        context = histories_for(prepared, history, requests.as_of, users) if len(users) else []
        out = list(histories)
        for i, h in zip(known, context, strict=True):
            out[i] = h
        return out
    context = [*prepared.source, domain.name] if history == "all_domains" else [domain.name]
    return [h if user is None else catalogue.history(user, context)
            for h, user in zip(histories, requests.read_from, strict=True)]


def _item_text(cfg: ExperimentConfig, prepared: Prepared, requests: Requests, rankers: list[Ranker],
               device: torch.device) -> np.ndarray:
    """The prepared text embeddings, plus one row per new item or query (embedded with embedding.encoder)."""
    if not requests.new_texts:
        return prepared.embeddings
    models = [r for r in rankers if r.checkpoint is not None]
    where, first = requests.new_where[0], requests.new_items[0]
    named = f"query {first[:60]!r}" if where == "query" else f"{where}: item {first!r}"
    if not models:
        raise ConfigError(f"{named} is new to the catalogue and only a model can read its text, but "
                          "recommend.fusion has popularity/itemknn only")
    for ranker in models:
        model = read_info(ranker.checkpoint).model
        if not model.item_text or model.item_ids:
            raise DataError(
                f"{named} is new to the catalogue, but the model {ranker.checkpoint} "
                f"(model.item_ids={str(model.item_ids).lower()}, model.item_text="
                f"{str(model.item_text).lower()}) can only score catalogue items: use a text-only model "
                "(model.item_text=true, model.item_ids=false)"
            )
    from trecsys.ingest.embed import embed_texts

    vectors, encoder = embed_texts(requests.new_texts, cfg.embedding, device=str(device), progress=False)
    check_encoder(encoder, prepared)
    return np.concatenate([prepared.embeddings, vectors.astype(np.float32)])


# ---------------------------------------------------------------------------------------------
# Output


def output_table(requests: Requests, mode: str, values: torch.Tensor, index: torch.Tensor,
                 item_ids: np.ndarray) -> pa.Table:
    """One row per (list, rank); places left empty (-inf: filtered, seen or beyond the catalogue) dropped."""
    values_np, index_np = values.numpy(), index.numpy()
    keep = np.isfinite(values_np)
    rows, cols = np.nonzero(keep)  # row-major: each list in rank order
    columns = {}
    if mode == "queries":
        columns["query"] = pa.array(np.asarray(requests.labels, dtype=object)[rows], pa.string())
        columns["user_id"] = pa.array(np.asarray(requests.users, dtype=object)[rows], pa.string())
    else:
        columns["user_id"] = pa.array(np.asarray(requests.labels, dtype=object)[rows], pa.string())
    columns["rank"] = pa.array((cols + 1).astype(np.int32), pa.int32())
    columns["item_id"] = pa.array(item_ids[index_np[rows, cols]], pa.string())
    columns["score"] = pa.array(values_np[rows, cols].astype(np.float32), pa.float32())
    return pa.table(columns)


def _context(cfg: ExperimentConfig, domain: DomainRange, rankers: list[Ranker], requests: Requests, mode: str,
             seconds: float, rank_seconds: float, rank_cpu_seconds: float) -> dict:
    rc = cfg.recommend
    return {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "trecsys_version": __version__,
        "run_dir": str(cfg.run_dir),
        "mode": mode,
        "domain": domain.name,
        "as_of": requests.as_of,
        "k": rc.k,
        "exclude_seen": rc.exclude_seen,
        "include_categories": rc.include_categories,
        "exclude_categories": rc.exclude_categories,
        "diversity": rc.diversity,
        "models": [{"model": r.label, "weight": r.weight,
                    "sha256": weights_sha256(r.checkpoint) if r.checkpoint is not None else None}
                   for r in rankers],
        "n_rows": len(requests.labels),
        "n_unknown_users": len(requests.unknown),
        "n_new_items": len(requests.new_texts) if mode == "users" else 0,
        "seconds": round(seconds, 3),
        # Scoring and ranking alone (user states, scores, top-K, re-ranking): what users/s measures.
        "rank_seconds": round(rank_seconds, 3),
        # CPU time of all threads in that span: steadier than wall time on a shared machine.
        "rank_cpu_seconds": round(rank_cpu_seconds, 3),
    }


def write_output(out: Output, table: pa.Table, requests: Requests, cfg: ExperimentConfig, prepared: Prepared,
                 rankers: list[Ranker], context: dict) -> None:
    """The Parquet file first (atomically: the previous one stays until the new one is complete),
    then the unknown-users list (a stale one removed) and the manifest that vouches for both."""
    write_parquet(table, out.parquet, output_metadata(context))
    write_companions(out, [out.parquet], requests, cfg, prepared, rankers, context)


def write_companions(out: Output, files: list[Path], requests: Requests, cfg: ExperimentConfig,
                     prepared: Prepared, rankers: list[Ranker], context: dict) -> None:
    """Beside the written `files`: the unknown-users list (a stale one removed) and the manifest that
    vouches for them all (one Parquet file, or the part files of a sharded run)."""
    files = list(files)
    if requests.unknown:
        write_text(out.unknown_users, "\n".join(requests.unknown) + "\n")
        files.append(out.unknown_users)
    elif out.unknown_users.exists():
        out.unknown_users.unlink()
    inputs = prepared_file_inputs(prepared)
    inputs += [describe_file(r.checkpoint / WEIGHTS) for r in rankers if r.checkpoint is not None]
    write_manifest(out.parquet.parent, STAGE, to_dict(cfg), inputs, {"context": context}, files=files,
                   name=out.manifest.name)


def output_metadata(context: dict) -> dict[str, str]:
    """The Parquet metadata of an output file (or of each part of a sharded output)."""
    models = [m for m in context["models"] if m["sha256"]]
    return {
        METADATA_KEY: json.dumps(context, sort_keys=True),
        "created_at": context["created_at"],
        "model": ",".join(m["model"] for m in context["models"]),
        "model_sha256": ",".join(m["sha256"] for m in models),
    }


def show_lists(table: pa.Table, titles: dict[str, str], n: int, histories: dict[str, list[str]] | None = None) -> str:
    """The first n lists of an output table with item titles, for people at a terminal; with each
    user's latest history items (titles) when `histories` are given."""
    frame = table.to_pandas()
    key = "query" if "query" in frame.columns else "user_id"
    lines = []
    for label, rows in list(frame.groupby(key, sort=False))[:n]:
        head = f"query {label!r}" if key == "query" else f"user {label}"
        if key == "query" and rows["user_id"].notna().any():
            head += f" (blended with user {rows['user_id'].iloc[0]})"
        lines.append(f"{head}:")
        history = (histories or {}).get(label)
        if history:
            more = "... " if len(history) > 3 else ""
            lines.append(f"  history ({len(history)} items, latest last): {more}{'; '.join(history[-3:])}")
        for rank, item, score in zip(rows["rank"], rows["item_id"], rows["score"], strict=True):
            lines.append(f"  {rank:>3}. {titles.get(item) or item}  [{item}]  {score:.3f}")
    return "\n".join(lines)


def item_titles(items) -> dict[str, str]:
    return dict(zip(items["item_id"].astype(str), items["title"].fillna("").astype(str), strict=True))


def history_titles(prepared: Prepared, requests: Requests, n: int) -> dict[str, list[str]]:
    """The first n rows' histories as titles (new items by their text)."""
    titles = prepared.items["title"].fillna("").astype(str).to_numpy()
    ids = prepared.items["item_id"].astype(str).to_numpy()
    out = {}
    for label, history in zip(requests.labels[:n], requests.histories[:n], strict=False):
        out[label] = [titles[i] or ids[i] if i < len(ids) else requests.new_texts[i - len(ids)] for i in history]
    return out


def show_latest(cfg: ExperimentConfig, n: int) -> str | None:
    """The first n lists of today's default output (what `trec run` ends with), or None when absent."""
    path = output_paths(cfg, None).parquet
    if not path.is_file():
        return None
    prepared = load_prepared(cfg.run_dir)
    table = read_parquet(path)
    domain = prepared.domain(cfg.recommend.domain or prepared.target, key="recommend.domain")
    catalogue = Catalogue(prepared, domain)
    users = list(dict.fromkeys(table.column("user_id").to_pylist()))[:n]
    requests = user_requests(catalogue, [u for u in users if catalogue.knows(u)], None, exclude_seen=False)
    return (f"example recommendations ({path}):\n"
            + show_lists(table, item_titles(prepared.items), n, history_titles(prepared, requests, n)))
