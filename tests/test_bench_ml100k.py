"""scripts/bench_ml100k.py's own logic (never its timings): the tokens counted per epoch are the cells of
the trimmed batches trecsys trains on, both sides get the same threads and allocator environment,
RecBole's time to its best epoch, and the summary table says "not measured" rather than a number."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import bench_env  # noqa: E402
import bench_ml100k as B  # noqa: E402

from trecsys.train.windows import training_windows  # noqa: E402


def test_epoch_work_counts_the_cells_of_each_trimmed_batch():
    # max_seq_len 4: windows of 5; a 3-item sequence is left-padded by 2, a 5-item one is full.
    windows, _ = training_windows([np.array([1, 2, 3]), np.array([4, 5, 6, 7, 8])], 4)
    assert windows.shape == (2, 5)
    short = 0 if (windows[0] < 0).any() else 1
    full = 1 - short
    # Alone, the short window is trimmed to its 3 items: 2 input cells, both real.
    assert B.epoch_work(windows, [np.array([short])]) == {"sequences": 1, "positions": 2, "items": 2}
    assert B.epoch_work(windows, [np.array([full])]) == {"sequences": 1, "positions": 4, "items": 4}
    # Together the batch keeps the full width: the short one's padding is fed too (counted, not real).
    assert B.epoch_work(windows, [np.array([0, 1])]) == {"sequences": 2, "positions": 8, "items": 6}
    assert B.per_million(3.0, 1_500_000) == 2.0


def test_recbole_time_to_best_sums_training_and_validation_up_to_its_first_best_epoch():
    epochs = [{"train_s": 10.0, "train_cpu_s": 9.0, "valid_s": 1.0, "valid_cpu_s": 1.0, "valid_ndcg@10": 0.02},
              {"train_s": 20.0, "train_cpu_s": 19.0, "valid_s": 2.0, "valid_cpu_s": 2.0, "valid_ndcg@10": 0.05},
              {"train_s": 30.0, "train_cpu_s": 29.0, "valid_s": 3.0, "valid_cpu_s": 3.0, "valid_ndcg@10": 0.05}]
    assert B.recbole_time_to_best(epochs) == {"best_epoch": 2, "wall_s": 33.0, "cpu_s": 31.0}


def ours(reached):
    return {"work": {"positions": 120_000.0, "items": 97_000.0, "labels": 97_000, "sequences": 2_400.0},
            "s_per_epoch": 2.0, "s_per_epoch_with_valid": 2.5, "s_per_mtok": B.per_million(2.0, 120_000.0),
            "reached": reached, "exclude_seen.test_ndcg@10": 0.06, "exclude_seen.test_recall@10": 0.12,
            "seen_ranked.test_ndcg@10": 0.05, "seen_ranked.test_recall@10": 0.1}


def test_table_without_recbole_prints_not_measured_and_no_ratio():
    lines = B.table(ours(None), {})
    body = "\n".join(lines)
    assert lines[0].startswith("| ml-100k | trecsys | RecBole 1.2.1 |")
    assert "| seconds per epoch, training pass | 2.00 | not measured | not measured |" in body
    assert "x |" not in body  # no ratio without both sides
    assert all(line.count("|") == 5 for line in lines)


def test_table_with_recbole_gives_ratios_and_not_reached():
    theirs = {"s_per_epoch": 100.0, "s_per_epoch_with_valid": 110.0, "train_positions": 4_800_000,
              "train_items": 2_000_000, "train_labels": 97_000, "epochs": 3, "seen_ranked.test_ndcg@10": 0.06,
              "s_per_mtok": B.per_million(100.0, 4_800_000), "to_best": {"wall_s": 330.0, "cpu_s": 300.0}}
    body = "\n".join(B.table(ours(None), theirs))
    assert "| seconds per epoch, training pass | 2.00 | 100.0 | 50.0x |" in body
    assert "| tokens per epoch (tensor cells, padding included) | 120,000 | 4,800,000 | 40.0x |" in body
    assert "| time to the anchor, wall s (training + validation) | not reached | 330.0 |  |" in body
    reached = "\n".join(B.table(ours({"elapsed_s": 33.0, "cpu_s": 30.0}), theirs))
    assert "| time to the anchor, wall s (training + validation) | 33.0 | 330.0 | 10.0x |" in reached


def test_both_sides_get_the_same_threads_and_allocator(tmp_path, monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")  # the caller's own malloc settings never reach a side
    env = bench_env.child_env(3, tuned=True)
    assert {k: env[k] for k in bench_env.ALLOCATOR_ENV} == bench_env.ALLOCATOR_ENV
    assert "MALLOC_ARENA_MAX" not in env
    assert all(env[name] == "3" for name in bench_env.THREAD_ENV) and env["OMP_WAIT_POLICY"]
    assert not any(k.startswith("MALLOC_") for k in bench_env.child_env(1, tuned=False))
    # RecBole's side: a stand-in interpreter that reports its arguments and environment.
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho '{\"argv\": \"'\"$*\"'\", \"omp\": \"'\"$OMP_NUM_THREADS\"'\", "
                    "\"mmap\": \"'\"$MALLOC_MMAP_MAX_\"'\"}'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    result = B.run_recbole(str(fake), tmp_path / "ml-100k", 2, 3, tuned=True)
    assert result["argv"].endswith("--threads 3") and " 2 " in result["argv"]
    assert (result["omp"], result["mmap"]) == ("3", bench_env.ALLOCATOR_ENV["MALLOC_MMAP_MAX_"])
    # trecsys's side: the same environment, and runtime.threads on every command.
    side = B.Trecsys(tmp_path / "ml-100k", tmp_path / "run", 3, True, ["finetune.train.epochs=2"])
    assert "runtime.threads=3" in side.overrides and "finetune.train.epochs=2" in side.overrides
    shared = (*bench_env.ALLOCATOR_ENV, *bench_env.THREAD_ENV, "OMP_WAIT_POLICY")
    assert {k: side.env[k] for k in shared} == {k: env[k] for k in shared}


def test_skips_without_data_and_rejects_zero_epochs(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TRECSYS_ML100K", raising=False)
    monkeypatch.setattr(B, "recbole_package", lambda python: None)
    assert B.main(["--data", str(tmp_path)]) == 0
    assert "ml100k: skipped" in capsys.readouterr().out
    try:
        B.main(["--recbole-epochs", "0"])
    except SystemExit as stop:
        assert stop.code == 2
    else:
        raise AssertionError("--recbole-epochs 0 was accepted")


def test_an_unfinished_resumable_recbole_run_stops_before_trecsys_side(tmp_path, monkeypatch, capsys):
    (tmp_path / "ml-100k.inter").write_text("user_id:token\titem_id:token\n")
    calls = []

    def unfinished(python, data, epochs, threads, tuned, resume, budget_s):
        calls.append((resume, budget_s))
        return {"complete": False, "epochs": 2, "resumed_from_epoch": 2, "best_epoch": 1, "best_valid_ndcg": 0.05,
                "load_after": "load 1.0", "per_epoch": [{"train_s": 1.0, "train_cpu_s": 1.0, "valid_ndcg@10": 0.05},
                                                         {"train_s": 1.0, "train_cpu_s": 1.0, "valid_ndcg@10": 0.04}]}

    monkeypatch.setattr(B, "run_recbole", unfinished)
    monkeypatch.setattr(B, "run_trecsys", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trecsys ran")))
    assert B.main(["--data", str(tmp_path), "--recbole-python", "python", "--recbole-resume", str(tmp_path / "state"),
                   "--recbole-budget-s", "60", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert calls == [((tmp_path / "state").resolve(), 60.0)] and (tmp_path / "state").is_dir()
    assert "ml100k.recbole.epoch 2:" in out and "ml100k.recbole.epoch 1:" not in out  # this invocation's epochs
    assert "not finished after 2 epoch(s)" in out and "run the same command again" in out
    with pytest.raises(SystemExit):
        B.main(["--recbole-budget-s", "60"])  # a budget without a folder to continue from


@pytest.mark.skipif(not os.environ.get("RECBOLE_PYTHON"), reason="RecBole's own environment (RECBOLE_PYTHON) absent")
def test_recbole_resumed_one_epoch_per_process_equals_one_run(tmp_path):
    """recbole_sasrec.py --resume-dir: the same per-epoch validation and test numbers as one run."""
    rng = np.random.default_rng(0)
    rows = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for u in range(80):
        rows += [f"u{u}\ti{i}\t1\t{t}" for t, i in enumerate(rng.choice(150, rng.integers(5, 20), replace=False))]
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "tiny.inter").write_text("\n".join(rows) + "\n")

    def run(*extra):
        done = subprocess.run([os.environ["RECBOLE_PYTHON"], str(Path(B.__file__).parent / "recbole_sasrec.py"),
                               str(tmp_path), "3", str(tmp_path), "--dataset", "tiny", "--threads", "1", *extra],
                              capture_output=True, text=True, cwd=tmp_path, env=bench_env.child_env(1, tuned=False))
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    whole = run()
    parts = [run("--resume-dir", str(tmp_path / "state"), "--budget-s", "0.001") for _ in range(3)]
    assert [p["complete"] for p in parts] == [False, False, True]
    assert [e["valid_ndcg@10"] for e in parts[-1]["per_epoch"]] == [e["valid_ndcg@10"] for e in whole["per_epoch"]]
    assert parts[-1]["seen_ranked.test_ndcg@10"] == whole["seen_ranked.test_ndcg@10"]


@pytest.mark.skipif(not os.environ.get("RECBOLE_PYTHON"), reason="RecBole's own environment (RECBOLE_PYTHON) absent")
def test_recbole_exclude_seen_never_masks_the_held_out_item_when_timestamps_tie(tmp_path):
    """Every user's items share one timestamp (ml-100k users rate many films in one second): masking the
    user's other items can only lift the held-out item, so exclude_seen scores at least seen_ranked."""
    rng = np.random.default_rng(1)
    rows = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for u in range(80):
        rows += [f"u{u}\ti{i}\t1\t{u}" for i in rng.choice(60, rng.integers(5, 20), replace=False)]
    (tmp_path / "ties").mkdir()
    (tmp_path / "ties" / "ties.inter").write_text("\n".join(rows) + "\n")
    done = subprocess.run([os.environ["RECBOLE_PYTHON"], str(Path(B.__file__).parent / "recbole_sasrec.py"),
                           str(tmp_path), "2", str(tmp_path), "--dataset", "ties", "--threads", "1"],
                          capture_output=True, text=True, cwd=tmp_path, env=bench_env.child_env(1, tuned=False))
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["exclude_seen.test_recall@10"] >= result["seen_ranked.test_recall@10"] > 0
    assert result["exclude_seen.test_ndcg@10"] >= result["seen_ranked.test_ndcg@10"]
