"""Reading `<run_dir>/prepared/` back: the one loader every stage after `prepare` uses.

Artifact contract (written by trecsys/stages/prepare.py):
- items.parquet: item_idx (int32, dense, contiguous per domain), item_id, domain, title, text, ...
- interactions.parquet: user_idx, user_id, item_idx, domain, timestamp, rating, split (train, valid,
  test, or input: a held-out user's history); rows sorted by (user_idx, timestamp), ties in input
  order, domains interleaved.
- item_embeddings.parquet: item_idx, embedding (fixed-size list of float32); encoder info in metadata.
- sequences/*.npy: the same interactions as flat per-user arrays, memory-mapped by `domain_split`,
  trecsys/prepared/context.py and rank/requests.py's `Catalogue` (trecsys/prepared/sequences.py).
  Later stages read these, never interactions.parquet whole (`Prepared.interactions` is for scripts).
- manifest.json: `domains` {name: {role, item_start, item_stop, ...}}, `source`, `target`, `encoder`,
  ... (trecsys/prepared/manifest.py's `PreparedManifest`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from trecsys.artifacts import MANIFEST, read_manifest, read_parquet, verify_outputs
from trecsys.errors import ArtifactError, ConfigError
from trecsys.prepared.manifest import DomainRange, PreparedManifest
from trecsys.prepared.sequences import Ragged, Sequences, concat_rows, domain_rows
from trecsys.stage_table import PREPARE

PREPARED = PREPARE.folder


@dataclass
class Prepared:
    folder: Path
    manifest: PreparedManifest
    outputs: list[dict]  # the manifest's record of the files (path, size, mtime_ns, sha256)
    items: pd.DataFrame
    embeddings: np.ndarray  # (n_items, dim) float32, row i is item_idx i
    domains: dict[str, DomainRange]
    sequences: Sequences  # the memory-mapped per-user arrays (training reads only these)
    _interactions: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def interactions(self) -> pd.DataFrame:
        """interactions.parquet, read whole on first use (scripts, tests); no stage after prepare does."""
        if self._interactions is None:
            path = self.folder / "interactions.parquet"
            interactions = _checked(read_parquet(path), path).to_pandas()
            _check_values(interactions, len(self.items), path)
            self._interactions = interactions
        return self._interactions

    @property
    def target(self) -> str:
        return self.manifest.target

    @property
    def source(self) -> list[str]:
        return list(self.manifest.source)

    @property
    def n_users(self) -> int:
        return self.manifest.n_users

    @property
    def n_items(self) -> int:
        return len(self.items)

    def user_ids(self) -> np.ndarray:
        """The original user id of every user_idx (str; "" for an index no interaction has), read from
        interactions.parquet a batch of rows at a time (memory grows with users, not interactions),
        checking each row's item_idx and split as `interactions` does."""
        path = self.folder / "interactions.parquet"
        ids = np.full(self.n_users, "", dtype=object)
        try:
            batches = pq.ParquetFile(path).iter_batches(columns=["user_idx", "user_id", "item_idx", "split"],
                                                        batch_size=1 << 16)
            for batch in batches:
                _check_batch(batch, len(self.items), path)
                users = batch.column(0).to_numpy()
                first = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(users) else users
                ids[users[first]] = [str(u) for u in batch.column(1).take(pa.array(first)).to_pylist()]
        except (pa.ArrowInvalid, OSError, KeyError, IndexError) as exc:
            raise ArtifactError(f"{path}: cannot read its user ids ({str(exc).splitlines()[0]}): "
                                "re-run `trec prepare`") from None
        return ids

    def users_of(self, domains: list[str]) -> np.ndarray:
        """The user_idx of every user with an interaction in any of `domains` (sorted, from the
        sequences: a (domain, user) row exists only for a user with an interaction there)."""
        order = sorted(self.domains.values(), key=lambda d: d.item_start)
        rows = [np.asarray(self.sequences.users[self.sequences.rows(order.index(self.domains[name]))])
                for name in domains]
        return np.unique(np.concatenate(rows)).astype(np.int64) if rows else np.zeros(0, dtype=np.int64)

    def domain(self, name: str, key: str = "domain") -> DomainRange:
        if name not in self.domains:
            known = ", ".join(self.domains)
            raise ConfigError(f"config key '{key}': domain {name!r} is not in the prepared data (has: {known})")
        return self.domains[name]


def prepared_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / PREPARED


def load_prepared(run_dir: str | Path, verify: bool = False) -> Prepared:
    """Load and check `<run_dir>/prepared/`; `verify` recomputes every file's sha256."""
    folder = prepared_dir(run_dir)
    record = read_manifest(folder, stage=PREPARE.name)
    verify_outputs(folder, record, full_hash=verify, complete=verify)
    items = _checked(read_parquet(folder / "items.parquet"), folder / "items.parquet").to_pandas()
    _checked(_schema(folder / "interactions.parquet"), folder / "interactions.parquet")  # rows: on first use
    emb_table = _checked(read_parquet(folder / "item_embeddings.parquet"), folder / "item_embeddings.parquet")
    embeddings = _embedding_matrix(emb_table, len(items), folder / "item_embeddings.parquet")
    manifest = PreparedManifest.from_json(record, folder / MANIFEST)
    return Prepared(folder, manifest, record["outputs"], items, embeddings, manifest.ranges, Sequences(folder))


