"""`trec prepare`: synthetic data, cleaning, splits, the prepared/ artifact contract, safety on re-runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import fake_embed_texts

from trecsys.artifacts import parquet_metadata, read_manifest, run_lock
from trecsys.config import ExperimentConfig, build, load_config
from trecsys.errors import ConfigError, DataError, LockBusyError
from trecsys.ingest import synthetic
from trecsys.ingest.clean import clean_interactions, k_core, sort_by_user_time
from trecsys.ingest.split import assign_split, leave_one_out, temporal
from trecsys.ingest.synthetic import COLD_ITEM_RELEASE, SPAN_S, START_UNIX_S, generate_domains
from trecsys.ingest.synthetic_vocab import THEMES
from trecsys.prepared.sequences import FILES as SEQUENCE_FILES

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

    # Zipf-like popularity: the top 10% of items hold over twice their uniform share, and the long tail,
    # half the catalogue, under a third of the purchases (evenly spread demand would give it ~45%).
    for table in (kitchen, food):
        counts = table["item_id"].value_counts()
        assert counts.iloc[: len(counts) // 10].sum() > 0.2 * len(table)
        assert counts.iloc[len(counts) // 2:].sum() < 0.3 * len(table)

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
    words = {"camping": ("Camping", "Trail", "Backpacking", "TrailPeak", "Summit Ridge", "Backcountry", "Pinecrest")}

    def camping_share(table, titles):
        merged = table.merge(titles, on="item_id")
        is_camp = merged["title"].str.contains("|".join(words["camping"]))
        return is_camp.groupby(merged["user_id"]).mean()

    kitchen = camping_share(domains["Kitchen"].interactions, domains["Kitchen"].items[["item_id", "title"]])
    food = camping_share(domains["Food"].interactions, domains["Food"].items[["item_id", "title"]])
    both = pd.concat([kitchen.rename("kitchen"), food.rename("food")], axis=1, join="inner")
    assert both["kitchen"].corr(both["food"]) > 0.3


def test_synthetic_users_keep_their_brand_across_domains():
    """Brand loyalty, what the demo's transfer learns from Kitchen: in a theme, a user's Food purchase is
    from the brand they bought most in Kitchen far more often than its 1-in-4 share of the theme's brands."""
    domains = generate_domains(synthetic_config())
    theme_of = {brand: name for name, theme in THEMES.items() for brand in theme.brands}

    def bought(name):
        table = domains[name].interactions.merge(domains[name].items[["item_id", "brand"]], on="item_id")
        table = table[table["brand"].isin(theme_of)]
        return table.assign(theme=table["brand"].map(theme_of))

    kitchen, food = bought("Kitchen"), bought("Food")
    usual = kitchen.groupby(["user_id", "theme"])["brand"].agg(lambda b: b.mode().iloc[0]).rename("usual")
    both = food.join(usual, on=["user_id", "theme"], how="inner")
    assert len(both) > 100
    # 0.67 here; the same shop without loyalty gives 0.23.
    assert (both["brand"] == both["usual"]).mean() > 0.5


def test_demo_config_is_sized_for_a_few_cpu_minutes():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    domains = generate_domains(cfg)
    sizes = {name: len(d.interactions) for name, d in domains.items()}
    assert 10_000 <= sum(sizes.values()) <= 20_000 and sizes["Food"] < 0.5 * sizes["Kitchen"]
    assert all(len(d.items) == 400 for d in domains.values())


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


# ---------------------------------------------------------------------------------------------
# The prepare stage and its artifacts


@pytest.fixture
def fake_encoder(monkeypatch):
    from trecsys.stages import prepare

    monkeypatch.setattr(prepare, "embed_texts", fake_embed_texts)
    return prepare


