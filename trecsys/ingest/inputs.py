"""Plumbing shared by the readers: locating and opening input files (plain or gzip), bad-row
bookkeeping under `on_bad_rows`, and turning raw columns into the RawDomain column contract.
"""

from __future__ import annotations

import csv
import gzip
import math
import re
import warnings
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import pandas as pd
import pyarrow as pa

from trecsys.errors import ConfigError, DataError, TrecError, environment_error

GZIP_MAGIC = b"\x1f\x8b"
MAX_SKIPPED_EXAMPLES = 5
# Errors a damaged or mis-encoded input raises while being read; each becomes a one-line DataError.
READ_ERRORS = (EOFError, OSError, zlib.error, UnicodeDecodeError)
# The largest timestamp accepted: far beyond any unix time in ms, and safely inside int64.
MAX_TIMESTAMP = 2.0**62
ENCODING = "utf-8-sig"
# Ids never hold control characters (NUL, tab, line breaks, ...): such an id is a damaged row, and
# would print as something else than it is.
CONTROL_CHARACTERS = r"[\x00-\x1f\x7f]"
SPLIT_NAMES = {"train": "train", "valid": "valid", "validation": "valid", "dev": "valid", "test": "test",
               "input": "input"}


# ---------------------------------------------------------------------------------------------
# Files


def input_path(root: Path, relative: str, domain: str, key: str, fmt: str) -> Path:
    """The file named by `data.domains.<domain>.<key>`: absolute as given, else under `root`."""
    if not relative:
        raise ConfigError(f"data.domains.{domain}.{key} is required for format {fmt!r}: set it to a file path")
    path = Path(relative).expanduser()
    if not path.is_absolute():
        path = Path(root).expanduser() / path
    path = path.absolute()
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a file (data.domains.{domain}.{key})")
    if not path.is_file():
        raise DataError(f"{path}: file not found (data.domains.{domain}.{key})")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (data.domains.{domain}.{key})")
    return path


def parquet_input(root: Path, relative: str, domain: str, key: str = "interactions") -> Path:
    """A Parquet file, or a folder of `*.parquet` part files (what Spark, Hive or BigQuery exports
    write; read in sorted path order, as one table)."""
    path = Path(relative).expanduser()
    path = (path if path.is_absolute() else Path(root).expanduser() / path).absolute()
    if relative and path.is_dir():
        if not any(path.rglob("*.parquet")):
            raise DataError(f"{path}: folder holds no *.parquet part files (data.domains.{domain}.{key})")
        return path
    return input_path(root, relative, domain, key, "parquet")


def parquet_parts(path: Path) -> list[str]:
    """The files of a Parquet input in sorted order (one file for a file)."""
    return sorted(str(p) for p in path.rglob("*.parquet")) if path.is_dir() else [str(path)]


def is_gzip(path: Path) -> bool:
    """By content, not name: a `.gz` that is plain text, or gzip under another name, both read."""
    with open(path, "rb") as handle:
        return handle.read(2) == GZIP_MAGIC


def line_blocks(path: Path, size: int):
    """Whole lines of a text file (plain or gzip) as bytes, about `size` at a time: for readers that
    parse many lines at once, with memory bounded by the block and not by the file.

    One buffer is read into again and again (fresh 64 MiB allocations cost more in page faults
    than the copy); a line longer than the buffer grows it."""
    buffer = bytearray(size)
    view, carry = memoryview(buffer), 0
    with (gzip.open(path, "rb") if is_gzip(path) else open(path, "rb", buffering=0)) as handle:
        while True:
            if carry == len(buffer):
                view.release()
                buffer.extend(bytes(len(buffer)))
                view = memoryview(buffer)
            read = handle.readinto(view[carry:])
            end = carry + read
            if not read:
                if bytes(view[:carry]).strip():
                    yield bytes(view[:carry])
                return
            cut = buffer.rfind(b"\n", 0, end) + 1
            if cut == 0:
                carry = end
                continue
            yield bytes(view[:cut])
            view[:end - cut] = view[cut:end]
            carry = end - cut


def open_text(path: Path) -> TextIO:
    # utf-8-sig: files saved by spreadsheet programs start with a byte-order mark.
    if is_gzip(path):
        return gzip.open(path, "rt", encoding=ENCODING)
    return open(path, encoding=ENCODING)


