"""A hostile user and a hostile environment, through the real CLI: links planted at the names trecsys
writes, leftovers of killed runs, full disks and read-only folders. Nothing outside the run may ever
be written, and each failure is one `error:` line with its documented exit code.
"""

# ruff: noqa: F811  (test functions take the imported `ctx` fixture as a parameter)
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import tiny_config, write_tiny_prepared
from test_bad_input import ctx, hash_tree, leftovers  # noqa: F401  (ctx: the bad-input corpus fixture)
from test_reliability import ENV, REPO, SLOW_PREPARE, wait_for
from typer.testing import CliRunner

from trecsys.cli import app
from trecsys.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_IO, EXIT_NO_PERMISSION


def trec(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def last_error(result) -> str:
    return result.stderr.strip().splitlines()[-1]


def dead_pid() -> int:
    """The pid of a process that has exited (a SIGKILLed run, as far as its leftovers can tell)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def victim(ctx) -> Path:
    """A file outside the run that a planted link points to; it must never change."""
    path = ctx.tmp / "outside" / "precious.txt"
    path.parent.mkdir()
    path.write_text("do not touch\n")
    return path


# ---------------------------------------------------------------------------------------------
# Links planted at the names trecsys writes


def test_a_link_at_the_old_temporary_name_is_not_followed(ctx):
    """Temporary names used to be `.<name>.tmp-<pid>`: a link planted there received the Parquet bytes."""
    precious = victim(ctx)
    out = ctx.tmp / "recs" / "out.parquet"
    out.parent.mkdir()
    (out.parent / f".out.parquet.tmp-{os.getpid()}").symlink_to(precious)
    result = trec("recommend", "-c", ctx.config, "--output", out)
    assert result.exit_code == 0, result.output
    assert precious.read_text() == "do not touch\n"
    assert not out.is_symlink() and pq.read_table(out).num_rows > 0


def test_a_link_at_the_lock_file_is_refused_and_not_truncated(ctx):
    precious = victim(ctx)
    out = ctx.tmp / "recs" / "out.parquet"
    out.parent.mkdir()
    lock = out.parent / ".out.parquet.lock"
    lock.symlink_to(precious)
    result = trec("recommend", "-c", ctx.config, "--output", out)
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert last_error(result) == (f"error: lock file {lock} is a symbolic link (to {precious}); trecsys never "
                                  "follows one: remove it")
    assert precious.read_text() == "do not touch\n" and not out.exists()


def test_an_output_that_is_a_link_is_refused(ctx):
    precious = victim(ctx)
    out = ctx.tmp / "out.parquet"
    out.symlink_to(precious)
    result = trec("recommend", "-c", ctx.config, "--output", out)
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert last_error(result).startswith(f"error: output {out} is a symbolic link (to {precious})")
    assert precious.read_text() == "do not touch\n" and out.is_symlink()


def test_an_output_that_is_a_folder_is_refused(ctx):
    out = ctx.tmp / "out.parquet"
    out.mkdir()
    result = trec("recommend", "-c", ctx.config, "--output", out)
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert last_error(result) == f"error: output {out} is a folder; name a file (or remove the folder)"


def test_a_stage_folder_that_is_a_link_is_refused_before_any_work(ctx):
    elsewhere = ctx.tmp / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine\n")
    (ctx.run_dir / "eval").symlink_to(elsewhere)
    result = trec("evaluate", "-c", ctx.config)
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert last_error(result).startswith(f"error: output {ctx.run_dir / 'eval'} is a symbolic link")
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep.txt"]
    assert (ctx.run_dir / "eval").is_symlink()


def test_a_link_planted_in_the_training_work_folder_is_not_followed(ctx):
    precious = victim(ctx)
    work = ctx.run_dir / ".pretrain.work"
    work.mkdir()
    (work / "train_log.jsonl").symlink_to(precious)
    result = trec("pretrain-source", "-c", ctx.config)
    assert precious.read_text() == "do not touch\n"
    assert result.exit_code in (0, EXIT_BAD_INPUT), result.output


# ---------------------------------------------------------------------------------------------
# Leftovers of killed runs


def test_leftovers_of_a_killed_run_are_cleaned_by_the_next_run(ctx):
    pid = dead_pid()
    run = ctx.run_dir
    stale_dir = run / f".eval.tmp-{pid}"
    stale_dir.mkdir()
    (stale_dir / "metrics.parquet").write_bytes(b"half")
    stale_link = run / f".eval.tmp-{pid}-abc"
    stale_link.symlink_to(ctx.tmp)  # removed as a link, never followed into
    (run / ".eval.lock").write_text(f"{pid}\n")  # a lock file of the killed run
    live = run / f".eval.tmp-{os.getppid()}"  # a live process's temporary folder stays
    live.mkdir()
    result = trec("evaluate", "-c", ctx.config)
    assert result.exit_code == 0, result.output
    assert not stale_dir.exists() and not stale_link.is_symlink()
    assert not (run / ".eval.lock").exists()
    assert live.is_dir() and (ctx.tmp / "good.yaml").is_file()
    live.rmdir()
    assert leftovers(ctx.tmp) == []


def test_a_killed_recommend_leaves_nothing_for_long(ctx):
    pid = dead_pid()
    out = ctx.tmp / "recs" / "out.parquet"
    out.parent.mkdir()
    stale = [out.parent / f".out.parquet.tmp-{pid}", out.parent / f".out.parquet.tmp-{pid}-x1y2"]
    for path in stale:
        path.write_bytes(b"PAR1 half written")
    result = trec("recommend", "-c", ctx.config, "--output", out)
    assert result.exit_code == 0, result.output
    assert not any(p.exists() for p in stale) and leftovers(ctx.tmp) == []


# ---------------------------------------------------------------------------------------------
# The environment: full disks, size limits, read-only folders. Not a bug (exit 1): its own code,
# with the path named, and the previous output kept.

FSIZE_LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
from trecsys.cli import main
sys.argv = ["trec", *sys.argv[1:]]
main()
"""


def test_file_too_large_exits_74_naming_the_output(ctx):
    out = ctx.tmp / "out.parquet"
    out.write_bytes(b"the previous output")
    proc = subprocess.run([sys.executable, "-c", FSIZE_LIMITED, "recommend", "-c", str(ctx.config),
                           "--output", str(out)], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_IO, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == f"error: {out}: file too large for this file system or ulimit -f"
    assert out.read_bytes() == b"the previous output" and leftovers(ctx.tmp) == []


def test_disk_full_exits_74_naming_the_output(ctx, monkeypatch):
    import trecsys.artifacts

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(trecsys.artifacts.pq, "write_table", full)
    before = hash_tree(ctx.run_dir)
    result = trec("evaluate", "-c", ctx.config)
    assert result.exit_code == EXIT_IO, result.output
    message = last_error(result)
    assert message.startswith(f"error: {ctx.run_dir / 'eval'}/") and message.endswith(".parquet: no space left on "
                                                                                      "the device"), message
    assert hash_tree(ctx.run_dir) == before and leftovers(ctx.tmp) == []


def test_a_read_only_folder_exits_77_naming_it(ctx, monkeypatch):
    import trecsys.artifacts

    def read_only(*args, dir=None, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", dir)

    monkeypatch.setattr(trecsys.artifacts.tempfile, "mkstemp", read_only)
    out = ctx.tmp / "out.parquet"
    result = trec("recommend", "-c", ctx.config, "--output", out)
    assert result.exit_code == EXIT_NO_PERMISSION, result.output
    assert last_error(result) == f"error: {out}: read-only file system"
    assert not out.exists() and leftovers(ctx.tmp) == []


# ---------------------------------------------------------------------------------------------
# Request files and options


@pytest.mark.parametrize("option", ["--users", "--queries", "--histories"])
def test_a_request_file_that_is_not_utf8_names_its_line(ctx, option):
    name = "h.jsonl" if option == "--histories" else "f.txt"
    path = ctx.tmp / name
    path.write_bytes(b'{"user_id": "u1", "item_ids": ["F001"]}\n' if option == "--histories" else b"u1\n")
    with open(path, "ab") as handle:
        handle.write('caf\xe9\n'.encode("latin-1"))
    result = trec("recommend", "-c", ctx.config, option, path, "--output", ctx.tmp / "o.parquet")
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert last_error(result) == f"error: {option} {path}:2: not UTF-8 (byte 0xe9); save the file as UTF-8"


@pytest.mark.parametrize("args", [["recommend", "--wait", "-1"], ["recommend", "--show", "-2"],
                                  ["run", "--show", "-1"]], ids=["wait", "show", "run-show"])
def test_negative_counts_and_waits_are_refused(ctx, args):
    result = trec(args[0], "-c", ctx.config, *args[1:])
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert args[1] in result.output and not (ctx.run_dir / "recommend").exists()


# ---------------------------------------------------------------------------------------------
# Signals outside training: SIGTERM and SIGINT stop any stage with exit 130 and no leftovers


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_during_prepare_exits_130_and_leaves_nothing(tmp_path, signum):
    run_dir = tmp_path / "run"
    config = tmp_path / "p.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(run_dir), "device": "cpu",
        "data": {"domains": {"Kitchen": {"format": "synthetic"}, "Food": {"format": "synthetic"}},
                 "source": ["Kitchen"], "target": "Food", "synthetic": {"n_users": 60, "n_items_per_domain": 30}},
    }))
    marker = tmp_path / "embedding"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_PREPARE, str(marker), "prepare", "-c", str(config)],
                            env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(marker, proc)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, stderr[-2000:]
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (f"error: stopped by {signum.name}; what this run was writing was "
                                               "discarded and earlier outputs are kept")
    assert not (run_dir / "prepared").exists() and leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# --compare paths that contain "="


