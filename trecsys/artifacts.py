"""Artifact I/O in one place: atomic writes, Parquet, manifests with hashes, and run locks.

Every stage writes its folder through `stage_output`, which builds the folder under a temporary name
and swaps it in only when the stage succeeded, so a failed or killed run never leaves a partial
artifact and never destroys the previous good one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import hashlib
import json
import os
import platform
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from trecsys import __version__
from trecsys.errors import (
    EXIT_NO_PERMISSION,
    ArtifactError,
    EnvironmentFailure,
    LockBusyError,
    TrecError,
    environment_error,
)
from trecsys.runtime import thread_record

PARQUET_COMPRESSION = "zstd"
MANIFEST = "manifest.json"


# ---------------------------------------------------------------------------------------------
# Atomic files


# The process umask, read once (os.umask can only be read by setting it).
_UMASK = os.umask(0o022)
os.umask(_UMASK)
# Never follow a link when creating a temporary name or a lock: a link planted there would make a
# write land on an unrelated file outside the run.
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; it replaces `path` only if the block succeeds.

    The temporary file is created here with O_CREAT|O_EXCL (mkstemp: a fresh, unpredictable name that
    is never a link), so writers that open it by name write into a file this process owns. An output
    that is a symbolic link or a folder is refused rather than replaced.
    """
    path = Path(path)
    _ensure_writable_dir(path.parent)
    refuse_link(path)
    if path.is_dir():
        raise ArtifactError(f"output {path} is a folder; name a file (or remove the folder)")
    clean_stale(path)
    with environment_errors(path):
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
        os.close(fd)
    tmp = Path(name)
    try:
        with environment_errors(path):
            yield tmp
            # mkstemp (and safetensors) make 0600 files: give artifacts the usual mode.
            os.chmod(tmp, 0o666 & ~_UMASK)
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def refuse_link(path: Path) -> None:
    """trecsys replaces its outputs whole and never writes through a symbolic link."""
    path = Path(path)
    if path.is_symlink():
        raise ArtifactError(f"output {path} is a symbolic link (to {os.readlink(path)}); trecsys never writes "
                            "through a link: remove the link, or name the real path")


def open_append(path: Path):
    """A text handle appending to `path` (created if missing), refusing a link at that name."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | _NOFOLLOW, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            refuse_link(path)
        raise
    return os.fdopen(fd, "a", encoding="utf-8")


# Temporary and moved-aside names carry the pid of the process that made them: `.<name>.tmp-<pid>...`.
_STALE = re.compile(r"(tmp|old)-(\d+)(?:-.*)?")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _remove(path: Path) -> None:
    """Remove a file, a link (never what it points to) or a folder tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def clean_stale(path: Path, keep_old: bool = False) -> None:
    """Remove temporary (and moved-aside) siblings of `path` left by processes that are gone (a
    SIGKILLed or crashed run); those of live processes are left alone. `keep_old`: moved-aside
    folders are kept (the caller may restore one)."""
    path = Path(path)
    prefix = f".{path.name}."
    with contextlib.suppress(OSError):
        for entry in path.parent.iterdir():
            match = _STALE.fullmatch(entry.name[len(prefix):]) if entry.name.startswith(prefix) else None
            if match is None or _pid_alive(int(match.group(2))) or (keep_old and match.group(1) == "old"):
                continue
            _remove(entry)


# ---------------------------------------------------------------------------------------------
# Environment errors: a full disk or a read-only folder is not a bug; name the path and exit with the
# documented code.


