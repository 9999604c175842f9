"""`trec recommend` on the tiny prepared run with small random checkpoints: what the lists hold, that
they are the model's exact ranking, fusion, filters, MMR, new users, queries, and cron safety."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
import yaml
from conftest import tiny_config, write_tiny_prepared
from typer.testing import CliRunner

from trecsys.artifacts import (
    parquet_metadata,
    read_json,
    read_parquet,
    run_lock,
    write_manifest,
    write_parquet,
)
from trecsys.cli import app
from trecsys.config import ModelConfig, load_config
from trecsys.errors import ArtifactError, ConfigError, DataError, LockBusyError
from trecsys.model.checkpoint import load_checkpoint, save_checkpoint
from trecsys.model.seqrec import SeqRecModel
from trecsys.prepared.tables import load_prepared
from trecsys.rank.rerank import mmr_rerank
from trecsys.stages import recommend as stage
from trecsys.train.windows import history_batch

REPO = Path(__file__).resolve().parents[1]
TARGET = (54, 70)  # the tiny run's Food items: item_idx 54..69, ids F000..F015, titles "Food item j"
K = 5  # every tiny Food user has at least 5 items left unseen


def idx(item_id: str) -> int:
    return TARGET[0] + int(item_id[1:])


def item_id(index: int) -> str:
    return f"F{index - TARGET[0]:03d}"


def write_config(run_dir: Path, **recommend) -> Path:
    """conftest's tiny_config with a `recommend` section."""
    path = tiny_config(run_dir, run_dir.parent / f"{run_dir.name}.yaml")
    data = yaml.safe_load(path.read_text())
    data["recommend"] = {"k": K, **recommend}
    path.write_text(yaml.safe_dump(data))
    return path


def save_model(folder: Path, run_dir: Path, seed: int = 0, extra: dict | None = None, n_items: int | None = None,
               **model) -> Path:
    prepared = load_prepared(run_dir)
    torch.manual_seed(seed)
    cfg = ModelConfig(**{"d_model": 16, "n_layers": 1, "n_heads": 2, "max_seq_len": 8, "dropout": 0.0,
                         "n_experts": 2, **model})
    save_checkpoint(SeqRecModel(cfg, prepared.embeddings.shape[1], n_items or prepared.n_items), folder,
                    extra=extra)
    return folder


def direct_scores(run_dir: Path, user: str, domains: tuple[str, ...] = ("Food",)) -> tuple[torch.Tensor, np.ndarray]:
    """The finetune model's Food scores for a user's history in `domains`, by a direct forward pass."""
    prepared = load_prepared(run_dir)
    model, _ = load_checkpoint(run_dir / "finetune")
    model.set_item_text(torch.from_numpy(prepared.embeddings))
    inter = prepared.interactions
    history = inter.loc[(inter["user_id"] == user) & inter["domain"].isin(domains), "item_idx"].to_numpy()
    with torch.no_grad():
        scores = model.score(model.user_state(history_batch([history], 8)), model.item_reps(*TARGET))[0]
    return scores, history


def ranked(scores: torch.Tensor, k: int) -> list[str]:
    """The tie rule by hand: score descending, then the lower index."""
    order = sorted(range(len(scores)), key=lambda j: (-float(scores[j]), j))
    return [item_id(TARGET[0] + j) for j in order if float(scores[j]) != -np.inf][:k]


def recommend(run_dir: Path, overrides: list[str] | None = None, **options) -> pd.DataFrame:
    out = stage.run(load_config(write_config(run_dir), overrides or []), **options)
    return pd.read_parquet(out.parquet)


@pytest.fixture
def run_dir(tiny_prepared) -> Path:
    save_model(tiny_prepared / "finetune", tiny_prepared)
    return tiny_prepared


@pytest.fixture
def fake_encoder(monkeypatch, tiny_prepared):
    """embed_texts for the tiny run: a catalogue item's text gets that item's prepared embedding, so a
    new item described like a known one is the known one to the model; other texts get a seeded vector."""
    from trecsys.ingest import embed

    prepared = load_prepared(tiny_prepared)
    by_text = dict(zip(prepared.items["text"], prepared.embeddings, strict=True))
    info = {k: prepared.manifest.encoder_record[k] for k in ("name", "revision", "pooling", "dim")}

    def fake(texts, cfg, device="cpu", progress=True, cache=True):
        rows = [by_text[t] if t in by_text else np.random.default_rng(len(t)).standard_normal(16) for t in texts]
        return np.stack(rows).astype(np.float32), info

    monkeypatch.setattr(embed, "embed_texts", fake)
    return fake


