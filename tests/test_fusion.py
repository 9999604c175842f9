"""The fused model (finetune candidate `fusion`): its scores, weights chosen on validation only, the
saved folder, and that `trec evaluate` and `trec recommend` rank with it unchanged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import tiny_config, write_tiny_prepared
from test_finetune_target import rewrite_test_items
from typer.testing import CliRunner

from trecsys.artifacts import read_parquet
from trecsys.cli import app
from trecsys.config import load_config
from trecsys.errors import ArtifactError
from trecsys.model.checkpoint import load_checkpoint
from trecsys.prepared.context import target_sequences
from trecsys.prepared.tables import load_prepared
from trecsys.rank.fusion import GRID, choose_weights, clear_gain, read_fusion
from trecsys.rank.metrics import full_ranking_topk, ranking_metrics
from trecsys.rank.rankers import Ranker, RankingInputs, fused_ranker, make_scorer
from trecsys.rank.scorers import ItemKNNScorer, ModelScorer, PopularityScorer, to_local
from trecsys.rank.validation import EvalCase, make_ranker
from trecsys.stages import recommend as recommend_stage

runner = CliRunner()
FINETUNE = {"epochs": 2, "batch_size": 16, "lr": 0.01, "patience": 0}


def trec(*args: str):
    return runner.invoke(app, list(args))


def fusion_config(run_dir: Path, path: Path) -> Path:
    return tiny_config(run_dir, path, {"finetune": {"strategy": "auto", "candidates": ["scratch", "fusion"],
                                                    "train": dict(FINETUNE)},
                                       "recommend": {"k": 5}})


def z(scores: torch.Tensor) -> torch.Tensor:
    std, mean = torch.std_mean(scores.double(), dim=1, correction=0, keepdim=True)
    return torch.where(std > 0, (scores - mean) / std, torch.zeros_like(scores.double()))


def fused_scorer(folder: Path, weights: dict, prepared, histories: list, counted: list, item_chunk: int):
    """The factory's scorer for `folder`'s network fused with the baselines counted on `counted`."""
    domain = prepared.domain(prepared.target)
    inputs = RankingInputs(prepared, domain, histories, counted=lambda: counted, model_histories=None,
                           item_text=prepared.embeddings, device=torch.device("cpu"), user_batch=64,
                           item_chunk=item_chunk)
    return make_scorer(fused_ranker(Ranker("fused", folder), weights), inputs)


@pytest.fixture(scope="module")
def fused_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fusion")
    run_dir = root / "run"
    write_tiny_prepared(run_dir)
    result = trec("finetune-target", "-c", str(fusion_config(run_dir, root / "cfg.yaml")))
    assert result.exit_code == 0, result.output
    assert "fusion of scratch + item-knn + popularity" in result.output
    return run_dir


def scratch_scorer(run_dir: Path, split: str):
    """The run's prepared data, its target sequences, and the scratch candidate's model and scorer
    over `split`'s histories."""
    prepared = load_prepared(run_dir)
    seqs = target_sequences(prepared)
    model, _ = load_checkpoint(run_dir / "finetune" / "candidates" / "scratch")
    scorer = ModelScorer(model, seqs.histories[split], seqs.domain, prepared.embeddings, torch.device("cpu"))
    return prepared, seqs, model, scorer


def test_fused_scores_are_the_weighted_sum_of_z_scores(fused_run):
    prepared, seqs, _, scorer = scratch_scorer(fused_run, "test")
    domain = seqs.domain
    histories = seqs.histories["test"]
    local, train = to_local(histories, domain), to_local(seqs.train, domain)
    weights = {"model": 0.7, "item-knn": 0.5, "popularity": 0.2}
    rows = torch.arange(len(histories))
    scratch = fused_run / "finetune" / "candidates" / "scratch"
    got = fused_scorer(scratch, weights, prepared, histories, train, item_chunk=5).score_chunk(rows, 3, 11)
    parts = [scorer, ItemKNNScorer(train, local, domain.n_items), PopularityScorer(train, domain.n_items)]
    expected = sum(w * z(p.score_chunk(rows, 0, domain.n_items)) for w, p in zip(weights.values(), parts, strict=True))
    assert torch.allclose(got.double(), expected[:, 3:11], atol=1e-5)
    alone = fused_scorer(scratch, {"model": 1.0, "item-knn": 0.0, "popularity": 0.0}, prepared, histories, train, 16)
    assert torch.equal(alone.score_chunk(rows, 0, 16), scorer.score_chunk(rows, 0, 16))  # the model's own ranking


