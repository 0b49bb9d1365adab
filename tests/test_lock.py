"""A training holds its folder (scripts/lock.py): a second training into it is refused with the holder named, a
dead holder's lock is taken over, another host's is never broken, the other ranks of a torchrun job pass, a run
releases only its own lock, a run removes the partial files that killed runs left, and a full disk is named with
the training's folders and their free space."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine

from scripts import lock
from scripts.checkpointing import TrainingCheckpointer
from scripts.checks import bundle_error
from scripts.lock import LOCK_NAME, FolderLockedError, acquire, hold_training_folder, release
from scripts.utils import BundleInputError
from tests.conftest import BUNDLE_ROOT, TINY, bundle, tiny_unet

HOST = socket.gethostname()


@pytest.fixture(autouse=True)
def _own_state(monkeypatch):
    """Each test starts holding no lock and knowing no training folder, and gives back what it took."""
    monkeypatch.setattr(lock, "_held", {})
    monkeypatch.setattr(lock, "_created", {})
    monkeypatch.setattr(lock, "_folders", {})
    for name in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    yield
    release()


@pytest.fixture
def flocks():
    """Open lock files that hold the kernel's lock, as a running training's do; closed at the test's end."""
    handles: list[int] = []
    yield handles
    for handle in handles:
        os.close(handle)


