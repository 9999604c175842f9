"""Who gets a recommendation list, and from which history: the run's users, a `--users` file, new
users' `--histories` (which may name items the catalogue does not know, with their text), or queries.

History rule: a known user's history is their interactions in the recommended domain, in the prepared
order; a user with none there (known only from other domains) is read from all their interactions —
the cross-domain cold start the transfer is for. Items the catalogue does not know get item_idx
`n_items + j` and are represented by their text alone; a query is such an item, read as a one-item
history.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.types as pat

from trecsys.artifacts import read_parquet
from trecsys.errors import DataError
from trecsys.prepared.sequences import BY_USER
from trecsys.prepared.tables import DomainRange, Prepared, domain_split

PARQUET_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")


@dataclass
class History:
    """One user's ordered items from a --histories file; `texts[i]` describes a new item (or is None)."""

    user_id: str
    item_ids: list[str]
    texts: list[str | None]
    where: str  # file:line or file row, for messages


@dataclass
class Requests:
    """One row per list to make, with the histories the rankers read (global item_idx)."""

    labels: list[str]  # the user id, or the query text in query mode
    users: list[str | None]  # whose list it is (query mode: --user, or None)
    histories: list[np.ndarray]
    exclude: list[np.ndarray]  # catalogue-local items never to recommend to that row
    # Items new to the catalogue (item ids; in query mode the queries): item_idx n_items + j.
    new_items: list[str] = field(default_factory=list)
    new_texts: list[str] = field(default_factory=list)  # what the encoder reads for each
    new_where: list[str] = field(default_factory=list)  # where each was first named
    unknown: list[str] = field(default_factory=list)  # requested user ids the run does not know
    # Query mode with --user: that user's history beside each query row, blended by weight.
    user_histories: list[np.ndarray] | None = None
    # Per row of histories + user_histories: the user whose history was read from the prepared data
    # (None: a --histories entry or a query), so a model that reads other domains as context can
    # have it re-read with them.
    read_from: list[str | None] = field(default_factory=list)
    # --as-of: the split the histories stop before (valid: train; test: train and valid), or None.
    as_of: str | None = None


# ---------------------------------------------------------------------------------------------
# Input files


def read_lines(path: Path, option: str) -> list[tuple[int, str]]:
    """(line number, stripped text) of each non-empty line of a UTF-8 text file (a BOM is allowed);
    a file that is not UTF-8 is refused naming the line."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DataError(f"{option} {path}:{line}: not UTF-8 (byte 0x{data[exc.start]:02x}); save the file as "
                        "UTF-8") from None
    return [(n, line.strip()) for n, line in enumerate(text.split("\n"), 1) if line.strip()]


def read_user_ids(path: Path) -> list[str]:
    """User ids from a text file (one per line) or a Parquet file with a user_id column, deduplicated."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--users {path}: file not found")
    if path.suffix.lower() in PARQUET_SUFFIXES:
        table = read_parquet(path)
        if "user_id" not in table.column_names:
            raise DataError(f"--users {path}: no user_id column (columns: {', '.join(table.column_names)})")
        column = table.column("user_id")
        if column.null_count:
            raise DataError(f"--users {path}: column user_id has {column.null_count} empty values")
        ids = [str(v) for v in column.to_pylist()]
    else:
        ids = [line for _, line in read_lines(path, "--users")]
    if not ids:
        raise DataError(f"--users {path}: the file lists no user ids")
    return list(dict.fromkeys(ids))


