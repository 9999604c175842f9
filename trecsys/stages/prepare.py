"""`trec prepare`: read every domain, clean, split, map ids, embed item text → <run_dir>/prepared/.

The folder is the contract every later stage reads (items, interactions, item embeddings, the
per-user sequences as flat arrays, config, manifest); it is built under a temporary name and swapped in only when complete.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from trecsys.artifacts import describe_file, run_lock, stage_output, write_manifest, write_parquet, write_text
from trecsys.config import DataConfig, DomainConfig, ExperimentConfig, to_dict, to_yaml
from trecsys.console import log
from trecsys.errors import ConfigError, DataError, InterruptedRun
from trecsys.ingest.clean import clean_interactions
from trecsys.ingest.embed import embed_texts, encoder_metadata
from trecsys.ingest.raw import RawDomain
from trecsys.ingest.readers import read_domain
from trecsys.ingest.split import SPLITS, assign_split
from trecsys.ingest.synthetic import generate_domains
from trecsys.ingest.text import compose_text
from trecsys.prepared.manifest import PreparedManifest
from trecsys.prepared.sequences import write_sequences
from trecsys.runtime import StopRequest, Threads, apply_threads, resolve_device
from trecsys.stage_table import PREPARE
from trecsys.stages import prepare_shards

# Item metadata columns copied to items.parquet (as str) when a domain has them.
ITEM_FIELDS = ("brand", "category", "price")
# Columns prepare sets itself; an item file's columns of these names are not copied.
RESERVED_ITEM_COLUMNS = ("item_idx", "domain")


def run(cfg: ExperimentConfig) -> None:
    threads = apply_threads(cfg.runtime.threads)
    if not prepare_shards.is_sharded():
        return _run(cfg, threads, None)
    # torchrun: every rank embeds a share of the item texts; rank 0 alone does everything else.
    if int(os.environ.get("RANK", "0")) != 0:
        return prepare_shards.follow(cfg)
    ranks = prepare_shards.Ranks.start()
    try:
        _run(cfg, threads, ranks)
    except BaseException:
        ranks.abort()
        raise
    finally:
        ranks.stop()


def _run(cfg: ExperimentConfig, threads: Threads, ranks: prepare_shards.Ranks | None) -> None:
    roles = domain_roles(cfg.data)
    out = Path(cfg.run_dir).expanduser() / PREPARE.folder
    started = time.perf_counter()
    with run_lock(out), StopRequest() as stop:
        timings: dict[str, tuple[float, float]] = {}
        _note(f"reading {len(roles)} domain(s): {', '.join(roles)}"
              + ("" if cfg.data.engine == "pandas" else f" (data.engine={cfg.data.engine})") + f"; {threads.line()}")
        tables = pandas_tables if cfg.data.engine == "pandas" else columnar_tables
        items, interactions, raw, removed = tables(cfg, timings)
        _stop_if_asked(stop, "after reading, cleaning and splitting the inputs")

        clock = _now()
        items["text"] = item_texts(items, cfg.data)
        for warning in check_item_text(items, interactions, raw, cfg.data):
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        _note(f"embedding {len(items):,} item texts with {cfg.embedding.encoder}"
              + (f" on {ranks.world_size} processes" if ranks else ""))
        embeddings, encoder, embedding = embed_items(items["text"].tolist(), cfg, stop, ranks)
        if embeddings.shape[0] != len(items):
            raise DataError(f"the encoder returned {embeddings.shape[0]} embeddings for {len(items)} items")
        timings["embed"] = _since(clock)
        _stop_if_asked(stop, "after embedding (the embeddings are cached)")

        clock = _now()
        stats = domain_stats(items, interactions, roles, raw, removed)
        with stage_output(out) as folder:
            write_parquet(items_table(items), folder / "items.parquet")
            write_parquet(interactions, folder / "interactions.parquet")
            write_parquet(embeddings_table(items["item_idx"].to_numpy(), embeddings), folder / "item_embeddings.parquet",
                          metadata=encoder_metadata(encoder))
            write_text(folder / "config.yaml", to_yaml(cfg))
            # The same interactions as flat per-user arrays: what training memory-maps.
            write_sequences(folder, interactions, {n: (d["item_start"], d["item_stop"]) for n, d in stats.items()},
                            list(cfg.data.source), cfg.data.target, len(items))
            timings["write"] = _since(clock)
            write_manifest(
                folder, PREPARE.name, to_dict(cfg),
                inputs=[describe_file(Path(f)) for domain in raw.values() for f in domain.files],
                extra=PreparedManifest(
                    seed=cfg.seed,
                    timings_s={k: round(wall, 3) for k, (wall, _) in timings.items()},
                    cpu_s={k: round(cpu, 3) for k, (_, cpu) in timings.items()},
                    domains=stats,
                    source=list(cfg.data.source),
                    target=cfg.data.target,
                    encoder=encoder,
                    n_users=int(pc.max(interactions["user_idx"]).as_py()) + 1,
                    n_items=len(items),
                    embedding=embedding,
                ).to_json(),
            )
    print(summary_table(stats))
    print(catalogue_note(stats, cfg.data))
    for name, domain in raw.items():
        if domain.skipped_rows:
            examples = "; ".join(domain.skipped_examples[:3])
            log(f"{name}: skipped {domain.skipped_rows:,} bad input rows (data.on_bad_rows=skip), e.g. {examples}")
    log(f"prepared: {out} ({time.perf_counter() - started:.1f} s)")


def embed_items(texts: list[str], cfg: ExperimentConfig, stop: StopRequest, ranks: prepare_shards.Ranks | None
                ) -> tuple[np.ndarray, dict, dict]:
    """(vectors, encoder record, what was embedded): the texts the cache lacks are embedded here, or
    by every rank of a torchrun launch (stages/prepare_shards.py) and then read back from the cache."""
    started = time.perf_counter()
    counts: dict = {}
    if ranks is None:
        vectors, encoder = embed_texts(texts, cfg.embedding, device=str(resolve_device(cfg.device)),
                                       stop=stop.requested, counts=counts)
        embedded, per_rank = counts.get("embedded", 0), None
    else:
        shares = ranks.embed(texts, cfg, stop.requested)
        vectors, encoder = embed_texts(texts, cfg.embedding, device=prepare_shards.rank_device(cfg.device),
                                       stop=stop.requested, counts=counts)
        # Nothing is left to embed here unless a rank could not write the cache (it warned).
        embedded, per_rank = shares["embedded"] + counts.get("embedded", 0), shares["per_rank"]
    seconds = time.perf_counter() - started
    distinct = counts.get("distinct", len(set(texts)))
    record = {"texts": len(texts), "distinct": distinct, "embedded": embedded, "from_cache": distinct - embedded, "processes": ranks.world_size if ranks else 1,
              "seconds": round(seconds, 3), "items_per_s": round(embedded / seconds, 1) if embedded else None}
    if per_rank is not None:
        record["embedded_per_rank"] = per_rank
    if embedded:
        _note(f"embedded {embedded:,} new item texts in {seconds:.1f} s: {embedded / seconds:,.0f} items/s on "
              f"{record['processes']} process(es); {record['from_cache']:,} from the cache")
    return vectors, encoder, record


def pandas_tables(cfg: ExperimentConfig, timings: dict[str, tuple[float, float]]
                  ) -> tuple[pd.DataFrame, pa.Table, dict[str, RawDomain], dict[str, dict]]:
    """(items, interactions table, raw domains, rows removed per domain) with pandas, in memory."""
    clock = _now()
    raw = read_domains(cfg)
    timings["read"] = _since(clock)

    clock = _now()
    cleaned, removed = {}, {}
    for name, domain in raw.items():
        cleaned[name], removed[name] = clean_interactions(domain.interactions, cfg.data, name)
        if cleaned[name].empty:
            _nothing_left(name, cfg.data)
    timings["clean"] = _since(clock)

    clock = _now()
    for name, frame in cleaned.items():
        frame["split"] = assign_split(frame, cfg.data.split, cfg.data.temporal_holdout, name,
                                      raw[name].order_only, cfg.data.held_out_per_user)
    _check_target(cfg.data.target, (cleaned[cfg.data.target]["split"] == "test").any())
    items, interactions = build_tables(cleaned, raw, catalogue_ids(cfg.data, cleaned, raw))
    timings["split"] = _since(clock)
    return items, interactions_table(interactions), raw, removed


def columnar_tables(cfg: ExperimentConfig, timings: dict[str, tuple[float, float]]
                    ) -> tuple[pd.DataFrame, pa.Table, dict[str, RawDomain], dict[str, dict]]:
    """The same as pandas_tables, on Polars columns (data.engine: polars; trecsys/ingest/columnar.py)."""
    try:
        from trecsys.ingest import columnar
    except ImportError:
        raise ConfigError("data.engine: polars needs the polars package: pip install 'transfer-recsys[scale]' "
                          "(or polars), or set data.engine: pandas") from None

    if cfg.data.split == "users":
        raise ConfigError("data.split: users (inductive users) runs on data.engine: pandas; set it")
    clock = _now()
    synthetic = generate_domains(cfg)
    root = Path(cfg.data.root).expanduser()
    if cfg.data.on_bad_rows not in ("error", "skip"):
        raise ConfigError(f"data.on_bad_rows: {cfg.data.on_bad_rows!r} is not one of 'error', 'skip'")
    timings["read"] = _since(clock)
    timings["clean"] = (0.0, 0.0)
    # Each domain is cleaned as soon as it is read: one domain's raw rows in memory at a time.
    domains = {}
    for name, spec in cfg.data.domains.items():
        clock = _now()
        domains[name] = (columnar.from_raw(synthetic[name]) if spec.format == "synthetic"
                         else columnar.read_columnar(name, spec, root, cfg.data.on_bad_rows))
        timings["read"] = _plus(timings["read"], _since(clock))
        clock = _now()
        columnar.clean(domains[name], cfg.data, name)
        if domains[name].frame.height == 0:
            _nothing_left(name, cfg.data)
        timings["clean"] = _plus(timings["clean"], _since(clock))

    clock = _now()
    for name, domain in domains.items():
        columnar.assign_split(domain, cfg.data.split, cfg.data.temporal_holdout, name)
    target = domains[cfg.data.target].frame
    _check_target(cfg.data.target, bool((target["split"] == columnar.SPLIT_CODES["test"]).any()))
    raw = {name: d.raw for name, d in domains.items()}
    removed = {name: d.removed for name, d in domains.items()}
    quiet = {name: quiet_items(cfg.data, name, d.raw, d.items) for name, d in domains.items()}
    item_ids, frame, users = columnar.build_tables(domains, quiet)
    items = item_table(item_ids, raw)
    table = pa.table({
        "user_idx": pa.array(frame["user_idx"].to_numpy(), pa.int32()),
        "user_id": _strings(users, frame["user_idx"].to_numpy()),
        "item_idx": pa.array(frame["item_idx"].to_numpy(), pa.int32()),
        "domain": _strings(list(domains), frame["domain_pos"].to_numpy()),
        # Whole seconds (the contract); the rows are already in full-precision order.
        "timestamp": pa.array(np.floor(frame["timestamp"].to_numpy()).astype(np.int64), pa.int64()),
        "rating": pa.array(frame["rating"].to_numpy(), pa.float32()),
        "split": _strings(list(SPLITS), frame["split"].to_numpy()),
    })
    timings["split"] = _since(clock)
    return items, table, raw, removed


# ---------------------------------------------------------------------------------------------
# Config and input


def domain_roles(data: DataConfig) -> dict[str, str]:
    """Each domain's role in mapping order (DataConfig.validate checked the names when the config loaded)."""
    return {name: "target" if name == data.target else "source" if name in data.source else "other"
            for name in data.domains}


