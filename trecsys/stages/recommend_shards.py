"""`torchrun --nproc_per_node N -m trecsys recommend`: the users split across ranks, one Parquet dataset.

Every rank builds the same request list (the prepared data and the users file are read by all),
takes a contiguous block of it (whole `recommend.user_batch` blocks, in order), ranks those users
on its own device and writes `part-<rank>-of-<world>.parquet` into a folder that rank 0 created
under a temporary name. When every rank has written its part, rank 0 swaps the folder in under
the output name (the same swap as a stage folder: the previous output stays readable until the new
one is complete) and writes the manifest beside it. If any rank fails, nothing is published.

Read back with any Parquet dataset reader (`pd.read_parquet(folder)`, `pq.read_table(folder)`,
Spark): the parts in name order are the rows of a one-process run, in the same order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as torch_dist

from trecsys.artifacts import (
    run_lock,
    stage_output,
    verify_stage_folder,
    write_parquet,
)
from trecsys.config import ExperimentConfig
from trecsys.errors import ConfigError, TrecError
from trecsys.prepared.tables import load_prepared
from trecsys.rank.requests import Catalogue, Requests, read_histories, read_user_ids, user_requests
from trecsys.rank.rerank import category_mask
from trecsys.train.engine import distributed


def is_sharded() -> bool:
    """True under torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def shard_rows(n_rows: int, rank: int, world_size: int, block: int) -> tuple[int, int]:
    """[lo, hi) of the rows rank `rank` ranks: whole blocks of `block` rows, split as evenly as
    possible, in rank order (so the parts concatenated in rank order are the rows in order)."""
    n_blocks = -(-n_rows // block)
    first, stop = rank * n_blocks // world_size, (rank + 1) * n_blocks // world_size
    return min(first * block, n_rows), min(stop * block, n_rows)


def take_rows(requests: Requests, lo: int, hi: int) -> Requests:
    """The requests of rows [lo, hi) (users mode: one row per user)."""
    return dataclasses.replace(
        requests, labels=requests.labels[lo:hi], users=requests.users[lo:hi],
        histories=requests.histories[lo:hi], exclude=requests.exclude[lo:hi],
        read_from=requests.read_from[lo:hi] if requests.read_from else [],
    )


def part_name(rank: int, world_size: int) -> str:
    return f"part-{rank:05d}-of-{world_size:05d}.parquet"


def run_sharded(cfg: ExperimentConfig, model: str | None, users: str | None, histories: str | None,
                output: str | None, wait: float, strict: bool, verify: bool, query_mode: bool):
    """The users mode of `trec recommend`, one share of the users per torchrun rank."""
    from trecsys.stages import recommend as rec

    if query_mode:
        raise ConfigError("--query/--queries rank a handful of texts: run them in one process, not under torchrun")
    out = rec.output_paths(cfg, output, "users")
    with distributed(cfg.device) as dist:
        lock = run_lock(out.parquet, wait_s=wait) if dist.is_main else contextlib.nullcontext()
        with lock, (stage_output(out.parquet) if dist.is_main else contextlib.nullcontext()) as staging:
            shared = [str(staging) if dist.is_main else None]
            torch_dist.broadcast_object_list(shared, src=0)
            staging = Path(shared[0])
            started = time.perf_counter()
            error: BaseException | None = None
            try:
                result = _rank_share(cfg, model, users, histories, strict, verify, dist, staging, rec)
            except Exception as exc:  # noqa: BLE001 - every rank must reach the vote below
                error, result = exc, None
            failed = torch.tensor([float(error is not None)])
            torch_dist.all_reduce(failed)
            if error is not None:
                raise error
            if failed.item():
                raise TrecError(f"recommend: {int(failed.item())} of {dist.world_size} ranks failed (see their "
                                f"errors); nothing was published to {out.parquet}")
            requests, prepared, rankers, context = result
            if dist.is_main:
                context["seconds"] = round(time.perf_counter() - started, 3)
        # Rank 0 left stage_output: the parts are published under out.parquet.
        if dist.is_main:
            parts = [out.parquet / part_name(r, dist.world_size) for r in range(dist.world_size)]
            rec.write_companions(out, parts, requests, cfg, prepared, rankers, context)
            if requests.unknown:
                print(f"warning: {len(requests.unknown):,} of {len(requests.unknown) + len(requests.labels):,} "
                      f"requested user ids are not in the prepared data; they got no list (listed in "
                      f"{out.unknown_users})", file=sys.stderr)
            print(f"recommend: {len(requests.labels):,} users in {dist.world_size} parts → {out.parquet}")
        dist.barrier()
    return out


def _rank_share(cfg, model, users, histories, strict, verify, dist, staging: Path, rec):
    prepared = load_prepared(cfg.run_dir, verify=verify)
    rc = cfg.recommend
    domain = prepared.domain(rc.domain or prepared.target, key="recommend.domain")
    rankers = rec.resolve_rankers(cfg, model, prepared)
    for ranker in rankers:
        if ranker.checkpoint is not None:
            verify_stage_folder(ranker.checkpoint, full_hash=verify)
    catalogue = Catalogue(prepared, domain)
    user_ids = read_user_ids(Path(users)) if users else None
    given = read_histories(Path(histories)) if histories else None
    requests = user_requests(catalogue, user_ids, given, rc.exclude_seen)
    rec._check_users(requests, users, strict)
    items = prepared.items.iloc[domain.item_start:domain.item_stop].reset_index(drop=True)
    allowed = category_mask(items, rc.include_categories, rc.exclude_categories, domain.name)
    lo, hi = shard_rows(len(requests.labels), dist.rank, dist.world_size, rc.user_batch)
    share = take_rows(requests, lo, hi)
    ranking_started, ranking_cpu = time.perf_counter(), time.process_time()
    if hi > lo:
        values, index = rec.rank(cfg, prepared, domain, rankers, share, allowed, dist.device)
    else:  # more ranks than blocks of users: an empty part keeps the dataset's schema
        values, index = torch.full((0, rc.k), -float("inf")), torch.zeros((0, rc.k), dtype=torch.long)
    context = rec._context(cfg, domain, rankers, share, "users", 0.0, time.perf_counter() - ranking_started,
                           time.process_time() - ranking_cpu)
    context.update({"part": dist.rank, "parts": dist.world_size, "rows": [lo, hi]})
    table = rec.output_table(share, "users", values, index, items["item_id"].astype(str).to_numpy())
    write_parquet(table, staging / part_name(dist.rank, dist.world_size), rec.output_metadata(context))
    print(f"recommend: rank {dist.rank}: users {lo:,}-{hi:,} of {len(requests.labels):,}, {table.num_rows:,} rows",
          file=sys.stderr)
    totals = rec._context(cfg, domain, rankers, requests, "users", 0.0, 0.0, 0.0)
    totals["parts"] = dist.world_size
    return requests, prepared, rankers, totals
