"""`trec prepare`: synthetic data, cleaning, splits, the prepared/ artifact contract, safety on re-runs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from trecsys.config import ExperimentConfig, build
from trecsys.data import synthetic
from trecsys.data.clean import clean_interactions, k_core, sort_by_user_time
from trecsys.data.split import assign_split, leave_one_out, temporal
from trecsys.data.synthetic import COLD_ITEM_RELEASE, SPAN_S, START_UNIX_S, generate_domains
from trecsys.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TRECSYS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def synthetic_config(tmp_path: Path | None = None, **data_overrides) -> ExperimentConfig:
    data = {
        "domains": {"Kitchen": {"format": "synthetic"}, "Food": {"format": "synthetic"}},
        "source": ["Kitchen"],
        "target": "Food",
        "synthetic": {"n_users": 300, "n_items_per_domain": 200},
    }
    data.update(data_overrides)
    top = {"data": data}
    if tmp_path is not None:
        top["run_dir"] = str(tmp_path / "run")
        top["embedding"] = {"cache_dir": str(tmp_path / "cache")}
    return build(ExperimentConfig, top)


def frame(rows, columns=("user_id", "item_id", "timestamp")) -> pd.DataFrame:
    out = pd.DataFrame(rows, columns=list(columns))
    out["timestamp"] = out["timestamp"].astype(np.int64)
    return out


# ---------------------------------------------------------------------------------------------
# Synthetic data


def test_synthetic_is_deterministic_per_seed():
    first = generate_domains(synthetic_config())
    second = generate_domains(synthetic_config())
    for name in ("Kitchen", "Food"):
        pd.testing.assert_frame_equal(first[name].interactions, second[name].interactions)
        pd.testing.assert_frame_equal(first[name].items, second[name].items)
    other = generate_domains(build(ExperimentConfig, {**_as_dict(synthetic_config()), "seed": 1}))
    assert not first["Food"].interactions.equals(other["Food"].interactions)


def _as_dict(cfg: ExperimentConfig) -> dict:
    from trecsys.config import to_dict

    return to_dict(cfg)


def test_synthetic_structure_supports_transfer():
    cfg = synthetic_config()
    domains = generate_domains(cfg)
    kitchen, food = domains["Kitchen"].interactions, domains["Food"].interactions
    items = domains["Food"].items
    assert list(items.columns) == ["item_id", "title", "brand", "category", "price"]
    assert items["item_id"].is_unique and items["title"].str.len().min() > 10

    # The target is small next to the source, and a large share of users shop in both.
    assert len(food) < 0.5 * len(kitchen)
    overlap = set(kitchen["user_id"]) & set(food["user_id"])
    assert 0.45 * cfg.data.synthetic.n_users < len(overlap) < 0.75 * cfg.data.synthetic.n_users

    # Cold users: 1-3 target interactions, most of them with a source history to transfer from.
    target_counts = food.groupby("user_id").size()
    cold_users = set(target_counts[target_counts <= 3].index)
    assert len(cold_users) >= 30 and len(cold_users & overlap) >= 15

    # Time order within each user, and no user buys the same item twice in a domain.
    for table in (kitchen, food):
        assert (table.groupby("user_id")["timestamp"].diff().dropna() > 0).all()
        assert not table.duplicated(["user_id", "item_id"]).any()

    # Zipf-like popularity: the top 10% of items hold over twice their uniform share, with a long tail.
    for table in (kitchen, food):
        counts = table["item_id"].value_counts()
        assert counts.iloc[: len(counts) // 10].sum() > 0.2 * len(table)
        assert counts.iloc[0] > 5 * counts.median()

    # Cold items (target only) appear late and, under leave-one-out, only in valid/test.
    _, cold = synthetic._generate(cfg)
    assert not cold["Kitchen"]
    food_sorted = sort_by_user_time(food)
    food_sorted["split"] = leave_one_out(food_sorted)
    bought_cold = food_sorted[food_sorted["item_id"].isin(cold["Food"])]
    assert bought_cold["item_id"].nunique() >= 5
    assert set(bought_cold["split"]) == {"valid", "test"}
    assert bought_cold["timestamp"].min() >= START_UNIX_S + COLD_ITEM_RELEASE * SPAN_S


def test_synthetic_themes_carry_across_domains():
    """A user's Food titles share theme words with their Kitchen titles far more than chance."""
    domains = generate_domains(synthetic_config())
    words = {"camping": ("Camping", "Trail", "Backpacking", "TrailPeak", "Summit Ridge", "Backcountry")}

    def camping_share(table, titles):
        merged = table.merge(titles, on="item_id")
        is_camp = merged["title"].str.contains("|".join(words["camping"]))
        return is_camp.groupby(merged["user_id"]).mean()

    kitchen = camping_share(domains["Kitchen"].interactions, domains["Kitchen"].items[["item_id", "title"]])
    food = camping_share(domains["Food"].interactions, domains["Food"].items[["item_id", "title"]])
    both = pd.concat([kitchen.rename("kitchen"), food.rename("food")], axis=1, join="inner")
    assert both["kitchen"].corr(both["food"]) > 0.3


