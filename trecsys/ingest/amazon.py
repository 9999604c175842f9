"""Readers for the Amazon Reviews dumps (2014, 2018, 2023): reviews and metadata as JSON lines.

Reviews are read with Arrow's JSON reader when the whole file is clean, else line by line so
that a bad row is named by its line. The 2014 metadata lines are Python literals (single quotes),
parsed with `ast.literal_eval` when `json` refuses them. Metadata is kept only for reviewed items:
the dumps describe every product of a category, most of which never appear in the reviews.
"""

from __future__ import annotations

import ast
import html
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

from trecsys.errors import DataError
from trecsys.ingest.inputs import (
    READ_ERRORS,
    BadRows,
    finish_interactions,
    is_gzip,
    line_blocks,
    open_text,
    read_error,
    shown,
)


@dataclass(frozen=True)
class AmazonLayout:
    """Field names of one dump; its timestamps divided by `time_divisor` are unix seconds."""

    user: str
    item: str
    rating: str
    time: str
    time_divisor: int
    meta_item: str


LAYOUTS = {
    "amazon2014": AmazonLayout("reviewerID", "asin", "overall", "unixReviewTime", 1, "asin"),
    "amazon2018": AmazonLayout("reviewerID", "asin", "overall", "unixReviewTime", 1, "asin"),
    # 2023 reviews point at the product family (`parent_asin`), which is what the metadata describes.
    "amazon2023": AmazonLayout("user_id", "parent_asin", "rating", "timestamp", 1000, "parent_asin"),
}

_TAG = re.compile(r"<[A-Za-z/][^<>]*>")
# The characters Python's str.split() splits on (str.isspace), as one RE2 class: the vectorised
# _clean of _meta_with_arrow collapses exactly the runs the Python one does.
_SPACES = [c for c in range(0x110000) if chr(c).isspace()]
_SPACE_RUN = "[" + "".join(f"\\x{{{c:x}}}" for c in _SPACES) + "]+"
# A text that _clean's whitespace rule changes: another space character, two spaces, or one at an end.
_UNTIDY = "[" + "".join(f"\\x{{{c:x}}}" for c in _SPACES if c != 32) + "]|  |^ | $"
# Metadata fields a 2023 item text is made of (_item_text), typed as the dump documents them.
_META_2023 = pa.schema([("parent_asin", pa.string()), ("title", pa.string()), ("store", pa.string()),
                        ("categories", pa.list_(pa.string())), ("description", pa.list_(pa.string())),
                        ("features", pa.list_(pa.string())), ("price", pa.float64())])
META_BLOCK_BYTES = 32 << 20
# Where html.unescape may change a text ('&' then what can start an entity; its own pattern is
# &(#...|[^\t\n\f <&#;]{1,32};?)) or a tag may start: such texts are cleaned by _clean itself.
_MARKUP = r"&[^\t\n\f <&;]|<"
# 2018 metadata puts page CSS/JS into `price` for some items; only price-looking values are kept.
_PRICE = re.compile(r"^\$?\s?\d[\d,]*(\.\d+)?(\s*-\s*\$?\s?\d[\d,]*(\.\d+)?)?$")


def read_reviews(path: Path, fmt: str, bad: BadRows) -> pd.DataFrame:
    layout = LAYOUTS[fmt]
    source = {"user_id": layout.user, "item_id": layout.item, "timestamp": layout.time, "rating": layout.rating}
    clean = _reviews_with_arrow(path, layout, source)
    if clean is not None:
        return clean
    raw, lines = _reviews_line_by_line(path, fmt, layout, bad)
    return finish_interactions(path, raw, lines, source, bad)


