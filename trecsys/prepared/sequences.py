"""Users' item sequences as flat arrays on disk: `offsets` (int64, rows + 1) and `items` (int32 when the
catalogue fits), written once by `trec prepare` into `prepared/sequences/` and memory-mapped by every
later stage, so a stage's memory does not grow with Python lists of per-user arrays.

Rows are (domain, user) pairs: every domain's users in user_idx order, domains in catalogue order
(by item_start). `users.npy` holds each row's user_idx and `domains.npy` each domain's first row
(n_domains + 1 bounds). Per split of the interactions table (train, valid, test, input) one
offsets/items pair holds each row's items of that split in the prepared order. For the target domain's
users, `all_domains.*` hold what `finetune.history: all_domains` reads (trecsys/prepared/context.py):
`train`, everything up to the user's last target training item, held-out target items left out;
`valid` and `test`, what the user did before their first item of that split. `by_user.*` has one
row per user_idx: all of the user's items, every domain and split, in the prepared order (what
`trec recommend` reads as a known user's history: rank/requests.py's `Catalogue`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from trecsys.artifacts import atomic_path
from trecsys.errors import ArtifactError

FOLDER = "sequences"
SPLIT_PARTS = ("train", "valid", "test", "input")
CONTEXT_PARTS = ("all_domains.train", "all_domains.valid", "all_domains.test")
BY_USER = "by_user"  # rows are user_idx, not (domain, user)
# The files `load_sequences` needs: a prepared folder without them predates this layout.
FILES = ("users.npy", "domains.npy", *(f"{p}.{a}.npy" for p in (*SPLIT_PARTS, *CONTEXT_PARTS, BY_USER)
                                      for a in ("offsets", "items")))


class Ragged:
    """Rows of variable length over one flat item array: row r is `items[starts[r]:stops[r]]`.

    Reads like a list of int64 arrays (len, [r], iteration), which is what the code before flat
    arrays took; `take(rows)` is a subset of rows over the same (memory-mapped) items.
    """

    def __init__(self, items: np.ndarray, starts: np.ndarray, stops: np.ndarray):
        self.items, self.starts, self.stops = items, starts, stops

    @classmethod
    def from_offsets(cls, items: np.ndarray, offsets: np.ndarray) -> Ragged:
        return cls(items, offsets[:-1], offsets[1:])

    @classmethod
    def from_lists(cls, sequences) -> Ragged:
        """In memory, from a list of arrays (tests and small callers)."""
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences]) if len(sequences) else \
            np.zeros(0, dtype=np.int64)
        return cls.from_offsets(flat, offsets)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, row: int) -> np.ndarray:
        return np.asarray(self.items[self.starts[row]:self.stops[row]], dtype=np.int64)

    def __iter__(self) -> Iterator[np.ndarray]:
        for row in range(len(self)):
            yield self[row]

    def lengths(self) -> np.ndarray:
        return np.asarray(self.stops, dtype=np.int64) - np.asarray(self.starts, dtype=np.int64)

    def take(self, rows: np.ndarray) -> Ragged:
        rows = np.asarray(rows, dtype=np.int64)
        return Ragged(self.items, np.asarray(self.starts)[rows], np.asarray(self.stops)[rows])

    def positions(self) -> np.ndarray:
        """Indices into `items` of every row's items, rows in order (int64, sum of lengths)."""
        lengths = self.lengths()
        first = np.repeat(np.asarray(self.starts, dtype=np.int64) - np.cumsum(lengths) + lengths, lengths)
        return first + np.arange(int(lengths.sum()), dtype=np.int64)

    def flat(self) -> np.ndarray:
        """Every row's items in row order (int64, in memory)."""
        return np.asarray(self.items[self.positions()], dtype=np.int64)

    def chunks(self, rows_per_chunk: int = 1 << 16) -> Iterator[np.ndarray]:
        """`flat()` a block of rows at a time, so a pass over every item holds one block in memory."""
        for first in range(0, len(self), rows_per_chunk):
            yield Ragged(self.items, self.starts[first:first + rows_per_chunk],
                         self.stops[first:first + rows_per_chunk]).flat()

    def item_counts(self, start: int, stop: int) -> np.ndarray:
        """How often each item of [start, stop) occurs in all rows: (stop - start,) int64."""
        counts = np.zeros(stop - start, dtype=np.int64)
        for flat in self.chunks():
            counts += np.bincount(flat[(flat >= start) & (flat < stop)] - start, minlength=stop - start)
        return counts

    def any_items(self) -> bool:
        return bool((self.lengths() > 0).any())