def test_compare_paths_containing_an_equals_sign_are_runs_not_overrides(ctx):
    import shutil

    other = ctx.tmp / "runs" / "lr=0.1"
    shutil.copytree(ctx.run_dir, other)
    result = trec("evaluate", "-c", ctx.config, "--compare", ctx.run_dir, other, "evaluate.bootstrap=5")
    assert result.exit_code == 0, result.output
    runs = set(pd.read_parquet(ctx.run_dir / "eval" / "metrics.parquet")["run"])
    assert any("lr=0.1" in run for run in runs), runs


# ---------------------------------------------------------------------------------------------
# Catalogue identity: a model's item indices must mean the same items where it is used


SMALL_EVAL = {"evaluate": {"bootstrap": 10, "ks": [1, 5, 10]}}


def _trained_run(tmp: Path, name: str) -> tuple[Path, Path]:
    run_dir = tmp / name
    write_tiny_prepared(run_dir)
    config = tiny_config(run_dir, tmp / f"{name}.yaml", sections=SMALL_EVAL, epochs=1)
    result = trec("pretrain-source", "-c", config)
    assert result.exit_code == 0, result.output
    return run_dir, config


def _rename_item(run_dir: Path, index: int, new_id: str) -> None:
    """Re-prepare a catalogue of the same size with one item renamed (manifest re-written to match)."""
    import json

    import pyarrow as pa

    from trecsys.artifacts import write_manifest, write_parquet

    folder = run_dir / "prepared"
    items = pq.read_table(folder / "items.parquet")
    ids = items.column("item_id").to_pylist()
    ids[index] = new_id
    write_parquet(items.set_column(items.column_names.index("item_id"), "item_id", pa.array(ids)),
                  folder / "items.parquet")
    manifest = json.loads((folder / "manifest.json").read_text())
    generated = {"trecsys_version", "stage", "created_at", "host", "config", "inputs", "outputs"}
    write_manifest(folder, "prepare", manifest["config"], manifest["inputs"],
                   {k: v for k, v in manifest.items() if k not in generated})