def _reviews_with_arrow(path: Path, layout: AmazonLayout, source: dict[str, str]) -> pd.DataFrame | None:
    """Arrow's multithreaded JSON reader, ~3x faster than the line loop, for files without a bad row.

    Anything it cannot take (a malformed or Python-literal line, a value of the wrong type, a
    damaged gzip, a row the checks refuse) returns None, and the line loop reads the file again to
    name the exact line (Arrow's row numbers skip blank lines, so they are not file lines).
    """
    schema = pa.schema([(layout.user, pa.string()), (layout.item, pa.string()),
                        (layout.time, pa.float64()), (layout.rating, pa.float64())])
    options = pa_json.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    try:
        with pa.input_stream(path, compression="gzip" if is_gzip(path) else None) as stream:
            table = pa_json.read_json(stream, read_options=pa_json.ReadOptions(block_size=1 << 24),
                                      parse_options=options)
    except (pa.ArrowException, OSError, ValueError):
        return None
    raw = pd.DataFrame({
        "user_id": table.column(layout.user).to_pandas(), "item_id": table.column(layout.item).to_pandas(),
        "timestamp": table.column(layout.time).to_numpy() / layout.time_divisor,
        "rating": table.column(layout.rating).to_numpy(),
    })
    try:
        return finish_interactions(path, raw, np.arange(1, len(raw) + 1), source, BadRows("error"))
    except DataError:
        return None


def _reviews_line_by_line(path: Path, fmt: str, layout: AmazonLayout,
                          bad: BadRows) -> tuple[pd.DataFrame, np.ndarray]:
    parse = _parse_json_or_literal if fmt == "amazon2014" else _parse_json
    users, items, times, ratings, lines = [], [], [], [], []
    for number, record in _records(path, parse, bad):
        user, item = record.get(layout.user), record.get(layout.item)
        time, rating = record.get(layout.time), record.get(layout.rating)
        problem = (
            _id_problem(layout.user, user) or _id_problem(layout.item, item)
            or _number_problem(layout.time, time, required=True)
            or _number_problem(layout.rating, rating, required=False)
        )
        if problem:
            bad.report(f"{path}:{number}", problem)
            continue
        users.append(str(user))
        items.append(str(item))
        # Division, not multiplication by 0.001: exact for whole seconds, so floor() keeps them.
        times.append(float(time) / layout.time_divisor)
        ratings.append(math.nan if rating is None else float(rating))
        lines.append(number)
    raw = pd.DataFrame({
        "user_id": pd.Series(users, dtype=str), "item_id": pd.Series(items, dtype=str),
        "timestamp": np.asarray(times, dtype=np.float64), "rating": np.asarray(ratings, dtype=np.float64),
    })
    return raw, np.asarray(lines, dtype=np.int64)


def read_meta(path: Path, fmt: str, wanted: set[str], bad: BadRows) -> pd.DataFrame:
    """One row per wanted item (the first line for an id wins; the 2018 dump repeats some)."""
    if fmt == "amazon2023":
        fast = _meta_with_arrow(path, wanted)
        if fast is not None:
            return fast
    layout = LAYOUTS[fmt]
    parse = _parse_json_or_literal if fmt == "amazon2014" else _parse_json
    # Finding the id with a regex first skips parsing the lines of items without reviews.
    key = re.escape(layout.meta_item)
    id_pattern = re.compile(rf"""['"]{key}['"]\s*:\s*['"]([^'"\\]*)['"]""")
    rows: dict[str, dict[str, str]] = {}

    def wanted_line(line: str) -> bool:
        match = id_pattern.search(line)
        return match is None or (match.group(1) in wanted and match.group(1) not in rows)

    for number, record in _records(path, parse, bad, keep_line=wanted_line):
        item = record.get(layout.meta_item)
        problem = _id_problem(layout.meta_item, item)
        if problem:
            bad.report(f"{path}:{number}", problem)
            continue
        item = str(item)
        if item in wanted and item not in rows:
            rows[item] = _item_text(record, fmt)
    columns = ["title", "brand", "category", "description", "price"]
    if fmt == "amazon2023":
        columns.insert(3, "features")
    items = pd.DataFrame.from_records(
        [{"item_id": item, **text} for item, text in rows.items()], columns=["item_id", *columns]
    )
    return items.astype(str)


