"""`trec recommend --as-of SPLIT`: lists made as `trec evaluate --split SPLIT` ranks, so that scoring
them with an independent implementation (below, from interactions.parquet and the lists alone)
gives evaluate's numbers, for a model, a model reading the source domains, and both baselines."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import tiny_config
from typer.testing import CliRunner

from trecsys.cli import app
from trecsys.config import ModelConfig
from trecsys.model.checkpoint import save_checkpoint
from trecsys.model.seqrec import SeqRecModel
from trecsys.prepared.tables import load_prepared

K = 10  # the tiny Food catalogue has 16 items
runner = CliRunner()


def independent_metrics(interactions: pd.DataFrame, lists: pd.DataFrame, split: str) -> dict[str, float]:
    """Recall@K and NDCG@K of the lists against each Food user's `split` items, averaged over the users
    who have any (binary relevance; ideal DCG over min(#targets, K) places)."""
    held = interactions[(interactions["domain"] == "Food") & (interactions["split"] == split)]
    targets = held.groupby("user_id")["item_id"].apply(set).to_dict()
    ranked = lists.sort_values(["user_id", "rank"]).groupby("user_id")["item_id"].apply(list).to_dict()
    recall, ndcg = [], []
    for user, wanted in targets.items():
        top = ranked.get(user, [])[:K]
        hits = [i for i, item in enumerate(top) if item in wanted]
        recall.append(len(hits) / len(wanted))
        ideal = sum(1 / np.log2(i + 2) for i in range(min(len(wanted), K)))
        ndcg.append(sum(1 / np.log2(i + 2) for i in hits) / ideal)
    return {"recall": float(np.mean(recall)), "ndcg": float(np.mean(ndcg))}


def save_model(run_dir, stage: str, history: str) -> None:
    prepared = load_prepared(run_dir)
    torch.manual_seed(7)
    cfg = ModelConfig(d_model=16, n_layers=1, n_heads=2, max_seq_len=8, dropout=0.0, n_experts=2)
    save_checkpoint(SeqRecModel(cfg, prepared.embeddings.shape[1], prepared.n_items), run_dir / stage,
                    extra={"history": history})


@pytest.mark.parametrize("history", ["target", "all_domains"])
def test_recommend_as_of_a_split_scores_like_evaluate(tiny_prepared, history):
    run_dir = tiny_prepared
    save_model(run_dir, "finetune", history)
    path = tiny_config(run_dir, run_dir.parent / "cfg.yaml",
                       {"evaluate": {"ks": [K], "bootstrap": 0, "candidates": False}, "recommend": {"k": K}})
    interactions = pd.read_parquet(run_dir / "prepared" / "interactions.parquet")
    items = pd.read_parquet(run_dir / "prepared" / "items.parquet")[["item_idx", "item_id"]]
    interactions = interactions.merge(items, on="item_idx")
    for split in ("valid", "test"):
        result = runner.invoke(app, ["evaluate", "-c", str(path), "--split", split])
        assert result.exit_code == 0, result.output
        metrics = pd.read_parquet(run_dir / "eval" / "metrics.parquet").query("slice == 'all' and k == @K")
        for ranker, label in (("latest", "finetune"), ("popularity", "popularity"), ("itemknn", "item-knn")):
            data = yaml.safe_load(path.read_text())
            data["recommend"]["fusion"] = [{"model": ranker}]
            path.write_text(yaml.safe_dump(data))
            out = run_dir.parent / f"{split}-{ranker}.parquet"
            result = runner.invoke(app, ["recommend", "-c", str(path), "--as-of", split, "--output", str(out)])
            assert result.exit_code == 0, result.output
            got = independent_metrics(interactions, pd.read_parquet(out), split)
            for metric, value in got.items():
                expected = metrics.query("run == @label and metric == @metric")["value"].item()
                assert value == pytest.approx(expected, abs=1e-6), (split, label, metric)


def test_without_as_of_the_held_out_items_are_history(tiny_prepared):
    """The plain lists read every interaction (the production use): their test recall is 0, since a
    user's test item is in the history and excluded; --as-of test is what scores."""
    save_model(tiny_prepared, "finetune", "target")
    path = tiny_config(tiny_prepared, tiny_prepared.parent / "cfg.yaml", {"recommend": {"k": K}})
    interactions = pd.read_parquet(tiny_prepared / "prepared" / "interactions.parquet")
    items = pd.read_parquet(tiny_prepared / "prepared" / "items.parquet")[["item_idx", "item_id"]]
    interactions = interactions.merge(items, on="item_idx")
    plain, as_of = tiny_prepared.parent / "plain.parquet", tiny_prepared.parent / "as_of.parquet"
    assert runner.invoke(app, ["recommend", "-c", str(path), "--output", str(plain)]).exit_code == 0
    assert runner.invoke(app, ["recommend", "-c", str(path), "--as-of", "test", "--output", str(as_of)]).exit_code == 0
    assert independent_metrics(interactions, pd.read_parquet(plain), "test")["recall"] == 0.0
    assert independent_metrics(interactions, pd.read_parquet(as_of), "test")["recall"] > 0.0


def test_as_of_refuses_what_has_no_split(tiny_prepared, tmp_path):
    path = tiny_config(tiny_prepared, tmp_path / "cfg.yaml", {"recommend": {"k": K, "fusion": [{"model": "popularity"}]}})
    result = runner.invoke(app, ["recommend", "-c", str(path), "--as-of", "train"])
    assert result.exit_code == 2 and "option --as-of: 'train' is not a held-out split" in result.stderr
    result = runner.invoke(app, ["recommend", "-c", str(path), "--as-of", "test", "--query", "tea"])
    assert result.exit_code == 2 and "does not combine with --histories, --query" in result.stderr