def concat_rows(first: Ragged, second: Ragged) -> Ragged:
    """Row r of the result is `first[r]` followed by `second[r]` (in memory)."""
    a, b = first.lengths(), second.lengths()
    offsets = np.concatenate([[0], np.cumsum(a + b)]).astype(np.int64)
    out = np.empty(int(offsets[-1]), dtype=np.int64)
    out[np.repeat(offsets[:-1], a) + _within(a)] = first.flat()
    out[np.repeat(offsets[:-1] + a, b) + _within(b)] = second.flat()
    return Ragged.from_offsets(out, offsets)


def _within(lengths: np.ndarray) -> np.ndarray:
    """0..length-1 for each row, concatenated."""
    return np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)


# ---------------------------------------------------------------------------------------------
# Writing (trec prepare)


def write_sequences(folder: Path, interactions: pa.Table, ranges: dict[str, tuple[int, int]],
                    source: list[str], target: str, n_items: int) -> None:
    """`folder/sequences/*.npy` from the interactions table `prepare` writes (sorted by user_idx, then
    time). `ranges`: {domain: (item_start, item_stop)}."""
    out = Path(folder) / FOLDER
    out.mkdir(parents=True, exist_ok=True)
    item_dtype = np.int32 if n_items <= np.iinfo(np.int32).max else np.int64
    users = interactions.column("user_idx").to_numpy()  # int32 as written: no int64 copy of every row
    items = interactions.column("item_idx").to_numpy()
    domain, domain_names = _codes(interactions, "domain")
    split, split_names = _codes(interactions, "split")

    def code(names: list[str], name: str) -> int:
        return names.index(name) if name in names else -1

    order = sorted(ranges, key=lambda name: ranges[name][0])
    rows_users, bounds = [], [0]
    parts: dict[str, tuple[list, list]] = {p: ([], []) for p in SPLIT_PARTS}  # lengths, items per domain
    for name in order:
        in_domain = domain == code(domain_names, name)
        d_users, d_items, d_split = users[in_domain], items[in_domain], split[in_domain]
        row_users = np.unique(d_users)  # rows are sorted by user_idx
        rows_users.append(row_users)
        bounds.append(bounds[-1] + len(row_users))
        for part in SPLIT_PARTS:
            keep = d_split == code(split_names, part)
            parts[part][0].append(np.bincount(np.searchsorted(row_users, d_users[keep]), minlength=len(row_users)))
            parts[part][1].append(d_items[keep])
    _save(out / "users.npy", np.concatenate(rows_users).astype(np.int64) if rows_users else np.zeros(0, dtype=np.int64))
    _save(out / "domains.npy", np.asarray(bounds, dtype=np.int64))
    for part, (lengths, part_items) in parts.items():
        _save_ragged(out, part, np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64),
                     np.concatenate(part_items) if part_items else np.zeros(0, dtype=np.int64), item_dtype)

    # Every interaction's item, rows by user_idx: the table is sorted by user (a stable sort when not).
    by_user = np.argsort(users, kind="stable") if len(users) > 1 and (np.diff(users) < 0).any() else None
    n_users = int(users.max()) + 1 if len(users) else 0
    _save_ragged(out, BY_USER, np.bincount(users, minlength=n_users),
                 items if by_user is None else items[by_user], item_dtype)

    target_users = rows_users[order.index(target)] if target in order else np.zeros(0, dtype=np.int64)
    is_target_user = np.zeros(n_users, dtype=bool)  # a lookup: np.isin would sort every row's user
    is_target_user[target_users] = True
    context = np.isin(domain, [code(domain_names, d) for d in [*source, target]]) & is_target_user[users]
    start, stop = ranges.get(target, (0, 0))
    for part, (lengths, kept) in _context_parts(users[context], items[context], split[context], target_users,
                                                start, stop, split_names).items():
        _save_ragged(out, part, lengths, kept, item_dtype)


