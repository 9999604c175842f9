"""Atomic writes, stage folders that never leave partial output, manifests with hashes, and locks."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

import pyarrow as pa
import pytest

from trecsys.artifacts import (
    atomic_path,
    parquet_metadata,
    read_manifest,
    read_parquet,
    run_lock,
    stage_output,
    verify_outputs,
    write_manifest,
    write_parquet,
)
from trecsys.errors import ArtifactError, LockBusyError


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("good")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_checkpoints_get_the_usual_file_mode(tmp_path):
    """safetensors creates 0600 files; artifacts others read (a serving job, a colleague) follow the umask."""
    import torch

    from trecsys.model.checkpoint import save_weights

    save_weights(torch.nn.Linear(2, 2), tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_parquet_round_trip_with_metadata(tmp_path):
    table = pa.table({"a": [1, 2, 3]})
    write_parquet(table, tmp_path / "t.parquet", metadata={"trecsys.encoder": "{}"})
    assert read_parquet(tmp_path / "t.parquet").equals(table)
    assert parquet_metadata(tmp_path / "t.parquet")["trecsys.encoder"] == "{}"


def test_unreadable_parquet_is_an_artifact_error(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ArtifactError, match="bad.parquet: unreadable Parquet"):
        read_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ArtifactError, match="missing artifact"):
        read_parquet(tmp_path / "none.parquet")


def test_stage_output_swaps_only_on_success(tmp_path):
    final = tmp_path / "run" / "prepared"
    with stage_output(final) as folder:
        (folder / "a.txt").write_text("v1")
    assert (final / "a.txt").read_text() == "v1"

    with pytest.raises(ValueError), stage_output(final) as folder:
        (folder / "a.txt").write_text("partial")
        raise ValueError("failed half-way")
    assert (final / "a.txt").read_text() == "v1"
    assert sorted(p.name for p in final.parent.iterdir()) == ["prepared"]

    with stage_output(final) as folder:
        (folder / "b.txt").write_text("v2")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]


def test_stage_output_recovers_a_folder_left_aside_by_a_killed_swap(tmp_path):
    aside = tmp_path / ".prepared.old-12345"
    aside.mkdir()
    (aside / "a.txt").write_text("v1")
    with pytest.raises(ValueError), stage_output(tmp_path / "prepared"):
        raise ValueError("fail")
    assert (tmp_path / "prepared" / "a.txt").read_text() == "v1"


def test_manifest_hashes_detect_tampering(tmp_path):
    folder = tmp_path / "stage"
    folder.mkdir()
    (folder / "data.bin").write_bytes(b"0123456789")
    manifest = write_manifest(folder, "prepare", {"seed": 0}, inputs=[], extra={"seed": 0})
    assert manifest["outputs"][0]["path"] == "data.bin"
    assert read_manifest(folder, stage="prepare")["stage"] == "prepare"
    verify_outputs(folder, manifest, full_hash=True)

    # Same size, different bytes, mtime restored: only the full hash can tell.
    stat = (folder / "data.bin").stat()
    (folder / "data.bin").write_bytes(b"0123456780")
    os.utime(folder / "data.bin", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    verify_outputs(folder, manifest)  # fast path trusts size + mtime
    with pytest.raises(ArtifactError, match="does not match the sha256"):
        verify_outputs(folder, manifest, full_hash=True)

    (folder / "data.bin").write_bytes(b"01234")  # truncated
    with pytest.raises(ArtifactError, match="changed since it was written"):
        verify_outputs(folder, manifest)


def test_read_manifest_checks_stage(tmp_path):
    with pytest.raises(ArtifactError, match="no manifest.json"):
        read_manifest(tmp_path, stage="prepare")
    write_manifest(tmp_path, "pretrain", {}, [], {})
    with pytest.raises(ArtifactError, match="expected 'prepare'"):
        read_manifest(tmp_path, stage="prepare")


def _hold_lock(path, ready, release):
    with run_lock(path):
        ready.set()
        release.wait(10)


def test_run_lock_excludes_a_second_holder(tmp_path):
    target = tmp_path / "out"
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(target, ready, release))
    holder.start()
    try:
        assert ready.wait(10)
        started = time.monotonic()
        with pytest.raises(LockBusyError, match="locked by another trecsys run") as info, \
                run_lock(target, wait_s=0.3):
            pass
        assert info.value.exit_code == 3
        assert time.monotonic() - started >= 0.3
    finally:
        release.set()
        holder.join(10)
    with run_lock(target, wait_s=0):  # released when the holder exits
        pass


def test_manifest_records_the_versions_device_and_commit_that_made_it(tmp_path):
    import subprocess

    import numpy
    import torch
    import transformers

    from trecsys import __version__

    folder = tmp_path / "stage"
    folder.mkdir()
    manifest = write_manifest(folder, "prepare", {"device": "cpu"}, inputs=[], extra={})
    env = manifest["environment"]
    assert env["packages"] == {"trecsys": __version__, "torch": torch.__version__,
                               "transformers": transformers.__version__, "numpy": numpy.__version__}
    assert env["device"]["type"] == "cpu"
    repo = Path(__file__).resolve().parent.parent
    if (repo / ".git").exists():  # run from a checkout: the commit the code came from
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        assert env["git_commit"] == head and isinstance(env["git_dirty"], bool)
    assert read_manifest(folder)["environment"] == env