def prepared_files(run_dir: Path) -> dict[str, bytes]:
    folder = run_dir / "prepared"
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_prepare_writes_the_artifact_contract(tmp_path, fake_encoder, capsys):
    cfg = synthetic_config(tmp_path, text_template="{title}. {category}")
    fake_encoder.run(cfg)
    folder = Path(cfg.run_dir) / "prepared"
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.yaml", "interactions.parquet", "item_embeddings.parquet", "items.parquet", "manifest.json",
        "sequences"]
    listed = {entry["path"] for entry in json.loads((folder / "manifest.json").read_text())["outputs"]}
    assert {f"sequences/{name}" for name in SEQUENCE_FILES} <= listed  # in the manifest like every output
    assert not list(folder.parent.glob(".prepared.tmp-*"))

    items = pq.read_table(folder / "items.parquet")
    assert [str(t) for t in items.schema.types][:5] == ["int32", "string", "string", "string", "string"]
    assert items.column_names == ["item_idx", "item_id", "domain", "title", "text", "brand", "category", "price"]
    items = items.to_pandas()
    assert (items["item_idx"].to_numpy() == np.arange(len(items))).all()
    # Contiguous per domain in mapping order, sorted by item_id within a domain.
    assert items["domain"].drop_duplicates().tolist() == ["Kitchen", "Food"]
    for _, block in items.groupby("domain", sort=False):
        assert block["item_id"].is_monotonic_increasing
    assert (items["text"] == items["title"] + ". " + items["category"]).all()

    table = pq.read_table(folder / "interactions.parquet")
    assert {f.name: str(f.type) for f in table.schema} == {
        "user_idx": "int32", "user_id": "string", "item_idx": "int32", "domain": "string",
        "timestamp": "int64", "rating": "float", "split": "string"}
    inter = table.to_pandas()
    keys = list(zip(inter["user_idx"], inter["timestamp"], strict=True))
    assert keys == sorted(keys)
    assert set(inter["split"]) == {"train", "valid", "test"}
    # user_idx is dense over the sorted original ids, shared by both domains.
    users = inter.drop_duplicates("user_idx").sort_values("user_idx")
    assert users["user_id"].tolist() == sorted(users["user_id"]) and users["user_idx"].tolist() == list(range(len(users)))
    # Each item's domain matches the interaction's domain.
    assert (items.set_index("item_idx").loc[inter["item_idx"], "domain"].to_numpy() == inter["domain"].to_numpy()).all()

    embeddings = pq.read_table(folder / "item_embeddings.parquet")
    assert str(embeddings.schema.field("embedding").type) == "fixed_size_list<element: float>[8]"
    assert embeddings.column("item_idx").to_pylist() == list(range(len(items)))
    assert json.loads(parquet_metadata(folder / "item_embeddings.parquet")["trecsys.encoder"])["name"] == "fake"

    manifest = read_manifest(folder, "prepare")
    assert manifest["target"] == "Food" and manifest["source"] == ["Kitchen"] and manifest["seed"] == 0
    assert set(manifest["timings_s"]) == {"read", "clean", "split", "embed", "write"}
    kitchen, food = manifest["domains"]["Kitchen"], manifest["domains"]["Food"]
    assert (kitchen["role"], food["role"]) == ("source", "target")
    assert (kitchen["item_start"], kitchen["item_stop"], food["item_start"], food["item_stop"]) == (
        0, kitchen["n_items"], kitchen["n_items"], len(items))
    assert manifest["n_items"] == len(items) and manifest["n_users"] == inter["user_idx"].nunique()
    assert food["n_interactions"] == (inter["domain"] == "Food").sum()
    assert food["cold_items_test"] > 0
    assert load_config(folder / "config.yaml").data.target == "Food"
    printed = capsys.readouterr()
    assert "Kitchen" in printed.out and "overlap users" in printed.out and str(folder) in printed.err


def test_overlap_users_are_counted_across_domains(tmp_path, fake_encoder):
    cfg = synthetic_config(tmp_path)
    fake_encoder.run(cfg)
    raw = generate_domains(cfg)
    both = set(raw["Kitchen"].interactions["user_id"]) & set(raw["Food"].interactions["user_id"])
    domains = read_manifest(Path(cfg.run_dir) / "prepared")["domains"]
    assert domains["Kitchen"]["n_overlap_users"] == domains["Food"]["n_overlap_users"] == len(both)
    assert domains["Food"]["n_users"] == raw["Food"].interactions["user_id"].nunique()


def test_domain_config_is_checked(tmp_path, fake_encoder):
    # Checked when the config is built, before any stage runs.
    with pytest.raises(ConfigError, match=r"'data\.target': 'Books' is not a domain of data.domains \(Kitchen, Food\)"):
        synthetic_config(tmp_path, target="Books")
    with pytest.raises(ConfigError, match=r"'data\.source\[0\]': 'Food' is the target"):
        synthetic_config(tmp_path, source=["Food"])
    with pytest.raises(ConfigError, match=r"'data\.source\[1\]': 'Kitchen' is listed twice"):
        synthetic_config(tmp_path, source=["Kitchen", "Kitchen"])


