"""`trec pretrain-source` end to end on a tiny fake prepared folder, through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config, write_tiny_prepared
from typer.testing import CliRunner

from trecsys.cli import app
from trecsys.model.checkpoint import load_checkpoint
from trecsys.train.engine import LOG, read_log

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def trec(*args: str):
    return runner.invoke(app, list(args))


def test_pretrain_writes_the_best_checkpoint_log_config_and_manifest(tiny_prepared, tmp_path):
    cfg = tiny_config(tiny_prepared, tmp_path / "cfg.yaml")
    result = trec("pretrain-source", "-c", str(cfg))
    assert result.exit_code == 0, result.output
    assert "best valid ndcg@10" in result.output and "parameters" in result.output
    out = tiny_prepared / "pretrain"
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "train_log.jsonl",
                                               "config.yaml", "manifest.json"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "pretrain-source" and manifest["source"] == ["Books", "Games"]
    assert manifest["inputs"][0]["path"] == "prepared/manifest.json" and len(manifest["inputs"][0]["sha256"]) == 64
    log = list(read_log(out / LOG))
    assert len(log) == 4 and log[-1]["loss"] < log[0]["loss"]
    best = max(log, key=lambda r: r["valid"]["ndcg@10"])
    assert manifest["metrics"] == best["valid"] and manifest["best_step"] == best["step"]
    assert {"Books/ndcg@10", "Games/recall@10", "recall@10"} <= manifest["metrics"].keys()
    model, info = load_checkpoint(out)
    assert info.extra["source"] == ["Books", "Games"] and model.num_parameters() == manifest["n_parameters"]
    assert not (tiny_prepared / ".pretrain.work").exists()  # the resumable state is gone after success


def test_pretrain_data_both_trains_on_the_target_train_split_only_and_validates_on_it(tiny_prepared, tmp_path,
                                                                                       monkeypatch):
    from trecsys.prepared.tables import domain_split, load_prepared
    from trecsys.stages import pretrain_source

    seen = {}
    real = pretrain_source.domain_windows

    def recording(domain, sequences, *args):
        seen[domain.name] = sequences
        return real(domain, sequences, *args)

    monkeypatch.setattr(pretrain_source, "domain_windows", recording)
    cfg = tiny_config(tiny_prepared, tmp_path / "cfg.yaml")
    result = trec("pretrain-source", "-c", str(cfg), "pretrain.data=both")
    assert result.exit_code == 0, result.output
    assert "training windows from Books, Games, Food" in result.output
    manifest = json.loads((tiny_prepared / "pretrain" / "manifest.json").read_text())
    assert manifest["source"] == ["Books", "Games"] and manifest["domains"] == ["Books", "Games", "Food"]
    assert {"Food/ndcg@10", "Books/ndcg@10"} <= manifest["metrics"].keys()
    # The target's windows are cut from its train split: no valid or test item is ever a label or input.
    split = domain_split(load_prepared(tiny_prepared), "Food")
    trained = seen["Food"]
    assert len(trained) == len(split.train)
    assert all(np.array_equal(a, b) for a, b in zip(trained, split.train, strict=True))
    held_out = {(u, int(i)) for u, rows in enumerate(zip(split.valid, split.test, strict=True)) for r in rows for i in r}
    assert held_out and not held_out & {(u, int(i)) for u, row in enumerate(trained) for i in row}
    # The control reads the target alone; the default, the sources alone.
    seen.clear()
    result = trec("pretrain-source", "-c", str(cfg), "pretrain.data=target")
    assert result.exit_code == 0, result.output
    assert set(seen) == {"Food"} and all(np.array_equal(a, b) for a, b in zip(seen["Food"], split.train, strict=True))
    assert json.loads((tiny_prepared / "pretrain" / "manifest.json").read_text())["domains"] == ["Food"]
    seen.clear()
    assert trec("pretrain-source", "-c", str(cfg)).exit_code == 0
    assert set(seen) == {"Books", "Games"}
    assert "'pretrain.data'" in trec("pretrain-source", "-c", str(cfg), "pretrain.data=all").output


def test_max_steps_then_resume_finishes_exactly_like_an_uninterrupted_run(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    for run_dir in (whole, cut):
        write_tiny_prepared(run_dir)
    assert trec("pretrain-source", "-c", str(tiny_config(whole, tmp_path / "w.yaml"))).exit_code == 0
    cfg = tiny_config(cut, tmp_path / "c.yaml")
    first = trec("pretrain-source", "-c", str(cfg), "pretrain.train.max_steps=12")
    assert first.exit_code == 0, first.output
    assert "(max_steps)" in first.output and (cut / ".pretrain.work" / "last").is_dir()
    second = trec("pretrain-source", "-c", str(cfg), "--resume")
    assert second.exit_code == 0, second.output
    # Same weights after every later epoch: the validation metrics match to the last digit.
    valid = {r["step"]: r["valid"] for r in read_log(whole / "pretrain" / LOG)}
    resumed = {r["step"]: r["valid"] for r in read_log(cut / "pretrain" / LOG)}
    assert [16, 24, 32] == [s for s in resumed if s > 12]
    assert all(resumed[s] == valid[s] for s in (16, 24, 32))
    assert not (cut / ".pretrain.work").exists()


def test_resume_without_state_and_changed_keys_are_refused(tiny_prepared, tmp_path):
    cfg = tiny_config(tiny_prepared, tmp_path / "cfg.yaml")
    result = trec("pretrain-source", "-c", str(cfg), "--resume")
    assert result.exit_code == 2 and "nothing to resume" in result.output
    assert trec("pretrain-source", "-c", str(cfg), "pretrain.train.max_steps=3").exit_code == 0
    result = trec("pretrain-source", "-c", str(cfg), "--resume", "model.d_model=32")
    assert result.exit_code == 2 and "'model.d_model' was 16 there and is 32 now" in result.output


def test_missing_or_stale_prepared_data_is_an_artifact_error(tmp_path):
    cfg = tiny_config(tmp_path / "empty", tmp_path / "cfg.yaml")
    result = trec("pretrain-source", "-c", str(cfg))
    assert result.exit_code == 2 and "run the prepare stage first" in result.output
    run_dir = tmp_path / "run"
    write_tiny_prepared(run_dir, encoder="some/other-encoder")
    cfg = tiny_config(run_dir, tmp_path / "cfg2.yaml")
    result = trec("pretrain-source", "-c", str(cfg))
    assert result.exit_code == 2
    assert "'embedding.encoder'" in result.output and "some/other-encoder" in result.output
    result = trec("pretrain-source", "-c", str(cfg), "embedding.encoder=some/other-encoder", "data.source=[Games]")
    assert result.exit_code == 2 and "'data.source'" in result.output


def test_sampled_softmax_loss_trains(tiny_prepared, tmp_path):
    cfg = tiny_config(tiny_prepared, tmp_path / "cfg.yaml", loss="sampled", n_negatives=8)
    result = trec("pretrain-source", "-c", str(cfg))
    assert result.exit_code == 0, result.output
    log = list(read_log(tiny_prepared / "pretrain" / LOG))
    assert log[-1]["loss"] < log[0]["loss"]


def test_bad_train_values_name_their_key(tiny_prepared, tmp_path):
    cfg = tiny_config(tiny_prepared, tmp_path / "cfg.yaml")
    result = trec("pretrain-source", "-c", str(cfg), "pretrain.train.batch_size=0")
    assert result.exit_code == 2 and "'pretrain.train.batch_size'" in result.output
    result = trec("pretrain-source", "-c", str(cfg), "pretrain.train.precision=fp8")
    assert result.exit_code == 2 and "'pretrain.train.precision'" in result.output


@pytest.mark.slow
def test_two_process_torchrun_gives_the_same_losses_as_one_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    logs = {}
    for n_proc in (1, 2):
        run_dir = tmp_path / f"p{n_proc}"
        write_tiny_prepared(run_dir)
        cfg = tiny_config(run_dir, tmp_path / f"p{n_proc}.yaml", epochs=2)
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n_proc),
             "-m", "trecsys", "pretrain-source",
             "-c", str(cfg), "model.dropout=0.0"],
            env=env, timeout=240, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stderr.count("wrote") == 1  # rank 0 alone reports and writes
        logs[n_proc] = list(read_log(run_dir / "pretrain" / LOG))
    assert [r["step"] for r in logs[1]] == [r["step"] for r in logs[2]] == [8, 16]
    for a, b in zip(logs[1], logs[2], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["valid"]["ndcg@10"] == pytest.approx(b["valid"]["ndcg@10"], abs=1e-3)


def test_cuda_bf16_pretrain_runs_when_a_gpu_is_present(tiny_prepared, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cfg = tiny_config(tiny_prepared, tmp_path / "cfg.yaml")
    result = trec("pretrain-source", "-c", str(cfg), "device=cuda")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tiny_prepared / "pretrain" / "manifest.json").read_text())
    assert manifest["precision"] in ("bf16", "fp16")


def test_a_diverged_run_exits_4_and_leaves_the_previous_pretrain_untouched(tiny_prepared, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_prepared, tmp_path / "cfg.yaml")
    assert trec("pretrain-source", "-c", str(cfg)).exit_code == 0
    before = (tiny_prepared / "pretrain" / "model.safetensors").read_bytes()
    import trecsys.train.next_item as stage  # where the training stages' next-item loss lives

    real = stage.chunked_cross_entropy
    monkeypatch.setattr(stage, "chunked_cross_entropy", lambda *a, **k: real(*a, **k) * float("nan"))
    result = trec("pretrain-source", "-c", str(cfg))
    assert result.exit_code == 4 and "diverged at step 1" in result.output
    assert (tiny_prepared / "pretrain" / "model.safetensors").read_bytes() == before


def test_trimming_shared_left_padding_does_not_change_the_model_output():
    from trecsys.config import ModelConfig
    from trecsys.model.seqrec import SeqRecModel
    from trecsys.train.windows import trim_left_padding

    torch.manual_seed(0)
    model = SeqRecModel(ModelConfig(d_model=16, n_layers=1, n_heads=2, max_seq_len=8, dropout=0.0), 4, 30).eval()
    model.set_item_text(torch.randn(30, 4))
    seq = torch.tensor([[-1, -1, -1, -1, 3, 4, 5, 6], [-1, -1, -1, -1, -1, -1, 7, 8]])
    trimmed = trim_left_padding(seq)
    assert trimmed.shape == (2, 4)
    assert torch.allclose(model.user_state(seq), model.user_state(trimmed), atol=1e-6)
    assert trim_left_padding(torch.full((2, 8), -1)).shape == (2, 1)