def food_histories(run_dir: Path) -> dict[str, set[str]]:
    inter = pd.read_parquet(run_dir / "prepared" / "interactions.parquet")
    inter = inter[inter["domain"] == "Food"]
    return {u: {item_id(i) for i in g["item_idx"]} for u, g in inter.groupby("user_id")}


def users_without_food(run_dir: Path) -> list[str]:
    inter = pd.read_parquet(run_dir / "prepared" / "interactions.parquet")
    return sorted(set(inter["user_id"]) - set(inter.loc[inter["domain"] == "Food", "user_id"]))


def lists(frame: pd.DataFrame, key: str = "user_id") -> dict[str, list[str]]:
    return {u: g.sort_values("rank")["item_id"].tolist() for u, g in frame.groupby(key, sort=False)}


# ---------------------------------------------------------------------------------------------
# The lists


def test_lists_are_the_models_exact_ranking_with_seen_items_excluded(run_dir, capsys):
    recs = recommend(run_dir, show=2)
    seen = food_histories(run_dir)
    assert list(recs.columns) == ["user_id", "rank", "item_id", "score"]
    assert set(recs["user_id"]) == set(seen)  # every user of the target domain, by original id
    assert recs.groupby("user_id")["rank"].apply(list).map(lambda r: r == list(range(1, K + 1))).all()
    assert recs["item_id"].map(lambda i: TARGET[0] <= idx(i) < TARGET[1]).all()
    for user, items in lists(recs).items():
        assert not set(items) & seen[user]
    assert (recs.groupby("user_id")["score"].diff().dropna() <= 0).all()

    # The same numbers from a direct forward pass: state after the whole Food history, dot product.
    for user in ("u1", "u2", "u7"):
        scores, history = direct_scores(run_dir, user)
        scores[history - TARGET[0]] = -torch.inf
        mine = recs[recs["user_id"] == user]
        assert mine["item_id"].tolist() == ranked(scores, K)
        assert np.allclose(mine["score"], [float(scores[idx(i) - TARGET[0]]) for i in mine["item_id"]], atol=1e-5)

    printed = capsys.readouterr()
    assert "user u1:" in printed.out and "Food item" in printed.out and "users/s ranking" in printed.err


def test_a_model_trained_with_source_context_reads_it(run_dir):
    """finetune.history: all_domains in the checkpoint: the user's source items interleaved, as in training."""
    save_model(run_dir / "finetune", run_dir, extra={"history": "all_domains"})
    recs = recommend(run_dir, ["recommend.exclude_seen=false"])
    for user in ("u1", "u2"):
        scores, history = direct_scores(run_dir, user, ("Books", "Games", "Food"))
        assert (history < TARGET[0]).any() and (history >= TARGET[0]).any()
        assert recs.loc[recs["user_id"] == user, "item_id"].tolist() == ranked(scores, K)


def test_output_metadata_manifest_and_partition_by_date(run_dir):
    out = stage.run(load_config(write_config(run_dir)))
    day = time.strftime("%Y-%m-%d")
    assert out.parquet == run_dir / "recommend" / f"date={day}" / "recommendations.parquet"
    meta = parquet_metadata(out.parquet)
    context = json.loads(meta["trecsys.recommend"])
    assert context["models"][0]["model"] == str(run_dir / "finetune")
    assert len(meta["model_sha256"]) == 64 and meta["created_at"].startswith(day)
    manifest = read_json(out.manifest)
    assert manifest["stage"] == "recommend" and [o["path"] for o in manifest["outputs"]] == ["recommendations.parquet"]
    # The partition folder reads as a dataset: the companions start with "_" and are skipped.
    dataset = pd.read_parquet(run_dir / "recommend")
    assert len(dataset) == K * len(food_histories(run_dir)) and set(dataset["date"].astype(str)) == {day}


def test_same_lists_for_any_batch_and_chunk_size(run_dir):
    first = recommend(run_dir)
    for overrides in (["recommend.user_batch=7", "recommend.item_chunk=3"], ["recommend.user_batch=1"]):
        second = recommend(run_dir, overrides)
        pd.testing.assert_frame_equal(first.drop(columns="score"), second.drop(columns="score"))
        # Matrix products of other shapes may round the last bit of a float32 score differently.
        assert np.allclose(first["score"], second["score"], rtol=1e-6, atol=1e-6)


