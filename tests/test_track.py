"""Experiment tracking: real TensorBoard event files and a real MLflow run, read back with TensorBoard's
own event reader and MLflow's own client (both from the `tracking` extra; skipped without it)."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import tiny_config, write_tiny_prepared
from typer.testing import CliRunner

from trecsys.cli import app
from trecsys.track import mlflow_key

mlflow = pytest.importorskip("mlflow")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

runner = CliRunner()
TRACK = {"tensorboard": True, "mlflow": True}
FINETUNE = {"candidates": ["full", "adaptor"], "train": {"epochs": 2, "batch_size": 16, "lr": 0.01, "patience": 0}}


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator.EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_stages_write_tensorboard_events_and_mlflow_runs_that_their_own_readers_read_back(tmp_path):
    run_dir = tmp_path / "run"
    write_tiny_prepared(run_dir)
    cfg = tiny_config(run_dir, tmp_path / "cfg.yaml", {"track": TRACK, "finetune": FINETUNE,
                                                       "evaluate": {"bootstrap": 10, "ks": [5, 10]}}, epochs=2)
    for stage in ("pretrain-source", "finetune-target", "evaluate"):
        result = runner.invoke(app, [stage, "-c", str(cfg)])
        assert result.exit_code == 0, result.output

    # TensorBoard: per-step curves that equal train_log.jsonl, one sub-run per fine-tuning candidate.
    log = [json.loads(line) for line in (run_dir / "pretrain" / "train_log.jsonl").read_text().splitlines()]
    tb = _scalars(run_dir / "tensorboard" / "pretrain-source")
    assert tb["train/loss"] == [(r["step"], pytest.approx(r["loss"])) for r in log]
    assert [s for s, _ in tb["valid/ndcg@10"]] == [r["step"] for r in log if "valid" in r]
    for candidate in ("full", "adaptor"):
        assert "valid/ndcg@10" in _scalars(run_dir / "tensorboard" / "finetune-target" / candidate)
    assert any(tag.startswith("test/") for tag in _scalars(run_dir / "tensorboard" / "evaluate"))

    # MLflow: one finished run per stage in the run folder's own store, read with MLflow's client.
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir.resolve() / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("run")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"pretrain-source", "finetune-target", "evaluate"}
    assert all(r.info.status == "FINISHED" for r in runs.values())
    pretrain = runs["pretrain-source"]
    assert pretrain.data.params["pretrain.train.lr"] == "0.01" and pretrain.data.params["data.target"] == "Food"
    history = client.get_metric_history(pretrain.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["loss"])) for r in log]
    assert {"model.safetensors", "manifest.json", "train_log.jsonl"} <= {
        a.path for a in client.list_artifacts(pretrain.info.run_id)}
    finetune = runs["finetune-target"].data.metrics
    assert "full/valid/ndcg_at_10" in finetune and "adaptor/train/loss" in finetune
    evaluation = runs["evaluate"]
    import pandas as pd

    table = pd.read_parquet(run_dir / "eval" / "metrics.parquet")
    row = table[(table["slice"] == "all") & (table["metric"] == "ndcg") & (table["k"] == 10)].iloc[0]
    assert evaluation.data.metrics[mlflow_key(f"test/{row['run']}/ndcg@10")] == pytest.approx(row["value"])
    assert "report.md" in {a.path for a in client.list_artifacts(evaluation.info.run_id)}

    # Re-running a stage replaces its TensorBoard curves instead of doubling them.
    result = runner.invoke(app, ["pretrain-source", "-c", str(cfg)])
    assert result.exit_code == 0, result.output
    assert _scalars(run_dir / "tensorboard" / "pretrain-source")["train/loss"] == tb["train/loss"]


def test_tracking_without_the_packages_is_a_config_error_only_when_asked_for(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    cfg = tiny_config(run_dir, tmp_path / "cfg.yaml")
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed: find_spec raises/none
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    assert runner.invoke(app, ["prepare", "-c", str(cfg), "--print-config"]).exit_code == 0
    result = runner.invoke(app, ["prepare", "-c", str(cfg), "track.mlflow=true", "--print-config"])
    assert result.exit_code == 2
    assert "config key 'track.mlflow' on the command line (track.mlflow=true): needs the mlflow package" in result.stderr
    assert "transfer-recsys[tracking]" in result.stderr
