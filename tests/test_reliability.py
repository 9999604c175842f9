"""Reliability promises, end to end: kill and resume, clean stops on signals, integrity checks with
and without --verify, one writer per run directory, no unsafe loaders, repeatable CPU results.

See the README section "Guarantees" for what these tests stand behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import tiny_config, write_tiny_prepared
from safetensors.torch import load_file
from test_bad_input import hash_tree, leftovers
from typer.testing import CliRunner

from trecsys.artifacts import read_manifest, sha256_file, verify_stage_folder
from trecsys.cli import app
from trecsys.errors import EXIT_BAD_INPUT, EXIT_BUSY, EXIT_INTERRUPTED
from trecsys.prepared.tables import load_prepared
from trecsys.train.engine import LAST, STATE

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "trecsys"
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def trec(*args: str):
    return CliRunner().invoke(app, list(args))


def start_trec(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trecsys", *args], env=ENV, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {path} appeared: "
                                 f"{proc.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear within {timeout_s:g}s")
        time.sleep(0.05)


def tensors(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


# ---------------------------------------------------------------------------------------------
# Interruption


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    for run_dir in (whole, cut):
        write_tiny_prepared(run_dir)
    train = {"epochs": 3, "batch_size": 32, "checkpoint_every_steps": 2}  # 12 steps
    result = trec("pretrain-source", "-c", str(tiny_config(whole, tmp_path / "w.yaml", **train)))
    assert result.exit_code == 0, result.output

    cfg = tiny_config(cut, tmp_path / "c.yaml", **train)
    proc = start_trec("pretrain-source", "-c", str(cfg))
    wait_for(cut / ".pretrain.work" / LAST / STATE, proc)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.kill()  # SIGKILL: no handler runs, nothing is saved beyond the last checkpoint
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (cut / "pretrain").exists()

    resumed = trec("pretrain-source", "-c", str(cfg), "--resume")
    assert resumed.exit_code == 0, resumed.output
    expected, got = tensors(whole / "pretrain"), tensors(cut / "pretrain")
    assert expected.keys() == got.keys()
    assert all(expected[k].equal(got[k]) for k in expected)
    manifests = [json.loads((d / "pretrain" / "manifest.json").read_text()) for d in (whole, cut)]
    assert manifests[0]["metrics"] == manifests[1]["metrics"]
    assert manifests[0]["best_step"] == manifests[1]["best_step"]
    assert leftovers(tmp_path) == [] and not (cut / ".pretrain.work").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_saves_a_checkpoint_and_exits_130(tmp_path, signum):
    run_dir = tmp_path / "run"
    write_tiny_prepared(run_dir)
    # Many epochs: the run is still training when the signal arrives.
    cfg = tiny_config(run_dir, tmp_path / "c.yaml", epochs=50, checkpoint_every_steps=1)
    proc = start_trec("pretrain-source", "-c", str(cfg))
    state = run_dir / ".pretrain.work" / LAST / STATE
    wait_for(state, proc)
    first_mtime = state.stat().st_mtime_ns
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, stderr[-2000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: stopped by {signum.name} after step "), last
    assert "--resume" in last
    # The stop wrote a fresh checkpoint of the step it finished, and no stage folder or temp file.
    assert state.stat().st_mtime_ns > first_mtime
    assert not (run_dir / "pretrain").exists() and leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Integrity


def _flip_footer_byte(path: Path) -> None:
    """Change one byte of the Parquet footer's writer name (the file still reads), keeping size and mtime."""
    stat = path.stat()
    data = path.read_bytes()
    at = data.rindex(b"parquet-cpp-arrow")
    path.write_bytes(data[:at] + b"P" + data[at + 1:])
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_same_size_tampered_file_passes_the_fast_path_but_not_verify(tiny_prepared, tmp_path):
    target = tiny_prepared / "prepared" / "interactions.parquet"
    _flip_footer_byte(target)
    load_prepared(tiny_prepared)  # size and mtime match: the fast path trusts it
    cfg = str(tiny_config(tiny_prepared, tmp_path / "c.yaml"))
    before = hash_tree(tiny_prepared)
    for stage in ("pretrain-source", "distill", "finetune-target", "evaluate", "recommend"):
        result = trec(stage, "-c", cfg, "--verify")
        assert result.exit_code == EXIT_BAD_INPUT, result.output
        assert result.stderr.strip().splitlines()[-1] == (
            f"error: {target} does not match the sha256 in {target.parent / 'manifest.json'}: "
            "re-run the stage that made it")
    assert hash_tree(tiny_prepared) == before


def test_a_truncated_file_fails_the_fast_path(tiny_prepared, tmp_path):
    target = tiny_prepared / "prepared" / "items.parquet"
    target.write_bytes(target.read_bytes()[:-10])
    result = trec("evaluate", "-c", str(tiny_config(tiny_prepared, tmp_path / "c.yaml")))
    assert result.exit_code == EXIT_BAD_INPUT
    assert f"error: {target} changed since it was written" in result.stderr


def test_evaluate_verify_checks_the_checkpoint_folder_too(tiny_prepared, tmp_path):
    from test_bad_input import write_checkpoint

    folder = write_checkpoint(tiny_prepared / "pretrain", n_items=70)
    weights = folder / "model.safetensors"
    stat, data = weights.stat(), bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    verify_stage_folder(folder)  # fast path: same size and mtime
    result = trec("evaluate", "-c", str(tiny_config(tiny_prepared, tmp_path / "c.yaml")), "--verify")
    assert result.exit_code == EXIT_BAD_INPUT
    assert f"error: {weights} does not match the sha256" in result.stderr


