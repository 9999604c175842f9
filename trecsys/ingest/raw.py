"""What every reader returns: one domain's interactions and item table with uniform column names.

Readers (trecsys/ingest/readers.py) turn a format into a RawDomain; cleaning, splitting and id
mapping (trecsys/stages/prepare.py) work on RawDomain only, so they never see a format's quirks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

# interactions columns:
#   user_id   str     original user id (users are matched across domains by this)
#   item_id   str     original item id
#   timestamp float64 unix seconds at full precision (fractions order events), or int64 for whole
#                     numbers such as a 0-based `position`
#   rating    float64 optional (NaN when the format has none)
#   split     str     optional: 'train' | 'valid' | 'test' when the input is pre-split (split: given)
# Row order is the input order; sorting by (user_id, timestamp) must be stable on it.
#
# items columns:
#   item_id   str     unique
#   any text fields the format has: title, brand, category, description, price, text, ...
#   (strings; lists such as Amazon categories are joined with ", " by the reader)
INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp", "rating", "split")


@dataclass
class RawDomain:
    name: str
    interactions: pd.DataFrame
    items: pd.DataFrame
    # Files read, for the manifest (absolute paths).
    files: list[str] = field(default_factory=list)
    # Rows skipped under on_bad_rows: skip, with the first few reasons for the summary.
    skipped_rows: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    # True when `timestamp` is an order (position), not a time: temporal splits are then refused.
    order_only: bool = False