def test_a_model_is_refused_on_a_same_size_catalogue_with_other_items(tmp_path):
    run_dir, config = _trained_run(tmp_path, "run")
    _rename_item(run_dir, 40, "B-renamed")
    for args in (["evaluate", "-c", config], ["recommend", "-c", config, "--output", tmp_path / "r.parquet"],
                 ["finetune-target", "-c", config, "finetune.strategy=full"]):
        result = trec(*args)
        assert result.exit_code == EXIT_BAD_INPUT, result.output
        message = last_error(result)
        assert "trained on another catalogue" in message or "other prepared data" in message, message
        assert str(run_dir / "prepared") in message or str((run_dir / "prepared").resolve()) in message, message
    assert not (tmp_path / "r.parquet").exists() and not (run_dir / "eval").exists()


def test_a_model_copied_to_another_run_with_the_same_catalogue_is_accepted_and_a_renamed_one_refused(tmp_path):
    import shutil

    run_dir, _ = _trained_run(tmp_path, "run")
    model = tmp_path / "model"
    shutil.copytree(run_dir / "pretrain", model)
    other = tmp_path / "other"
    write_tiny_prepared(other)  # the same catalogue, prepared again
    config = tiny_config(other, tmp_path / "o.yaml", sections=SMALL_EVAL)
    result = trec("evaluate", "-c", config, "--model", model)
    assert result.exit_code == 0, result.output
    _rename_item(other, 3, "B-renamed")
    result = trec("evaluate", "-c", config, "--model", model)
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    message = last_error(result)
    assert "trained on another catalogue" in message and str((run_dir / "prepared").resolve()) in message
    assert str(other / "prepared") in message, message


