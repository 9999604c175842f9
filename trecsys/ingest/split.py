"""Train/valid/test assignment for one domain's cleaned interactions: a column, never copies.

`leave_one_out` holds out each user's last interaction (test) and second last (valid); `temporal`
holds out the latest interactions of the domain by a global time cut; `given` keeps the reader's split;
`users` splits the users (inductive): a valid or test user's last interactions are held out and the
rest of their history is `input`, read before the held-out items at evaluation and never trained on.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from trecsys.errors import ConfigError, DataError

SPLITS = ("train", "valid", "test")
# A held-out user's history: what a model reads before their held-out items, never training data.
INPUT = "input"


def assign_split(frame: pd.DataFrame, method: str, holdout: float, domain: str, order_only: bool,
                 held_out_per_user: int = 1) -> np.ndarray:
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
    if method == "users":
        return by_user_group(frame, held_out_per_user, domain)
    raise ConfigError(f"data.split: unknown split {method!r}; use one of leave_one_out, temporal, given, users")


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
    bad = ~np.isin(values, (*SPLITS, INPUT))
    if bad.any():
        raise DataError(
            f"domain {domain!r}: split value {values[bad][0]!r} is not one of {', '.join((*SPLITS, INPUT))} "
            f"({int(bad.sum())} rows)"
        )
    return values


def by_user_group(frame: pd.DataFrame, held_out: int, domain: str) -> np.ndarray:
    """Users in groups (the split column holds each user's group: train, valid or test). A train
    user's interactions are all training data; a valid (test) user's last `held_out` interactions are
    valid (test) targets and the earlier ones `input`: their history at evaluation, never trained on."""
    if "split" not in frame.columns or frame["split"].isna().all():
        raise ConfigError(
            f"data.split=users needs each user's group (train, valid or test) in the input, and domain "
            f"{domain!r} has none: name its column in data.domains.{domain}.columns.split"
        )
    if held_out < 1:
        raise ConfigError(f"data.held_out_per_user must be at least 1, got {held_out}")
    group = frame["split"].astype(object).to_numpy()
    bad = ~np.isin(group, SPLITS)
    if bad.any():
        raise DataError(f"domain {domain!r}: user group {group[bad][0]!r} is not one of {', '.join(SPLITS)} "
                        f"({int(bad.sum())} rows)")
    groups_per_user = frame.groupby("user_id", sort=False)["split"].nunique()
    if (groups_per_user > 1).any():
        user = groups_per_user.index[(groups_per_user > 1).to_numpy()][0]
        raise DataError(f"domain {domain!r}: user {user!r} is in more than one group "
                        f"({', '.join(sorted(frame.loc[frame['user_id'] == user, 'split'].unique()))}); "
                        "data.split=users needs one group per user")
    from_end = frame.groupby("user_id", sort=False).cumcount(ascending=False).to_numpy()
    return np.where(group == "train", "train", np.where(from_end < held_out, group, INPUT)).astype(object)