def test_weights_are_the_best_grid_point_on_validation(fused_run):
    prepared, seqs, model, scorer = scratch_scorer(fused_run, "valid")
    domain = seqs.domain
    histories = seqs.histories["valid"]
    weights, grid = choose_weights(scorer, to_local(seqs.train, domain), to_local(histories, domain),
                                   to_local(seqs.targets["valid"], domain), domain.n_items, user_batch=7)
    chosen = GRID.index(tuple(weights.values()))
    # The best grid point, or the model alone when the best one's gain is within one standard error.
    assert len(grid) == len(GRID) and chosen in (0, max(range(len(grid)), key=lambda g: (grid[g]["ndcg@10"], -g)))
    # The grid's (model alone) point is the candidate's own validation score, as auto measured it.
    rank = make_ranker([EvalCase("Food", domain, histories, seqs.targets["valid"])], prepared.embeddings, 64,
                       torch.device("cpu"))
    model.set_item_text(torch.from_numpy(prepared.embeddings))
    with torch.no_grad():
        own = rank(model.eval())["ndcg@10"]
    assert grid[0]["ndcg@10"] == pytest.approx(own, abs=1e-9)
    # And item-kNN alone is the floor's validation score.
    local = to_local(histories, domain)
    knn = ItemKNNScorer(to_local(seqs.train, domain), local, domain.n_items)
    users = [u for u, t in enumerate(seqs.targets["valid"]) if len(t)]
    _, top = full_ranking_topk(lambda r, a, b: knn.score_chunk(torch.tensor(users)[r], a, b), len(users),
                               domain.n_items, 10, exclude=[local[u] for u in users])
    targets = to_local([seqs.targets["valid"][u] for u in users], domain)
    assert grid[-1]["ndcg@10"] == pytest.approx(np.nanmean(ranking_metrics(top, targets, (10,))["ndcg@10"]))