def _meta_with_arrow(path: Path, wanted: set[str]) -> pd.DataFrame | None:
    """read_meta for the 2023 dump, parsed by Arrow a block of lines at a time and cleaned as whole
    columns: the same table as the line loop at a third of its CPU (2.4 against 7.3 s on the 10M
    bench-scale Home_and_Kitchen metadata), or None, and the loop reads the file.

    Arrow's parser is strict where it matters for sameness: a field of another type than
    _META_2023's (a number for a title, a nested list), a key given twice, a malformed line or a
    number out of range fails the read, and so does a missing or empty id; the line loop then
    decides (it names the line or skips it). A row with a text that may hold an HTML entity or tag
    (_MARKUP) is cleaned by the Python _item_text.
    """
    options = pa_json.ParseOptions(explicit_schema=_META_2023, unexpected_field_behavior="ignore")
    kept = []
    try:
        for block in line_blocks(path, META_BLOCK_BYTES):
            batch = pa_json.read_json(pa.py_buffer(block), parse_options=options)
            ids = batch.column("parent_asin")
            if ids.null_count or pc.any(pc.equal(ids, "")).as_py():
                return None
            # A Python set lookup per id: pc.is_in would hash the whole wanted set for every block.
            kept.append(batch.filter(pa.array([i in wanted for i in ids.to_pylist()], pa.bool_())))
    except (pa.ArrowException, *READ_ERRORS, ValueError):
        return None
    columns = ["item_id", "title", "brand", "category", "features", "description", "price"]
    if not kept:
        return pd.DataFrame(columns=columns).astype(str)
    # Memory: the kept blocks stay chunks (no combined copy), the first line of each id is taken
    # by one filter, and each column is cleaned and turned into Python strings on its own.
    table = pa.concat_tables(kept)
    del kept
    ids = table.column("parent_asin").to_numpy(zero_copy_only=False)
    first = ~pd.Index(ids).duplicated()
    if not first.all():
        table, ids = table.filter(pa.array(first)), ids[first]
    text, special = {"item_id": ids}, np.zeros(table.num_rows, dtype=bool)
    for name, source, joiner in (("title", "title", None), ("brand", "store", None), ("category", "categories", ", "),
                                 ("features", "features", " "), ("description", "description", " ")):
        text[name], markup = _text_column(table.column(source), joiner)
        special |= markup
    # Rows that may hold an HTML entity or tag go through the Python cleaner, as in the loop.
    rows = np.flatnonzero(special)
    by_python = [_item_text(record, "amazon2023") for record in table.take(pa.array(rows, pa.int64())).to_pylist()]
    text["price"] = _price_column(table.column("price"))
    del table
    for row, values in zip(rows, by_python, strict=True):
        for name, value in values.items():
            text[name][row] = value
    items = pd.DataFrame(text, columns=columns).astype(str)
    del text
    pa.default_memory_pool().release_unused()  # the parse's blocks, back to the system
    return items


def _clean_strings(values: pa.Array) -> pa.Array:
    """_clean of each string without markup (null -> ''): whitespace runs to one space, trimmed.
    Only the texts that need it are rewritten (most titles are tidy already)."""
    values = values.fill_null("")
    untidy = pc.match_substring_regex(values, _UNTIDY)
    if not pc.any(untidy).as_py():
        return values
    fixed = pc.utf8_trim(pc.replace_substring_regex(values.filter(untidy), _SPACE_RUN, " "), " ")
    return pc.replace_with_mask(values, untidy, fixed)


