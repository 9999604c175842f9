"""Item text: fill a text template (`data.domains.<name>.text_template`, else `data.text_template`) from the item table's columns, one string per item.

This string is what the text encoder sees, so it is saved beside the items as their `text` column.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np
import pandas as pd

from trecsys.errors import ConfigError

TEMPLATE_KEY = "data.text_template"
# Punctuation a separator may start with; a field value already ending in it is not doubled ("Inc.. ").
_SEPARATOR_PUNCTUATION = ".,;:!?-–—|/"
# What a cut at a word boundary must not leave at the end of the text.
_DANGLING = " \t" + _SEPARATOR_PUNCTUATION + "([{\"'"


@dataclass(frozen=True)
class TemplatePart:
    field: str
    # The literal text after this field, up to the next field (or the end of the template).
    separator: str


@dataclass(frozen=True)
class Template:
    prefix: str
    parts: tuple[TemplatePart, ...]


def parse_template(template: str, key: str = TEMPLATE_KEY) -> Template:
    """`key` is the config key errors name (a domain's own template has its own key)."""
    try:
        pieces = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(
            f"{key}: cannot read {template!r} ({exc}); write fields as {{title}}"
        ) from None
    prefix = ""
    fields: list[str] = []
    separators: list[str] = []
    for literal, name, spec, conversion in pieces:
        if fields:
            separators[-1] += literal
        else:
            prefix += literal
        if name is None:
            continue
        if not name.strip():
            raise ConfigError(
                f"{key}: empty field '{{}}' in {template!r}; name a column, e.g. {{title}}"
            )
        if spec or conversion:
            raise ConfigError(
                f"{key}: field {{{name}}} has a format spec or conversion, which templates do not "
                "support; write plain {column} fields"
            )
        fields.append(name)
        separators.append("")
    if not fields:
        raise ConfigError(f"{key}: {template!r} names no field; write e.g. '{{title}}. {{brand}}'")
    return Template(prefix, tuple(TemplatePart(f, s) for f, s in zip(fields, separators, strict=True)))


def compose_text(items: pd.DataFrame, template: str, max_chars: int, key: str = TEMPLATE_KEY) -> pd.Series:
    """One text per row of `items`, in its index order.

    A missing, NaN or blank field is dropped together with the separator that follows it; after the
    last present field the template's own ending is used instead, so no dangling ". " is left. A row
    with no present field gives "". Whitespace is collapsed; texts longer than `max_chars` are cut at
    a word boundary.
    """
    if max_chars < 1:
        raise ConfigError(f"data.max_text_chars must be at least 1, got {max_chars}")
    parsed = parse_template(template, key)
    missing = [part.field for part in parsed.parts if part.field not in items.columns]
    if missing:
        available = ", ".join(str(c) for c in items.columns)
        raise ConfigError(
            f"{key}: field {{{missing[0]}}} is not a column of the item table; "
            f"available columns: {available}"
        )
    ending = parsed.parts[-1].separator
    # Built from the right: `tail` is the text from the current field on, `has_tail` whether any
    # later field was present, which decides between the field's own separator and the ending.
    tail = pd.Series("", index=items.index, dtype=object)
    has_tail = np.zeros(len(items), dtype=bool)
    for part in reversed(parsed.parts):
        value = _clean(items[part.field])
        present = (value != "").to_numpy()
        joined = _strip_doubled(value, part.separator) + part.separator + tail
        last = _strip_doubled(value, ending) + ending
        tail = tail.where(~present, joined.where(has_tail, last))
        has_tail |= present
    text = (parsed.prefix + tail).where(has_tail, "")
    text = text.str.replace(r"\s+", " ", regex=True).str.strip()
    return _cap(text, max_chars).rename("text")


def _clean(column: pd.Series) -> pd.Series:
    """Field values as whitespace-collapsed strings, "" where missing."""
    text = column.astype(object).where(column.notna(), "").astype(str)
    return text.str.replace(r"\s+", " ", regex=True).str.strip()


def _strip_doubled(value: pd.Series, separator: str) -> pd.Series:
    lead = separator.lstrip()[:1]
    if not lead or lead not in _SEPARATOR_PUNCTUATION:
        return value
    stripped = value.str.rstrip(lead).str.rstrip()
    # A value that is nothing but that punctuation stays as it is rather than vanish.
    return stripped.where(stripped != "", value)


def _cap(text: pd.Series, max_chars: int) -> pd.Series:
    long = text.str.len() > max_chars
    if not long.any():
        return text
    cut = text[long].str.slice(0, max_chars + 1)
    # Keep whole words: drop the partial last word, unless the first word alone is longer than the cap.
    at_word = cut.str.replace(r"\s+\S*$", "", regex=True)
    one_word = ~cut.str.slice(0, max_chars).str.contains(r"\s", regex=True)
    capped = at_word.where(~one_word, cut.str.slice(0, max_chars)).str.slice(0, max_chars)
    text = text.copy()
    text[long] = capped.str.rstrip(_DANGLING)
    return text
