"""scripts/study_transfer.py: the few-shot protocol's step count and the summary it writes."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_config, write_tiny_prepared

from trecsys.config import load_config
from trecsys.stages import finetune_target

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "study_transfer.py"
spec = importlib.util.spec_from_file_location("study_transfer", SCRIPT)
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)


def test_full_data_epoch_steps_is_what_one_finetune_epoch_takes(tmp_path):
    """Few-shot runs get epochs / fraction epochs and validate every full-data epoch's steps; both
    rest on this count matching the engine's."""
    run_dir = tmp_path / "run"
    write_tiny_prepared(run_dir)
    finetune = {"strategy": "scratch", "train": {"epochs": 1, "batch_size": 7, "patience": 0}}
    cfg = load_config(tiny_config(run_dir, tmp_path / "cfg.yaml", {"finetune": finetune}))
    finetune_target.run(cfg)
    steps = json.loads((run_dir / "finetune" / "manifest.json").read_text())["candidates"]["scratch"]["steps"]
    assert steps > 1 and study.full_data_epoch_steps(cfg, run_dir) == steps


def test_goals_compare_like_with_like():
    rows = [("full", 0.060, 100), ("scratch", 0.050, 100), ("id_only", 0.040, 50),
            ("auto (kept full)", 0.060, 100), ("full@0.1", 0.030, 100), ("scratch@0.1", 0.040, 100),
            ("full+ids@0.1", 0.033, 120), ("scratch+ids@0.1", 0.030, 120),
            ("full+source_history", 0.066, 100), ("scratch+source_history", 0.055, 100),
            ("student", 0.054, 25)]
    table = pd.DataFrame({"variant": [r[0] for r in rows], "test_ndcg@10": [r[1] for r in rows],
                          "n_trainable": [r[2] for r in rows],
                          "shared_ndcg@10": [r[1] + 0.01 for r in rows]})
    text = study.goals(table)
    assert "- auto (kept full): 0.0600; scratch 0.0500, id_only 0.0400" in text
    assert "- 10% of the target users: full 0.0300 vs scratch 0.0400 (-25%); full+ids 0.0330 vs scratch+ids 0.0300 (+10%)" in text
    assert "- full reading the source history: 0.0660 vs 0.0600 (users also in the source: 0.0760 vs 0.0700)" in text
    assert "- student: 90% of the fine-tuned teacher's (full) NDCG with 25% of its parameters" in text


def test_levers_parse_and_name_their_own_folders():
    assert study.parse_lever("whiten:finetune.adaptor_init=whiten") == ("whiten", ["finetune.adaptor_init=whiten"])
    assert study.parse_lever("cl:finetune.init_from=/t/pretrain, finetune.adaptor_init=reinit") == (
        "cl", ["finetune.init_from=/t/pretrain", "finetune.adaptor_init=reinit"])
    for bad in ("whiten", "whiten:", ":a=b", "a[b]:x=y", "w:finetune.adaptor_init"):
        with pytest.raises(ValueError):
            study.parse_lever(bad)
    assert study.variant_folder("full[whiten]+ids@0.1") == "full_whiten_ids_frac0.1"
    assert study.variant_folder("scratch@0.1") == "scratch_frac0.1"


def test_paired_gains_compare_each_transfer_row_with_its_own_scratch_row():
    rng = np.random.default_rng(0)
    scratch = rng.random(400) * 0.2
    per_user = {"scratch@0.1": scratch, "full@0.1": scratch + 0.01, "full[w]@0.1": scratch - 0.01 * (rng.random(400) > 0.5),
                "scratch+ids@0.1": scratch, "full+ids@0.1": scratch + rng.normal(0, 0.05, 400),
                "full": scratch, "scratch": scratch * 0.5, "item-knn": scratch}
    table = study.paired_gains(per_user, seed=0, n_samples=200).set_index("transfer")
    pairs = set(zip(table.index, table["against"], strict=True))
    assert pairs == {("full@0.1", "scratch@0.1"), ("full[w]@0.1", "scratch@0.1"), ("full[w]@0.1", "full@0.1"),
                     ("full+ids@0.1", "scratch+ids@0.1"), ("full", "scratch")}
    row = table.loc["full@0.1"]  # a constant gain: the CI is the point
    assert row["delta"] == pytest.approx(0.01) and row["ci_low"] == pytest.approx(0.01) and row["ci_high"] == pytest.approx(0.01)
    assert row["gain"] == pytest.approx(0.01 / scratch.mean())
    row = table[table["against"] == "scratch@0.1"].loc["full[w]@0.1"]
    assert row["ci_low"] < row["delta"] < row["ci_high"] < 0
    lines = study.paired_lines(table.reset_index())
    assert "- full@0.1 0.1" in lines and "vs scratch@0.1 " in lines and f"({0.01 / scratch.mean():+.1%})" in lines


def test_whitening_lines_say_how_far_a_teachers_biases_are_from_each_catalogues_mean(tmp_path):
    import torch

    from trecsys.config import ModelConfig
    from trecsys.model.checkpoint import save_checkpoint
    from trecsys.model.seqrec import SeqRecModel
    from trecsys.prepared.tables import load_prepared

    run_dir = tmp_path / "run"
    write_tiny_prepared(run_dir)
    prepared = load_prepared(run_dir)
    text = torch.from_numpy(np.asarray(prepared.embeddings, dtype=np.float32))
    model = SeqRecModel(ModelConfig(d_model=8, n_heads=2, n_layers=1, n_experts=2), text.shape[1], prepared.n_items)
    rows = np.concatenate([np.arange(prepared.domain(d).item_start, prepared.domain(d).item_stop)
                           for d in prepared.source])
    with torch.no_grad():
        model.adaptor.bias[:] = text[rows].mean(0)  # biases at the source catalogue's mean
    save_checkpoint(model, tmp_path / "teacher", {})
    text_out = study.whitening_lines(run_dir, {"teacher": tmp_path / "teacher", "absent": tmp_path / "none"})
    assert "- teacher (" in text_out and "mean |b_k − source mean| 0.000" in text_out and "absent" not in text_out


def test_a_teacher_that_read_the_target_is_refused_and_the_study_pretrains_on_the_source_only(tmp_path, capsys,
                                                                                             monkeypatch):
    run_dir = tmp_path / "run"
    teacher = run_dir / "pretrain"
    teacher.mkdir(parents=True)
    for name in ("model.safetensors", "config.json"):
        (teacher / name).write_text("{}")
    (teacher / "manifest.json").write_text(json.dumps({"domains": ["Kitchen", "Food"]}))
    config = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    assert study.main(["-c", str(config), f"run_dir={run_dir}", "--fractions", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "trained on the target 'Food' too" in err and "--retrain" in err
    assert not (run_dir / "prepared").exists()  # refused before any work
    # Its own teacher is always source-only, whatever the config or the command line says.
    seen = []
    monkeypatch.setattr(study, "run_study", lambda args, base, overrides, fractions: seen.append(overrides) or 0)
    assert study.main(["-c", str(config), f"run_dir={tmp_path / 'other'}", "pretrain.data=both"]) == 0
    assert seen[0][-1] == "pretrain.data=source"
