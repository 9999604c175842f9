"""Cleaning one domain's interactions: duplicates, rating threshold, iterative k-core, time order.

The result is sorted by (user_id, timestamp); the sort is stable, so interactions at the same time
keep their input order (the order a reader found them in, which is all the data says about them).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from trecsys.config import DataConfig
from trecsys.errors import ConfigError


def clean_interactions(frame: pd.DataFrame, data: DataConfig, domain: str) -> tuple[pd.DataFrame, dict]:
    """Return the cleaned interactions of `domain` and how many rows each step removed."""
    removed = {"duplicates": 0, "below_rating_threshold": 0, "k_core": 0}
    if data.dedupe:
        duplicated = frame.duplicated(subset=["user_id", "item_id", "timestamp"], keep="first")
        removed["duplicates"] = int(duplicated.sum())
        frame = frame[~duplicated.to_numpy()]
    if data.rating_threshold is not None:
        if "rating" not in frame.columns or frame["rating"].isna().all():
            raise ConfigError(
                f"data.rating_threshold is set to {data.rating_threshold:g} but domain {domain!r} has no "
                "ratings; remove data.rating_threshold (set it to null)"
            )
        keep = (frame["rating"] >= data.rating_threshold).to_numpy()
        removed["below_rating_threshold"] = int((~keep).sum())
        frame = frame[keep]
    before = len(frame)
    frame, rounds = k_core(frame, data.min_user_interactions, data.min_item_interactions)
    removed["k_core"] = before - len(frame)
    removed["k_core_rounds"] = rounds
    return sort_by_user_time(frame), removed


def k_core(frame: pd.DataFrame, min_user: int, min_item: int) -> tuple[pd.DataFrame, int]:
    """Drop users and items below the minimum counts, repeatedly, until none is left below.

    Removing an item can push a user below `min_user` (and the other way round), hence the loop.
    Returns the filtered frame and the number of rounds that removed something.
    """
    rounds = 0
    while len(frame):
        user_counts = frame.groupby("user_id", sort=False)["user_id"].transform("size")
        item_counts = frame.groupby("item_id", sort=False)["item_id"].transform("size")
        keep = ((user_counts >= min_user) & (item_counts >= min_item)).to_numpy()
        if keep.all():
            break
        frame = frame[keep]
        rounds += 1
    return frame, rounds


def sort_by_user_time(frame: pd.DataFrame) -> pd.DataFrame:
    """Stable sort by (user_id, timestamp): ties stay in input order."""
    user_codes = pd.factorize(frame["user_id"], sort=True)[0]
    order = np.lexsort((frame["timestamp"].to_numpy(), user_codes))  # lexsort is stable
    return frame.iloc[order].reset_index(drop=True)