def shown(value, limit: int = 60) -> str:
    """repr() of a value for a one-line message, cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_error(path: Path, exc: BaseException, line: int | None = None) -> TrecError:
    """A one-line DataError for a file that cannot be read to the end (or the environment's error:
    permission denied, I/O error)."""
    where = f"{path}:{line}" if line else str(path)
    environment = environment_error(exc, where)
    if environment is not None:
        return environment
    if isinstance(exc, UnicodeDecodeError):
        return DataError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start}): re-save the file as UTF-8")
    if isinstance(exc, (EOFError, zlib.error, gzip.BadGzipFile)):
        reached = f" after line {line}" if line else ""
        return DataError(f"{path}: truncated or corrupt gzip file{reached} ({exc}): download or compress it again")
    return DataError(f"{where}: cannot read the file ({exc})")


def first_line(path: Path) -> str:
    """The header line without its line ending; a file with no text is a DataError."""
    try:
        with open_text(path) as handle:
            line = handle.readline()
    except READ_ERRORS as exc:
        raise read_error(path, exc) from None
    if not line.strip():
        raise DataError(f"{path}: file is empty (no header line)")
    return line.rstrip("\r\n")


def check_unique_header(path: Path, names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DataError(f"{path}:1: header names column {name!r} twice: rename or remove one")
        seen.add(name)


def read_delimited(path: Path, sep: str, quoting: int, bad: BadRows, names: list[str] | None = None,
                   has_header: bool = True) -> tuple[pd.DataFrame, np.ndarray]:
    """All columns as strings (empty field → NaN), and the 1-based file line of every row.

    Rows with too many fields are bad rows; blank lines are dropped. Given `names`, a header line
    (already parsed by the caller) is skipped, or there is none when `has_header` is False.
    """
    first_row_line = 2 if has_header else 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            frame = pd.read_csv(
                path, sep=sep, header=None if names else 0, names=names,
                skiprows=1 if names and has_header else None,
                dtype=str, keep_default_na=False, na_values=[""], quoting=quoting,
                skip_blank_lines=False, on_bad_lines="warn", encoding=ENCODING,
                compression="gzip" if is_gzip(path) else None,
            )
        except READ_ERRORS as exc:
            raise read_error(path, exc) from None
        except (pd.errors.ParserError, ValueError) as exc:
            raise DataError(f"{path}: cannot parse ({str(exc).strip().splitlines()[0]})") from None
    skipped = []
    for warning in caught:
        for line, detail in re.findall(r"Skipping line (\d+): ([^\n]+)", str(warning.message)):
            skipped.append((int(line), detail))
    skipped.sort()
    # Record of each row (pandas counts records, the header being record 1): every record pandas
    # dropped shifts the rows after it.
    lines = np.arange(len(frame), dtype=np.int64) + first_row_line
    for line, _ in skipped:
        lines[lines >= line] += 1
    # A quoted field may hold line breaks, so that records and file lines part: map records to the
    # line each starts on (only then, as it takes another pass over the file).
    n_records = first_row_line - 1 + len(frame) + len(skipped)
    if quoting != csv.QUOTE_NONE and len(frame) and _count_lines(path) != n_records:
        starts = _record_starts(path, sep, quoting)
        if len(starts) >= max(int(lines.max()), max((line for line, _ in skipped), default=0)):
            lines = starts[lines - 1]
            skipped = [(int(starts[line - 1]), detail) for line, detail in skipped]
    # Reported with the caller's checks of the same file, so that `error` names the earliest line.
    bad.defer(path, [(line, f"{detail} (a field holds the separator?)") for line, detail in skipped])
    blank = frame.isna().all(axis=1).to_numpy()
    if blank.any():
        frame, lines = frame.loc[~blank].reset_index(drop=True), lines[~blank]
    return frame, lines


def _count_lines(path: Path) -> int:
    try:
        with open_text(path) as handle:
            return sum(1 for _ in handle)
    except READ_ERRORS as exc:
        raise read_error(path, exc) from None


def _record_starts(path: Path, sep: str, quoting: int) -> np.ndarray:
    """The file line on which each CSV record starts (record 1 is the first line)."""
    starts = []
    try:
        with open_text(path) as handle:
            reader = csv.reader(handle, delimiter=sep, quoting=quoting)
            while True:
                start = reader.line_num + 1
                if next(reader, None) is None:
                    break
                starts.append(start)
    except (*READ_ERRORS, csv.Error):
        return np.zeros(0, dtype=np.int64)  # pandas read it: keep its numbering
    return np.asarray(starts, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Bad rows


@dataclass
class BadRows:
    """Under `error` the first bad row raises; under `skip` bad rows are counted, a few kept as examples."""

    mode: str
    count: int = 0
    examples: list[str] = field(default_factory=list)
    pending: dict[Path, list[tuple[int, str]]] = field(default_factory=dict)

    def report(self, where: str, reason: str) -> None:
        message = f"{where}: {reason}"
        if self.mode == "error":
            raise DataError(f"{message} (set data.on_bad_rows: skip to drop such rows)")
        self.count += 1
        if len(self.examples) < MAX_SKIPPED_EXAMPLES:
            self.examples.append(message)

    def report_many(self, path: Path, problems: Iterable[tuple[int, str]], unit: str = "line") -> None:
        """(line, reason) pairs from one file, with those deferred for it, in file order."""
        merged = [*self.pending.pop(path, []), *problems]
        for line, reason in sorted(merged, key=lambda p: p[0]):
            self.report(location(path, line, unit), reason)

    def defer(self, path: Path, problems: list[tuple[int, str]]) -> None:
        """Hold problems found while parsing until the row checks of the same file report theirs."""
        if problems:
            self.pending.setdefault(path, []).extend(problems)

    def flush(self) -> None:
        for path in list(self.pending):
            self.report_many(path, [])


def location(path: Path, line: int, unit: str = "line") -> str:
    """`file:line` for text files, `file row N` for tables without lines (Parquet)."""
    return f"{path}:{line}" if unit == "line" else f"{path} row {line}"


# ---------------------------------------------------------------------------------------------
# Columns → contract


def finish_interactions(path: Path, raw: pd.DataFrame, lines: np.ndarray, source: dict[str, str],
                        bad: BadRows, unit: str = "line") -> pd.DataFrame:
    """Validate raw columns and return the contract frame, dropping bad rows (or raising on the first).

    `raw` has user_id, item_id, timestamp and optionally rating and split, in any dtype; `source`
    maps those names to the column names the file uses, for messages.
    """
    n = len(raw)
    reasons = np.full(n, None, dtype=object)

    def flag(mask: np.ndarray, make_reason) -> None:
        fresh = np.flatnonzero(mask & pd.isna(reasons))
        for i in fresh:
            reasons[i] = make_reason(i)

    users = _as_str(raw["user_id"])
    items = _as_str(raw["item_id"])
    for column, values in (("user_id", users), ("item_id", items)):
        flag(values.isna().to_numpy(), lambda i, c=column: f"missing value in column {source[c]!r}")
        flag(_has_control(values), lambda i, c=column, v=values: f"column {source[c]!r}: {shown(v.iat[i])} holds "
             "a control character (NUL, tab, line break...)")

    times, time_text = _as_time(raw["timestamp"])
    time_column = source["timestamp"]

    def time_value(i: int) -> str:
        return f"column {time_column!r}: {shown(time_text.iat[i])}"

    flag(time_text.isna().to_numpy(), lambda i: f"missing value in column {time_column!r}")
    flag(~np.isfinite(times), lambda i: f"{time_value(i)} is not a number")
    flag(times < 0, lambda i: f"{time_value(i)} is negative")
    flag(times >= MAX_TIMESTAMP, lambda i: f"{time_value(i)} is too large")

    if "rating" in raw:
        ratings = _parse_floats(raw["rating"])
        given = raw["rating"].notna().to_numpy()
        flag(given & ~np.isfinite(ratings),
             lambda i: f"column {source['rating']!r}: {shown(raw['rating'].iat[i])} is not a number")
    else:
        ratings = np.full(n, np.nan)

    splits = None
    if "split" in raw:
        text = _as_str(raw["split"]).str.strip().str.lower()
        splits = text.map(SPLIT_NAMES)
        flag(splits.isna().to_numpy(), lambda i: f"column {source['split']!r}: {shown(raw['split'].iat[i])} "
             "is not one of train, valid (dev), test, input")

    keep = pd.isna(reasons)
    bad.report_many(path, [(int(lines[i]), reasons[i]) for i in np.flatnonzero(~keep)], unit)

    def kept(values: pd.Series) -> pd.Series:
        values = values if keep.all() else values[keep]
        return values.reset_index(drop=True).astype(str)

    out = pd.DataFrame({
        "user_id": kept(users),
        "item_id": kept(items),
        # Full precision: fractions of a second order events (prepare stores whole seconds, in this order).
        "timestamp": times[keep],
        "rating": ratings[keep],
    })
    if splits is not None:
        out["split"] = kept(splits)
    return out


def finish_items(path: Path, raw: pd.DataFrame, lines: np.ndarray, id_column: str, bad: BadRows,
                 unit: str = "line") -> pd.DataFrame:
    """item_id first, every other column as a text field ('' when empty); the first row of an id wins."""
    ids = _as_str(raw[id_column])
    control = _has_control(ids)
    problems = [(int(lines[i]), f"missing value in column {id_column!r}") for i in np.flatnonzero(ids.isna())]
    problems += [(int(lines[i]), f"column {id_column!r}: {shown(ids.iat[i])} holds a control character (NUL, "
                  "tab, line break...)") for i in np.flatnonzero(control)]
    bad.report_many(path, problems, unit)
    missing = ids.isna().to_numpy() | control
    out = pd.DataFrame({"item_id": ids[~missing].astype(str).to_numpy()})
    for column in raw.columns:
        if column == id_column or column == "item_id":
            continue
        out[column] = _as_str(raw[column])[~missing].fillna("").astype(str).to_numpy()
    if out.empty:
        raise DataError(f"{path}: no item rows")
    return out.drop_duplicates("item_id", keep="first").reset_index(drop=True)


def items_from_interactions(interactions: pd.DataFrame) -> pd.DataFrame:
    """The item table when no item file is configured: ids only, in order of first interaction."""
    return pd.DataFrame({"item_id": pd.unique(interactions["item_id"])}).astype({"item_id": str})


def _has_control(ids: pd.Series) -> np.ndarray:
    return ids.str.contains(CONTROL_CHARACTERS, regex=True, na=False).to_numpy(dtype=bool)


def _as_str(series: pd.Series) -> pd.Series:
    """Strings with NaN for missing; numbers (ids stored as ints in Parquet) are written out."""
    if pd.api.types.is_string_dtype(series.dtype) and series.dtype != object:
        return series
    mask = series.isna()
    out = series.map(_format_value, na_action="ignore").astype(str)
    return out.mask(mask) if mask.any() else out


def _format_value(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, tuple, np.ndarray)):
        return ", ".join(_format_value(v) for v in value if v is not None)
    return str(value)


def _as_time(series: pd.Series) -> tuple[np.ndarray, pd.Series]:
    """Seconds as float64 (NaN where unparseable) and the values as given, NaN where missing.

    Numbers are taken as they are; datetimes (Parquet) and ISO 8601 strings, when no value of the
    column is a number, become unix seconds.
    """
    if pd.api.types.is_datetime64_any_dtype(series.dtype):
        return _datetime_seconds(series), series.astype(object)
    if pd.api.types.is_numeric_dtype(series.dtype):
        return _float_array(series), series.astype(object)
    text = _as_str(series)
    seconds = _parse_floats(text)
    present = text.notna().to_numpy()
    if present.any() and np.isnan(seconds[present]).all():
        parsed = pd.to_datetime(text, format="ISO8601", errors="coerce", utc=True)
        if parsed.notna().any():
            seconds = _datetime_seconds(parsed)
    return seconds, text


def _float_array(series: pd.Series) -> np.ndarray:
    return series.to_numpy(dtype=np.float64, na_value=math.nan)


def _parse_floats(series: pd.Series) -> np.ndarray:
    """Numbers from text, NaN where missing or unparseable.

    Arrow's cast is ~20x faster than pandas.to_numeric but all-or-nothing, so it is tried first
    and pandas (which marks each bad value) only runs when the column has a bad value.
    """
    if pd.api.types.is_numeric_dtype(series.dtype):
        return _float_array(series)
    try:
        return pa.array(series, from_pandas=True).cast(pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return _float_array(pd.to_numeric(series, errors="coerce"))


def _datetime_seconds(series: pd.Series) -> np.ndarray:
    values = pd.to_datetime(series, utc=True)
    seconds = (values - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
    return _float_array(seconds.astype("float64"))
