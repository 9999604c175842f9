"""Data fidelity of `trec prepare`: per-domain text templates, catalogues from the item files."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import fake_embed_texts
from typer.testing import CliRunner

from trecsys.cli import app
from trecsys.stages import prepare

runner = CliRunner()


@pytest.fixture
def fake_encoder(monkeypatch):
    monkeypatch.setattr(prepare, "embed_texts", fake_embed_texts)


def write_domains(root: Path) -> None:
    """Two csv domains: Books items have `title`, Music items have `text`; each item file lists
    items no one interacted with (b20, m18, m19); m17 has one interaction."""
    rows = []
    for u in range(8):
        rows += [(f"u{u}", f"b{(u + k) % 12}", 10 * k) for k in range(6)]
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(root / "books.csv", index=False)
    rows = []
    for u in range(8):
        rows += [(f"u{u}", f"m{(2 * u + k) % 12}", 100 + 10 * k) for k in range(4)]
    rows.append(("u0", "m17", 5))  # m17's only interaction: min_item_interactions=2 removes it
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(root / "music.csv", index=False)
    books, music = [*range(12), 20], [*range(12), 17, 18, 19]
    pd.DataFrame({"item_id": [f"b{i}" for i in books],
                  "title": [f"Book {i}" for i in books]}).to_csv(root / "books_items.csv", index=False)
    pd.DataFrame({"item_id": [f"m{i}" for i in music],
                  "text": [f"Song {i}" for i in music]}).to_csv(root / "music_items.csv", index=False)


def write_config(root: Path, **data) -> Path:
    write_domains(root)
    config = {
        "run_dir": str(root / "run"),
        "embedding": {"encoder": "fake", "cache_dir": str(root / "cache")},  # fake_embed_texts
        "data": {
            "root": str(root),
            "domains": {
                "Books": {"format": "csv", "interactions": "books.csv", "items": "books_items.csv"},
                "Music": {"format": "csv", "interactions": "music.csv", "items": "music_items.csv",
                          "text_template": "{text}"},
            },
            "source": ["Books"],
            "target": "Music",
            **data,
        },
    }
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def prepared_items(root: Path) -> pd.DataFrame:
    return pq.read_table(root / "run" / "prepared" / "items.parquet").to_pandas()


def test_each_domain_has_its_own_text_template(tmp_path, fake_encoder):
    path = write_config(tmp_path, text_template="{title}")
    data = yaml.safe_load(path.read_text())
    data["data"]["domains"]["Music"]["text_template"] = "Track: {text}"
    path.write_text(yaml.safe_dump(data))
    result = runner.invoke(app, ["prepare", "-c", str(path)])
    assert result.exit_code == 0, result.output
    items = prepared_items(tmp_path).set_index("item_id")
    assert items.loc["b1", "text"] == "Book 1"  # data.text_template
    assert items.loc["m2", "text"] == "Track: Song 2"  # data.domains.Music.text_template


def test_a_domain_template_field_its_item_file_lacks_is_a_config_error(tmp_path, fake_encoder):
    path = write_config(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["data"]["domains"]["Music"]["text_template"] = "{title}"  # Music items have `text`
    path.write_text(yaml.safe_dump(data))
    result = runner.invoke(app, ["prepare", "-c", str(path)])
    assert result.exit_code == 2
    assert "data.domains.Music.text_template: field {title} is not a column" in result.stderr
    assert not (tmp_path / "run" / "prepared").exists()


def test_sigterm_stops_prepare_with_exit_130_and_writes_nothing(tmp_path, monkeypatch):
    def embed_then_terminated(texts, cfg, device="cpu", progress=True, stop=None, counts=None):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while embedding
        assert stop is not None and stop()  # the embedder is asked to stop after its chunk
        return fake_embed_texts(texts, cfg)

    monkeypatch.setattr(prepare, "embed_texts", embed_then_terminated)
    before = signal.getsignal(signal.SIGTERM)
    result = runner.invoke(app, ["prepare", "-c", str(write_config(tmp_path))])
    assert result.exit_code == 130, result.output
    assert "prepare: stopped after embedding (the embeddings are cached)" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: stopped by SIGTERM")
    assert not (tmp_path / "run" / "prepared").exists()
    assert signal.getsignal(signal.SIGTERM) == before  # the handler was put back


def test_the_catalogue_holds_every_listed_item_and_prepare_counts_the_quiet_ones(tmp_path, fake_encoder):
    path = write_config(tmp_path)
    result = runner.invoke(app, ["prepare", "-c", str(path)])
    assert result.exit_code == 0, result.output
    items = prepared_items(tmp_path)
    by_domain = items.groupby("domain")["item_id"].apply(set).to_dict()
    assert by_domain["Books"] == {f"b{i}" for i in [*range(12), 20]}
    assert by_domain["Music"] == {f"m{i}" for i in [*range(12), 17, 18, 19]}
    assert items.set_index("item_id").loc["m19", "text"] == "Song 19"  # ranked by its text
    assert "catalogue: 3 of 28 items have no interactions" in result.stdout
    manifest = json.loads((tmp_path / "run" / "prepared" / "manifest.json").read_text())
    assert manifest["domains"]["Music"]["items_without_interactions"] == 2
    assert manifest["domains"]["Music"]["n_items"] == 15

    # The cleaning filters remove an item with its interactions (m17), not the never-bought ones.
    result = runner.invoke(app, ["prepare", "-c", str(path), "data.min_item_interactions=2"])
    assert result.exit_code == 0, result.output
    music = set(prepared_items(tmp_path).query("domain == 'Music'")["item_id"])
    assert music == {f"m{i}" for i in [*range(12), 18, 19]}

    # data.catalogue: interacted keeps the items with interactions only.
    result = runner.invoke(app, ["prepare", "-c", str(path), "data.catalogue=interacted"])
    assert result.exit_code == 0, result.output
    music = set(prepared_items(tmp_path).query("domain == 'Music'")["item_id"])
    assert music == {f"m{i}" for i in [*range(12), 17]}
    assert "data.catalogue: interacted" in result.stdout


def test_a_text_model_recommends_items_no_one_bought(tmp_path, fake_encoder):
    path = write_config(tmp_path)
    data = yaml.safe_load(path.read_text())
    data.update({
        "device": "cpu",
        "model": {"d_model": 8, "n_layers": 1, "n_heads": 2, "max_seq_len": 4, "n_experts": 2},
        "pretrain": {"train": {"epochs": 1, "batch_size": 8, "patience": 0}},
        "finetune": {"strategy": "zero_shot"},
        "recommend": {"k": 15, "exclude_seen": False},
    })
    path.write_text(yaml.safe_dump(data))
    for stage in ("prepare", "pretrain-source", "finetune-target"):
        result = runner.invoke(app, [stage, "-c", str(path)])
        assert result.exit_code == 0, result.output
    out = tmp_path / "recs.parquet"
    result = runner.invoke(app, ["recommend", "-c", str(path), "--output", str(out)])
    assert result.exit_code == 0, result.output
    recs = pq.read_table(out).to_pandas()
    assert set(recs.loc[recs["user_id"] == "u0", "item_id"]) >= {"m18", "m19"}