# The columns each prepared file must have, and the type test each must pass (the contract above).
_INT, _STR = pa.types.is_integer, lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)
_SCHEMA = {
    "items.parquet": {"item_idx": _INT, "item_id": _STR, "domain": _STR},
    "interactions.parquet": {"user_idx": _INT, "item_idx": _INT, "domain": _STR, "timestamp": _INT, "split": _STR},
    "item_embeddings.parquet": {"item_idx": _INT, "embedding": lambda t: pa.types.is_fixed_size_list(t)
                                and pa.types.is_floating(t.value_type)},
}
# input: a held-out user's history (data.split: users), read before their held-out items, never trained on.
SPLITS = ("train", "valid", "test", "input")


def _checked(table: pa.Table | pa.Schema, path: Path) -> pa.Table | pa.Schema:
    """Refuse a prepared file that lacks a contract column or holds it with the wrong type."""
    schema = table if isinstance(table, pa.Schema) else table.schema
    for column, is_ok in _SCHEMA[path.name].items():
        if column not in schema.names:
            raise ArtifactError(f"{path}: no column {column!r}; not a prepared file: re-run `trec prepare`")
        if not is_ok(schema.field(column).type):
            raise ArtifactError(f"{path}: column {column!r} has type {schema.field(column).type}, "
                                "not the prepared contract's: re-run `trec prepare`")
    return table


def _schema(path: Path) -> pa.Schema:
    try:
        return pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ArtifactError(f"{path}: unreadable Parquet ({str(exc).splitlines()[0]})") from None


def _check_values(interactions: pd.DataFrame, n_items: int, path: Path) -> None:
    items = interactions["item_idx"].to_numpy()
    if len(items) and (items.min() < 0 or items.max() >= n_items):
        raise ArtifactError(f"{path}: item_idx outside the {n_items} prepared items: re-run `trec prepare`")
    unknown = set(interactions["split"].unique()) - set(SPLITS)
    if unknown:
        raise ArtifactError(f"{path}: column 'split' holds {sorted(unknown)[:3]}, expected {', '.join(SPLITS)}: "
                            "re-run `trec prepare`")


def _check_batch(batch: pa.RecordBatch, n_items: int, path: Path) -> None:
    """`_check_values` on one batch of rows (item_idx and split columns)."""
    low, high = pc.min_max(batch.column("item_idx")).values()
    if low.is_valid and (low.as_py() < 0 or high.as_py() >= n_items):
        raise ArtifactError(f"{path}: item_idx outside the {n_items} prepared items: re-run `trec prepare`")
    unknown = set(pc.unique(batch.column("split")).to_pylist()) - set(SPLITS)
    if unknown:
        raise ArtifactError(f"{path}: column 'split' holds {sorted(map(str, unknown))[:3]}, expected "
                            f"{', '.join(SPLITS)}: re-run `trec prepare`")


def _embedding_matrix(table: pa.Table, n_items: int, path: Path) -> np.ndarray:
    idx = table.column("item_idx").to_numpy()
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    matrix = np.zeros((n_items, dim), dtype=np.float32)
    if len(idx) != n_items or idx.min(initial=0) < 0 or idx.max(initial=-1) >= n_items:
        raise ArtifactError(f"{path}: {len(idx)} embeddings for {n_items} items: re-run `trec prepare`")
    matrix[idx] = values.reshape(len(idx), dim)
    return matrix


@dataclass
class DomainSplit:
    """One domain's users with their ordered train sequences and held-out targets (item_idx).

    `valid` and `test` hold each user's held-out items (usually one under leave-one-out; empty when
    the user has none). Evaluating on valid uses `train` as history; on test, `train + valid`; a
    held-out user's `input` items (data.split: users) come first in both, and are never trained on.
    """

    domain: DomainRange
    user_idx: np.ndarray
    train: Ragged
    valid: Ragged
    test: Ragged
    input: Ragged | None = None

    def history(self, split: str) -> Ragged:
        before = self.train if self.input is None else concat_rows(self.input, self.train)
        if split == "valid":
            return before
        if split == "test":
            return concat_rows(before, self.valid)
        raise ValueError(f"unknown split {split!r}")

    def targets(self, split: str) -> Ragged:
        return {"valid": self.valid, "test": self.test}[split]


def seen_items(sequences) -> np.ndarray:
    """The distinct item_idx of some training sequences: the items a model's ID table needs."""
    if isinstance(sequences, Ragged):  # a block of rows at a time: memory grows with items, not interactions
        return seen_items([np.unique(block) for block in sequences.chunks()])
    parts = [np.asarray(seq, dtype=np.int64) for seq in sequences]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


def domain_split(prepared: Prepared, name: str) -> DomainSplit:
    """A domain's users and their items per split, in the prepared sequence order, memory-mapped
    from `prepared/sequences/` (the rows of the domain there)."""
    domain = prepared.domain(name)
    store = prepared.sequences
    rows = store.rows(sorted(prepared.domains.values(), key=lambda d: d.item_start).index(domain))
    parts = {part: domain_rows(store.part(part), rows) for part in SPLITS}
    return DomainSplit(domain, np.asarray(store.users[rows], dtype=np.int64), parts["train"], parts["valid"],
                       parts["test"], parts["input"] if parts["input"].any_items() else None)
