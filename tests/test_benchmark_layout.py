"""A pre-split cross-domain benchmark as published: one interaction file of mixed histories, one item
file whose `category` tells the domains apart, users in train/valid/test groups with two held-out
targets each; read through the CLI without converting it outside the toolkit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import fake_embed_texts
from typer.testing import CliRunner

from trecsys.cli import app
from trecsys.stages import prepare

runner = CliRunner()
N_USERS, HELD_OUT = 30, 2


@pytest.fixture
def fake_encoder(monkeypatch):
    monkeypatch.setattr(prepare, "embed_texts", fake_embed_texts)


def write_benchmark(root: Path) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for u in range(N_USERS):
        group = "train" if u < 20 else "valid" if u < 25 else "test"
        items = [f"b{i}" for i in rng.choice(15, 4, replace=False)] + [f"m{i}" for i in rng.choice(15, 5, replace=False)]
        for position, item in enumerate(items):  # books first, then music: one mixed history
            rows.append((f"u{u}", item, position, group))
    pd.DataFrame(rows, columns=["user", "item", "position", "group"]).to_csv(root / "all.csv", index=False)
    pd.DataFrame({"item": [f"b{i}" for i in range(15)] + [f"m{i}" for i in range(15)],
                  "title": [f"Book {i}" for i in range(15)] + [f"Song {i}" for i in range(15)],
                  "category": ["books"] * 15 + ["music"] * 15}).to_csv(root / "items.csv", index=False)


def write_config(root: Path) -> Path:
    write_benchmark(root)
    columns = {"user": "user", "item": "item", "time": "position", "split": "group", "domain": "category"}
    shared = {"format": "csv", "interactions": "all.csv", "items": "items.csv", "columns": columns}
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump({
        "run_dir": str(root / "run"),
        "embedding": {"encoder": "fake", "cache_dir": str(root / "cache")},
        "data": {"root": str(root), "split": "users", "held_out_per_user": HELD_OUT,
                 "domains": {"Books": {**shared, "select": "books"}, "Music": {**shared, "select": "music"}},
                 "source": ["Books"], "target": "Music"},
        "evaluate": {"ks": [5, 10], "bootstrap": 0},
        "recommend": {"fusion": [{"model": "popularity"}], "k": 10},
    }))
    return path


def test_one_file_split_by_item_column_with_inductive_users(tmp_path, fake_encoder):
    path = write_config(tmp_path)
    result = runner.invoke(app, ["prepare", "-c", str(path)])
    assert result.exit_code == 0, result.output
    items = pd.read_parquet(tmp_path / "run" / "prepared" / "items.parquet")
    assert set(items.loc[items["domain"] == "Books", "item_id"].str[0]) == {"b"}
    assert set(items.loc[items["domain"] == "Music", "item_id"].str[0]) == {"m"}
    rows = pd.read_parquet(tmp_path / "run" / "prepared" / "interactions.parquet")
    group = rows["user_id"].str[1:].astype(int).map(lambda u: "train" if u < 20 else "valid" if u < 25 else "test")
    # Train users train on everything; held-out users never have a training row.
    assert (rows.loc[group == "train", "split"] == "train").all()
    assert not (rows.loc[group != "train", "split"] == "train").any()
    music = rows[rows["domain"] == "Music"]
    held = music[music["split"] == "test"].groupby("user_id").size()
    assert len(held) == 5 and (held == HELD_OUT).all()  # the last two Music items of each test user
    assert (music[group[music.index] == "test"].groupby("user_id")["split"].apply(
        lambda s: list(s) == ["input"] * 3 + ["test"] * 2)).all()

    result = runner.invoke(app, ["evaluate", "-c", str(path), "--split", "test"])
    assert result.exit_code == 0, result.output
    metrics = pd.read_parquet(tmp_path / "run" / "eval" / "metrics.parquet")
    got = metrics.query("run == 'popularity' and slice == 'all' and metric == 'recall' and k == 10")

    # Independently: popularity counts the training users' Music items (held-out users' histories
    # are not training data); each test user's two targets are scored, recall averaged per user.
    items = items.set_index("item_idx")["item_id"]
    counts = music[music["split"] == "train"]["item_idx"].map(items).value_counts()
    catalogue = items[items.str.startswith("m")]
    order = sorted(catalogue, key=lambda i: (-counts.get(i, 0), catalogue[catalogue == i].index[0]))
    recalls = []
    for _, user in music[group[music.index] == "test"].groupby("user_id"):
        seen = set(user.loc[user["split"] == "input", "item_idx"].map(items))
        top = [i for i in order if i not in seen][:10]
        targets = set(user.loc[user["split"] == "test", "item_idx"].map(items))
        recalls.append(len(targets & set(top)) / len(targets))
    assert got["value"].item() == pytest.approx(np.mean(recalls))
    assert got["n_users"].item() == 5


def test_a_user_in_two_groups_is_refused(tmp_path, fake_encoder):
    path = write_config(tmp_path)
    frame = pd.read_csv(tmp_path / "all.csv")
    frame.loc[0, "group"] = "test"  # u0 is a train user
    frame.to_csv(tmp_path / "all.csv", index=False)
    result = runner.invoke(app, ["prepare", "-c", str(path)])
    assert result.exit_code == 2 and "user 'u0' is in more than one group" in result.stderr


def test_a_select_value_no_item_has_is_refused(tmp_path, fake_encoder):
    path = write_config(tmp_path)
    result = runner.invoke(app, ["prepare", "-c", str(path), "data.domains.Music.select=films"])
    assert result.exit_code == 2
    assert "no item has category='films' (data.domains.Music.select); values: books, music" in result.stderr
