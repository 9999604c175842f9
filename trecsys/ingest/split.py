"""Train/valid/test assignment for one domain's cleaned interactions: a column, never copies.

`leave_one_out` holds out each user's last interaction (test) and second last (valid); `temporal`
holds out the latest interactions of the domain by a global time cut; `given` keeps the reader's split.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from trecsys.errors import ConfigError, DataError

SPLITS = ("train", "valid", "test")


def assign_split(frame: pd.DataFrame, method: str, holdout: float, domain: str, order_only: bool) -> np.ndarray:
    """The split of every row of `frame` (sorted by user then time) as an array of str."""
    if method == "leave_one_out":
        return leave_one_out(frame)
    if method == "temporal":
        if order_only:
            raise ConfigError(
                f"data.split=temporal needs timestamps, but domain {domain!r} only gives an order "
                "(positions); use data.split=leave_one_out"
            )
        return temporal(frame["timestamp"].to_numpy(), holdout, domain)
    if method == "given":
        return given(frame, domain)
    raise ConfigError(f"data.split: unknown split {method!r}; use one of leave_one_out, temporal, given")


def leave_one_out(frame: pd.DataFrame) -> np.ndarray:
    """Per user by order: last → test, second last → valid (3+ interactions), the rest → train.

    A user with 2 interactions gets train + test, with 1 only train: both still feed training and
    (for 2) evaluation, and a valid row would leave nothing to learn from.
    """
    groups = frame.groupby("user_id", sort=False)
    from_end = groups.cumcount(ascending=False).to_numpy()
    size = groups["user_id"].transform("size").to_numpy()
    split = np.full(len(frame), "train", dtype=object)
    split[(from_end == 0) & (size >= 2)] = "test"
    split[(from_end == 1) & (size >= 3)] = "valid"
    return split


def temporal(timestamps: np.ndarray, holdout: float, domain: str) -> np.ndarray:
    """A global cut: the latest `holdout` fraction of the interactions is held out, the earlier half
    of it (by time) valid and the later half test. Equal timestamps always land on the same side."""
    if not 0.0 < holdout < 1.0:
        raise ConfigError(f"data.temporal_holdout must be between 0 and 1 (exclusive), got {holdout:g}")
    valid_from = np.quantile(timestamps, 1.0 - holdout, method="higher")
    test_from = np.quantile(timestamps, 1.0 - holdout / 2.0, method="higher")
    split = np.full(len(timestamps), "train", dtype=object)
    split[timestamps >= valid_from] = "valid"
    split[timestamps >= test_from] = "test"
    if (split == "train").all():
        raise DataError(f"domain {domain!r}: the temporal split held out nothing; raise data.temporal_holdout")
    if (split != "train").all():
        raise DataError(
            f"domain {domain!r}: all interactions share the held-out timestamps, so the temporal split "
            "leaves no training data; use data.split=leave_one_out"
        )
    return split


def given(frame: pd.DataFrame, domain: str) -> np.ndarray:
    if "split" not in frame.columns or frame["split"].isna().all():
        raise ConfigError(
            f"data.split=given needs a split column in the input, and domain {domain!r} has none; "
            "use a format with a split (recbole_split) or data.split=leave_one_out"
        )
    values = frame["split"].astype(object).to_numpy()
    bad = ~np.isin(values, SPLITS)
    if bad.any():
        raise DataError(
            f"domain {domain!r}: split value {values[bad][0]!r} is not one of {', '.join(SPLITS)} "
            f"({int(bad.sum())} rows)"
        )
    return values
