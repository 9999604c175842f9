"""Readers: one domain's input files in any supported format → a RawDomain (trecsys/ingest/raw.py).

`read_domain` picks the reader by `format`. Amazon JSON lines live in trecsys/ingest/amazon.py; the
tabular formats (RecBole atomic files, pre-split RecBole benchmarks, CSV/TSV/Parquet) are here.
`format: synthetic` is not read from files (the synthetic generator makes those domains).

Conventions common to all readers:
- Paths are relative to `root` unless absolute; `.gz` is detected by content.
- Bad rows (a missing id, a non-numeric or negative time, a non-numeric rating, a line with too
  many fields, malformed JSON) raise a DataError naming file and line under `on_bad_rows: error`,
  or are dropped and counted under `skip`. Missing files or columns, bad headers and empty files
  are always errors.
- Without an item file (`items` left empty) the item table holds the interacted ids only.
- `users` files are checked to exist but not read: users are matched across domains by id.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from trecsys.config import DomainConfig
from trecsys.errors import ConfigError, DataError
from trecsys.ingest import amazon
from trecsys.ingest.inputs import (
    READ_ERRORS,
    BadRows,
    check_unique_header,
    finish_interactions,
    finish_items,
    first_line,
    input_path,
    items_from_interactions,
    open_text,
    parquet_input,
    parquet_parts,
    read_delimited,
    read_error,
)
from trecsys.ingest.raw import RawDomain
from trecsys.ingest.select import select_domain

RECBOLE_TYPES = ("token", "token_seq", "float", "float_seq")
# Order columns a RecBole .inter may carry, best first; `position` is an order, not a time.
RECBOLE_ORDER_COLUMNS = ("timestamp", "position")
RECBOLE_SPLIT_COLUMNS = ("origin_split", "split")
SPLIT_FILES = ("train", "valid", "test")


def read_domain(name: str, domain: DomainConfig, root: Path, on_bad_rows: str) -> RawDomain:
    """Read one configured domain; `on_bad_rows` is 'error' (raise at the first bad row) or 'skip'."""
    if on_bad_rows not in ("error", "skip"):
        raise ConfigError(f"data.on_bad_rows: {on_bad_rows!r} is not one of 'error', 'skip'")
    reader = _READERS.get(domain.format)
    if reader is None:
        raise ConfigError(
            f"data.domains.{name}.format: {domain.format!r} domains are generated, not read from files"
            if domain.format == "synthetic" else
            f"data.domains.{name}.format: unknown format {domain.format!r}; known: {', '.join(_READERS)}"
        )
    if domain.users:
        input_path(root, domain.users, name, "users", domain.format)
    bad = BadRows(on_bad_rows)
    raw = select_domain(name, domain, reader(name, domain, Path(root), bad))
    bad.flush()
    raw.skipped_rows, raw.skipped_examples = bad.count, bad.examples
    if raw.interactions.empty:
        after = f" after skipping {bad.count} bad rows" if bad.count else ""
        raise DataError(f"{raw.files[0]}: no interactions{after} (data.domains.{name}.interactions)")
    return raw


# ---------------------------------------------------------------------------------------------
# Amazon


def _read_amazon(name: str, domain: DomainConfig, root: Path, bad: BadRows) -> RawDomain:
    reviews = input_path(root, domain.interactions, name, "interactions", domain.format)
    interactions = amazon.read_reviews(reviews, domain.format, bad)
    files = [str(reviews)]
    if domain.items and not interactions.empty:  # no interactions: read_domain says so
        meta = input_path(root, domain.items, name, "items", domain.format)
        items = amazon.read_meta(meta, domain.format, set(interactions["item_id"].unique()), bad)
        if items.empty:
            raise DataError(f"{meta}: describes none of the {interactions['item_id'].nunique()} reviewed items "
                            f"(is it the metadata file of the same category as {reviews.name}?)")
        files.append(str(meta))
    else:
        items = items_from_interactions(interactions)
    return RawDomain(name=name, interactions=interactions, items=items, files=files)


# ---------------------------------------------------------------------------------------------
# RecBole atomic files


def parse_atomic_header(path: Path, line: str) -> dict[str, str]:
    """`name:type` fields of a RecBole header, in file order, as {name: type}."""
    fields: dict[str, str] = {}
    for index, field in enumerate(line.split("\t"), 1):
        field_name, colon, field_type = field.strip().partition(":")
        if not colon or not field_name:
            raise DataError(
                f"{path}:1: header field {index} {field!r} is not name:type "
                "(RecBole atomic files start with a typed header such as user_id:token<TAB>item_id:token)"
            )
        if field_type not in RECBOLE_TYPES:
            raise DataError(
                f"{path}:1: header field {field!r} has unknown type {field_type!r}; "
                f"expected one of {', '.join(RECBOLE_TYPES)}"
            )
        if field_name in fields:
            raise DataError(f"{path}:1: header names field {field_name!r} twice: rename or remove one")
        fields[field_name] = field_type
    return fields


def _require_fields(path: Path, fields: dict[str, str], required: tuple[str, ...], hint: str = "") -> None:
    for field_name in required:
        if field_name not in fields:
            raise DataError(
                f"{path}:1: header has no {field_name!r} field (found: {', '.join(fields)}){hint}"
            )


def _read_atomic(path: Path, bad: BadRows, required: tuple[str, ...], hint: str = "",
                 ) -> tuple[pd.DataFrame, np.ndarray, dict[str, str]]:
    fields = parse_atomic_header(path, first_line(path))
    _require_fields(path, fields, required, hint)
    frame, lines = read_delimited(path, "\t", csv.QUOTE_NONE, bad, list(fields))
    return frame, lines, fields


def _read_recbole(name: str, domain: DomainConfig, root: Path, bad: BadRows) -> RawDomain:
    path = input_path(root, domain.interactions, name, "interactions", domain.format)
    fields = parse_atomic_header(path, first_line(path))
    if "item_id_list" in fields:
        raise DataError(
            f"{path}:1: has an item_id_list field, the pre-split benchmark layout: "
            f"set data.domains.{name}.format: recbole_split"
        )
    _require_fields(path, fields, ("user_id", "item_id"))
    order = next((c for c in RECBOLE_ORDER_COLUMNS if c in fields), None)
    if order is None:
        raise DataError(
            f"{path}:1: header has neither a timestamp nor a position field (found: {', '.join(fields)}): "
            "add one so that each user's interactions can be ordered"
        )
    frame, lines = read_delimited(path, "\t", csv.QUOTE_NONE, bad, list(fields))
    columns = {"user_id": "user_id", "item_id": "item_id", "timestamp": order}
    if "rating" in fields:
        columns["rating"] = "rating"
    split = next((c for c in RECBOLE_SPLIT_COLUMNS if c in fields), None)
    if split is not None:
        columns["split"] = split
    raw = pd.DataFrame({key: frame[column] for key, column in columns.items()})
    interactions = finish_interactions(path, raw, lines, columns, bad)
    files = [str(path)]
    items = _read_item_file(name, domain, root, bad, files, interactions, headerless_ok=False)
    return RawDomain(name=name, interactions=interactions, items=items, files=files,
                     order_only=order == "position")


def _read_item_file(name: str, domain: DomainConfig, root: Path, bad: BadRows, files: list[str],
                    interactions: pd.DataFrame, headerless_ok: bool) -> pd.DataFrame:
    """A RecBole `.item` file; with `headerless_ok`, also a UniSRec-style `.text` of `id<TAB>text`."""
    if not domain.items:
        return items_from_interactions(interactions)
    path = input_path(root, domain.items, name, "items", domain.format)
    files.append(str(path))
    header = first_line(path)
    if headerless_ok and not _looks_typed(header):
        frame, lines = read_delimited(path, "\t", csv.QUOTE_NONE, bad, ["item_id", "text"], has_header=False)
    else:
        frame, lines, _ = _read_atomic(path, bad, ("item_id",))
    return finish_items(path, frame, lines, "item_id", bad)


def _looks_typed(header: str) -> bool:
    return all(f.partition(":")[2] in RECBOLE_TYPES for f in header.split("\t"))


# ---------------------------------------------------------------------------------------------
# Pre-split RecBole benchmarks (UniSRec layout)


def _read_recbole_split(name: str, domain: DomainConfig, root: Path, bad: BadRows) -> RawDomain:
    """`<prefix>.{train,valid,test}.inter` rows of (user, history, next item) → per-user sequences.

    Train rows are the prefixes of each user's train sequence (histories may be cut to their last
    50 items, and rows may come longest first), so the sequence is rebuilt as the shortest row's
    history followed by every row's target, checking that each history continues it. The valid
    and test targets follow. Positions become `timestamp` (an order: `order_only`). When
    `<prefix>.item2index` / `<prefix>.user2index` (`raw_id<TAB>index`) sit beside the files, the
    indices are mapped back to the raw ids, which is what the `.text` item file and other domains use.
    """
    if not domain.interactions:
        raise ConfigError(
            f"data.domains.{name}.interactions is required for format 'recbole_split': "
            "set it to the prefix of <prefix>.train.inter, e.g. Scientific/Scientific"
        )
    prefix = str(Path(domain.interactions).expanduser())
    paths = {split: _split_file(root, prefix, f".{split}.inter", name) for split in SPLIT_FILES}
    rows = {}
    for split, path in paths.items():
        frame, lines, _ = _read_atomic(path, bad, ("user_id", "item_id_list", "item_id"))
        keep = _drop_missing(path, frame, lines, ("user_id", "item_id"), bad)
        rows[split] = (path, frame.loc[keep], lines[keep])
    users, items, positions, splits = _rebuild_sequences(rows)
    files = [str(p) for p in paths.values()]
    users = _map_back(root, prefix, "user2index", users, name, files)
    items = _map_back(root, prefix, "item2index", items, name, files)
    interactions = pd.DataFrame({
        "user_id": pd.Series(users, dtype=str), "item_id": pd.Series(items, dtype=str),
        "timestamp": np.asarray(positions, dtype=np.int64), "rating": np.full(len(users), np.nan),
        "split": pd.Series(splits, dtype=str),
    })
    item_table = _read_item_file(name, domain, root, bad, files, interactions, headerless_ok=True)
    return RawDomain(name=name, interactions=interactions, items=item_table, files=files, order_only=True)


def _split_file(root: Path, prefix: str, suffix: str, name: str, required: bool = True) -> Path | None:
    for candidate in (prefix + suffix, prefix + suffix + ".gz"):
        path = Path(candidate) if Path(candidate).is_absolute() else Path(root).expanduser() / candidate
        if path.is_file():
            return input_path(root, candidate, name, "interactions", "recbole_split")
    if not required:
        return None
    shown = Path(prefix + suffix)
    shown = shown if shown.is_absolute() else (Path(root).expanduser() / shown).absolute()
    raise DataError(
        f"{shown}: file not found (data.domains.{name}.interactions is the prefix of "
        "<prefix>.train.inter, <prefix>.valid.inter and <prefix>.test.inter)"
    )


def _drop_missing(path: Path, frame: pd.DataFrame, lines: np.ndarray, columns: tuple[str, ...],
                  bad: BadRows) -> np.ndarray:
    keep = np.ones(len(frame), dtype=bool)
    problems = []
    for column in columns:
        missing = frame[column].isna().to_numpy() & keep
        problems += [(int(lines[i]), f"missing value in column {column!r}") for i in np.flatnonzero(missing)]
        keep &= ~missing
    bad.report_many(path, problems)
    return keep


def _rebuild_sequences(rows: dict) -> tuple[list[str], list[str], list[int], list[str]]:
    train_path, train, train_lines = rows["train"]
    by_user: dict[str, list[tuple[list[str], str, int]]] = {}
    for user, history, target, line in zip(train["user_id"], train["item_id_list"], train["item_id"],
                                           train_lines.tolist(), strict=True):
        by_user.setdefault(user, []).append((_tokens(history), target, line))
    sequences: dict[str, list[str]] = {}
    for user, user_rows in by_user.items():
        if len(user_rows[0][0]) > len(user_rows[-1][0]):
            user_rows.reverse()  # written longest history first
        sequence = user_rows[0][0] + [target for _, target, _ in user_rows]
        start = len(user_rows[0][0])
        for offset, (history, _, line) in enumerate(user_rows):
            end = start + offset
            if history != sequence[max(0, end - len(history)):end]:
                raise DataError(
                    f"{train_path}:{line}: the history of user {user!r} does not continue the user's other "
                    "train rows; each train row must be a prefix of one sequence"
                )
        sequences[user] = sequence
    labels = {user: ["train"] * len(seq) for user, seq in sequences.items()}
    for split in ("valid", "test"):
        path, frame, lines = rows[split]
        seen: set[str] = set()
        for user, history, target, line in zip(frame["user_id"], frame["item_id_list"], frame["item_id"],
                                               lines.tolist(), strict=True):
            if user in seen:
                raise DataError(f"{path}:{line}: a second {split} row for user {user!r}; expected one per user")
            seen.add(user)
            history = _tokens(history)
            sequence = sequences.get(user)
            if sequence is None:  # no earlier rows: the history is all the user's train items
                sequence = sequences[user] = list(history)
                labels[user] = ["train"] * len(history)
            elif history != sequence[len(sequence) - len(history):]:
                raise DataError(
                    f"{path}:{line}: the history of user {user!r} is not the end of the user's earlier "
                    f"sequence (from the {'train' if split == 'valid' else 'train and valid'} rows)"
                )
            sequence.append(target)
            labels[user].append(split)
    users, items, positions, splits = [], [], [], []
    for user, sequence in sequences.items():
        users += [user] * len(sequence)
        items += sequence
        positions += range(len(sequence))
        splits += labels[user]
    return users, items, positions, splits


def _tokens(value) -> list[str]:
    return value.split() if isinstance(value, str) else []


def _map_back(root: Path, prefix: str, kind: str, ids: list[str], name: str, files: list[str]) -> list[str]:
    """Replace benchmark indices by raw ids through `<prefix>.<kind>` when that file exists."""
    path = _split_file(root, prefix, f".{kind}", name, required=False)
    if path is None:
        return ids
    files.append(str(path))
    index_to_raw: dict[str, str] = {}
    try:
        with open_text(path) as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                raw_id, sep, index = line.rstrip("\r\n").rpartition("\t")
                if not sep or not raw_id or not index.strip():
                    raise DataError(f"{path}:{number}: expected raw_id<TAB>index, got {line.strip()!r}")
                index_to_raw[index.strip()] = raw_id
    except READ_ERRORS as exc:
        raise read_error(path, exc) from None
    unknown = next((i for i in ids if i not in index_to_raw), None)
    if unknown is not None:
        raise DataError(f"{path}: has no entry for index {unknown!r} used in the .inter files")
    return [index_to_raw[i] for i in ids]


# ---------------------------------------------------------------------------------------------
# Generic CSV / TSV / Parquet with a column mapping


def _read_table(name: str, domain: DomainConfig, root: Path, bad: BadRows) -> RawDomain:
    path = (parquet_input(root, domain.interactions, name) if domain.format == "parquet"
            else input_path(root, domain.interactions, name, "interactions", domain.format))
    cols = domain.columns
    wanted = {"user_id": cols.user, "item_id": cols.item, "timestamp": cols.time}
    if cols.rating:
        wanted["rating"] = cols.rating
    if cols.split:
        wanted["split"] = cols.split
    reverse = {"user_id": "user", "item_id": "item", "timestamp": "time", "rating": "rating", "split": "split"}
    frame, lines, unit, found = _read_tabular(path, domain.format, bad, list(wanted.values()))
    files = parquet_parts(path) if domain.format == "parquet" else [str(path)]
    for key, column in wanted.items():
        if column not in found:
            raise DataError(
                f"{path}: has no column {column!r} (data.domains.{name}.columns.{reverse[key]}); "
                f"columns found: {', '.join(found)}"
            )
    raw = pd.DataFrame({key: frame[column] for key, column in wanted.items()})
    interactions = finish_interactions(path, raw, lines, wanted, bad, unit)
    if domain.items:
        item_path = (parquet_input(root, domain.items, name, "items") if domain.format == "parquet"
                     else input_path(root, domain.items, name, "items", domain.format))
        files += parquet_parts(item_path) if domain.format == "parquet" else [str(item_path)]
        frame, lines, unit, found = _read_tabular(item_path, domain.format, bad, None)
        if cols.item not in found:
            raise DataError(
                f"{item_path}: has no column {cols.item!r} (data.domains.{name}.columns.item names the item id "
                f"in both files); columns found: {', '.join(found)}"
            )
        items = finish_items(item_path, frame, lines, cols.item, bad, unit)
    else:
        items = items_from_interactions(interactions)
    return RawDomain(name=name, interactions=interactions, items=items, files=files,
                     order_only=cols.time == "position")


def _read_tabular(path: Path, fmt: str, bad: BadRows,
                  columns: list[str] | None) -> tuple[pd.DataFrame, np.ndarray, str, list[str]]:
    """(frame, line or row numbers, 'line' | 'row', header names); `columns` limits Parquet reads."""
    if fmt == "parquet":
        return read_parquet_table(path, columns)
    sep = "," if fmt == "csv" else "\t"
    try:
        with open_text(path) as handle:
            header = next(csv.reader(handle, delimiter=sep), None)
    except READ_ERRORS as exc:
        raise read_error(path, exc) from None
    except csv.Error as exc:
        raise DataError(f"{path}:1: unreadable header ({exc})") from None
    if not header or not any(h.strip() for h in header):
        raise DataError(f"{path}: file is empty (no header line)")
    check_unique_header(path, header)
    frame, lines = read_delimited(path, sep, csv.QUOTE_MINIMAL, bad)
    return frame, lines, "line", header


def read_parquet_table(path: Path, columns: list[str] | None) -> tuple[pd.DataFrame, np.ndarray, str, list[str]]:
    """A Parquet file or folder of part files (rows numbered across the parts, in path order)."""
    try:
        parts = parquet_parts(path)
        schema = pq.read_schema(parts[0])
        names = list(schema.names)
        check_unique_header(path, names)
        present = names if columns is None else [c for c in columns if c in names]
        table = pa.concat_tables([pq.read_table(p, columns=present) for p in parts])
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: unreadable Parquet ({str(exc).splitlines()[0]})") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: has no rows")
    frame = pd.DataFrame({c: _arrow_column(table.column(c)) for c in present})
    return frame, np.arange(1, len(frame) + 1, dtype=np.int64), "row", names


def _arrow_column(column: pa.ChunkedArray) -> pd.Series:
    """Numbers and datetimes stay typed (times); lists become Python lists, joined later as text."""
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    return column.to_pandas()


_READERS: dict[str, Callable[[str, DomainConfig, Path, BadRows], RawDomain]] = {
    "amazon2014": _read_amazon,
    "amazon2018": _read_amazon,
    "amazon2023": _read_amazon,
    "recbole": _read_recbole,
    "recbole_split": _read_recbole_split,
    "csv": _read_table,
    "tsv": _read_table,
    "parquet": _read_table,
}