@contextlib.contextmanager
def environment_errors(path: Path) -> Iterator[None]:
    """Turn an environment OSError (disk full, read-only, ...) while writing `path` into a TrecError naming it."""
    try:
        yield
    except OSError as exc:
        error = environment_error(exc, path)
        if error is None:
            raise
        raise error from None


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
        error = environment_error(exc, folder)
        if error is not None:
            raise TrecError(f"cannot create output folder {folder}: {exc.strerror}",
                            exit_code=error.exit_code) from None
        raise TrecError(f"cannot create output folder {folder}: {exc.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise TrecError(f"output folder is not writable: {folder}", exit_code=EXIT_NO_PERMISSION)


# ---------------------------------------------------------------------------------------------
# Stage folders


@contextlib.contextmanager
def stage_output(final: Path) -> Iterator[Path]:
    """Build a stage's folder under a temporary name; swap it in when the block succeeds.

    The old folder is moved aside before the new one is renamed into place and deleted after, so
    at every instant either the old or the new complete folder exists under a known name. The
    temporary and moved-aside names are fresh (mkdtemp), never links; a stage folder that is a link is
    refused before anything is built.
    """
    final = Path(final)
    _ensure_writable_dir(final.parent)
    refuse_link(final)
    _recover_swapped(final)
    clean_stale(final)
    if final.exists() and not final.is_dir():
        raise ArtifactError(f"output {final} is a file, not a stage folder: remove it")
    with environment_errors(final):
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    try:
        with environment_errors(final):
            try:
                yield tmp
            except EnvironmentFailure as exc:  # name the file as it would have been in `final`
                inside = exc.path is not None and Path(exc.path).is_relative_to(tmp)
                raise (exc.at(final / Path(exc.path).relative_to(tmp)) if inside else exc) from None
            os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700 folders
            old = final.with_name(f".{final.name}.old-{os.getpid()}-{os.urandom(4).hex()}")
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _recover_swapped(final: Path) -> None:
    """A run killed between the two renames of `stage_output` left the old folder aside: restore it."""
    if final.exists() or final.is_symlink():
        return
    for old in sorted(final.parent.glob(f".{final.name}.old-*")):
        if old.is_dir() and not old.is_symlink():
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
        "runtime": thread_record(),
        "config": config,
        "inputs": inputs,
        "outputs": outputs,
        **extra,
        "environment": environment_record(config.get("device", "auto")),
    }
    write_json(Path(folder) / name, manifest)
    return manifest


def environment_record(device: str = "auto") -> dict[str, Any]:
    """What else decides the numbers (the README: results change across torch versions): the versions
    of the packages that compute them, the device, and the code's git commit when run from a checkout."""
    from importlib.metadata import PackageNotFoundError, version

    packages = {"trecsys": __version__}
    for dist in ("torch", "transformers", "numpy"):
        try:
            packages[dist] = version(dist)
        except PackageNotFoundError:
            packages[dist] = None
    return {"packages": packages, "device": _device_record(device), **_git_record()}


def _device_record(name: str) -> dict[str, Any]:
    import torch  # every stage that writes a manifest has loaded it already

    from trecsys.runtime import resolve_device

    try:
        device = resolve_device(name)
    except TrecError:
        return {"type": name}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return {"type": "cuda", "name": torch.cuda.get_device_name(index), "cuda": torch.version.cuda,
                "count": torch.cuda.device_count()}
    return {"type": device.type, "name": platform.processor() or platform.machine()}