def test_failed_rerun_keeps_the_previous_prepared_folder(tmp_path, fake_encoder, monkeypatch):
    cfg = synthetic_config(tmp_path)
    fake_encoder.run(cfg)
    before = prepared_files(Path(cfg.run_dir))

    # A filter that empties the domains is refused before anything is written...
    with pytest.raises(DataError, match=r"no interactions left after cleaning.*min_user_interactions=1000"):
        fake_encoder.run(synthetic_config(tmp_path, min_user_interactions=1000))
    # ...and a failure in the middle of writing leaves the old folder in place.
    def broken_manifest(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(fake_encoder, "write_manifest", broken_manifest)
    with pytest.raises(OSError, match="disk full"):
        fake_encoder.run(synthetic_config(tmp_path, min_user_interactions=3))
    assert prepared_files(Path(cfg.run_dir)) == before
    assert not [p for p in Path(cfg.run_dir).iterdir() if p.name.startswith(".prepared.") and "lock" not in p.name]


def test_a_second_concurrent_prepare_is_refused(tmp_path, fake_encoder):
    cfg = synthetic_config(tmp_path)
    with run_lock(Path(cfg.run_dir) / "prepared"):
        with pytest.raises(LockBusyError, match="locked by another trecsys run") as caught:
            fake_encoder.run(cfg)
    assert caught.value.exit_code == 3
    assert not (Path(cfg.run_dir) / "prepared").exists()


def test_temporal_split_through_prepare(tmp_path, fake_encoder):
    cfg = synthetic_config(tmp_path, split="temporal", temporal_holdout=0.2)
    fake_encoder.run(cfg)
    inter = pq.read_table(tmp_path / "run" / "prepared" / "interactions.parquet").to_pandas()
    for _, domain in inter.groupby("domain"):
        times = {s: domain.loc[domain["split"] == s, "timestamp"] for s in ("train", "valid", "test")}
        assert times["train"].max() < times["valid"].min() and times["valid"].max() < times["test"].min()
        assert 0.15 < (domain["split"] != "train").mean() < 0.25


def write_csv(path: Path, text: str) -> None:
    path.write_text(text.strip() + "\n", encoding="utf-8")


def test_csv_domains_users_matched_by_id_and_items_without_text(tmp_path, fake_encoder):
    write_csv(tmp_path / "books.csv", "user_id,item_id,timestamp\nu1,b1,10\nu1,b2,20\nu2,b1,5\nu3,b3,7")
    write_csv(tmp_path / "books_items.csv", "item_id,title\nb1,The Hobbit\nb2,Dune\nb9,Unsold")
    write_csv(tmp_path / "movies.csv", "user_id,item_id,timestamp\nu1,m1,15\nu1,m2,20\nu4,m1,3\nu4,m3,4")
    cfg = build(ExperimentConfig, {
        "run_dir": str(tmp_path / "run"),
        "data": {"root": str(tmp_path), "target": "Movies", "source": ["Books"],
                 "domains": {"Books": {"format": "csv", "interactions": "books.csv", "items": "books_items.csv"},
                             "Movies": {"format": "csv", "interactions": "movies.csv"}}},
    })
    fake_encoder.run(cfg)
    folder = tmp_path / "run" / "prepared"
    items = pq.read_table(folder / "items.parquet").to_pandas()
    # b9 has no interaction but the item file lists it: in the catalogue; b3 has no metadata, so no text.
    assert items["item_id"].tolist() == ["b1", "b2", "b3", "b9", "m1", "m2", "m3"]
    assert items["text"].tolist() == ["The Hobbit", "Dune", "", "Unsold", "", "", ""]
    inter = pq.read_table(folder / "interactions.parquet").to_pandas()
    u1 = inter[inter["user_id"] == "u1"]
    # Domains interleave by time; the tie at t=20 keeps the mapping order (Books first).
    assert u1["item_idx"].tolist() == [0, 4, 1, 5] and u1["user_idx"].eq(0).all()
    assert u1["split"].tolist() == ["train", "train", "test", "test"]
    assert inter["rating"].isna().all()
    manifest = read_manifest(folder, "prepare")
    books, movies = manifest["domains"]["Books"], manifest["domains"]["Movies"]
    assert (books["n_overlap_users"], movies["n_overlap_users"]) == (1, 1)
    assert (books["items_without_text"], movies["items_without_text"]) == (1, 3)
    assert (books["n_users"], books["n_items"], movies["n_users"], movies["n_items"]) == (3, 4, 2, 3)
    assert (books["items_without_interactions"], movies["items_without_interactions"]) == (1, 0)
    assert manifest["n_users"] == 4
    assert [Path(entry["path"]).name for entry in manifest["inputs"]] == ["books.csv", "books_items.csv", "movies.csv"]


def test_cli_exits_3_when_prepared_is_locked(tmp_path, fake_encoder):
    from typer.testing import CliRunner

    from trecsys.cli import app

    run_dir = tmp_path / "run"
    with run_lock(run_dir / "prepared"):
        result = CliRunner().invoke(app, ["prepare", "-c", str(REPO / "configs" / "demo.yaml"), f"run_dir={run_dir}"])
    assert result.exit_code == 3, result.output
    assert "locked by another trecsys run" in result.output


# ---------------------------------------------------------------------------------------------
# End to end, with the real encoder and the real data


@pytest.mark.slow
def test_demo_prepare_through_the_cli_with_the_real_encoder(tmp_path):
    run_dir = tmp_path / "demo"
    # A smaller shop than the demo's, so the encoder has ~250 titles to embed, not ~770.
    command = [sys.executable, "-m", "trecsys", "prepare", "-c", str(REPO / "configs" / "demo.yaml"),
               f"run_dir={run_dir}", f"embedding.cache_dir={tmp_path / 'cache'}",
               "data.synthetic.n_users=400", "data.synthetic.n_items_per_domain=130"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "Food" in result.stdout and str(run_dir / "prepared") in result.stderr

    folder = run_dir / "prepared"
    manifest = read_manifest(folder, "prepare")
    encoder = json.loads(parquet_metadata(folder / "item_embeddings.parquet")["trecsys.encoder"])
    assert encoder == manifest["encoder"] and encoder["dim"] == 384
    table = pq.read_table(folder / "item_embeddings.parquet")
    vectors = np.asarray(table.column("embedding").combine_chunks().flatten()).reshape(len(table), -1)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)

    # Text carries the themes across domains: a Kitchen camping item is closer to Food camping items
    # than to Food baking items.
    items = pq.read_table(folder / "items.parquet").to_pandas()
    food = items["domain"] == "Food"
    camping = items["title"].str.contains("Camping|Backpacking|Trail")
    baking = items["title"].str.contains("Flour|Yeast|Cake Mix|Vanilla")
    kitchen_camping = vectors[(~food & camping).to_numpy()]
    to_camping = kitchen_camping @ vectors[(food & camping).to_numpy()].T
    to_baking = kitchen_camping @ vectors[(food & baking).to_numpy()].T
    assert to_camping.mean() > to_baking.mean() + 0.05


def shared_data(name: str) -> Path:
    folder = SHARED_DATA / name
    if not folder.is_dir():
        pytest.skip(f"shared data {folder} not present")
    return folder


@pytest.mark.slow
@pytest.mark.shared_data
def test_kitchen_to_food_counts_match_provenance(tmp_path, fake_encoder):
    root = shared_data("amazon_food_kitchen")
    cfg = load_config(REPO / "configs" / "kitchen_to_food.yaml", [f"data.root={root}", f"run_dir={tmp_path}"])
    fake_encoder.run(cfg)
    manifest = read_manifest(tmp_path / "prepared", "prepare")
    food, kitchen = manifest["domains"]["Food"], manifest["domains"]["Kitchen"]
    assert (food["n_interactions"], food["n_users"], food["n_items"]) == (98_316, 14_870, 8_661)
    assert (kitchen["n_interactions"], kitchen["n_users"], kitchen["n_items"]) == (337_811, 47_589, 27_637)
    assert food["n_overlap_users"] == kitchen["n_overlap_users"] == 9_398
    assert manifest["n_users"] == 53_061 and manifest["n_items"] == 8_661 + 27_637
    assert (kitchen["item_start"], food["item_start"]) == (0, 27_637)
    assert food["items_without_text"] == kitchen["items_without_text"] == 0


@pytest.mark.shared_data
def test_office_given_split_equals_leave_one_out():
    from trecsys.ingest.readers import read_domain

    root = shared_data("amazon2014_office")
    cfg = load_config(REPO / "configs" / "office2014.yaml", [f"data.root={root}"])
    raw = read_domain("Office", cfg.data.domains["Office"], root, "error")
    cleaned, _ = clean_interactions(raw.interactions, cfg.data, "Office")
    given_split = assign_split(cleaned, "given", 0.1, "Office", raw.order_only)
    assert (given_split == leave_one_out(cleaned)).all()
    assert (len(cleaned), cleaned["user_id"].nunique(), cleaned["item_id"].nunique()) == (53_258, 4_905, 2_420)