def _codes(table: pa.Table, column: str) -> tuple[np.ndarray, list[str]]:
    """A string column as integer codes and the names they stand for."""
    encoded = pc.dictionary_encode(table.column(column).combine_chunks())
    return np.asarray(encoded.indices), encoded.dictionary.to_pylist()


def _context_parts(users, items, split, target_users, start, stop, split_names) -> dict:
    """The all_domains sequences of each target user (rows follow `target_users`), vectorised:
    `train` up to the last target training item without held-out target items; `valid`/`test`
    before the first target item of that split, target items only from the splits before it."""
    n = len(target_users)
    # 4-byte rows and positions while they fit: these arrays span every context interaction.
    index = np.int32 if max(n, len(items)) < np.iinfo(np.int32).max else np.int64
    row = np.searchsorted(target_users, users).astype(index)
    position = np.arange(len(items), dtype=index)
    target = (items >= start) & (items < stop)
    kind = {name: split == (split_names.index(name) if name in split_names else -1) for name in SPLIT_PARTS}

    last_train = np.full(n, -1, dtype=index)
    tt = np.flatnonzero(target & kind["train"])
    ends = tt[np.r_[row[tt][1:] != row[tt][:-1], True]] if len(tt) else tt
    last_train[row[ends]] = ends
    keep_train = (position <= last_train[row]) & ~(target & ~kind["train"])

    out = {"all_domains.train": keep_train}
    for name, visible in (("valid", ("train", "input")), ("test", ("train", "input", "valid"))):
        first_held = np.full(n, np.iinfo(index).max, dtype=index)
        held = np.flatnonzero(target & kind[name])
        firsts = held[np.r_[True, row[held][1:] != row[held][:-1]]] if len(held) else held
        first_held[row[firsts]] = firsts
        seen = np.logical_or.reduce([kind[v] for v in visible])
        out[f"all_domains.{name}"] = (position < first_held[row]) & (~target | seen)
    return {part: (np.bincount(row[keep], minlength=n), items[keep]) for part, keep in out.items()}


def _save_ragged(out: Path, part: str, lengths: np.ndarray, items: np.ndarray, item_dtype) -> None:
    _save(out / f"{part}.offsets.npy", np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64))
    _save(out / f"{part}.items.npy", items.astype(item_dtype))


def _save(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


# ---------------------------------------------------------------------------------------------
# Reading (every later stage)


class Sequences:
    """The memory-mapped arrays of one prepared folder (see the module docstring)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder) / FOLDER
        missing = [name for name in FILES if not (self.folder / name).is_file()]
        if missing:
            raise ArtifactError(f"{self.folder / missing[0]}: missing; this prepared folder predates this version's "
                                "memory-mapped sequences: re-run `trec prepare`")
        self.users = self._load("users.npy")
        self.bounds = np.asarray(self._load("domains.npy"))

    def _load(self, name: str) -> np.ndarray:
        try:
            return np.load(self.folder / name, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise ArtifactError(f"{self.folder / name}: unreadable ({exc}): re-run `trec prepare`") from None

    def part(self, name: str) -> Ragged:
        """All rows of one offsets/items pair (`train`, `all_domains.valid`, ...), memory-mapped."""
        return Ragged.from_offsets(self._load(f"{name}.items.npy"), self._load(f"{name}.offsets.npy"))

    def rows(self, domain_position: int) -> slice:
        """The rows of the domain that is `domain_position`-th in catalogue order."""
        return slice(int(self.bounds[domain_position]), int(self.bounds[domain_position + 1]))


def domain_rows(part: Ragged, rows: slice) -> Ragged:
    """Rows `rows` of `part`, still over its memory-mapped items."""
    return Ragged(part.items, part.starts[rows], part.stops[rows])