def _text_column(column: pa.ChunkedArray, joiner: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(_clean of each row, whether the row may hold markup: _MARKUP) for a string column, or for a
    list column (parts cleaned, empty ones dropped, joined; markup in any part)."""
    column = column.combine_chunks()
    if joiner is None:
        return _clean_strings(column).to_numpy(zero_copy_only=False), _matches(column, _MARKUP)
    flat, rows = pc.list_flatten(column), pc.list_parent_indices(column).to_numpy()
    markup = np.zeros(len(column), dtype=bool)
    markup[rows[_matches(flat, _MARKUP)]] = True
    parts = _clean_strings(flat)
    keep = pc.not_equal(parts, "")
    parts, rows = parts.filter(keep), rows[keep.to_numpy(zero_copy_only=False)]
    offsets = np.searchsorted(rows, np.arange(len(column) + 1)).astype(np.int32)  # rows ascend: parts stay in order
    joined = pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), parts), joiner)
    return joined.to_numpy(zero_copy_only=False), markup


def _matches(values: pa.Array, pattern: str) -> np.ndarray:
    return pc.fill_null(pc.match_substring_regex(values, pattern), False).to_numpy(zero_copy_only=False)


def _price_column(column: pa.ChunkedArray) -> np.ndarray:
    """_price of numbers: two decimals, '' for null (Arrow refuses the non-finite ones)."""
    return np.array(["" if v is None else f"{v:.2f}" for v in column.to_pylist()], dtype=object)


def _item_text(record: dict, fmt: str) -> dict[str, str]:
    if fmt == "amazon2014":
        paths = [p for p in record.get("categories") or [] if isinstance(p, list)]
        # The deepest category path is the most specific; the first of equal depth wins.
        deepest = max(paths, key=len, default=[])
        category = " > ".join(_clean(c) for c in deepest if _clean(c))
        brand = record.get("brand")
    elif fmt == "amazon2018":
        category = _clean(record.get("category"))
        brand = record.get("brand")
    else:
        category = _clean(record.get("categories"))
        brand = record.get("store")
    text = {
        "title": _clean(record.get("title")),
        "brand": _clean(brand),
        "category": category,
        "description": _clean(record.get("description"), joiner=" "),
        "price": _price(record.get("price")),
    }
    if fmt == "amazon2023":
        text["features"] = _clean(record.get("features"), joiner=" ")
    return text


def _clean(value, joiner: str = ", ") -> str:
    """Text of a metadata field: lists joined, HTML entities and tags removed, whitespace collapsed."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        parts = (_clean(v, joiner) for v in value)
        return joiner.join(p for p in parts if p)
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    text = html.unescape(str(value))
    if "<" in text:
        text = _TAG.sub(" ", text)
    return " ".join(text.split())


def _price(value) -> str:
    if isinstance(value, bool) or value is None:
        return ""
    if isinstance(value, (int, float)):
        return f"{value:.2f}" if math.isfinite(value) else ""
    text = _clean(value)
    return text if _PRICE.match(text) else ""


def _id_problem(name: str, value) -> str | None:
    if value is None:
        return f"missing field {name!r}"
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        return f"field {name!r}: {shown(value)} is not an id"
    return None


def _number_problem(name: str, value, required: bool) -> str | None:
    if value is None:
        return f"missing field {name!r}" if required else None
    if isinstance(value, bool):
        return f"field {name!r}: {shown(value)} is not a number"
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return f"field {name!r}: {shown(value)} is not a number"
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"field {name!r}: {shown(value)} is not a number"
    if required and value < 0:
        return f"field {name!r}: {shown(value)} is negative"
    return None


def _records(path: Path, parse: Callable[[str], object], bad: BadRows,
             keep_line: Callable[[str], bool] | None = None):
    """(line number, dict) for every non-blank line; malformed lines go to `bad`."""
    number = 0
    try:
        with open_text(path) as handle:
            for number, line in enumerate(handle, 1):  # noqa: B007 (number is read after the loop)
                if not line.strip() or (keep_line is not None and not keep_line(line)):
                    continue
                try:
                    record = parse(line)
                except ValueError as exc:
                    bad.report(f"{path}:{number}", f"malformed JSON: {exc}")
                    continue
                if not isinstance(record, dict):
                    bad.report(f"{path}:{number}", f"expected a JSON object, got {type(record).__name__}")
                    continue
                yield number, record
    except READ_ERRORS as exc:
        raise read_error(path, exc, number or None) from None


def _parse_json(line: str) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{exc.msg} (column {exc.colno})") from None


def _parse_json_or_literal(line: str) -> object:
    """JSON, else a Python literal (the 2014 metadata); never `eval`."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        message = f"{exc.msg} (column {exc.colno}), and not a Python literal either"
    try:
        return ast.literal_eval(line.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise ValueError(message) from None