def read_queries(path: Path) -> list[str]:
    """One query per non-empty line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--queries {path}: file not found")
    queries = [line for _, line in read_lines(path, "--queries")]
    if not queries:
        raise DataError(f"--queries {path}: the file holds no queries")
    return queries


def read_histories(path: Path) -> list[History]:
    """New users' histories: JSONL lines {"user_id", "item_ids": [...], "texts": [...]} ("titles" may
    stand for "texts"), or Parquet with one row per interaction (user_id, item_id[, text|title]) or
    one row per user (user_id, item_ids[, texts|titles] as lists). Order is the history order."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--histories {path}: file not found")
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        histories = _parquet_histories(path)
    elif suffix in JSONL_SUFFIXES:
        histories = _jsonl_histories(path)
    else:
        raise DataError(f"--histories {path}: unknown file type {suffix!r}; use .jsonl or .parquet")
    if not histories:
        raise DataError(f"--histories {path}: the file holds no histories")
    return histories


def _jsonl_histories(path: Path) -> list[History]:
    out: dict[str, History] = {}
    for line_no, line in read_lines(path, "--histories"):
        where = f"{path}:{line_no}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected an object with user_id and item_ids")
        history = _history(record.get("user_id"), record.get("item_ids"), _texts_field(record, where), where)
        if history.user_id in out:
            raise DataError(f"{where}: user {history.user_id!r} already has a history at {out[history.user_id].where}")
        out[history.user_id] = history
    return list(out.values())


def _texts_field(record: dict, where: str):
    if "texts" in record and "titles" in record:
        raise DataError(f"{where}: give either texts or titles, not both")
    return record.get("texts", record.get("titles"))


def _history(user_id, item_ids, texts, where: str) -> History:
    if user_id is None or (isinstance(user_id, str) and not user_id.strip()):
        raise DataError(f"{where}: missing user_id")
    if not isinstance(item_ids, list) or not item_ids:
        raise DataError(f"{where}: item_ids must be a non-empty list of item ids")
    if any(i is None or isinstance(i, (dict, list)) for i in item_ids):
        raise DataError(f"{where}: item_ids must hold plain ids, got {item_ids[:3]!r}")
    if texts is None:
        texts = [None] * len(item_ids)
    if not isinstance(texts, list) or len(texts) != len(item_ids):
        raise DataError(f"{where}: texts must be a list as long as item_ids ({len(item_ids)}), null where the "
                        "catalogue knows the item")
    texts = [t.strip() if isinstance(t, str) and t.strip() else None for t in texts]
    return History(str(user_id), [str(i) for i in item_ids], texts, where)


def _parquet_histories(path: Path) -> list[History]:
    table = read_parquet(path)
    names = table.column_names
    if "user_id" not in names:
        raise DataError(f"--histories {path}: no user_id column (columns: {', '.join(names)})")
    text_column = next((c for c in ("texts", "titles", "text", "title") if c in names), None)
    users = [None if u is None else str(u) for u in table.column("user_id").to_pylist()]
    texts = table.column(text_column).to_pylist() if text_column else [None] * len(users)
    if "item_ids" in names and _is_list(table.schema.field("item_ids").type):
        items = table.column("item_ids").to_pylist()
        histories = [_history(u, i, t, f"{path} row {r}") for r, (u, i, t) in enumerate(zip(users, items, texts,
                                                                                                strict=True))]
        seen: dict[str, str] = {}
        for h in histories:
            if h.user_id in seen:
                raise DataError(f"{h.where}: user {h.user_id!r} already has a history at {seen[h.user_id]}")
            seen[h.user_id] = h.where
        return histories
    if "item_id" not in names:
        raise DataError(f"--histories {path}: needs an item_id column (one row per interaction) or an item_ids "
                        f"list column (one row per user); columns: {', '.join(names)}")
    if isinstance(texts and texts[0], list):
        raise DataError(f"--histories {path}: column {text_column} holds lists; one row per interaction needs one text")
    grouped: dict[str, History] = {}
    for r, (user, item, text) in enumerate(zip(users, _as_strings(table.column("item_id")), texts, strict=True)):
        where = f"{path} row {r}"
        if user is None or item is None:
            raise DataError(f"{where}: empty {'user_id' if user is None else 'item_id'}")
        history = grouped.setdefault(user, History(user, [], [], where))
        history.item_ids.append(item)
        history.texts.append(text.strip() if isinstance(text, str) and text.strip() else None)
    return list(grouped.values())