@functools.cache
def _git_record() -> dict[str, Any]:
    """The commit of the checkout trecsys runs from, and whether tracked files differ from it;
    nothing for an installed package (no .git beside it) or without git."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists() or not (root / "pyproject.toml").is_file():
        return {}
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": commit, "git_dirty": bool(changed)}


def read_manifest(folder: Path, stage: str | None = None, name: str = MANIFEST) -> dict:
    folder = Path(folder)
    path = folder / name
    if not path.is_file():
        what = f"the {stage} stage" if stage else "a trecsys stage"
        raise ArtifactError(f"{folder} has no {name}: run {what} first")
    manifest = check_manifest(read_json(path), path)
    if stage is not None and manifest.get("stage") != stage:
        raise ArtifactError(f"{path}: made by stage {manifest.get('stage')!r}, expected {stage!r}")
    return manifest


def read_record(cls: type, folder: Path, stage: str) -> Any:
    """`cls.from_json` of the keys of `folder`'s manifest that dataclass `cls` names (a stage's own
    record); a missing or malformed one is refused naming the file (exit 2)."""
    manifest = read_manifest(folder, stage=stage)
    path = Path(folder) / MANIFEST
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in manifest]
    if missing:
        raise ArtifactError(f"{path}: no {missing[0]!r}: re-run `trec {stage}` to rewrite it")
    try:
        return cls.from_json({f.name: manifest[f.name] for f in dataclasses.fields(cls)})
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ArtifactError(f"{path}: malformed {stage} record ({type(exc).__name__}: {exc}): re-run `trec {stage}` "
                            "to rewrite it") from None


# The keys every manifest has, and the keys of each outputs / inputs entry (inputs may lack digests).
_MANIFEST_KEYS = {"stage": str, "outputs": list, "inputs": list, "config": dict}
_ENTRY_KEYS = {"path": str, "size": int, "mtime_ns": int, "sha256": str}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def check_manifest(manifest: Any, path: Path) -> dict:
    """The manifest at `path` if it has the shape trecsys writes; a hand-edited or foreign one is refused."""

    def bad(what: str) -> ArtifactError:
        return ArtifactError(f"{path}: not a trecsys manifest ({what}): re-run the stage that made it")

    if not isinstance(manifest, dict):
        raise bad("a JSON object with an outputs list")
    for key, kind in _MANIFEST_KEYS.items():
        if not isinstance(manifest.get(key), kind):
            raise bad(f"'{key}' must be a {kind.__name__}, got {type(manifest.get(key)).__name__}")
    for section in ("outputs", "inputs"):
        for entry in manifest[section]:
            shown = f"malformed {section} entry {str(entry)[:80]}"
            if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"]:
                raise bad(shown)
            required = _ENTRY_KEYS if section == "outputs" else {"path": str}
            for key, kind in _ENTRY_KEYS.items():
                if (key in required or key in entry) and not (isinstance(entry.get(key), kind)
                                                            and not isinstance(entry.get(key), bool)):
                    raise bad(shown)
            if "sha256" in entry and not _SHA256.fullmatch(entry["sha256"]):
                raise bad(shown)
            if section == "outputs":
                relative = Path(entry["path"])
                if relative.is_absolute() or ".." in relative.parts:
                    raise bad(f"output {entry['path']!r} is outside its folder")
    return manifest


def verify_outputs(folder: Path, manifest: dict, full_hash: bool = False, complete: bool = False) -> None:
    """Refuse a stage folder whose files changed since its manifest was written.

    The fast path compares size and mtime; `full_hash` recomputes sha256 (`--verify`). `complete`:
    the folder is the stage's alone, so a file the manifest does not list is refused too (an entry
    removed by hand would otherwise hide a swapped file).
    """
    folder = Path(folder)
    check_manifest(manifest, folder / MANIFEST)
    for entry in manifest["outputs"]:
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
    if complete:
        listed = {Path(entry["path"]).as_posix() for entry in manifest["outputs"]} | {MANIFEST}
        for path in sorted(folder.rglob("*")):
            if (path.is_file() or path.is_symlink()) and path.relative_to(folder).as_posix() not in listed:
                raise ArtifactError(f"{path} is not listed in {folder / MANIFEST}: a stage folder holds only what "
                                    "its stage wrote; remove the file or re-run the stage")


def verify_stage_folder(folder: Path, full_hash: bool = False) -> None:
    """`verify_outputs` for a folder a stage wrote; a checkpoint folder without a manifest (a training
    run's `best/`) has nothing to check against and passes."""
    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        verify_outputs(folder, read_manifest(folder), full_hash=full_hash, complete=full_hash)


# ---------------------------------------------------------------------------------------------
# Locks


@contextlib.contextmanager
def run_lock(target: Path, wait_s: float = 0.0, poll_s: float = 0.2) -> Iterator[None]:
    """Hold an exclusive lock on `target` (a file or folder path) for the duration of the block.

    A second run on the same target waits up to `wait_s` seconds, then raises LockBusyError (exit 3).
    The lock is an flock on a sibling `.lock` file, so it is released when the process dies. The lock
    file is opened without following links and never truncated; the holder removes it when done (the
    next run removes one a killed run left), re-checking after each acquire that the name still points
    to the file it locked.
    """
    target = Path(target)
    _ensure_writable_dir(target.parent)
    refuse_link(target)
    lock_path = target.with_name(f".{target.name}.lock")
    deadline = time.monotonic() + max(wait_s, 0.0)
    while True:
        fd = _open_lock(lock_path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() >= deadline:
                raise LockBusyError(
                    f"{target} is locked by another trecsys run (lock file {lock_path}); waited {wait_s:g}s"
                ) from None
            time.sleep(poll_s)
            continue
        if _same_file(fd, lock_path):
            break
        os.close(fd)  # its holder removed it between our open and our lock: take the new one
    try:
        # The holder's pid, for people; fixed width so that nothing needs truncating.
        os.pwrite(fd, f"{os.getpid():>10}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            if _same_file(fd, lock_path):
                os.unlink(lock_path)
        os.close(fd)


def _open_lock(lock_path: Path) -> int:
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | _NOFOLLOW, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ArtifactError(f"lock file {lock_path} is a symbolic link (to {os.readlink(lock_path)}); "
                                "trecsys never follows one: remove it") from None
        if exc.errno == errno.EISDIR:
            raise ArtifactError(f"lock file {lock_path} is a folder: remove it") from None
        error = environment_error(exc, lock_path)
        if error is not None:
            raise error from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ArtifactError(f"lock file {lock_path} is not a regular file: remove it")
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)