def held_by(
    folder: Path, pid: int, host: str = HOST, started: str = "2025-01-01T10:00:00+00:00", flocks: list | None = None
) -> Path:
    """``folder`` with a lock naming process ``pid`` on ``host``; with ``flocks``, its kernel lock held (a running
    holder), else as a holder that ended left it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    path.write_text(json.dumps({"pid": pid, "host": host, "started": started, "command": "python -m monai.bundle run"}))
    if flocks is not None:
        flocks.append(os.open(path, os.O_RDWR))
        fcntl.flock(flocks[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)
    return path


def dead_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_folder_held_by_a_live_process_is_refused_naming_it(tmp_path, flocks):
    path = held_by(tmp_path, os.getppid(), flocks=flocks)
    before = path.read_text()
    with pytest.raises(FolderLockedError) as error:
        acquire(tmp_path)
    message = str(error.value)
    assert f"{tmp_path} is held by another training: process {os.getppid()} on host {HOST}" in message
    assert "started 2025-01-01T10:00:00+00:00" in message and "--overwrite true does not break the lock" in message
    assert isinstance(error.value, BundleInputError) and path.read_text() == before


def test_a_dead_holders_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    pid = dead_pid()
    held_by(tmp_path, pid)
    with caplog.at_level(logging.WARNING, logger="scripts.lock"):
        path = acquire(tmp_path)
    assert f"taking over the lock of process {pid} on {HOST}" in caplog.text
    assert json.loads(path.read_text())["pid"] == os.getpid()


def test_the_own_process_takes_over_its_earlier_lock(tmp_path):
    """An in-process training (MONAI Label) that ended by an error left its lock: the next one may go on."""
    held_by(tmp_path, os.getpid())
    assert json.loads(acquire(tmp_path).read_text())["started"] != "2025-01-01T10:00:00+00:00"
    first = set(lock._held)
    acquire(tmp_path)  # this process's own lock, still held: given back and taken again, once
    assert set(lock._held) == first and len(lock._held) == 1


def test_a_lock_from_another_host_is_reported_and_never_broken(tmp_path):
    path = held_by(tmp_path, dead_pid(), host="elsewhere", started="2025-01-01T10:00:00")
    before = path.read_text()
    with pytest.raises(FolderLockedError) as error:
        acquire(tmp_path)
    held = r"held by a training on another host: process \d+ on host elsewhere, .* \(\d+ d \d+ h ago\)"
    assert re.search(held, str(error.value))
    assert "never broken, as its process cannot be checked from here" in str(error.value)
    assert path.read_text() == before


def test_the_other_ranks_of_a_torchrun_job_pass(tmp_path, monkeypatch, flocks):
    held_by(tmp_path, os.getppid(), flocks=flocks)
    monkeypatch.setenv("RANK", "1")
    assert hold_training_folder(tmp_path, tmp_path, tmp_path) is None
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(FolderLockedError):
        hold_training_folder(tmp_path, tmp_path, tmp_path)


def test_release_removes_only_the_own_lock(tmp_path):
    """At exit (atexit; also after an uncaught error) the process removes its lock, and not one that replaced it."""
    code = (
        "import sys; from scripts.lock import acquire; acquire(sys.argv[1]); path = acquire(sys.argv[2]); "
        "path.write_text(path.read_text().replace('\"pid\": ', '\"pid\": 1')); raise RuntimeError('fails')"
    )
    mine, replaced = tmp_path / "mine" / "models", tmp_path / "replaced"
    command = [sys.executable, "-c", code, mine, replaced]
    result = subprocess.run(command, cwd=BUNDLE_ROOT, capture_output=True, text=True)
    assert result.returncode == 1 and "fails" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "mine").exists()  # nor the folders that taking the lock created
    assert (replaced / LOCK_NAME).is_file()


def test_a_completed_training_releases_its_folder(tmp_path):
    """A training run in-process (MONAI Label) gives its folder back when the trainer completes."""
    path = hold_training_folder(tmp_path, tmp_path, tmp_path)
    trainer = Engine(lambda engine, batch: None)
    TrainingCheckpointer(str(tmp_path), {"model": tiny_unet()}).attach(trainer)
    assert path.is_file()
    trainer.run([0], max_epochs=1)
    assert not path.exists() and (tmp_path / "checkpoint_final.pt").is_file()


def test_a_run_removes_the_partial_files_of_killed_runs(tmp_path, caplog):
    """ignite's DiskSaver and scripts.utils.atomic_path write into temporaries that a SIGKILL leaves behind; a run
    removes those in the folder it holds when training starts, after its checks."""
    ckpt_dir, model_dir = tmp_path / "models", tmp_path / "best"
    stale = [ckpt_dir / "tmpk2_x9ab0", ckpt_dir / ".model.pt.a1b2c3d4.pt"]
    kept = [ckpt_dir / "tmp_notes.txt", ckpt_dir / ".model.pt.a1b2.pt", model_dir / "tmp0q8w7e6r"]  # not held
    for path in stale + kept:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x" * 10)
    hold_training_folder(ckpt_dir, model_dir, tmp_path)
    trainer = Engine(lambda engine, batch: None)
    TrainingCheckpointer(str(ckpt_dir), {"model": tiny_unet()}).attach(trainer)
    assert all(path.exists() for path in stale)  # not before training starts
    with caplog.at_level(logging.INFO, logger="scripts.lock"):
        trainer.run([0], max_epochs=1)
    assert not any(path.exists() for path in stale) and all(path.exists() for path in kept)
    assert f"removed {stale[0]} (10 bytes)" in caplog.text


def test_a_second_training_into_a_held_folder_is_refused(dataset, tmp_path, flocks):
    """Here the test process is the first training: the second is refused even with --overwrite true (the lock never
    reads it), with the lock's refusal alone, and the first run's files are left as they are."""
    models = tmp_path / "models"
    path = held_by(models, os.getpid(), flocks=flocks)
    (models / "checkpoint_epoch=1.pt").write_bytes(b"")  # the first run's
    result = bundle(
        "run", ["train.json"], tmp_path, expect_success=False, bundle_root=BUNDLE_ROOT, dataset_dir=dataset,
        ckpt_dir=models, output_dir=tmp_path, overwrite="true", **TINY,
    )
    assert "several reasons" not in result.stderr and "earlier training run" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert f"error: {models} is held by another training: process {os.getpid()} on host {HOST}" in last
    assert sorted(p.name for p in models.iterdir()) == ["checkpoint_epoch=1.pt", LOCK_NAME]
    assert json.loads(path.read_text())["pid"] == os.getpid()  # untouched
    assert not list(tmp_path.glob("events.out.tfevents*"))  # refused before the first write


@pytest.mark.parametrize(
    "failure, what",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "no space left on the disk"),
        (RuntimeError("[enforce fail at inline_container.cc:672] . file write failed"), "a file write failed"),
    ],
)
def test_a_full_disk_is_named_with_the_folders_free_space(tmp_path, monkeypatch, failure, what):
    """MONAI wraps the writer's error in "Failed to evaluate ConfigExpression": the last line names the disk."""
    models = tmp_path / "models"
    hold_training_folder(models, models, tmp_path)
    trainer = Engine(lambda engine, batch: None)
    TrainingCheckpointer(str(models), {"model": tiny_unet()}).attach(trainer)

    def full_disk(*args, **kwargs):
        raise failure

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(type(failure)) as raised:
        trainer.run([0], max_epochs=1)
    wrapped = RuntimeError("Failed to evaluate ConfigExpression")
    wrapped.__cause__ = raised.value
    message = str(bundle_error(wrapped))
    free = r" \([\d.]+ [GMK]B free\)"
    where = f"ckpt_dir and model_dir {re.escape(str(models))}{free}, output_dir {re.escape(str(tmp_path))}{free}"
    assert re.match(rf"{re.escape(what)}.* while writing to {where}: ", message), message
    assert message.endswith("resume with --train#resume_from latest.")
    assert sorted(p.name for p in models.iterdir()) == [LOCK_NAME]  # no partial file left
