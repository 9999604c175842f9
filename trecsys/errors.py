"""Errors meant for people: each carries the exit code a scheduler can act on.

The CLI prints `error: <message>` on one line and exits with `exit_code`; a traceback is shown only
with `--debug`. Anything that is not a TrecError is a bug in trecsys and exits with 1.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path

# Exit codes, documented in `trec --help` and the README.
EXIT_OK = 0
EXIT_BUG = 1  # an unexpected exception: a bug, please report it
EXIT_BAD_INPUT = 2  # bad config, missing or malformed input files, incompatible artifacts
EXIT_BUSY = 3  # another run holds the lock on the same output and --wait ran out
EXIT_DIVERGED = 4  # training produced NaN/inf; the last good checkpoint is kept
EXIT_OUT_OF_MEMORY = 5  # the device ran out of memory; the message names the batch size to lower
EXIT_IO = 74  # the environment: disk full, quota, file too large, I/O error (the message names the path)
EXIT_NO_PERMISSION = 77  # the environment: permission denied or read-only file system (names the path)
EXIT_INTERRUPTED = 130  # stopped by SIGINT/SIGTERM after saving what could be saved

EXIT_CODES_HELP = (
    "Exit codes: 0 ok; 1 bug in trecsys; 2 bad input or config; 3 output locked by another run; "
    "4 training diverged; 5 out of memory; 74 disk full or file too large; "
    "77 permission denied or read-only; 130 interrupted (SIGINT or SIGTERM)."
)


class TrecError(Exception):
    """A failure caused by the input or the environment, with a one-line message for the user."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(TrecError):
    """The experiment config is wrong: unknown key, wrong type, missing value."""


class DataError(TrecError):
    """An input file is missing or malformed; the message names file, line and column."""


class ArtifactError(TrecError):
    """An artifact on disk is missing, stale, tampered with or from another run."""


class LockBusyError(TrecError):
    exit_code = EXIT_BUSY


class DivergedError(TrecError):
    exit_code = EXIT_DIVERGED


class OutOfMemoryError(TrecError):
    exit_code = EXIT_OUT_OF_MEMORY


class InterruptedRun(TrecError):
    exit_code = EXIT_INTERRUPTED


# ---------------------------------------------------------------------------------------------
# Environment errors: a full disk or a read-only folder is not a bug in trecsys.

# errno -> (exit code, what to tell the user)
ENVIRONMENT_ERRNO = {
    errno.ENOSPC: (EXIT_IO, "no space left on the device"),
    errno.EDQUOT: (EXIT_IO, "disk quota exceeded"),
    errno.EFBIG: (EXIT_IO, "file too large for this file system or ulimit -f"),
    errno.EIO: (EXIT_IO, "input/output error"),
    errno.EACCES: (EXIT_NO_PERMISSION, "permission denied"),
    errno.EPERM: (EXIT_NO_PERMISSION, "operation not permitted"),
    errno.EROFS: (EXIT_NO_PERMISSION, "read-only file system"),
}


def environment_error(exc: BaseException, path: Path | str | None = None) -> TrecError | None:
    """The TrecError for an OSError caused by the environment (see ENVIRONMENT_ERRNO), else None.

    pyarrow raises OSError without an errno (the errno is only in its message): read it from there.
    """
    if not isinstance(exc, OSError):
        return None
    code = exc.errno
    if code is None:
        found = re.search(r"errno (\d+)|\[Errno (\d+)\]", str(exc))
        code = int(found.group(1) or found.group(2)) if found else None
    if code not in ENVIRONMENT_ERRNO:
        return None
    exit_code, what = ENVIRONMENT_ERRNO[code]
    where = path if path is not None else exc.filename
    return EnvironmentFailure(what, where, exit_code, detail=str(exc))


class EnvironmentFailure(TrecError):
    """Disk full, read-only, permission denied...: `path` is what could not be written or read."""

    def __init__(self, what: str, path: Path | str | None, exit_code: int, detail: str = ""):
        super().__init__(f"{path}: {what}" if path else f"{what} ({detail})", exit_code=exit_code)
        self.what, self.path, self.detail = what, path, detail

    def at(self, path: Path | str) -> EnvironmentFailure:
        """The same failure, naming `path` instead (where a temporary file was going to end up)."""
        return EnvironmentFailure(self.what, path, self.exit_code, self.detail)
