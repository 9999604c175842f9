"""Errors meant for people: each carries the exit code a scheduler can act on.

The CLI prints `error: <message>` on one line and exits with `exit_code`; a traceback is shown only
with `--debug`. Anything that is not a TrecError is a bug in trecsys and exits with 1.
"""

from __future__ import annotations

# Exit codes, documented in `trec --help` and the README.
EXIT_OK = 0
EXIT_BUG = 1  # an unexpected exception: a bug, please report it
EXIT_BAD_INPUT = 2  # bad config, missing or malformed input files, incompatible artifacts
EXIT_BUSY = 3  # another run holds the lock on the same output and --wait ran out
EXIT_DIVERGED = 4  # training produced NaN/inf; the last good checkpoint is kept
EXIT_OUT_OF_MEMORY = 5  # the device ran out of memory; the message names the batch size to lower
EXIT_NOT_AVAILABLE = 69  # the stage is not part of this release yet
EXIT_INTERRUPTED = 130  # stopped by SIGINT/SIGTERM after saving what could be saved

EXIT_CODES_HELP = (
    "Exit codes: 0 ok; 1 bug in trecsys; 2 bad input or config; 3 output locked by another run; "
    "4 training diverged; 5 out of memory; 69 stage not available yet; 130 interrupted."
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


class NotAvailableError(TrecError):
    exit_code = EXIT_NOT_AVAILABLE


class InterruptedRun(TrecError):
    exit_code = EXIT_INTERRUPTED
