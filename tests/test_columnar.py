"""`data.engine: polars` writes the same prepared files, byte for byte, as the pandas path."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import fake_embed_texts

pytest.importorskip("polars")

from trecsys.artifacts import read_manifest  # noqa: E402
from trecsys.config import ExperimentConfig, build  # noqa: E402
from trecsys.errors import DataError  # noqa: E402
from trecsys.ingest import columnar  # noqa: E402
from trecsys.stages import prepare  # noqa: E402

FILES = ("items.parquet", "interactions.parquet", "item_embeddings.parquet")


@pytest.fixture(autouse=True)
def fake_encoder(monkeypatch):
    monkeypatch.setattr(prepare, "embed_texts", fake_embed_texts)


def run_both(tmp_path: Path, data: dict, monkeypatch=None) -> dict[str, Path]:
    """prepare with each engine; assert identical files and manifest statistics. With
    `monkeypatch`, the polars engine must read every domain with its own fast readers."""
    out = {}
    for engine in ("pandas", "polars"):
        if monkeypatch is not None and engine == "polars":
            monkeypatch.setattr(columnar, "read_domain", _no_fallback)
        cfg = build(ExperimentConfig, {"run_dir": str(tmp_path / engine), "data": {**data, "engine": engine}})
        prepare.run(cfg)
        out[engine] = tmp_path / engine / "prepared"
    for name in FILES:
        assert (out["pandas"] / name).read_bytes() == (out["polars"] / name).read_bytes(), name
    stats = [read_manifest(out[e], stage="prepare")["domains"] for e in ("pandas", "polars")]
    assert stats[0] == stats[1]
    return out


def _no_fallback(name, *args):
    raise AssertionError(f"domain {name!r} went to the pandas reader")


def review(user, item, seconds, rating=5.0, **extra) -> dict:
    return {"rating": rating, "title": "t", "text": "x", "asin": item, "parent_asin": item, "user_id": user,
            "timestamp": seconds * 1000, "helpful_vote": 0, "verified_purchase": True, **extra}


def write_jsonl(path: Path, records: list[dict], gz: bool = False) -> str:
    text = "".join(json.dumps(r) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path.name


def amazon_domain(tmp_path: Path, name: str, users: int, items: int, seed: int, gz: bool = False,
                  bad_line: bool = False) -> dict:
    """Reviews with duplicates, same-second ties, low ratings and a long tail (for the k-core)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    records = []
    for u in range(users):
        for _ in range(int(rng.integers(1, 9))):
            item = f"B0{name[:2].upper()}{int(rng.zipf(1.5)) % items:06d}"
            records.append(review(f"A{u:05d}X", item, int(rng.integers(100, 130)), float(rng.integers(1, 6))))
    records += records[:5]  # exact duplicates
    meta = [{"parent_asin": f"B0{name[:2].upper()}{i:06d}", "title": f"{name} thing {i}", "store": "S",
             "categories": [name, "Sub"], "price": 9.5, "features": ["f"], "description": ["d"]}
            for i in range(items)]
    reviews = write_jsonl(tmp_path / f"{name}.jsonl{'.gz' if gz else ''}", records, gz)
    if bad_line:
        with open(tmp_path / reviews, "a", encoding="utf-8") as handle:
            handle.write('{"user_id": "A1", "parent_asin": \n')
    return {"format": "amazon2023", "interactions": reviews, "items": write_jsonl(tmp_path / f"meta_{name}.jsonl", meta)}


def test_amazon_with_filters_and_gzip_is_identical(tmp_path, monkeypatch):
    data = {"root": str(tmp_path), "source": ["Kitchen"], "target": "Food",
            "domains": {"Kitchen": amazon_domain(tmp_path, "Kitchen", 60, 40, 0, gz=True),
                        "Food": amazon_domain(tmp_path, "Food", 50, 30, 1)},
            "rating_threshold": 2.0, "min_user_interactions": 2, "min_item_interactions": 2,
            "text_template": "{title}. {brand}"}
    out = run_both(tmp_path, data, monkeypatch)
    table = pq.read_table(out["polars"] / "interactions.parquet")
    assert table.num_rows > 100 and pa.compute.min(table["rating"]).as_py() >= 2.0


