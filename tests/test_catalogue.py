"""Data fidelity of `trec prepare`: per-domain text templates, catalogues from the item files."""

from __future__ import annotations

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
    items no one interacted with (b9, m8, m9)."""
    rows = []
    for u in range(6):
        rows += [(f"u{u}", f"b{(u + k) % 5}", 10 * k) for k in range(4)]
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(root / "books.csv", index=False)
    rows = []
    for u in range(6):
        rows += [(f"u{u}", f"m{(2 * u + k) % 6}", 100 + 10 * k) for k in range(3)]
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(root / "music.csv", index=False)
    pd.DataFrame({"item_id": [f"b{i}" for i in (0, 1, 2, 3, 4, 9)],
                  "title": [f"Book {i}" for i in (0, 1, 2, 3, 4, 9)]}).to_csv(root / "books_items.csv", index=False)
    pd.DataFrame({"item_id": [f"m{i}" for i in (0, 1, 2, 3, 4, 5, 8, 9)],
                  "text": [f"Song {i}" for i in (0, 1, 2, 3, 4, 5, 8, 9)]}).to_csv(root / "music_items.csv", index=False)


def write_config(root: Path, **data) -> Path:
    write_domains(root)
    config = {
        "run_dir": str(root / "run"),
        "embedding": {"cache_dir": str(root / "cache")},
        "data": {
            "root": str(root),
            "domains": {
                "Books": {"format": "csv", "interactions": "books.csv", "items": "books_items.csv"},
                "Music": {"format": "csv", "interactions": "music.csv", "items": "music_items.csv"},
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
    def embed_then_terminated(texts, cfg, device="cpu", progress=True, stop=None):
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