def test_synthetic_unknown_domain_name_is_a_config_error():
    cfg = build(ExperimentConfig, {"data": {"domains": {"Garden": {"format": "synthetic"}}, "target": "Garden"}})
    with pytest.raises(ConfigError, match=r"data\.domains\.Garden.*Kitchen, Food, Outdoors"):
        generate_domains(cfg)


def test_synthetic_single_and_three_domains():
    single = build(ExperimentConfig, {"data": {"domains": {"Food": {"format": "synthetic"}}, "target": "Food",
                                               "synthetic": {"n_users": 50, "n_items_per_domain": 40}}})
    assert generate_domains(single)["Food"].interactions["user_id"].nunique() == 50
    three = synthetic_config(domains={"Kitchen": {"format": "synthetic"}, "Outdoors": {"format": "synthetic"},
                                      "Food": {"format": "synthetic"}}, source=["Kitchen", "Outdoors"])
    domains = generate_domains(three)
    assert list(domains) == ["Kitchen", "Outdoors", "Food"]
    assert all(len(d.interactions) > 0 for d in domains.values())


# ---------------------------------------------------------------------------------------------
# Cleaning


def test_k_core_is_iterative():
    # z has one interaction: removing it leaves c with one, and removing c is a second round.
    rows = [("a", "x", 1), ("a", "y", 2), ("b", "x", 1), ("b", "y", 2), ("c", "y", 1), ("c", "z", 2)]
    kept, rounds = k_core(frame(rows), min_user=2, min_item=2)
    assert rounds == 2
    assert sorted(zip(kept["user_id"], kept["item_id"], strict=True)) == [("a", "x"), ("a", "y"), ("b", "x"), ("b", "y")]


def test_clean_dedupes_thresholds_and_sorts_stably():
    cfg = synthetic_config(rating_threshold=3.0)
    rows = [("u2", "i1", 5, 4.0), ("u1", "i2", 7, 5.0), ("u1", "i1", 7, 3.0), ("u1", "i1", 7, 3.0),
            ("u1", "i3", 1, 2.0), ("u1", "i4", 7, 3.5)]
    cleaned, removed = clean_interactions(frame(rows, ("user_id", "item_id", "timestamp", "rating")), cfg.data, "X")
    assert removed["duplicates"] == 1 and removed["below_rating_threshold"] == 1
    # Ties at t=7 keep their input order: i2, i1, i4.
    assert list(zip(cleaned["user_id"], cleaned["item_id"], strict=True)) == [("u1", "i2"), ("u1", "i1"), ("u1", "i4"), ("u2", "i1")]


def test_rating_threshold_without_ratings_is_a_config_error():
    cfg = synthetic_config(rating_threshold=4.0)
    no_ratings = frame([("u", "i", 1)])
    no_ratings["rating"] = np.nan
    with pytest.raises(ConfigError, match=r"data\.rating_threshold.*'Food' has no ratings"):
        clean_interactions(no_ratings, cfg.data, "Food")


# ---------------------------------------------------------------------------------------------
# Splits


def test_leave_one_out_rules_and_ties():
    rows = [("one", "a", 1),
            ("two", "a", 1), ("two", "b", 2),
            ("many", "a", 1), ("many", "b", 2), ("many", "c", 3), ("many", "d", 3)]
    table = sort_by_user_time(frame(rows))
    table["split"] = leave_one_out(table)
    got = {(u, i): s for u, i, s in zip(table["user_id"], table["item_id"], table["split"], strict=True)}
    assert got[("one", "a")] == "train"
    assert (got[("two", "a")], got[("two", "b")]) == ("train", "test")
    # c and d tie at t=3: input order decides, so d (later in the input) is the test item.
    assert [got[("many", i)] for i in "abcd"] == ["train", "train", "valid", "test"]


def test_temporal_split_is_a_global_cut():
    split = temporal(np.arange(100, dtype=np.int64), 0.2, "D")
    assert (split[:80] == "train").all() and (split[80:90] == "valid").all() and (split[90:] == "test").all()
    with pytest.raises(ConfigError, match="data.temporal_holdout"):
        temporal(np.arange(10), 1.5, "D")
    with pytest.raises(ConfigError, match="order"):
        assign_split(frame([("u", "i", 1)]), "temporal", 0.1, "Food", order_only=True)


def test_given_split_needs_a_valid_column():
    table = frame([("u", "i", 1), ("u", "j", 2)])
    with pytest.raises(ConfigError, match="data.split=given"):
        assign_split(table, "given", 0.1, "D", order_only=False)
    table["split"] = ["train", "dev"]
    with pytest.raises(DataError, match="'dev'"):
        assign_split(table, "given", 0.1, "D", order_only=False)
    table["split"] = ["train", "test"]
    assert list(assign_split(table, "given", 0.1, "D", order_only=False)) == ["train", "test"]
