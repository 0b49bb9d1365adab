"""
The training-folder lock: a training holds its ``ckpt_dir`` while it runs, so that a second training into that
folder is refused with the holder named, instead of removing the first one's checkpoints in its rotation (or
deleting them with ``overwrite``) and mixing the two runs' files.

:py:func:`hold_training_folder`, which ``configs/train.json`` runs before anything is written (``lock_folder``),
takes the kernel's lock (``flock``) of ``training.lock`` in ``ckpt_dir`` and writes the process id, host, start
time and command line into it as JSON. The kernel drops that lock when the process ends, however it ends, so a
held lock is a running training. The lock is released when the trainer completes
(``scripts.checkpointing.TrainingCheckpointer``, for trainings run in-process such as MONAI Label's) and when the
process exits, also after an uncaught error or a refusal; a release removes the lock file only while it still
holds this process's record, and the folders that taking it created while they are still empty. After the run's
checks, the checkpointer removes the temporary files that killed runs left in ``ckpt_dir``
(:py:func:`remove_stale_temporaries`).

- only rank 0 of a ``torchrun`` job takes the lock (it is the rank that writes); the other ranks pass;
- this process's lock of an earlier in-process training (one that ended by an error) is given back and taken again;
- a lock whose process no longer runs on this host is taken over with a warning;
- a lock from another host is never broken, since its process cannot be checked from here: it is reported with
  its host and age.

Each refusal is a :py:class:`FolderLockedError` (a :py:class:`scripts.utils.BundleInputError`).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import shlex
import socket
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from scripts.utils import BundleInputError, atomic_temporary_target

try:
    import fcntl
except ImportError:  # Windows: the lock's record alone tells whether its holder runs
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "LOCK_NAME",
    "FolderLockedError",
    "acquire",
    "hold_training_folder",
    "is_temporary",
    "release",
    "remove_stale_temporaries",
    "training_folders",
]

logger = logging.getLogger(__name__)

LOCK_NAME = "training.lock"
OTHER_FOLDER = "--ckpt_dir runs/<name>/models --output_dir runs/<name>"
# ignite's DiskSaver(atomic=True) writes into tempfile.NamedTemporaryFile(dir=save_dir): "tmp" and 8 random characters
IGNITE_TEMPORARY = re.compile(r"tmp[a-z0-9_]{8}")

# the locks this process holds: lock file -> its open file (with the kernel's lock) and the holder record it wrote
_held: dict[Path, tuple[int, dict[str, Any]]] = {}
# the folders that taking a lock created, by lock file, deepest first: removed on release while still empty
_created: dict[Path, list[Path]] = {}
# the folders of this process's training, by config key, for messages about them (a full disk)
_folders: dict[str, Path] = {}


class FolderLockedError(BundleInputError):
    """A training into a folder that another training holds."""


def rank() -> int:
    """This process's rank in a ``torchrun`` job (``RANK``, else ``LOCAL_RANK``); 0 outside one."""
    for name in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def training_folders() -> dict[str, Path]:
    """The output folders of this process's training by config key (``ckpt_dir``, ...); empty outside a training."""
    return dict(_folders)


def _holder() -> dict[str, Any]:
    """The record this process writes into its lock."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(getattr(sys, "orig_argv", sys.argv)),
    }


def _lock_file(handle: int) -> bool:
    """Take the kernel's exclusive lock of the open file ``handle`` without waiting; False when another open file
    holds it. The kernel drops it when its process ends, however it ends, so a held lock means a running holder
    and there is no window between finding a lock stale and taking it over. Where there is no ``fcntl`` (Windows)
    the record alone tells, through :py:func:`process_alive`."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _is_file_at(handle: int, path: Path) -> bool:
    """Whether the open file ``handle`` is still the file at ``path`` (a releasing holder may have removed it)."""
    try:
        return os.fstat(handle).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _write(handle: int, holder: dict[str, Any]) -> None:
    """Replace the record in the open lock file ``handle`` by ``holder``."""
    os.ftruncate(handle, 0)
    os.pwrite(handle, (json.dumps(holder) + "\n").encode(), 0)


def _read(path: Path) -> dict[str, Any] | None:
    """The holder record in ``path``; None when it is gone, empty, damaged or still being written."""
    try:
        holder = json.loads(path.read_text())
    except (ValueError, FileNotFoundError):
        return None
    valid = isinstance(holder, dict) and isinstance(holder.get("pid"), int) and isinstance(holder.get("host"), str)
    return holder if valid else None


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host."""
    if pid <= 0:  # os.kill(0, ...) would signal the process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def _age(started: object) -> str:
    """How long ago the ISO time ``started`` was, as ``2 d 5 h``, ``3 h 05 min``, ``12 min`` or ``40 s``."""
    try:
        seconds = max(0, int(time.time() - datetime.fromisoformat(str(started)).timestamp()))
    except ValueError:
        return "unknown time"
    if seconds >= 86400:
        return f"{seconds // 86400} d {seconds % 86400 // 3600} h"
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 60} min" if seconds >= 60 else f"{seconds} s"


def _refusal(path: Path, holder: dict[str, Any] | None) -> FolderLockedError:
    """The refusal of a training into ``path``'s folder, naming ``holder`` and the ways out."""
    folder = path.parent
    if holder is None:
        return FolderLockedError(
            f"{folder} has a lock file {path} that names no training (damaged, or being written): if no training "
            f"runs into {folder}, delete it; or train into another folder ({OTHER_FOLDER})."
        )
    held = (
        f"process {holder['pid']} on host {holder['host']}, started {holder.get('started', '?')} "
        f"({_age(holder.get('started'))} ago)"
    )
    command = f", command: {holder['command']}" if holder.get("command") else ""
    if holder["host"] != socket.gethostname():
        return FolderLockedError(
            f"{folder} is held by a training on another host: {held}{command} (lock file {path}). A lock from another "
            f"host is never broken, as its process cannot be checked from here: wait for that run to end or train "
            f"into another folder ({OTHER_FOLDER}); if that run no longer runs, delete {path}."
        )
    return FolderLockedError(
        f"{folder} is held by another training: {held}{command} (lock file {path}). Two trainings into one folder "
        f"remove each other's checkpoints, and --overwrite true does not break the lock: wait for that run to end or "
        f"stop it, or train into another folder ({OTHER_FOLDER})."
    )