def test_temporal_split_and_bad_lines_skipped_are_identical(tmp_path):
    data = {"root": str(tmp_path), "source": ["Kitchen"], "target": "Food", "on_bad_rows": "skip",
            "domains": {"Kitchen": amazon_domain(tmp_path, "Kitchen", 40, 30, 2),
                        "Food": amazon_domain(tmp_path, "Food", 40, 20, 3, bad_line=True)},
            "split": "temporal", "temporal_holdout": 0.2}
    out = run_both(tmp_path, data)
    assert read_manifest(out["polars"], stage="prepare")["domains"]["Food"]["skipped_rows"] == 1


def test_a_bad_line_names_its_line_under_both_engines(tmp_path):
    domains = {"Food": amazon_domain(tmp_path, "Food", 10, 5, 4, bad_line=True)}
    messages = []
    for engine in ("pandas", "polars"):
        cfg = build(ExperimentConfig, {"run_dir": str(tmp_path / engine), "data": {
            "root": str(tmp_path), "target": "Food", "domains": domains, "engine": engine}})
        with pytest.raises(DataError) as caught:
            prepare.run(cfg)
        messages.append(str(caught.value))
    assert messages[0] == messages[1] and "Food.jsonl:" in messages[0]


def test_synthetic_shop_is_identical(tmp_path):
    run_both(tmp_path, {"domains": {"Kitchen": {"format": "synthetic"}, "Food": {"format": "synthetic"}},
                        "source": ["Kitchen"], "target": "Food", "synthetic": {"n_users": 200, "n_items_per_domain": 80},
                        "min_item_interactions": 3})


def test_parquet_folder_of_parts_reads_as_the_single_file(tmp_path, monkeypatch):
    """A folder of part files (as Spark writes them) prepares to the same files as one Parquet file,
    under both engines; integer ids and a given split column included."""
    rows = pd.DataFrame({
        "uid": [3, 1, 1, 2, 3, 1, 2, 3, 2, 1, 3, 2],
        "sku": [10, 11, 12, 10, 12, 10, 11, 11, 12, 13, 13, 13],
        "ts": [5, 1, 2, 3, 6, 3, 4, 7, 5, 9, 9, 8],
        "stars": [5.0, 4.0, 3.0, 5.0, 2.0, 1.0, 4.0, 5.0, 3.0, 4.0, 5.0, 2.0],
        "part": ["train", "train", "train", "train", "valid", "valid", "valid", "test", "test", "test", "train", "train"],
    })
    pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), tmp_path / "one.parquet")
    (tmp_path / "parts").mkdir()
    for i, lo in enumerate(range(0, len(rows), 5)):
        pq.write_table(pa.Table.from_pandas(rows.iloc[lo:lo + 5], preserve_index=False),
                       tmp_path / "parts" / f"part-{i:05d}.parquet")
    columns = {"user": "uid", "item": "sku", "time": "ts", "rating": "stars", "split": "part"}
    prepared = {}
    for source in ("one.parquet", "parts"):
        data = {"root": str(tmp_path), "target": "Shop", "split": "given",
                "domains": {"Shop": {"format": "parquet", "interactions": source, "columns": columns}}}
        prepared[source] = run_both(tmp_path / f"run_{source}", data, monkeypatch)["polars"]
    for name in FILES:
        assert (prepared["one.parquet"] / name).read_bytes() == (prepared["parts"] / name).read_bytes()
    table = pq.read_table(prepared["parts"] / "interactions.parquet").to_pandas()
    assert sorted(table["user_id"].unique()) == ["1", "2", "3"] and set(table["split"]) == {"train", "valid", "test"}


def test_items_without_any_text_are_an_error_under_both_engines(tmp_path):
    """Metadata that lists every item but gives none a text field: both engines refuse it with the
    same message (the polars engine used to miss it: it looked for the items in raw rows it no
    longer keeps)."""
    domain = amazon_domain(tmp_path, "Food", 30, 10, 5)
    meta = [{"parent_asin": f"B0FO{i:06d}", "title": " "} for i in range(10)]
    domain["items"] = write_jsonl(tmp_path / "meta_blank.jsonl", meta)
    messages = []
    for engine in ("pandas", "polars"):
        cfg = build(ExperimentConfig, {"run_dir": str(tmp_path / engine), "data": {
            "root": str(tmp_path), "target": "Food", "domains": {"Food": domain}, "engine": engine,
            "min_user_interactions": 1, "min_item_interactions": 1}})
        with pytest.raises(DataError) as caught:
            prepare.run(cfg)
        messages.append(str(caught.value))
    assert messages[0] == messages[1] and "has any text" in messages[0]