class _Fixed:
    """A scorer with given scores (users x items)."""

    device = torch.device("cpu")

    def __init__(self, scores: torch.Tensor):
        self.scores = scores

    def score_chunk(self, rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return self.scores[rows, start:stop].clone()


def test_fusion_is_chosen_only_for_a_gain_beyond_one_standard_error():
    rng = np.random.default_rng(0)
    n_users, n_items = 300, 30
    histories = [np.array([u % n_items]) for u in range(n_users)]
    targets = [np.array([(u + 1) % n_items]) for u in range(n_users)]
    # Item-kNN learns "a -> a+1" from these sequences; a model of random scores knows nothing.
    sequences = [np.array([a, (a + 1) % n_items]) for a in range(n_items) for _ in range(5)]
    noise = _Fixed(torch.from_numpy(rng.standard_normal((n_users, n_items))).float())
    weights, grid = choose_weights(noise, sequences, histories, targets, n_items, user_batch=64)
    assert weights["item-knn"] > 0 and grid[0]["ndcg@10"] < 0.5
    # A model that puts the target first: nothing fused can do better, the model alone is kept.
    perfect = torch.zeros(n_users, n_items)
    perfect[torch.arange(n_users), torch.tensor([t[0] for t in targets])] = 1.0
    weights, _ = choose_weights(_Fixed(perfect), sequences, histories, targets, n_items)
    assert weights == {"model": 1.0, "item-knn": 0.0, "popularity": 0.0}


def test_one_standard_error_rule():
    assert not clear_gain(np.array([0.01, -0.01] * 50 + [0.001]))  # a mean of ~0: noise
    assert clear_gain(np.full(100, 0.01) + np.random.default_rng(0).normal(0, 0.01, 100))
    assert not clear_gain(np.array([0.5]))  # one user says nothing


def test_the_fusion_candidate_is_saved_and_chosen_on_validation_only(fused_run, tmp_path):
    out = fused_run / "finetune"
    manifest = json.loads((out / "manifest.json").read_text())
    fusion = json.loads((out / "candidates" / "fusion" / "fusion.json").read_text())
    valid = {s: manifest["candidates"][s]["valid"]["ndcg@10"] for s in ("scratch", "fusion")}
    assert valid["fusion"] >= valid["scratch"] and fusion["base"] == "scratch"
    alone = fusion["weights"] == dict(zip(fusion["weights"], GRID[0], strict=True))
    if alone:  # the model alone ties its base exactly (not up to summation order), so auto keeps the base
        assert valid["fusion"] == valid["scratch"] and manifest["chosen"] == "scratch"
    else:
        assert valid["fusion"] == next(r["ndcg@10"] for r in fusion["grid"]
                                       if all(r[c] == w for c, w in fusion["weights"].items()))
    assert manifest["chosen"] == ("fusion" if valid["fusion"] > valid["scratch"] else "scratch")
    assert (out / "fusion.json").is_file() == (manifest["chosen"] == "fusion")
    for name in ("model.safetensors", "config.json"):  # the fused folder holds its base model
        assert (out / "candidates" / "fusion" / name).read_bytes() == (out / "candidates" / "scratch" / name).read_bytes()
    # Every test item rewritten: the same weights and grid (the test split is never read).
    prepared = load_prepared(fused_run)
    seqs = target_sequences(prepared)
    rng = np.random.default_rng(1)
    new_items = {int(u): int(rng.integers(seqs.domain.item_start, seqs.domain.item_stop)) for u in seqs.user_idx}
    second = tmp_path / "b"
    rewrite_test_items(fused_run, second, new_items)
    assert trec("finetune-target", "-c", str(fusion_config(second, tmp_path / "b.yaml"))).exit_code == 0
    again = json.loads((second / "finetune" / "candidates" / "fusion" / "fusion.json").read_text())
    assert again["weights"] == fusion["weights"] and again["grid"] == fusion["grid"]


def test_evaluate_ranks_with_the_fused_model(fused_run, tmp_path):
    cfg = fusion_config(fused_run, tmp_path / "cfg.yaml")
    result = trec("evaluate", "-c", str(cfg), "evaluate.bootstrap=0", "evaluate.ks=[5, 10]")
    assert result.exit_code == 0, result.output
    labels = set(read_parquet(fused_run / "eval" / "metrics.parquet").to_pandas()["run"])
    assert {"finetune/fusion", "finetune/scratch (kept)"} <= labels or {"finetune/fusion (kept)",
                                                                         "finetune/scratch"} <= labels
    # A fused folder whose weights give every ranker a share (the tiny run's validation may keep the
    # model alone): evaluate ranks with the weighted sum, built like the floor rows (train split).
    folder = tmp_path / "fused"
    shutil.copytree(fused_run / "finetune" / "candidates" / "scratch", folder)
    weights = {"model": 1.0, "item-knn": 0.5, "popularity": 0.3}
    (folder / "fusion.json").write_text(json.dumps({"weights": weights}))
    result = trec("evaluate", "-c", str(cfg), "--model", str(folder), "evaluate.bootstrap=0", "evaluate.ks=[10]")
    assert result.exit_code == 0, result.output
    metrics = read_parquet(fused_run / "eval" / "metrics.parquet").to_pandas()
    prepared = load_prepared(fused_run)
    seqs = target_sequences(prepared)
    domain = seqs.domain
    users = [u for u, t in enumerate(seqs.targets["test"]) if len(t)]
    histories = [seqs.histories["test"][u] for u in users]
    local, train = to_local(histories, domain), to_local(seqs.train, domain)
    targets = to_local([seqs.targets["test"][u] for u in users], domain)
    model, _ = load_checkpoint(folder)
    parts = [ModelScorer(model, histories, domain, prepared.embeddings, torch.device("cpu")),
             ItemKNNScorer(train, local, domain.n_items), PopularityScorer(train, domain.n_items)]
    rows = torch.arange(len(users))
    expected_scores = sum(w * z(p.score_chunk(rows, 0, domain.n_items)) for w, p in zip(weights.values(), parts, strict=True))
    _, top = full_ranking_topk(lambda r, a, b: expected_scores[r, a:b], len(users), domain.n_items, 10, exclude=local)
    expected = np.nanmean(ranking_metrics(top, targets, (10,))["ndcg@10"])
    _, alone = full_ranking_topk(lambda r, a, b: parts[0].score_chunk(r, a, b), len(users), domain.n_items, 10,
                                 exclude=local)
    assert expected != pytest.approx(np.nanmean(ranking_metrics(alone, targets, (10,))["ndcg@10"]))
    row = metrics[(metrics["run"] == str(folder)) & (metrics["metric"] == "ndcg") & (metrics["k"] == 10)
                  & (metrics["slice"] == "all")]
    assert row["value"].iloc[0] == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("weights", [None, {"model": 1.0, "item-knn": 0.5, "popularity": 0.3}])
def test_recommend_with_the_fused_model_equals_recommend_fusion_by_hand(fused_run, tmp_path, weights):
    folder = fused_run / "finetune" / "candidates" / "fusion"
    if weights is None:  # the weights finetune chose
        weights = json.loads((folder / "fusion.json").read_text())["weights"]
    else:
        folder = tmp_path / "fused"
        shutil.copytree(fused_run / "finetune" / "candidates" / "scratch", folder)
        (folder / "fusion.json").write_text(json.dumps({"weights": weights}))
    cfg_path = fusion_config(fused_run, tmp_path / "cfg.yaml")
    cfg = load_config(cfg_path, [])
    out = recommend_stage.run(cfg, model=str(folder), output=str(tmp_path / "a"))
    fused = pd.read_parquet(out.parquet)
    names = {"model": str(fused_run / "finetune" / "candidates" / "scratch"), "item-knn": "itemknn",
             "popularity": "popularity"}
    parts = [{"model": names[c], "weight": w} for c, w in weights.items() if w > 0]
    by_hand = load_config(cfg_path, ["recommend.fusion=" + yaml.safe_dump(parts, default_flow_style=True).strip()])
    out = recommend_stage.run(by_hand, output=str(tmp_path / "b"))
    expected = pd.read_parquet(out.parquet)
    assert fused["item_id"].tolist() == expected["item_id"].tolist()
    assert np.allclose(fused["score"], expected["score"], atol=1e-5)


@pytest.mark.parametrize("weights", [{"model": -1.0, "item-knn": 1.0, "popularity": 0.0},
                                     {"model": 0.0, "item-knn": 0.0, "popularity": 0.0},
                                     {"model": 1.0, "item-knn": 1.0}, {"model": "1", "item-knn": 0, "popularity": 0},
                                     {"model": float("nan"), "item-knn": 1.0, "popularity": 0.0}, None])
def test_a_malformed_fusion_file_is_refused_naming_it(tmp_path, weights):
    (tmp_path / "fusion.json").write_text(json.dumps({"weights": weights}))
    with pytest.raises(ArtifactError, match=r"fusion\.json: 'weights' must give each of model, item-knn, popularity"):
        read_fusion(tmp_path)
    assert read_fusion(tmp_path / "elsewhere") is None  # no file: a plain model


def test_a_fusion_of_the_model_alone_ties_its_base_and_auto_keeps_the_base(tmp_path, monkeypatch):
    from trecsys.stages import finetune_target

    real = finetune_target.choose_weights

    def alone_a_last_bit_above(*args, **kwargs):
        weights, grid = real(*args, **kwargs)
        grid[0] = {**grid[0], "ndcg@10": grid[0]["ndcg@10"] + 1e-17 + abs(grid[0]["ndcg@10"]) * 1e-15}
        return dict(zip(weights, GRID[0], strict=True)), grid

    monkeypatch.setattr(finetune_target, "choose_weights", alone_a_last_bit_above)
    run_dir = tmp_path / "run"
    write_tiny_prepared(run_dir)
    result = trec("finetune-target", "-c", str(fusion_config(run_dir, tmp_path / "cfg.yaml")))
    assert result.exit_code == 0, result.output
    manifest = json.loads((run_dir / "finetune" / "manifest.json").read_text())
    valid = {s: manifest["candidates"][s]["valid"]["ndcg@10"] for s in ("scratch", "fusion")}
    assert valid["fusion"] == valid["scratch"] and manifest["chosen"] == "scratch"
    assert not (run_dir / "finetune" / "fusion.json").exists()
