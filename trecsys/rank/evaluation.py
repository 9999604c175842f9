"""From top lists to numbers: per-user metrics on each slice of the evaluated users, then point
estimates with bootstrap CIs and paired comparisons — the rows of eval/metrics.parquet.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from trecsys.rank import metrics as M

METRICS_COLUMNS = ("run", "split", "slice", "metric", "k", "value", "ci_low", "ci_high", "n_users")
COMPARISON_COLUMNS = ("run", "reference", "split", "slice", "metric", "k", "delta", "ci_low", "ci_high",
                      "p_value", "n_users")


@dataclass
class Slice:
    name: str
    # Positions (into the evaluated users) of the users in this slice.
    users: np.ndarray
    # Their held-out targets; restricted to the slice's items for target-item slices.
    targets: list[np.ndarray]
    # Coverage, diversity and popularity describe the lists, which target slices do not change.
    describes_lists: bool


def history_label(lengths: np.ndarray) -> str:
    """A history slice's name: the smallest and largest number of target training items of its
    users (`train items:4-7`, `train items:3` when they all have 3), what the slice really holds."""
    lo, hi = int(lengths.min()), int(lengths.max())
    return f"train items:{lo}" if lo == hi else f"train items:{lo}-{hi}"


def build_slices(targets: list[np.ndarray], train_lengths: np.ndarray, in_source: np.ndarray | None,
                 item_train_counts: np.ndarray, history_edges: Sequence[int], cold_item_interactions: int
                 ) -> list[Slice]:
    """all; users by number of target training items (buckets cut at `history_edges`, each named by
    the range its users really have); users also in a source domain or not (when there are source
    domains: `in_source` not None); and target items that are cold (< threshold train interactions),
    never seen in training, or warm."""
    everyone = np.arange(len(targets))
    slices = [Slice("all", everyone, targets, True)]
    bucket = np.searchsorted(np.asarray(history_edges), train_lengths, side="right")
    for b in range(len(history_edges) + 1):
        users = everyone[bucket == b]
        if len(users):
            slices.append(Slice(history_label(np.asarray(train_lengths)[users]), users,
                                [targets[u] for u in users], True))
    if in_source is not None:
        for label, mask in (("source:shared", in_source), ("source:target-only", ~in_source)):
            users = everyone[mask]
            slices.append(Slice(label, users, [targets[u] for u in users], True))
    item_groups = {
        "target:unseen": item_train_counts == 0,
        f"target:cold(<{cold_item_interactions})": item_train_counts < cold_item_interactions,
        "target:warm": item_train_counts >= cold_item_interactions,
    }
    for label, is_member in item_groups.items():
        kept = [t[is_member[t]] for t in targets]
        users = everyone[np.fromiter((len(t) > 0 for t in kept), dtype=bool, count=len(kept))]
        slices.append(Slice(label, users, [kept[u] for u in users], False))
    return [s for s in slices if len(s.users)]


def per_user_metrics(topk: np.ndarray, slices: list[Slice], ks: Sequence[int], item_embeddings: np.ndarray,
                     item_percentile: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """{slice: {"ndcg@10": per-user values, ...}} for one system's top lists (catalogue-local)."""
    everyone = slices[0]
    accuracy = M.ranking_metrics(topk, everyone.targets, ks)
    lists = {**M.intra_list_diversity(topk, item_embeddings, ks), **M.average_popularity(topk, item_percentile, ks)}
    out: dict[str, dict[str, np.ndarray]] = {}
    for s in slices:
        if s.describes_lists:
            values = {key: v[s.users] for key, v in accuracy.items()}
            values.update({key: v[s.users] for key, v in lists.items()})
        else:
            values = M.ranking_metrics(topk[s.users], s.targets, ks)
        out[s.name] = values
    return out


def split_key(key: str) -> tuple[str, int]:
    name, k = key.split("@")
    return name, int(k)


def summarise(runs: list[str], per_user: list[dict[str, dict[str, np.ndarray]]], topks: list[np.ndarray],
              ks: Sequence[int], n_items: int, split: str, n_samples: int, seed: int
              ) -> tuple[list[dict], list[dict]]:
    """Rows of metrics.parquet and comparison.parquet (every run against runs[0]).

    Each slice draws one set of user resamples (seeded), shared by every run and metric, so the CI
    of a difference is the paired bootstrap.
    """
    metric_rows: list[dict] = []
    comparison_rows: list[dict] = []
    for slice_name in per_user[0]:
        keys = list(per_user[0][slice_name])
        matrix = np.column_stack([system[slice_name][key] for system in per_user for key in keys])
        point = matrix.mean(axis=0)
        samples = M.bootstrap_means(matrix, n_samples, seed) if n_samples else None
        n_users = len(matrix)
        _add_rows(metric_rows, comparison_rows, runs, keys, point, samples, split, slice_name, n_users)
        if slice_name == "all":
            # Coverage counts distinct items over all users; it is not a mean over users, and a
            # resample (~63% distinct users) always covers less, so a user bootstrap would put the
            # interval below the estimate. It is reported without one.
            cov_keys = [f"coverage@{k}" for k in ks]
            point = np.array([M.catalogue_coverage(t, n_items, [k])[f"coverage@{k}"] for t in topks for k in ks])
            _add_rows(metric_rows, comparison_rows, runs, cov_keys, point, None, split, slice_name, n_users)
    return metric_rows, comparison_rows


def _add_rows(metric_rows: list[dict], comparison_rows: list[dict], runs: list[str], keys: list[str],
              point: np.ndarray, samples: np.ndarray | None, split: str, slice_name: str, n_users: int) -> None:
    n_keys = len(keys)
    nan = np.full(n_keys, np.nan)
    for r, run in enumerate(runs):
        cols = slice(r * n_keys, (r + 1) * n_keys)
        low, high = M.percentile_interval(samples[:, cols]) if samples is not None else (nan, nan)
        for j, key in enumerate(keys):
            name, k = split_key(key)
            metric_rows.append(dict(run=run, split=split, slice=slice_name, metric=name, k=k,
                                    value=float(point[cols][j]), ci_low=float(low[j]), ci_high=float(high[j]),
                                    n_users=n_users))
        if r == 0:
            continue
        ref = slice(0, n_keys)
        delta = point[cols] - point[ref]
        if samples is not None:
            delta_samples = samples[:, cols] - samples[:, ref]
            d_low, d_high = M.percentile_interval(delta_samples)
            p = M.paired_p_value(delta_samples, delta)
        else:
            d_low, d_high, p = nan, nan, nan
        for j, key in enumerate(keys):
            name, k = split_key(key)
            comparison_rows.append(dict(run=run, reference=runs[0], split=split, slice=slice_name, metric=name,
                                        k=k, delta=float(delta[j]), ci_low=float(d_low[j]),
                                        ci_high=float(d_high[j]), p_value=float(p[j]), n_users=n_users))