def _is_list(kind: pa.DataType) -> bool:
    return pat.is_list(kind) or pat.is_large_list(kind)


def _as_strings(column: pa.ChunkedArray) -> list[str | None]:
    return [None if v is None else str(v) for v in column.to_pylist()]


# ---------------------------------------------------------------------------------------------
# From ids to item_idx


class Catalogue:
    """Known users and items of the prepared data, and each known user's history.

    With `as_of` (valid or test) a user's history is what `trec evaluate --split as_of` reads: their
    items of the domain from the splits before it (train; train and valid), with no fallback to
    other domains (evaluate has none), so lists made as of a split can be scored against it.
    """

    def __init__(self, prepared: Prepared, domain: DomainRange, as_of: str | None = None):
        self.prepared, self.domain, self.as_of = prepared, domain, as_of
        # Histories come from the memory-mapped sequences (one row per user_idx, every item in the
        # prepared order), never from the interactions table: memory grows with users, not interactions.
        self._by_user = prepared.sequences.part(BY_USER)
        ids = prepared.user_ids()
        known = np.flatnonzero(self._by_user.lengths() > 0)
        self._user_idx = dict(zip(ids[known].tolist(), known.tolist(), strict=True))
        self._as_of: dict[str, np.ndarray] = {}
        if as_of is not None:
            split = domain_split(prepared, domain.name)
            self._as_of = dict(zip(ids[split.user_idx].tolist(), split.history(as_of), strict=True))
        # The domain's users, in user_idx order: who gets a list when nobody is named.
        self.domain_users = ids[prepared.users_of([domain.name])].tolist()
        # Items are contiguous per domain: an item's domain is the range it falls in.
        ranges = sorted(prepared.domains.values(), key=lambda d: (d.item_start, d.item_stop))
        self._range_starts = np.array([d.item_start for d in ranges], dtype=np.int64)
        self._range_names = np.array([d.name for d in ranges], dtype=object)
        # An item id may exist in several domains: the recommended domain's item wins.
        table = prepared.items
        ranked = np.argsort(table["domain"].to_numpy() != domain.name, kind="stable")
        item_ids = table["item_id"].to_numpy().astype(str)[ranked]
        item_idx = table["item_idx"].to_numpy()[ranked]
        self.item_index: dict[str, int] = {}
        for item_id, idx in zip(item_ids, item_idx, strict=True):
            self.item_index.setdefault(item_id, int(idx))

    def knows(self, user_id: str) -> bool:
        return user_id in self._user_idx

    def in_domain(self, user_id: str) -> bool:
        """Whether the user has a history in the domain as of the split (always, without --as-of)."""
        return self.as_of is None or user_id in self._as_of

    def user_idx(self, user_ids: list[str]) -> np.ndarray:
        """The prepared user_idx of known users."""
        return np.array([self._user_idx[u] for u in user_ids], dtype=np.int64)

    def history(self, user_id: str, context: list[str] | None = None) -> np.ndarray:
        """The user's items in the domain (with `context`: in those domains, interleaved as they came),
        or all their items when they have none there."""
        if self.as_of is not None and context is None:
            return self._as_of.get(user_id, np.zeros(0, dtype=np.int64))
        items = self._by_user[self._user_idx[user_id]]
        if context is None:
            mine = (items >= self.domain.item_start) & (items < self.domain.item_stop)
        else:
            domains = self._range_names[np.searchsorted(self._range_starts, items, side="right") - 1]
            mine = np.isin(domains, context)
        return items[mine] if mine.any() else items

    def local(self, history: np.ndarray) -> np.ndarray:
        """The history's items of the recommended catalogue, as catalogue-local indices."""
        d = self.domain
        return history[(history >= d.item_start) & (history < d.item_stop)] - d.item_start


