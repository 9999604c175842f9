"""Artifact I/O in one place: atomic writes, Parquet, manifests with hashes, and run locks.

Every stage writes its folder through `stage_output`, which builds the folder under a temporary name
and swaps it in only when the stage succeeded, so a failed or killed run never leaves a partial
artifact and never destroys the previous good one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from trecsys import __version__
from trecsys.errors import ArtifactError, LockBusyError, TrecError

PARQUET_COMPRESSION = "zstd"
MANIFEST = "manifest.json"


# ---------------------------------------------------------------------------------------------
# Atomic files


# The process umask, read once (os.umask can only be read by setting it).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    _ensure_writable_dir(path.parent)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if tmp.is_file():  # some writers (safetensors) create 0600 files: give them the usual mode
            os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"missing file: {path}") from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: not valid JSON (line {exc.lineno}): {exc.msg}") from None


def write_parquet(table: pa.Table, path: Path, metadata: dict[str, str] | None = None) -> None:
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({k.encode(): v.encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression=PARQUET_COMPRESSION)


def read_parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"missing artifact: {path}")
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ArtifactError(f"{path}: unreadable Parquet ({str(exc).splitlines()[0]})") from None


def parquet_metadata(path: Path) -> dict[str, str]:
    meta = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items()}


def _ensure_writable_dir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrecError(f"cannot create output folder {folder}: {exc.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise TrecError(f"output folder is not writable: {folder}")


# ---------------------------------------------------------------------------------------------
# Stage folders


@contextlib.contextmanager
def stage_output(final: Path) -> Iterator[Path]:
    """Build a stage's folder under a temporary name; swap it in when the block succeeds.

    The old folder is moved aside before the new one is renamed into place and deleted after, so
    at every instant either the old or the new complete folder exists under a known name.
    """
    final = Path(final)
    _ensure_writable_dir(final.parent)
    _recover_swapped(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _recover_swapped(final: Path) -> None:
    """A run killed between the two renames of `stage_output` left the old folder aside: restore it."""
    if final.exists():
        return
    for old in sorted(final.parent.glob(f".{final.name}.old-*")):
        os.replace(old, final)
        return


# ---------------------------------------------------------------------------------------------
# Hashes and manifests


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def describe_file(path: Path, root: Path | None = None) -> dict[str, Any]:
    """size, mtime and sha256 of `path`, named relative to `root`, or absolute (so that a manifest
    means the same from any working directory)."""
    path = Path(path)
    stat = path.stat()
    shown = path.relative_to(root).as_posix() if root is not None else str(path.resolve())
    return {"path": shown, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256_file(path)}


def write_manifest(folder: Path, stage: str, config: dict, inputs: list[dict], extra: dict,
                   files: list[Path] | None = None, name: str = MANIFEST) -> dict:
    """Record what made `folder`: version, config, inputs, and each output file's size and sha256.

    The outputs are every file in `folder`, or only `files` when the folder is shared with others
    (a recommend output beside a person's own files); `name` is the manifest's file name there.
    """
    if files is None:
        files = [p for p in sorted(Path(folder).rglob("*")) if p.is_file() and p.name != name]
    outputs = [describe_file(p, root=folder) for p in files]
    manifest = {
        "trecsys_version": __version__,
        "stage": stage,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"python": platform.python_version(), "platform": platform.platform()},
        "config": config,
        "inputs": inputs,
        "outputs": outputs,
        **extra,
    }
    write_json(Path(folder) / name, manifest)
    return manifest


def read_manifest(folder: Path, stage: str | None = None, name: str = MANIFEST) -> dict:
    folder = Path(folder)
    path = folder / name
    if not path.is_file():
        what = f"the {stage} stage" if stage else "a trecsys stage"
        raise ArtifactError(f"{folder} has no {name}: run {what} first")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("outputs", []), list):
        raise ArtifactError(f"{path}: not a trecsys manifest (a JSON object with an outputs list): "
                            "re-run the stage that made it")
    if stage is not None and manifest.get("stage") != stage:
        raise ArtifactError(f"{path}: made by stage {manifest.get('stage')!r}, expected {stage!r}")
    return manifest


def verify_outputs(folder: Path, manifest: dict, full_hash: bool = False) -> None:
    """Refuse a stage folder whose files changed since its manifest was written.

    The fast path compares size and mtime; `full_hash` recomputes sha256 (`--verify`).
    """
    folder = Path(folder)
    for entry in manifest.get("outputs", []):
        if not (isinstance(entry, dict) and isinstance(entry.get("path"), str)
                and {"size", "mtime_ns", "sha256"} <= entry.keys()):
            raise ArtifactError(f"{folder / MANIFEST}: malformed outputs entry {str(entry)[:80]}: "
                                "re-run the stage that made it")
        path = folder / entry["path"]
        if not path.is_file():
            raise ArtifactError(f"{path} is listed in {folder / MANIFEST} but missing")
        stat = path.stat()
        if stat.st_size != entry["size"]:
            raise ArtifactError(
                f"{path} changed since it was written ({stat.st_size} bytes, manifest says {entry['size']}): "
                "re-run the stage that made it"
            )
        if full_hash or stat.st_mtime_ns != entry["mtime_ns"]:
            if sha256_file(path) != entry["sha256"]:
                raise ArtifactError(
                    f"{path} does not match the sha256 in {folder / MANIFEST}: re-run the stage that made it"
                )


def verify_stage_folder(folder: Path, full_hash: bool = False) -> None:
    """`verify_outputs` for a folder a stage wrote; a checkpoint folder without a manifest (a training
    run's `best/`) has nothing to check against and passes."""
    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        verify_outputs(folder, read_manifest(folder), full_hash=full_hash)


# ---------------------------------------------------------------------------------------------
# Locks


@contextlib.contextmanager
def run_lock(target: Path, wait_s: float = 0.0, poll_s: float = 0.2) -> Iterator[None]:
    """Hold an exclusive lock on `target` (a file or folder path) for the duration of the block.

    A second run on the same target waits up to `wait_s` seconds, then raises LockBusyError (exit 3).
    The lock is an flock on a sibling `.lock` file, so it is released when the process dies.
    """
    target = Path(target)
    _ensure_writable_dir(target.parent)
    lock_path = target.with_name(f".{target.name}.lock")
    handle = open(lock_path, "a+")
    deadline = time.monotonic() + max(wait_s, 0.0)
    try:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockBusyError(
                        f"{target} is locked by another trecsys run (lock file {lock_path}); "
                        f"waited {wait_s:g}s"
                    ) from None
                time.sleep(poll_s)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()