def test_exclude_seen_off_and_k(run_dir):
    recs = recommend(run_dir, ["recommend.exclude_seen=false", "recommend.k=16"])
    assert (recs.groupby("user_id").size() == 16).all()  # the whole catalogue, seen items included
    recs = recommend(run_dir, ["recommend.k=100"])  # beyond the catalogue: every unseen item once
    seen = food_histories(run_dir)
    sizes = recs.groupby("user_id").size()
    assert all(sizes[u] == 16 - len(seen[u]) for u in sizes.index)


def test_ranked_seen_items_carry_the_models_seen_offset(run_dir):
    """With exclude_seen off, a user's own items score the model's seen offset (model.seen_bias) higher."""
    model, _ = load_checkpoint(run_dir / "finetune")
    with torch.no_grad():
        model.seen_bias.fill_(0.1)  # +1.0 on the scores: users who buy again
    save_checkpoint(model, run_dir / "finetune")
    recs = recommend(run_dir, ["recommend.exclude_seen=false", "recommend.k=16"])
    moved = 0
    for user in ("u1", "u2", "u7"):
        raw, history = direct_scores(run_dir, user)
        scores = raw.clone()
        scores[np.unique(history) - TARGET[0]] += 1.0
        mine = recs[recs["user_id"] == user]
        assert mine["item_id"].tolist() == ranked(scores, 16)
        assert np.allclose(mine["score"], [float(scores[idx(i) - TARGET[0]]) for i in mine["item_id"]], atol=1e-5)
        moved += ranked(scores, 16) != ranked(raw, 16)
    assert moved  # the offset changed some list: the check above can tell


@pytest.mark.parametrize("overrides", [[], ["recommend.exclude_seen=false"]])
def test_the_hnsw_index_finds_the_exact_lists_of_a_small_catalogue(run_dir, overrides, monkeypatch):
    """16 items and efSearch 64: the graph search visits every item, so the approximate path must give
    the exact lists, seen items excluded or ranked with the model's (here positive) seen offset."""
    pytest.importorskip("faiss")
    from trecsys.rank.ann import HNSWIndex

    searched, topk = [], HNSWIndex.topk
    monkeypatch.setattr(HNSWIndex, "topk", lambda self, *a: searched.append(1) or topk(self, *a))
    model, _ = load_checkpoint(run_dir / "finetune")
    with torch.no_grad():
        model.seen_bias.fill_(0.1)
    save_checkpoint(model, run_dir / "finetune")
    exact = recommend(run_dir, [*overrides, "recommend.k=12"])
    approximate = recommend(run_dir, [*overrides, "recommend.k=12", "recommend.index=hnsw"])
    assert searched and lists(approximate) == lists(exact)
    assert np.allclose(approximate["score"], exact["score"], atol=1e-5)


def test_the_hnsw_index_ranks_one_model_only_and_needs_faiss(run_dir, monkeypatch):
    pytest.importorskip("faiss")
    fused = ["recommend.index=hnsw", "recommend.fusion=[{model: latest}, {model: popularity}]"]
    with pytest.raises(ConfigError, match="'recommend.index'.*fusion"):
        recommend(run_dir, fused)
    monkeypatch.setitem(sys.modules, "faiss", None)  # as if it were not installed
    with pytest.raises(ConfigError, match="'recommend.index'.*pip install faiss-cpu"):
        recommend(run_dir, ["recommend.index=hnsw"])


def test_fusion_with_one_model_equals_that_model(run_dir):
    alone = recommend(run_dir)
    fused = recommend(run_dir, [f"recommend.fusion=[{{model: {run_dir / 'finetune'}, weight: 3.0}}]"])
    pd.testing.assert_frame_equal(alone, fused)
    popular = recommend(run_dir, ["recommend.fusion=[{model: popularity}]"])
    inter = pd.read_parquet(run_dir / "prepared" / "interactions.parquet").query("domain == 'Food'")
    counts = inter["item_idx"].map(item_id).value_counts()
    by_count = sorted(counts.index, key=lambda i: (-counts[i], i))
    seen = food_histories(run_dir)
    for user, items in lists(popular).items():
        assert items == [i for i in by_count if i not in seen[user]][:K]