def _stale(path: Path, holder: dict[str, Any] | None) -> bool:
    """Whether the record ``holder`` of a lock whose kernel lock this process just took is of no running training:
    a lock from another host is never taken over (its process cannot be checked from here); without ``fcntl`` a
    record of a running process on this host holds too."""
    if holder is None:
        return True
    if holder["host"] != socket.gethostname():
        return False
    if holder["pid"] == os.getpid():
        return True
    if fcntl is None and process_alive(holder["pid"]):
        return False
    logger.warning(
        f"{path}: taking over the lock of process {holder['pid']} on {holder['host']} (started "
        f"{holder.get('started', '?')}), which no longer runs"
    )
    return True


def acquire(folder: str | Path, attempts: int = 5) -> Path:
    """Take the lock of ``folder`` (created if needed) for this process, released at its exit at the latest;
    return the lock file's path. A lock this process took for an earlier training (in-process, as MONAI Label
    trains) is given back first.

    Raises:
        FolderLockedError: another training holds ``folder``, named in the message.
    """
    path = Path(folder) / LOCK_NAME
    if path.parent.exists() and path.resolve() in _held:
        logger.info(f"{path}: giving back this process's lock of an earlier training before taking it again")
        release(path)
    missing = [p for p in [path.parent, *path.parent.parents] if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(attempts):
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if _lock_file(handle) and _is_file_at(handle, path):
                holder = _read(path)
                if not _stale(path, holder):
                    raise _refusal(path, holder)
                _write(handle, mine := _holder())
                _held[path.resolve()] = (handle, mine)
                _created[path.resolve()] = [p.resolve() for p in missing]
                return path
            if _is_file_at(handle, path):  # held: by a running training
                raise _refusal(path, _read(path))
        except BaseException:
            os.close(handle)
            raise
        os.close(handle)  # the file was removed by its releasing holder meanwhile: try again
    raise _refusal(path, _read(path) if path.exists() else None)


def release(path: str | Path | None = None) -> None:
    """Release the lock ``path`` (a lock file or its folder), or every lock this process holds: remove each file
    that still holds this process's record, then drop the kernel's lock; then remove the folders taking it
    created, while they are empty (a refused run leaves nothing behind)."""
    if path is None:
        paths = list(_held)
    else:
        path = Path(path)
        paths = [(path / LOCK_NAME if path.is_dir() else path).resolve()]
    for lock in paths:
        handle, holder = _held.pop(lock, (None, None))
        try:
            if holder is not None and _read(lock) == holder:
                lock.unlink()
        except OSError:  # gone, or its folder unreadable: nothing of ours to remove
            pass
        if handle is not None:
            os.close(handle)
        _remove_empty(_created.pop(lock, []))


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) up to the first one that is not empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


atexit.register(release)


def is_temporary(name: str) -> bool:
    """Whether ``name`` is the name of a temporary file that a checkpoint writer of a training makes beside its file:
    ignite's ``DiskSaver`` (``tmpXXXXXXXX``) or ``scripts.utils.atomic_path`` (``.<file>.XXXXXXXX<suffixes>``)."""
    return bool(IGNITE_TEMPORARY.fullmatch(name)) or atomic_temporary_target(name) is not None


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files (:py:func:`is_temporary`) that runs killed while writing left in ``folder``; to be
    called while holding its lock, before this run writes. Returns the removed files."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = [p for p in sorted(folder.iterdir()) if is_temporary(p.name) and p.is_file() and not p.is_symlink()]
    for path in removed:
        size = path.stat().st_size
        path.unlink(missing_ok=True)
        logger.info(f"removed {path} ({size} bytes), a partial file of an earlier run that was stopped while writing")
    return removed


def hold_training_folder(
    ckpt_dir: str | Path, model_dir: str | Path | None = None, output_dir: str | Path | None = None
) -> Path | None:
    """Hold ``ckpt_dir`` for this training before its first write; return the lock file (None on the ranks other
    than 0 of a ``torchrun`` job, which pass).

    ``output_dir`` is only recorded, with the other folders, for messages about them (:py:func:`training_folders`).

    Raises:
        FolderLockedError: another training holds ``ckpt_dir``, named in the message (``overwrite`` or not).
    """
    folders = {"ckpt_dir": ckpt_dir, "model_dir": model_dir, "output_dir": output_dir}
    _folders.clear()
    _folders.update({name: Path(folder) for name, folder in folders.items() if folder})
    if rank() > 0:
        logger.debug(f"rank {rank()}: {ckpt_dir} is held by rank 0 of this job")
        return None
    path = acquire(ckpt_dir)
    logger.info(f"{ckpt_dir} is held by this training (lock file {path})")
    return path