def read_domains(cfg: ExperimentConfig) -> dict[str, RawDomain]:
    """Every domain in mapping order: synthetic ones generated together (they share users)."""
    synthetic = generate_domains(cfg)
    root = Path(cfg.data.root).expanduser()
    return {
        name: synthetic[name] if domain.format == "synthetic"
        else read_domain(name, domain, root, cfg.data.on_bad_rows)
        for name, domain in cfg.data.domains.items()
    }


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    """(wall, CPU) seconds since `start` (from _now)."""
    return time.perf_counter() - start[0], time.process_time() - start[1]


def _strings(values, codes: np.ndarray) -> pa.Array:
    """values[codes] as an Arrow string array, gathered by Arrow (no Python string per row)."""
    return pa.array(values, pa.string()).take(pa.array(codes))


def _plus(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    return a[0] + b[0], a[1] + b[1]


def _note(message: str) -> None:
    """Progress for people, on stderr so stdout stays the summary."""
    print(f"prepare: {message}", file=sys.stderr, flush=True)


def _stop_if_asked(stop: StopRequest, where: str) -> None:
    """SIGINT/SIGTERM stop prepare between its steps; nothing is written (the embedding cache keeps
    every finished chunk, so the next run continues where this one stopped)."""
    if stop.requested():
        _note(f"stopped {where}; run it again to continue")
        raise InterruptedRun(f"stopped by {stop.name}; what this run was writing was discarded and earlier "
                             "outputs are kept")


def _filters(data: DataConfig) -> str:
    parts = [f"data.min_user_interactions={data.min_user_interactions}",
             f"data.min_item_interactions={data.min_item_interactions}"]
    if data.rating_threshold is not None:
        parts.append(f"data.rating_threshold={data.rating_threshold:g}")
    return ", ".join(parts)


def _nothing_left(name: str, data: DataConfig) -> None:
    raise DataError(
        f"domain {name!r} has no interactions left after cleaning ({_filters(data)}); relax those settings"
    )


def _check_target(name: str, has_test: bool) -> None:
    if not has_test:
        raise DataError(
            f"target domain {name!r} has no test interactions after the split (users need at least 2 "
            "interactions for leave_one_out); check data.split and the filters"
        )


# ---------------------------------------------------------------------------------------------
# Tables


def catalogue_ids(data: DataConfig, cleaned: dict[str, pd.DataFrame],
                  raw: dict[str, RawDomain]) -> dict[str, np.ndarray]:
    """Each domain's catalogue (`data.catalogue`), sorted original item ids.

    items_file: the items with interactions after cleaning, plus the items the domain's item list
    names that had no interaction in the input at all (an item the cleaning removed stays removed).
    """
    return {name: np.union1d(frame["item_id"].astype(str).unique(),
                             quiet_items(data, name, raw[name], raw[name].interactions["item_id"]))
            for name, frame in cleaned.items()}


def quiet_items(data: DataConfig, name: str, raw: RawDomain, interacted) -> np.ndarray:
    """The listed items of a domain that no input interaction names (data.catalogue: items_file),
    given the item ids of its input interactions; none for data.catalogue: interacted."""
    if data.catalogue != "items_file" or not _lists_catalogue(data.domains[name]):
        return np.zeros(0, dtype=str)
    # numpy strings on both sides: np.setdiff1d on pandas 3's Arrow string array compares object by
    # object (7 s at 40k items, growing faster than the catalogue).
    listed = np.asarray(raw.items["item_id"].astype(str).unique(), dtype=str)
    return np.setdiff1d(listed, np.asarray(interacted, dtype=str))


def _lists_catalogue(domain: DomainConfig) -> bool:
    """Whether the domain's item table is a catalogue list: an item file (not an Amazon metadata
    dump of a whole category, which its reader already cuts to the reviewed items) or the shop."""
    if domain.format == "synthetic":
        return True
    return bool(domain.items) and not domain.format.startswith("amazon")


def build_tables(cleaned: dict[str, pd.DataFrame], raw: dict[str, RawDomain],
                 catalogues: dict[str, np.ndarray]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Dense ids: items contiguous per domain (mapping order, sorted by item_id inside a domain: the
    domain's catalogue), users over the sorted original ids of all domains, so one person is one
    user everywhere."""
    items = item_table(catalogues, raw)
    user_ids = np.sort(pd.unique(np.concatenate([f["user_id"].astype(str).to_numpy() for f in cleaned.values()])))
    users = pd.Index(user_ids)
    parts = []
    for name, frame in cleaned.items():
        block = items[items["domain"] == name]
        item_index = pd.Index(block["item_id"])
        parts.append(pd.DataFrame({
            "user_idx": users.get_indexer(frame["user_id"].astype(str)).astype(np.int32),
            "user_id": frame["user_id"].astype(str).to_numpy(),
            "item_idx": block["item_idx"].to_numpy()[item_index.get_indexer(frame["item_id"].astype(str))],
            "domain": name,
            "timestamp": frame["timestamp"].to_numpy(dtype=np.float64),  # fractions order events
            "rating": (frame["rating"].to_numpy(dtype=np.float32) if "rating" in frame.columns
                       else np.full(len(frame), np.nan, dtype=np.float32)),
            "split": frame["split"].to_numpy(),
        }))
    interactions = pd.concat(parts, ignore_index=True)
    # Stable: ties (same user, same time) keep domain mapping order, then each domain's input order.
    order = np.lexsort((interactions["timestamp"].to_numpy(), interactions["user_idx"].to_numpy()))
    return items, interactions.iloc[order].reset_index(drop=True)


def item_table(ids: dict[str, np.ndarray], raw: dict[str, RawDomain]) -> pd.DataFrame:
    """Items of every domain from their sorted ids (mapping order), item_idx contiguous per domain,
    with each domain's metadata columns (missing metadata stays NaN)."""
    item_frames, start = [], 0
    for name, domain_ids in ids.items():
        meta = raw[name].items.drop_duplicates("item_id").set_index("item_id").reindex(domain_ids)
        block = pd.DataFrame({"item_idx": np.arange(start, start + len(domain_ids), dtype=np.int32),
                              "item_id": domain_ids, "domain": name})
        for column in meta.columns:
            if column not in RESERVED_ITEM_COLUMNS:
                block[column] = meta[column].to_numpy()
        item_frames.append(block)
        start += len(domain_ids)
    return pd.concat(item_frames, ignore_index=True)


def item_texts(items: pd.DataFrame, data: DataConfig) -> pd.Series:
    """The text the encoder sees; an item without metadata gets "" (counted in the stats).

    Each domain uses its own `data.domains.<name>.text_template`, else `data.text_template`. When no
    domain has any item metadata (interactions only) every text is "": there is nothing to compose.
    A field of `data.text_template` that no domain has, or of a domain's own template that its item
    file lacks, is a ConfigError (most likely a typo).
    """
    fields = items.drop(columns=["item_idx", "item_id", "domain"])
    if fields.columns.empty:
        return pd.Series("", index=items.index, dtype=object)
    texts = pd.Series("", index=items.index, dtype=object)
    shared = items["domain"].map(lambda name: data.domains[name].text_template is None).to_numpy(dtype=bool)
    if shared.any():
        texts[shared] = compose_text(fields[shared], data.text_template, data.max_text_chars).to_numpy()
    for name, domain in data.domains.items():
        rows = (items["domain"] == name).to_numpy()
        if domain.text_template is None or not rows.any():
            continue
        own = fields[rows].dropna(axis=1, how="all")  # columns the domain's item file has
        texts[rows] = compose_text(own, domain.text_template, data.max_text_chars,
                                   key=f"data.domains.{name}.text_template").to_numpy()
    return texts.fillna("").astype(str)


# Above this share of a domain's items without text, prepare warns: those items share one embedding.
MISSING_TEXT_WARNING = 0.2


def check_item_text(items: pd.DataFrame, interactions: pa.Table, raw: dict[str, RawDomain],
                    data: DataConfig) -> list[str]:
    """Warnings about item text, for each domain that has item metadata: ids written differently in
    the interactions and the items file (`007` vs `7`, `b01` vs `B01`), and a large share of items
    without text. A domain with item metadata where no interacted item gets any text is an error:
    every item the model trains on would get the same embedding (items the file lists without
    interactions do not rescue it)."""
    warnings = []
    trained = np.zeros(len(items), dtype=bool)  # items some kept interaction names (item_idx = row)
    trained[np.unique(interactions["item_idx"].to_numpy())] = True
    for name, domain in raw.items():
        if len(domain.items.columns) <= 1:  # no items file: ids only, by design
            continue
        rows = (items["domain"] == name).to_numpy()
        block = items[rows]
        no_text = (block["text"].str.strip() == "").to_numpy()
        interacted = trained[block["item_idx"].to_numpy()]
        n, empty = len(block), int(no_text.sum())
        n_interacted, empty_interacted = int(interacted.sum()), int((no_text & interacted).sum())
        known = domain.items["item_id"].astype(str)
        # pyarrow's is_in: pandas' isin on string columns is ~10x slower (2 s at 600k ids).
        listed = pc.is_in(pa.array(block["item_id"].astype(str)), value_set=pa.array(known)).to_numpy(zero_copy_only=False)
        unmatched = block.loc[~listed, "item_id"].astype(str)
        near = []
        if len(unmatched):  # normalising every known id costs ~2 µs each: only when one is needed
            alike = {_normal_id(k): k for k in known}
            near = [(i, alike[_normal_id(i)]) for i in unmatched if _normal_id(i) in alike]
        source = data.domains[name].items or "its items"
        if near:
            example = f"e.g. {near[0][0]!r} in the interactions, {near[0][1]!r} in {source}"
            near_note = (f"{len(near):,} of {n:,} item ids of domain {name!r} match {source} only when written "
                         f"alike ({example}), so they get no text")
        if n_interacted and empty_interacted == n_interacted:
            raise DataError(
                f"domain {name!r}: none of its {n_interacted:,} interacted items has any text from {source} (data.text_template "
                f"{data.text_template!r})" + (f"; {near_note}: write the ids the same way in both files"
                                               if near else ": check the id column and the text fields")
            )
        if near:
            warnings.append(f"{near_note}: write the ids the same way in both files")
        if empty > MISSING_TEXT_WARNING * n:
            warnings.append(f"domain {name!r}: {empty:,} of {n:,} items ({empty / n:.0%}) have no text in {source}; "
                            "they share one text embedding and are told apart by their id alone")
    return warnings


def _normal_id(item_id: str) -> str:
    """An id as it may be written differently: case, surrounding spaces, leading zeros."""
    text = item_id.strip().casefold()
    return text.lstrip("0") or text


def items_table(items: pd.DataFrame) -> pa.Table:
    columns = {
        "item_idx": pa.array(items["item_idx"].to_numpy(dtype=np.int32), pa.int32()),
        "item_id": pa.array(items["item_id"].astype(str).tolist(), pa.string()),
        "domain": pa.array(items["domain"].astype(str).tolist(), pa.string()),
        "title": pa.array(_as_text(items, "title"), pa.string()),
        "text": pa.array(items["text"].astype(str).tolist(), pa.string()),
    }
    for field in ITEM_FIELDS:
        if field in items.columns:
            columns[field] = pa.array(_as_text(items, field), pa.string())
    return pa.table(columns)


def _as_text(items: pd.DataFrame, column: str) -> list[str]:
    if column not in items.columns:
        return [""] * len(items)
    values = items[column].astype(object)
    return values.where(values.notna(), "").astype(str).tolist()


def interactions_table(interactions: pd.DataFrame) -> pa.Table:
    return pa.table({
        "user_idx": pa.array(interactions["user_idx"].to_numpy(dtype=np.int32), pa.int32()),
        "user_id": pa.array(interactions["user_id"].tolist(), pa.string()),
        "item_idx": pa.array(interactions["item_idx"].to_numpy(dtype=np.int32), pa.int32()),
        "domain": pa.array(interactions["domain"].tolist(), pa.string()),
        # Whole seconds (the contract); the rows are already in full-precision order.
        "timestamp": pa.array(np.floor(interactions["timestamp"].to_numpy(dtype=np.float64)).astype(np.int64),
                              pa.int64()),
        "rating": pa.array(interactions["rating"].to_numpy(dtype=np.float32), pa.float32()),
        "split": pa.array(interactions["split"].tolist(), pa.string()),
    })


def embeddings_table(item_idx: np.ndarray, embeddings: np.ndarray) -> pa.Table:
    values = np.ascontiguousarray(embeddings, dtype=np.float32)
    flat = pa.array(values.reshape(-1), pa.float32())
    return pa.table({
        "item_idx": pa.array(item_idx.astype(np.int32), pa.int32()),
        "embedding": pa.FixedSizeListArray.from_arrays(flat, values.shape[1]),
    })


# ---------------------------------------------------------------------------------------------
# Statistics


def domain_stats(items: pd.DataFrame, interactions: pa.Table, roles: dict[str, str],
                 raw: dict[str, RawDomain], removed: dict[str, dict]) -> dict[str, dict]:
    """Per-domain counts for the manifest and the summary, on the columns of the written table."""
    user_idx = interactions["user_idx"].to_numpy()
    item_idx = interactions["item_idx"].to_numpy()
    split = {s: pc.equal(interactions["split"], s).to_numpy(zero_copy_only=False)
             for s in ("train", "valid", "test", "input")}
    n_users = int(user_idx.max()) + 1 if len(user_idx) else 0
    masks = {name: pc.equal(interactions["domain"], name).to_numpy(zero_copy_only=False) for name in roles}
    present = {name: np.bincount(user_idx[mask], minlength=n_users) > 0 for name, mask in masks.items()}
    stats = {}
    for name, role in roles.items():
        mask = masks[name]
        domain_items = items[items["domain"] == name]
        others = np.zeros(n_users, dtype=bool)
        for other, users in present.items():
            if other != name:
                others |= users
        in_split = {s: mask & rows for s, rows in split.items()}
        train_items = np.unique(item_idx[in_split["train"]])
        users_here, n_items, n_rows = int(present[name].sum()), len(domain_items), int(mask.sum())
        stats[name] = {
            "role": role,
            "item_start": int(domain_items["item_idx"].min()),
            "item_stop": int(domain_items["item_idx"].max()) + 1,
            "n_users": users_here,
            "n_items": n_items,
            "n_interactions": n_rows,
            "density": n_rows / (users_here * n_items),
            "n_overlap_users": int((present[name] & others).sum()),
            # Items seen in valid (test) but never in this domain's training rows.
            "cold_items_valid": len(np.setdiff1d(item_idx[in_split["valid"]], train_items)),
            "cold_items_test": len(np.setdiff1d(item_idx[in_split["test"]], train_items)),
            "items_without_text": int((domain_items["text"].str.strip() == "").sum()),
            # Catalogue items no kept interaction names (data.catalogue: items_file); ranked by text.
            "items_without_interactions": n_items - len(np.unique(item_idx[mask])),
            "skipped_rows": raw[name].skipped_rows,
            "removed_rows": removed[name],
            "splits": {s: int(m.sum()) for s, m in in_split.items()},
        }
    return stats


def catalogue_note(stats: dict[str, dict], data: DataConfig) -> str:
    """One line on the items no interaction names: they are in the catalogue, ranked by text."""
    quiet = sum(s["items_without_interactions"] for s in stats.values())
    if data.catalogue == "interacted":
        return "catalogue: items with interactions only (data.catalogue: interacted)"
    total = sum(s["n_items"] for s in stats.values())
    return (f"catalogue: {quiet:,} of {total:,} items have no interactions; they are ranked by their text "
            "(data.catalogue: interacted leaves them out)")


def summary_table(stats: dict[str, dict]) -> str:
    header = ("domain", "role", "users", "items", "interactions", "density", "overlap users",
              "cold valid", "cold test", "no text", "no interactions")
    rows = [header] + [
        (name, s["role"], f"{s['n_users']:,}", f"{s['n_items']:,}", f"{s['n_interactions']:,}",
         f"{s['density']:.5f}", f"{s['n_overlap_users']:,}", f"{s['cold_items_valid']:,}",
         f"{s['cold_items_test']:,}", f"{s['items_without_text']:,}", f"{s['items_without_interactions']:,}")
        for name, s in stats.items()
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    return "\n".join(lines)