# ---------------------------------------------------------------------------------------------
# Determinism and manifests


def test_same_config_and_seed_give_identical_metrics_and_hashed_manifests(tmp_path):
    tables = []
    for name in ("a", "b"):
        run_dir = tmp_path / name
        write_tiny_prepared(run_dir)
        path = tiny_config(run_dir, tmp_path / f"{name}.yaml", epochs=1)
        data = yaml.safe_load(path.read_text())
        data["evaluate"] = {"bootstrap": 20, "ks": [1, 5, 10]}
        path.write_text(yaml.safe_dump(data))
        for stage in ("pretrain-source", "evaluate"):
            result = trec(stage, "-c", str(path))
            assert result.exit_code == 0, result.output
        tables.append(pd.read_parquet(run_dir / "eval" / "metrics.parquet"))
        for stage in ("prepared", "pretrain", "eval"):
            assert_manifest_hashes(run_dir / stage)
    pd.testing.assert_frame_equal(tables[0], tables[1], check_exact=True)
    assert len(tables[0]) > 0 and tables[0]["value"].notna().all()


def assert_manifest_hashes(folder: Path) -> None:
    """The manifest lists every other file of the folder with its true size and sha256."""
    manifest = json.loads((folder / "manifest.json").read_text())
    listed = {entry["path"]: entry for entry in manifest["outputs"]}
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(listed) == on_disk and on_disk
    for name, entry in listed.items():
        assert entry["size"] == (folder / name).stat().st_size
        assert entry["sha256"] == sha256_file(folder / name)


# ---------------------------------------------------------------------------------------------
# Concurrency

# `trec prepare` with a fake, slow encoder: it touches a marker file while it holds the lock.
SLOW_PREPARE = """
import sys, time
from pathlib import Path
sys.path.insert(0, "tests")
marker = Path(sys.argv[1])
from conftest import fake_embed_texts
from trecsys.stages import prepare
def slow_embed(*args, **kwargs):
    marker.touch()
    time.sleep(4)
    return fake_embed_texts(*args, **kwargs)
prepare.embed_texts = slow_embed
from trecsys.cli import main
sys.argv = ["trec", *sys.argv[2:]]
main()
"""


def test_two_prepares_on_one_run_dir_never_mix(tmp_path, monkeypatch):
    from conftest import fake_embed_texts

    from trecsys.stages import prepare

    monkeypatch.setattr(prepare, "embed_texts", fake_embed_texts)
    run_dir = tmp_path / "run"
    config = tmp_path / "p.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(run_dir), "device": "cpu",
        "data": {"domains": {"Kitchen": {"format": "synthetic"}, "Food": {"format": "synthetic"}},
                 "source": ["Kitchen"], "target": "Food",
                 "synthetic": {"n_users": 120, "n_items_per_domain": 60}},
    }))
    marker = tmp_path / "embedding"
    first = subprocess.Popen([sys.executable, "-c", SLOW_PREPARE, str(marker), "prepare", "-c", str(config),
                              "seed=1"], env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(marker, first)
    second = trec("prepare", "-c", str(config), "seed=2")
    assert second.exit_code == EXIT_BUSY, second.output
    assert second.stderr.strip().splitlines()[-1].startswith(f"error: {run_dir / 'prepared'} is locked")
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr[-2000:]
    # Only the first run's output, whole and consistent with its manifest.
    prepared = load_prepared(run_dir, verify=True)
    assert prepared.manifest.seed == 1 and read_manifest(run_dir / "prepared")["config"]["seed"] == 1
    assert_manifest_hashes(run_dir / "prepared")
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Safety


def _calls(source: str, name: str) -> list[str]:
    """The text of every `name(...)` call in source, up to its closing parenthesis."""
    calls = []
    for match in re.finditer(rf"(?<![\w.]){re.escape(name)}\(", source):
        depth, i = 1, match.end()
        while depth and i < len(source):
            depth += {"(": 1, ")": -1}.get(source[i], 0)
            i += 1
        calls.append(source[match.start():i])
    return calls


def test_the_package_uses_no_unsafe_loader():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    for path in files:
        source = path.read_text(encoding="utf-8")
        code = "\n".join(line.split("#")[0] for line in source.splitlines())  # comments may say "pickle"
        where = path.relative_to(REPO)
        assert not re.search(r"\b(import|from)\s+(c?pickle|dill|cloudpickle|joblib|marshal|shelve)\b", code), where
        assert not re.search(r"\bpickle\.|allow_pickle\s*=\s*True", code), where
        for call in _calls(code, "torch.load"):
            assert "weights_only=True" in call, f"{where}: {call}"
        for call in _calls(code, "yaml.load"):
            assert path.name == "load.py" and "Loader=_UniqueKeyLoader" in call, f"{where}: {call}"
        for name in ("eval", "exec", "yaml.unsafe_load", "yaml.full_load"):
            assert not _calls(code, name), f"{where}: {name}("
    # The one yaml.load uses a SafeLoader subclass.
    from trecsys.config import _UniqueKeyLoader

    assert issubclass(_UniqueKeyLoader, yaml.SafeLoader)
