"""`trec distill` end to end on the tiny prepared folder, through the CLI (seconds each)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import launch
import pytest
import torch
from conftest import pretrained_tiny_run, tiny_config
from typer.testing import CliRunner

from trecsys.cli import app
from trecsys.config import ModelConfig
from trecsys.model.checkpoint import load_checkpoint, save_checkpoint
from trecsys.model.seqrec import SeqRecModel
from trecsys.prepared.tables import domain_split, load_prepared
from trecsys.runtime import seed_everything
from trecsys.train.engine import LOG, read_log
from trecsys.train.windows import training_windows, window_tensors

runner = CliRunner()
STUDENT = {"d_model": 8, "n_layers": 1, "n_heads": 2, "max_seq_len": 6, "dropout": 0.0, "n_experts": 2,
           "adaptor": "linear"}


def trec(*args: str):
    return runner.invoke(app, list(args))


def distill_config(run_dir: Path, path: Path, **distill) -> Path:
    train = {"epochs": 4, "batch_size": 16, "lr": 0.01, "patience": 0}
    return tiny_config(run_dir, path, {"distill": {"student": dict(STUDENT), "train": train, **distill}},
                       epochs=6, lr=0.02)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> Path:
    return pretrained_tiny_run(tmp_path_factory.mktemp("teacher"), distill_config)


@pytest.fixture
def run_copy(teacher_run, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(teacher_run, run_dir)
    return run_dir


def agreement(teacher: SeqRecModel, student: SeqRecModel, run_dir: Path) -> tuple[float, float]:
    """(mean KL(teacher ‖ student) over every source training position, mean top-5 overlap)."""
    prepared = load_prepared(run_dir)
    kls, overlaps = [], []
    for name in prepared.source:
        split = domain_split(prepared, name)
        d = split.domain
        inputs, labels = window_tensors(training_windows(split.train, 6)[0], d.item_start, d.item_stop)
        with torch.no_grad():
            logits = [m.eval().score(m.encode(inputs)[labels >= 0], m.item_reps(d.item_start, d.item_stop))
                      for m in (teacher, student)]
        p, q = (torch.log_softmax(x, dim=-1) for x in logits)
        kls.append((p.exp() * (p - q)).sum(-1))
        tops = [x.topk(5, dim=-1).indices for x in logits]
        overlaps.append((tops[0][:, :, None] == tops[1][:, None, :]).any(-1).float().mean(-1))
    return float(torch.cat(kls).mean()), float(torch.cat(overlaps).mean())


def test_distillation_moves_the_student_toward_the_teachers_rankings(run_copy, tmp_path):
    prepared = load_prepared(run_copy)
    teacher, _ = load_checkpoint(run_copy / "pretrain")
    seed_everything(0)  # the stage's seed: the student before training
    initial = SeqRecModel(ModelConfig(**STUDENT), prepared.embeddings.shape[1], prepared.n_items)
    students = {}
    for kd_ratio in (0.0, 1.0):
        cfg = distill_config(run_copy, tmp_path / f"kd{kd_ratio}.yaml", kd_ratio=kd_ratio, temperature=1.0)
        result = trec("distill", "-c", str(cfg))
        assert result.exit_code == 0, result.output
        students[kd_ratio], _ = load_checkpoint(run_copy / "distill")
    for model in (teacher, initial, *students.values()):
        model.set_item_text(torch.from_numpy(prepared.embeddings))
    kl_init, overlap_init = agreement(teacher, initial, run_copy)
    kl_ce, overlap_ce = agreement(teacher, students[0.0], run_copy)
    kl_kd, overlap_kd = agreement(teacher, students[1.0], run_copy)
    # Closer than at the start, and than labels alone make it. (The teacher learns model.seen_bias, so
    # its network no longer pushes seen items down: a little harder to match, 0.51 of the start.)
    assert kl_kd < 0.6 * kl_init and kl_kd < kl_ce
    assert overlap_kd > overlap_init and overlap_kd > overlap_ce
    assert float(students[1.0].seen_bias.detach()) == float(teacher.seen_bias.detach()) != 0.0  # no label loss: the teacher's offset


@pytest.mark.slow
def test_distillation_without_labels_runs_under_two_gloo_processes(run_copy, tmp_path):
    """kd_ratio 1: no loss term reaches the student's seen offset (it keeps the teacher's), and DDP
    refuses a trained parameter that gets no gradient; the offset is frozen, so torchrun works."""
    cfg = distill_config(run_copy, tmp_path / "cfg.yaml", kd_ratio=1.0)
    done = launch.trec(2, ["distill", "-c", str(cfg)], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    student, teacher = load_checkpoint(run_copy / "distill")[0], load_checkpoint(run_copy / "pretrain")[0]
    assert float(student.seen_bias.detach()) == float(teacher.seen_bias.detach()) != 0.0


def test_distill_reports_teacher_and_student_side_by_side(run_copy, tmp_path):
    cfg = distill_config(run_copy, tmp_path / "cfg.yaml", data="both", hidden_weight=0.5)
    result = trec("distill", "-c", str(cfg))
    assert result.exit_code == 0, result.output
    for label in ("teacher", "student", "parameters", "checkpoint MiB", "users/s", "valid ndcg@10"):
        assert label in result.output
    out = run_copy / "distill"
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "train_log.jsonl",
                                               "config.yaml", "manifest.json"}
    manifest = json.loads((out / "manifest.json").read_text())
    teacher, _ = load_checkpoint(run_copy / "pretrain")
    student, info = load_checkpoint(out)
    side = manifest["comparison"]
    assert side["teacher"]["n_parameters"] == teacher.num_parameters()
    assert side["student"]["n_parameters"] == student.num_parameters() < teacher.num_parameters()
    assert side["student"]["checkpoint_mib"] < side["teacher"]["checkpoint_mib"]
    assert side["teacher"]["users_per_s"] > 0 and side["student"]["users_per_s"] > 0
    assert side["student"]["valid"]["ndcg@10"] == pytest.approx(manifest["metrics"]["ndcg@10"])
    assert manifest["data"] == ["Books", "Games", "Food"] and info.extra["teacher"] == str(run_copy / "pretrain")
    assert {"Books/ndcg@10", "Food/ndcg@10"} <= manifest["metrics"].keys()
    assert len(list(read_log(out / LOG))) == 4


def test_distilling_twice_writes_identical_files(run_copy, tmp_path):
    """Same config, same seed: the same student, byte for byte (its sha256 is what manifests and
    --resume compare)."""
    cfg = distill_config(run_copy, tmp_path / "cfg.yaml", data="target", hidden_weight=0.5)
    weights = []
    for _ in range(3):
        result = trec("distill", "-c", str(cfg), "distill.train.epochs=2")
        assert result.exit_code == 0, result.output
        weights.append((run_copy / "distill" / "model.safetensors").read_bytes())
    assert weights[1] == weights[0] and weights[2] == weights[0]


def test_resume_with_hidden_matching_finishes_like_an_uninterrupted_run(run_copy, tmp_path):
    cfg = distill_config(run_copy, tmp_path / "cfg.yaml", data="target", hidden_weight=1.0)
    assert trec("distill", "-c", str(cfg)).exit_code == 0
    whole = [r["valid"] for r in read_log(run_copy / "distill" / LOG)]
    assert trec("distill", "-c", str(cfg), "distill.train.max_steps=5").exit_code == 0
    assert (run_copy / ".distill.work" / "last" / "projection.safetensors").is_file()
    resumed = trec("distill", "-c", str(cfg), "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert [r["valid"] for r in read_log(run_copy / "distill" / LOG)][-1] == whole[-1]


def test_bad_teachers_and_students_are_one_line_errors_naming_the_key(run_copy, tmp_path):
    cfg = distill_config(run_copy, tmp_path / "cfg.yaml")
    prepared = load_prepared(run_copy)
    for name, text_dim, n_items in (("narrow", 8, prepared.n_items), ("other_catalogue", 16, prepared.n_items + 3)):
        save_checkpoint(SeqRecModel(ModelConfig(**STUDENT), text_dim, n_items), tmp_path / name)
    cases = [
        ([f"distill.teacher={tmp_path / 'narrow'}"], "'distill.teacher'", "text_dim=8 but the prepared item embeddings have 16"),
        ([f"distill.teacher={tmp_path / 'other_catalogue'}"], "'distill.teacher'", "built for n_items="),
        (["distill.teacher=finetune"], "'distill.teacher'", "trec finetune-target"),
        (["distill.student.max_seq_len=12"], "'distill.student.max_seq_len'", "at most"),
        (["distill.student.n_heads=3"], "'distill.student.n_heads'", "do not divide"),
        (["distill.kd_ratio=1.5"], "'distill.kd_ratio'", "[0, 1]"),
        (["distill.temperature=0"], "'distill.temperature'", "> 0"),
        (["distill.data=elsewhere"], "'distill.data'", "'source'"),
    ]
    for overrides, key, what in cases:
        result = trec("distill", "-c", str(cfg), *overrides)
        message = result.output.strip()
        assert result.exit_code == 2 and "\n" not in message, (overrides, message)
        assert key in message and what in message, message


def test_trec_run_distills_the_fine_tuned_model_after_fine_tuning_when_it_is_the_teacher(run_copy, tmp_path):
    """`distill.teacher: finetune` compresses the target-tuned model: the pipeline runs distill after
    finetune-target, and evaluate ranks the student beside the model it compresses."""
    import pandas as pd

    from trecsys import pipeline
    from trecsys.config import load_config
    from trecsys.errors import ConfigError

    path = distill_config(run_copy, tmp_path / "cfg.yaml", teacher="finetune", data="target")
    cfg = load_config(path, ["finetune.strategy=full", "finetune.train.epochs=2", "evaluate.bootstrap=0",
                                    "evaluate.ks=[5,10]"])
    outcomes = pipeline.run(cfg, stages="distill,finetune-target,evaluate", show=0)
    assert [(o.stage, o.action) for o in outcomes] == [("finetune-target", "ran"), ("distill", "ran"),
                                                       ("evaluate", "ran")]
    manifest = json.loads((run_copy / "distill" / "manifest.json").read_text())
    assert Path(manifest["teacher"]).resolve() == (run_copy / "finetune").resolve()
    runs = list(dict.fromkeys(pd.read_parquet(run_copy / "eval" / "metrics.parquet")["run"]))
    assert runs[:2] == ["finetune/full (kept)", "distill (student of finetune)"]
    # Up to date now, in the same order.
    again = pipeline.run(cfg, stages="distill,finetune-target,evaluate", show=0)
    assert [(o.stage, o.action) for o in again] == [("finetune-target", "skipped"), ("distill", "skipped"),
                                                    ("evaluate", "skipped")]
    with pytest.raises(ConfigError, match=r"'distill.teacher' and 'finetune.init_from'"):
        pipeline.run(load_config(path, ["finetune.init_from=distill"]), stages="distill")