def test_fusion_sums_z_scores_over_the_catalogue(run_dir):
    overrides = ["recommend.fusion=[{model: latest, weight: 0.7}, {model: popularity, weight: 0.3}]",
                 "recommend.exclude_seen=false"]
    fused = recommend(run_dir, overrides)
    inter = pd.read_parquet(run_dir / "prepared" / "interactions.parquet").query("domain == 'Food'")
    counts = np.bincount(inter["item_idx"].to_numpy() - TARGET[0], minlength=16).astype(np.float64)
    scores, _ = direct_scores(run_dir, "u2")
    scores = scores.double().numpy()
    z = lambda s: (s - s.mean()) / s.std()  # noqa: E731
    total = 0.7 * z(scores) + 0.3 * z(counts)
    mine = fused[fused["user_id"] == "u2"]
    assert mine["item_id"].tolist() == ranked(torch.from_numpy(total), K)
    assert np.allclose(mine["score"], np.sort(total)[::-1][:K], atol=1e-4)
    # Statistics merged chunk by chunk give the same lists.
    chunked = recommend(run_dir, [*overrides, "recommend.item_chunk=3"])
    assert lists(chunked) == lists(fused)
    assert np.allclose(chunked["score"], fused["score"], atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Filters and diversity


def add_categories(run_dir: Path) -> None:
    """Give the tiny run's items categories (rewriting the prepared manifest to match)."""
    folder = run_dir / "prepared"
    items = pd.read_parquet(folder / "items.parquet")
    items["category"] = [f"Food > {'Snacks' if i % 3 == 0 else 'Drinks' if i % 3 == 1 else 'Tea, Coffee'}"
                         for i in items["item_idx"]]
    write_parquet(pa.Table.from_pandas(items, preserve_index=False), folder / "items.parquet")
    manifest = read_json(folder / "manifest.json")
    generated = {"trecsys_version", "stage", "created_at", "host", "config", "inputs", "outputs"}
    write_manifest(folder, "prepare", manifest["config"], manifest["inputs"],
                   {k: v for k, v in manifest.items() if k not in generated})


def test_category_filters(run_dir):
    add_categories(run_dir)
    category = {item_id(i): i % 3 for i in range(*TARGET)}
    recs = recommend(run_dir, ["recommend.include_categories=[snacks, Coffee]"])
    assert set(recs["item_id"].map(category)) == {0, 2}
    recs = recommend(run_dir, ["recommend.exclude_categories=[Drinks]", "recommend.k=16"])
    assert set(recs["item_id"].map(category)) == {0, 2}
    seen = food_histories(run_dir)
    sizes = recs.groupby("user_id").size()  # fewer than k when fewer items pass: never a filtered one
    assert all(sizes[u] == sum(1 for i in range(*TARGET) if i % 3 != 1 and item_id(i) not in seen[u])
               for u in sizes.index)
    recs = recommend(run_dir, ["recommend.include_categories=[Food]", "recommend.exclude_categories=[Tea]"])
    assert set(recs["item_id"].map(category)) == {0, 1}
    with pytest.raises(ConfigError, match=r"recommend\.include_categories.*no item of domain 'Food' passes"):
        recommend(run_dir, ["recommend.include_categories=[Toys]"])


def test_category_filter_without_categories_is_a_config_error(run_dir):
    with pytest.raises(ConfigError, match=r"recommend\.exclude_categories.*no category"):
        recommend(run_dir, ["recommend.exclude_categories=[Snacks]"])


def test_mmr_weight_zero_is_plain_top_k_and_weight_spreads_the_list():
    gen = torch.Generator().manual_seed(0)
    values = torch.sort(torch.randn(5, 30, generator=gen), dim=1, descending=True).values
    values[:, 10] = values[:, 9]  # a tie: the better-ranked candidate wins
    values[4, 20:] = -torch.inf  # a row with only 20 candidates
    index = torch.stack([torch.randperm(40, generator=gen)[:30] for _ in range(5)])
    unit = torch.nn.functional.normalize(torch.randn(40, 6, generator=gen), dim=1)
    got_values, got_index = mmr_rerank(values, index, unit, 25, 0.0)
    assert torch.equal(got_index[:4], index[:4, :25]) and torch.equal(got_values[:4], values[:4, :25])
    assert torch.equal(got_index[4, :20], index[4, :20]) and torch.isinf(got_values[4, 20:]).all()

    # Items 0 and 1 are the same text; with weight 0.5 the near-duplicate 1 waits behind 2.
    unit = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    picks = mmr_rerank(torch.tensor([[3.0, 2.9, 2.0]]), torch.tensor([[0, 1, 2]]), unit, 3, 0.5)[1]
    assert picks.tolist() == [[0, 2, 1]]


def test_diversity_lowers_list_similarity(run_dir):
    prepared = load_prepared(run_dir)
    emb = torch.nn.functional.normalize(torch.from_numpy(prepared.embeddings), dim=1)

    def mean_similarity(frame):
        out = []
        for items in lists(frame).values():
            e = emb[[idx(i) for i in items]]
            sim = e @ e.T
            out.append(float((sim.sum() - sim.trace()) / (len(items) * (len(items) - 1))))
        return np.mean(out)

    plain = recommend(run_dir)
    diverse = recommend(run_dir, ["recommend.diversity=0.7", "recommend.diversity_candidates=16"])
    assert mean_similarity(diverse) < mean_similarity(plain) - 0.05
    seen = food_histories(run_dir)
    for user, items in lists(diverse).items():
        assert len(items) == K == len(set(items)) and not set(items) & seen[user]


# ---------------------------------------------------------------------------------------------
# Who gets a list: --users, --histories, queries


def test_unknown_users_go_to_the_warning_file(run_dir, tmp_path, capsys):
    users = tmp_path / "users.txt"
    users.write_text("u1\nnobody\n\nu2\nu1\nghost\n")
    out_file = tmp_path / "out" / "recs.parquet"
    recs = recommend(run_dir, users=str(users), output=str(out_file))
    assert list(dict.fromkeys(recs["user_id"])) == ["u1", "u2"]
    unknown = tmp_path / "out" / "_recs.unknown_users.txt"
    assert unknown.read_text().split() == ["nobody", "ghost"]
    assert "2 of 4 requested user ids are not in the prepared data" in capsys.readouterr().err
    manifest = read_json(tmp_path / "out" / "_recs.manifest.json")
    assert {o["path"] for o in manifest["outputs"]} == {"recs.parquet", "_recs.unknown_users.txt"}

    # A Parquet list of users; no unknown ones this time, so the stale warning file goes.
    pd.DataFrame({"user_id": ["u4", "u3"]}).to_parquet(tmp_path / "users.parquet")
    recs = recommend(run_dir, users=str(tmp_path / "users.parquet"), output=str(out_file))
    assert list(dict.fromkeys(recs["user_id"])) == ["u4", "u3"] and not unknown.exists()

    before = out_file.read_bytes()
    with pytest.raises(DataError, match=r"--users .*users\.txt: 2 user id\(s\) are not in the prepared data.*--strict"):
        recommend(run_dir, users=str(users), output=str(out_file), strict=True)
    assert out_file.read_bytes() == before
    users.write_text("x\ny\n")
    with pytest.raises(DataError, match=r"none of its 2 user ids"):
        recommend(run_dir, users=str(users))
    users.write_text("\n")
    with pytest.raises(DataError, match=r"lists no user ids"):
        recommend(run_dir, users=str(users))


def test_user_known_only_in_the_source_is_read_from_their_source_history(run_dir, tmp_path):
    outsiders = users_without_food(run_dir)[:2]
    users = tmp_path / "users.txt"
    users.write_text("\n".join(outsiders) + "\n")
    recs = recommend(run_dir, users=str(users))
    assert set(recs["user_id"]) == set(outsiders)
    scores, history = direct_scores(run_dir, outsiders[0], ("Books", "Games"))
    assert len(history) and lists(recs)[outsiders[0]] == ranked(scores, K)


def test_new_users_with_new_items_given_by_text(run_dir, tmp_path, fake_encoder):
    histories = tmp_path / "new.jsonl"
    lines = [
        {"user_id": "new1", "item_ids": ["F003", "NEW-A"], "texts": [None, "Food item 8"]},
        {"user_id": "new2", "item_ids": ["F003", "F008"]},
        {"user_id": "u1", "item_ids": ["F011"], "titles": ["ignored: the catalogue knows F011"]},
    ]
    histories.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    recs = recommend(run_dir, ["recommend.exclude_seen=false"], histories=str(histories))
    got = lists(recs)
    assert list(got) == ["new1", "new2", "u1"]
    assert got["new1"] == got["new2"]  # the new item reads exactly like the catalogue item with its text
    assert np.allclose(recs.loc[recs["user_id"] == "new1", "score"], recs.loc[recs["user_id"] == "new2", "score"])
    assert got["u1"] != lists(recommend(run_dir, ["recommend.exclude_seen=false"]))["u1"]  # the file's history wins

    # The same histories as Parquet, one row per interaction.
    rows = pd.DataFrame({"user_id": ["new1", "new1", "new2", "new2"], "item_id": ["F003", "NEW-A", "F003", "F008"],
                         "text": [None, "Food item 8", None, None]})
    rows.to_parquet(tmp_path / "new.parquet")
    again = recommend(run_dir, ["recommend.exclude_seen=false"], histories=str(tmp_path / "new.parquet"))
    assert lists(again) == {"new1": got["new1"], "new2": got["new2"]}
    # Seen items are excluded by default; a new item is not in the catalogue, so nothing to exclude for it.
    excluded = lists(recommend(run_dir, ["recommend.k=16"], histories=str(tmp_path / "new.parquet")))
    assert "F003" not in excluded["new1"] and "F008" in excluded["new1"] and "F008" not in excluded["new2"]


def test_bad_histories_name_the_item_and_line(run_dir, tmp_path, fake_encoder):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"user_id": "a", "item_ids": ["F001"]}) + "\n" +
                   json.dumps({"user_id": "b", "item_ids": ["F002", "MYSTERY"]}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: item 'MYSTERY' is not in the prepared catalogue and has no text"):
        recommend(run_dir, histories=str(bad))
    bad.write_text('{"user_id": "a", "item_ids": ["F001"]\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: not valid JSON"):
        recommend(run_dir, histories=str(bad))
    bad.write_text(json.dumps({"user_id": "a", "item_ids": ["F001", "X"], "texts": ["t"]}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: texts must be a list as long as item_ids"):
        recommend(run_dir, histories=str(bad))
    # A model with an ID table cannot represent an item it has never seen.
    save_model(run_dir / "finetune", run_dir, item_ids=True)
    bad.write_text(json.dumps({"user_id": "a", "item_ids": ["NEW"], "texts": ["a brand new tea"]}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: item 'NEW' is new to the catalogue.*model\.item_ids=true"):
        recommend(run_dir, histories=str(bad))


def test_query_mode_follows_reads_the_query_as_a_one_item_history(run_dir, tmp_path, fake_encoder, capsys):
    follows = "recommend.query_mode=follows"
    out = stage.run(load_config(write_config(run_dir), ["recommend.exclude_seen=false", follows]),
                    query=["Food item 8", "wireless earbuds"])
    assert out.parquet.parent.parent == run_dir / "queries"
    recs = pd.read_parquet(out.parquet)
    assert list(recs.columns) == ["query", "user_id", "rank", "item_id", "score"] and recs["user_id"].isna().all()
    assert "query 'Food item 8':" in capsys.readouterr().out
    histories = tmp_path / "one.jsonl"
    histories.write_text(json.dumps({"user_id": "x", "item_ids": ["F008"]}) + "\n")
    one_item = recommend(run_dir, ["recommend.exclude_seen=false"], histories=str(histories))
    assert lists(recs, "query")["Food item 8"] == lists(one_item)["x"]

    # Blended with a user: weight 1 is the user's own list (their seen items excluded), 0 the query's.
    config = load_config(write_config(run_dir), ["recommend.query_user_weight=1.0", follows])
    as_user = pd.read_parquet(stage.run(config, query=["Food item 8"], user="u1").parquet)
    assert as_user["item_id"].tolist() == lists(recommend(run_dir))["u1"]
    config = load_config(write_config(run_dir), ["recommend.query_user_weight=0.0", follows])
    queries = tmp_path / "q.txt"
    queries.write_text("Food item 8\n\n")
    as_query = pd.read_parquet(stage.run(config, queries=str(queries), user="u1").parquet)
    seen = food_histories(run_dir)["u1"]
    config = load_config(write_config(run_dir), ["recommend.exclude_seen=false", "recommend.k=16", follows])
    everything = pd.read_parquet(stage.run(config, query=["Food item 8"]).parquet)["item_id"].tolist()
    assert as_query["item_id"].tolist() == [i for i in everything if i not in seen][:K]
    halfway = pd.read_parquet(stage.run(load_config(write_config(run_dir), [follows]), query=["Food item 8"], user="u1").parquet)
    assert len(halfway) == K and not set(halfway["item_id"]) & seen
    with pytest.raises(DataError, match=r"--user 'nobody'"):
        stage.run(config, query=["tea"], user="nobody")


# ---------------------------------------------------------------------------------------------
# Bad input


def test_models_for_another_catalogue_are_refused(run_dir, tmp_path):
    other = tmp_path / "other"  # the same catalogue, other users: fine
    write_tiny_prepared(other, seed=1)
    save_model(other / "pretrain", other)
    assert len(recommend(run_dir, model=str(other / "pretrain"))) == K * len(food_histories(run_dir))

    wrong = tmp_path / "wrong"  # one title differs: another catalogue of the same size
    write_tiny_prepared(wrong)
    folder = wrong / "prepared"
    items = pd.read_parquet(folder / "items.parquet")
    items.loc[0, "title"] = "Another book"
    write_parquet(pa.Table.from_pandas(items, preserve_index=False), folder / "items.parquet")
    manifest = read_json(folder / "manifest.json")
    generated = {"trecsys_version", "stage", "created_at", "host", "config", "inputs", "outputs"}
    write_manifest(folder, "prepare", manifest["config"], [], {k: v for k, v in manifest.items() if k not in generated})
    save_model(wrong / "pretrain", wrong)
    with pytest.raises(ArtifactError, match=r"--model .*wrong/pretrain: .*wrong/prepared/items\.parquet .*differs"):
        recommend(run_dir, model=str(wrong / "pretrain"))

    lone = save_model(tmp_path / "lone", run_dir, n_items=71)  # no run around it: only its size is checked
    with pytest.raises(ArtifactError, match=r"lone/config\.json: the model was built for n_items=71 .* 70 items"):
        recommend(run_dir, model=str(lone))
    with pytest.raises(ArtifactError, match=r"is not a checkpoint folder"):
        recommend(run_dir, model=str(tmp_path))


def test_no_model_and_bad_options(tiny_prepared):
    with pytest.raises(ArtifactError, match=r"has no trained model.*recommend\.fusion=\[\{model: popularity\}\]"):
        recommend(tiny_prepared)
    with pytest.raises(ConfigError, match=r"--query/--queries .* --users"):
        recommend(tiny_prepared, query=["tea"], users="x.txt")
    with pytest.raises(ConfigError, match=r"--user blends"):
        recommend(tiny_prepared, user="u1")
    with pytest.raises(ConfigError, match=r"recommend\.fusion\[1\]\.weight"):
        recommend(tiny_prepared, ["recommend.fusion=[{model: popularity}, {model: itemknn, weight: 0}]"])
    with pytest.raises(ConfigError, match=r"recommend\.diversity"):
        recommend(tiny_prepared, ["recommend.diversity=1.5"])
    with pytest.raises(ConfigError, match=r"recommend\.domain.*'Toys'"):
        recommend(tiny_prepared, ["recommend.domain=Toys", "recommend.fusion=[{model: popularity}]"])


def test_other_domain_catalogue(run_dir):
    recs = recommend(run_dir, ["recommend.domain=Books", "recommend.fusion=[{model: itemknn}]"])
    assert recs["item_id"].str.startswith("B").all()
    inter = pd.read_parquet(run_dir / "prepared" / "interactions.parquet")
    assert set(recs["user_id"]) == set(inter.loc[inter["domain"] == "Books", "user_id"])


# ---------------------------------------------------------------------------------------------
# Cron safety: locks, atomic replacement, exit codes


def cli(config: Path, *args: str):
    return CliRunner().invoke(app, ["recommend", "-c", str(config), *args])


def test_a_second_run_on_the_same_output_waits_then_exits_3(run_dir, tmp_path):
    config = write_config(run_dir)
    output = tmp_path / "recs.parquet"
    with run_lock(output):
        started = time.monotonic()
        result = cli(config, "--output", str(output), "--wait", "0.5")
        assert result.exit_code == 3, result.output
        assert time.monotonic() - started >= 0.5
        assert "locked by another trecsys run" in result.stderr and not output.exists()

    release = threading.Event()

    def hold():
        with run_lock(output):
            release.wait(10)
            time.sleep(0.5)

    holder = threading.Thread(target=hold)
    holder.start()
    time.sleep(0.1)
    release.set()
    result = cli(config, "--output", str(output), "--wait", "10")
    holder.join()
    assert result.exit_code == 0, result.output
    assert output.is_file()
    with pytest.raises(LockBusyError):
        with run_lock(output), run_lock(output, wait_s=0.1):
            pass


def test_a_failure_before_the_rename_keeps_the_previous_output(run_dir, monkeypatch):
    out = stage.run(load_config(write_config(run_dir)))
    before = {p.name: p.read_bytes() for p in out.parquet.parent.iterdir()}
    import pyarrow.parquet as pq

    real_write = pq.write_table

    def write_then_fail(table, where, **kwargs):
        real_write(table.slice(0, 5), where, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        stage.run(load_config(write_config(run_dir), ["recommend.k=3"]))
    after = {p.name: p.read_bytes() for p in out.parquet.parent.iterdir()}
    assert after == before  # same files, same bytes: no temporary file left either


KILLER = """
import os, signal, sys
import pyarrow.parquet as pq
from trecsys.cli import main
real = pq.write_table
def write_then_die(table, where, **kwargs):
    real(table.slice(0, 3), where, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)  # killed mid-write: the temporary file exists, the rename never happens
pq.write_table = write_then_die
sys.argv = ["trec", "recommend", "-c", sys.argv[1], "recommend.k=3"]
main()
"""


@pytest.mark.slow
def test_a_killed_run_leaves_the_previous_output_intact(run_dir):
    config = write_config(run_dir)
    out = stage.run(load_config(config))
    before = out.parquet.read_bytes()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", KILLER, str(config)], env=env, capture_output=True, timeout=120)
    assert result.returncode == -9, result.stderr.decode()[-2000:]
    assert out.parquet.read_bytes() == before
    assert len(read_parquet(out.parquet)) == K * len(food_histories(run_dir))
    # The lock died with the process: the next run goes ahead and replaces the output.
    result = cli(config, "recommend.k=3")
    assert result.exit_code == 0, result.output
    assert len(read_parquet(out.parquet)) == 3 * len(food_histories(run_dir))


def test_cli_errors_are_one_line_with_exit_codes(run_dir, tmp_path):
    config = write_config(run_dir)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = cli(config, "--output", str(blocker / "out"))
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot create output folder")
    users = tmp_path / "users.txt"
    users.write_text("u1\nnobody\n")
    result = cli(config, "--users", str(users), "--strict")
    assert result.exit_code == 2 and "--strict" in result.stderr
    result = cli(config, "--users", str(users), "--show", "1", "--output", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    assert "user u1:" in result.stdout
    assert (tmp_path / "o" / f"date={time.strftime('%Y-%m-%d')}" / "_recommendations.unknown_users.txt").is_file()
    help_text = CliRunner().invoke(app, ["recommend", "--help"]).output
    assert "Exit codes" in help_text and "locked" in help_text


def test_catalogue_histories_from_sequences_equal_the_interactions_tables(tmp_path):
    """Catalogue reads the memory-mapped sequences; every history, user and domain list it gives is
    what the interactions table says (the code before read that table whole into pandas)."""
    from trecsys.rank.requests import Catalogue

    write_tiny_prepared(tmp_path / "run", n_users=40, seed=3)
    prepared = load_prepared(tmp_path / "run")
    inter = prepared.interactions  # the reference: the table itself
    ids = inter["user_id"].astype(str).to_numpy()
    for name, domain in prepared.domains.items():
        for as_of in (None, "valid", "test"):
            catalogue = Catalogue(prepared, domain, as_of)
            in_domain = inter[inter["domain"] == name]
            assert catalogue.domain_users == list(dict.fromkeys(in_domain["user_id"].astype(str)))
            for user in dict.fromkeys(ids):
                assert catalogue.knows(user)
                rows = inter[ids == user]
                everything = rows["item_idx"].to_numpy(np.int64)
                mine = rows["domain"].to_numpy() == name
                expected = everything[mine] if mine.any() else everything
                if as_of is None:
                    np.testing.assert_array_equal(catalogue.history(user), expected)
                context = ["Books", name]
                here = np.isin(rows["domain"].to_numpy(), context)
                np.testing.assert_array_equal(catalogue.history(user, context),
                                              everything[here] if here.any() else everything)
                assert catalogue.user_idx([user]).tolist() == [int(rows["user_idx"].iloc[0])]
            if as_of is not None:
                visible = {"valid": ["train"], "test": ["train", "valid"]}[as_of]
                for user, rows in in_domain.groupby("user_id", sort=False):
                    np.testing.assert_array_equal(
                        catalogue.history(str(user)), rows.loc[rows["split"].isin(visible), "item_idx"].to_numpy())
            assert not catalogue.knows("nobody")
