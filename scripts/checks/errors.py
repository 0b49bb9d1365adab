"""
The bundle's own errors as the last thing a command prints.

MONAI's config parser wraps an error of a component in "Failed to instantiate component" or "Failed to evaluate
ConfigExpression", so that the message meant for the user scrolls away above a long traceback.
:py:func:`install_excepthook` prints it again at the end, and a write to a full disk as the folder and its free
space (:py:func:`disk_full_error`); :py:func:`brief_error` shortens a library's message for a problem list.
"""

from __future__ import annotations

import atexit
import errno
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scripts.lock import training_folders
from scripts.utils import BundleInputError, free_space

__all__ = [
    "MAX_LISTED",
    "MAX_MESSAGE",
    "DiskFullError",
    "brief_error",
    "bundle_error",
    "disk_full_error",
    "install_excepthook",
]

MAX_LISTED = 8
MAX_MESSAGE = 200

# the bundle's package folder (scripts/): an error whose last frame is below it was raised by the bundle's code
PACKAGE_DIR = Path(__file__).resolve().parents[1]


def _raised_here(error: BaseException) -> bool:
    """Whether ``error`` was raised by this bundle's own code (the last frame of its traceback is in ``scripts``)."""
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and PACKAGE_DIR in Path(frame.tb_frame.f_code.co_filename).resolve().parents


def bundle_error(error: BaseException | None) -> BaseException | None:
    """The bundle's own error behind ``error`` (its cause or context chain): a :py:class:`BundleInputError`, or
    else the first cause that the bundle's code raised (a missing resume checkpoint, too many non-finite steps),
    whose message is meant for the user as well."""
    chain: list[BaseException] = []
    while error is not None and all(error is not e for e in chain):
        if isinstance(error, BundleInputError):
            return error
        chain.append(error)
        error = error.__cause__ or error.__context__
    return disk_full_error(chain) or next((e for e in chain if _raised_here(e)), None)


class DiskFullError(BundleInputError):
    """A write that failed on a full disk (or quota), naming the folder and its free space."""


DISK_FULL = {errno.ENOSPC: "no space left on the disk", errno.EDQUOT: "the disk quota is exceeded"}
# what torch.save's RuntimeError (PyTorchStreamWriter) says when a write to its file fails, as on a full disk
WRITE_FAILED = "file write failed"


def _where(filename: str | None) -> str:
    """The file, else the training's folders (grouped by folder), else the working folder, with their free space."""
    if filename:
        return f"{filename} ({free_space(Path(filename).parent)} free on its disk)"
    names: dict[Path, list[str]] = {}
    for name, folder in training_folders().items():
        names.setdefault(folder, []).append(name)
    if not names:
        return f"{Path.cwd()} ({free_space(Path.cwd())} free)"
    return ", ".join(f"{' and '.join(keys)} {folder} ({free_space(folder)} free)" for folder, keys in names.items())


def disk_full_error(chain: Sequence[BaseException]) -> DiskFullError | None:
    """A :py:class:`DiskFullError` when an error of ``chain`` is a write to a full disk (``ENOSPC``, ``EDQUOT``, or
    torch.save's "file write failed"), naming the file, else the training's folders
    (:py:func:`scripts.lock.training_folders`), with their free space; None otherwise."""
    error = next((e for e in chain if isinstance(e, OSError) and e.errno in DISK_FULL), None)
    if error is not None:
        what, filename = DISK_FULL[error.errno], error.filename
    elif any(isinstance(e, RuntimeError) and WRITE_FAILED in str(e) for e in chain):
        what, filename = "a file write failed (is the disk full?)", None
    else:
        return None
    message = f"{what} while writing to {_where(filename)}: free disk space or write to another disk"
    if training_folders():  # checkpoints are written whole or not at all (scripts.checkpointing)
        message += "; the checkpoints written so far are complete: resume with --train#resume_from latest"
    return DiskFullError(message + ".")


def _excepthook(kind: type[BaseException], error: BaseException, traceback: Any) -> None:
    """Print the traceback as Python does, then the bundle's own message again as the last line, run the exit
    handlers (logging, TensorBoard's and MLflow's flushes, the folder lock's release) and exit with status 1.

    The process ends there rather than in the interpreter's shutdown: when a transform raises while MONAI's
    ``CacheDataset`` fills its cache, the pool's worker thread is left running, and the shutdown can then abort in
    native code ("terminate called without an active exception", exit status 134) after the message."""
    _previous_excepthook(kind, error, traceback)
    cause = bundle_error(error)
    if cause is not None and cause is not error:
        print(f"\nerror: {cause}", file=sys.stderr)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


_previous_excepthook = sys.excepthook


def install_excepthook() -> None:
    """Make the message of an uncaught :py:class:`BundleInputError`, or of another error the bundle's code raised
    (also one wrapped by MONAI's config parser), the last thing a command prints; the exit status is 1.
    Installed where the bundle runs from the command line (``python -m monai.bundle``, see
    :py:mod:`scripts.checks`); calling it again does nothing."""
    if sys.excepthook is not _excepthook:
        global _previous_excepthook
        _previous_excepthook = sys.excepthook
        sys.excepthook = _excepthook


def brief_error(error: Exception) -> str:
    """First line of a library's error message, shortened, with the exception type."""
    lines = str(error).strip().splitlines() or [""]
    message = lines[0] if len(lines[0]) <= MAX_MESSAGE else lines[0][:MAX_MESSAGE] + "..."
    return f"{type(error).__name__}: {message}"