# ---------------------------------------------------------------------------------------------
# Input fidelity: what prepare reads is what the models see


def _prepare(tmp: Path, monkeypatch, interactions: str, items: str | None = None, **data):
    from conftest import fake_embed_texts

    from trecsys.stages import prepare

    monkeypatch.setattr(prepare, "embed_texts", fake_embed_texts)
    (tmp / "f.csv").write_text(interactions, encoding="utf-8")
    domain = {"format": "csv", "interactions": "f.csv"}
    if items is not None:
        (tmp / "items.csv").write_text(items, encoding="utf-8")
        domain["items"] = "items.csv"
    config = tmp / "prepare.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(tmp / "run"), "device": "cpu",
                                      "data": {"root": str(tmp), "target": "Food", "domains": {"Food": domain},
                                               **data}}))
    return trec("prepare", "-c", config)


@pytest.mark.parametrize("engine", ["pandas", "polars"])
def test_fractions_of_a_second_order_events(tmp_path, monkeypatch, engine):
    # u1 bought b at 5.2 s and a at 5.7 s, listed the other way round: a is the last, held-out item.
    result = _prepare(tmp_path, monkeypatch, "user_id,item_id,timestamp\nu1,a,5.7\nu1,b,5.2\nu1,c,1\n"
                      "u2,a,1\nu2,b,2\nu2,c,3\n", engine=engine)
    assert result.exit_code == 0, result.output
    rows = pq.read_table(tmp_path / "run" / "prepared" / "interactions.parquet").to_pandas()
    items = pq.read_table(tmp_path / "run" / "prepared" / "items.parquet").to_pandas()
    u1 = rows[rows["user_id"] == "u1"].merge(items[["item_idx", "item_id"]], on="item_idx")
    assert u1["item_id"].tolist() == ["c", "b", "a"]
    assert u1["split"].tolist() == ["train", "valid", "test"]
    assert u1["timestamp"].tolist() == [1, 5, 5]  # stored in whole seconds, in full-precision order


@pytest.mark.parametrize("engine", ["pandas", "polars"])
@pytest.mark.parametrize("column", ["user_id", "item_id"])
def test_control_characters_in_ids_are_refused_with_file_and_line(tmp_path, monkeypatch, column, engine):
    bad = "u\x002,b,2" if column == "user_id" else "u2,b\x00,2"
    result = _prepare(tmp_path, monkeypatch, f"user_id,item_id,timestamp\nu1,a,1\n{bad}\n", engine=engine)
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    message = last_error(result)
    assert f"{tmp_path / 'f.csv'}:3: column '{column}'" in message and "control character" in message, message
    assert not (tmp_path / "run" / "prepared").exists()