def user_requests(catalogue: Catalogue, user_ids: list[str] | None, histories: list[History] | None,
                  exclude_seen: bool) -> Requests:
    """Rows for named users (or every user of the domain when none are named) and new users' histories.

    A --histories entry replaces what the run knows about that user.
    """
    given = {h.user_id: h for h in histories or []}
    if user_ids is None:
        user_ids = [] if histories else catalogue.domain_users
    wanted = list(dict.fromkeys([*user_ids, *given]))
    unknown = [u for u in wanted if u not in given and not catalogue.knows(u)]
    rows = [u for u in wanted if u in given or catalogue.knows(u)]
    new_index: dict[str, int] = {}
    new_texts: list[str | None] = []
    new_where: list[str] = []
    seqs = []
    for user in rows:
        if user in given:
            seqs.append(_map_history(given[user], catalogue, new_index, new_texts, new_where))
        else:
            seqs.append(catalogue.history(user))
    new_items = list(new_index)  # insertion order: item j first
    missing = [j for j, t in enumerate(new_texts) if t is None]
    if missing:
        j = missing[0]
        raise DataError(
            f"{new_where[j]}: item {new_items[j]!r} is not in the prepared catalogue and has no text: give its "
            f"text (texts/titles), or drop it ({len(missing)} such item(s))"
        )
    n_items = catalogue.prepared.n_items
    return Requests(
        labels=rows, users=list(rows), histories=seqs, read_from=[None if u in given else u for u in rows],
        exclude=[_seen(catalogue, s, n_items, exclude_seen) for s in seqs],
        new_items=new_items, new_texts=[str(t) for t in new_texts], new_where=new_where, unknown=unknown,
        as_of=catalogue.as_of,
    )


def _map_history(history: History, catalogue: Catalogue, new_index: dict[str, int], new_texts: list,
                 new_where: list[str]) -> np.ndarray:
    n_items = catalogue.prepared.n_items
    out = np.empty(len(history.item_ids), dtype=np.int64)
    for pos, (item, text) in enumerate(zip(history.item_ids, history.texts, strict=True)):
        known = catalogue.item_index.get(item)
        if known is not None:
            out[pos] = known
            continue
        if item not in new_index:
            new_index[item] = len(new_texts)
            new_texts.append(None)
            new_where.append(history.where)
        j = new_index[item]
        if new_texts[j] is None and text is not None:
            new_texts[j] = text
        out[pos] = n_items + j
    return out


def _seen(catalogue: Catalogue, history: np.ndarray, n_items: int, exclude_seen: bool) -> np.ndarray:
    if not exclude_seen:
        return np.zeros(0, dtype=np.int64)
    return catalogue.local(history[history < n_items])


def query_requests(catalogue: Catalogue, queries: list[str], user_id: str | None, exclude_seen: bool) -> Requests:
    """One row per query: the query is a new item (its text) read as a one-item history; with a user,
    that user's history rides along to be blended in, and their seen items are excluded."""
    n_items = catalogue.prepared.n_items
    user_history = None
    if user_id is not None:
        if not catalogue.knows(user_id):
            raise DataError(f"--user {user_id!r}: not a user of the prepared data in {catalogue.prepared.folder}")
        user_history = catalogue.history(user_id)
    exclude = _seen(catalogue, user_history, n_items, exclude_seen) if user_history is not None else np.zeros(0, np.int64)
    return Requests(
        labels=list(queries), users=[user_id] * len(queries),
        histories=[np.array([n_items + j], dtype=np.int64) for j in range(len(queries))],
        exclude=[exclude] * len(queries),
        new_items=list(queries), new_texts=list(queries), new_where=["query"] * len(queries),
        user_histories=[user_history] * len(queries) if user_history is not None else None,
        read_from=[None] * len(queries) + ([user_id] * len(queries) if user_history is not None else []),
    )