def test_ids_written_differently_in_the_two_files_are_reported_with_counts(tmp_path, monkeypatch):
    result = _prepare(tmp_path, monkeypatch,
                      "user_id,item_id,timestamp\n" + "".join(f"u{u},{i},{t}\n" for u in range(3)
                                                            for t, i in enumerate(["007", "8", "9", "10", "11"])),
                      "item_id,title\n7,Seven\n8,Eight\n9,Nine\n10,Ten\n11,Eleven\n")
    assert result.exit_code == 0, result.output
    assert ("item ids of domain 'Food' match items.csv only when written alike (e.g. '007' in "
            "the interactions, '7' in items.csv), so they get no text") in result.stderr
    assert "warning: 1 of " in result.stderr
    assert "warning: domain 'Food': 1 of 5 items" not in result.stderr  # 20%: not a large share


def test_a_large_share_of_items_without_text_is_a_warning_and_none_an_error(tmp_path, monkeypatch):
    rows = "user_id,item_id,timestamp\n" + "".join(f"u{u},i{i},{i}\n" for u in range(3) for i in range(4))
    result = _prepare(tmp_path, monkeypatch, rows, "item_id,title\ni0,Zero\ni1,One\n")
    assert result.exit_code == 0, result.output
    assert "warning: domain 'Food': 2 of 4 items (50%) have no text in items.csv" in result.stderr
    result = _prepare(tmp_path, monkeypatch, rows, "item_id,title\ni0,\ni1,\ni2,\ni3,\n")
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert last_error(result).startswith("error: domain 'Food': none of its 4 interacted items has any text from items.csv")
    padded = "user_id,item_id,timestamp\n" + "".join(f"u{u},00{i},{i}\n" for u in range(3) for i in range(4))
    result = _prepare(tmp_path, monkeypatch, padded, "item_id,title\n0,Zero\n1,One\n2,Two\n3,X\n")
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert "write the ids the same way in both files" in last_error(result)


# ---------------------------------------------------------------------------------------------
# Determinism on several threads: the same command, seed and thread count give the same weights


def test_item_tower_gradients_repeat_exactly_on_two_threads():
    """The gather of item features per position used advanced indexing, whose CPU backward adds a
    repeated item's gradients with atomic adds across threads: two runs differed by ~1e-4 in the demo."""
    import torch

    from trecsys.config import ModelConfig, build
    from trecsys.model.seqrec import SeqRecModel

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = build(ModelConfig, {"d_model": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 20, "n_experts": 4,
                                  "dropout": 0.0}, prefix="model.")
        torch.manual_seed(0)
        model = SeqRecModel(cfg, 64, 300)
        model.set_item_text(torch.randn(300, 64))
        inputs = torch.randint(0, 300, (128, 20))

        def grads() -> dict:
            model.zero_grad()
            model.encode(inputs).square().sum().backward()
            return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

        first = grads()
        for _ in range(10):
            again = grads()
            assert all(torch.equal(first[n], again[n]) for n in first), \
                [n for n in first if not torch.equal(first[n], again[n])]
    finally:
        torch.set_num_threads(threads)


def test_two_trainings_on_two_threads_give_bit_identical_weights(tmp_path):
    from safetensors.torch import load_file

    weights = []
    for name in ("a", "b"):
        run_dir = tmp_path / name
        write_tiny_prepared(run_dir, n_users=200)
        config = tiny_config(run_dir, tmp_path / f"{name}.yaml", epochs=1, batch_size=128, lr=0.003)
        data = yaml.safe_load(config.read_text())
        data["model"].update(d_model=32, max_seq_len=20, n_experts=4)
        config.write_text(yaml.safe_dump(data))
        proc = subprocess.run([sys.executable, "-m", "trecsys", "pretrain-source", "-c", str(config)],
                              env={**ENV, "OMP_NUM_THREADS": "2"}, cwd=REPO, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        weights.append(load_file(str(run_dir / "pretrain" / "model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch_equal(weights[0][k], weights[1][k]) for k in weights[0])


def torch_equal(a, b) -> bool:
    return bool((a == b).all()) and a.shape == b.shape
