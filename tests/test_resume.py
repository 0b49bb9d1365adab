"""Safe checkpoints: a run killed with SIGKILL mid-epoch resumes from its newest complete checkpoint (or the
one before, when the newest is damaged) and ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import io
import json
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import Compose, RandFlipd

from scripts.checkpointing import RNGState, TrainingCheckpointer, resolve_resume_path
from scripts.data.synthetic import generate_dataset
from tests.conftest import BUNDLE_ROOT, CONFIGS, TINY, bundle

SETTINGS = {**TINY, "epochs": 4, "val_interval": 2}  # 2 iterations per epoch; shuffling and augmentation on


def train(tmp: Path, data: Path, ckpt_dir: Path, extra_config: Path | None = None, **overrides) -> subprocess.CompletedProcess:
    return bundle(
        "run", ["train.json"] + ([extra_config] if extra_config else []), tmp, expect_success=None,
        **{**SETTINGS, "bundle_root": BUNDLE_ROOT, "dataset_dir": data, "ckpt_dir": ckpt_dir, "output_dir": tmp, **overrides},
    )


def kill_at_iteration(path: Path, iteration: int) -> Path:
    """The config's run list with a handler that SIGKILLs the process after ``iteration``."""
    run = json.loads((CONFIGS / "train.json").read_text())["run"]
    event = f"ignite.engine.Events.ITERATION_COMPLETED(once={iteration})"
    run.insert(-1, f"$@train#trainer.add_event_handler({event}, lambda e: os.kill(os.getpid(), 9))")
    path.write_text(json.dumps({"run": run}))
    return path


def final_state(ckpt_dir: Path) -> dict:
    return torch.load(ckpt_dir / "checkpoint_final.pt", weights_only=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    generate_dataset(out, seed=7, num_training=4, num_meta=2, num_validation=1, num_test=1, shape=(16, 16, 16))
    return out


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    result = train(tmp, data, tmp / "models")
    assert result.returncode == 0, result.stderr[-3000:]
    return final_state(tmp / "models")


@pytest.mark.parametrize("damage_newest", [False, True])
def test_killed_run_resumes_to_the_same_result(data, uninterrupted, tmp_path, damage_newest):
    ckpt_dir = tmp_path / "models"
    killed = train(tmp_path, data, ckpt_dir, kill_at_iteration(tmp_path / "kill.json", 5))  # mid-epoch 3
    assert killed.returncode == -signal.SIGKILL
    assert sorted(p.name for p in ckpt_dir.glob("checkpoint*.pt")) == ["checkpoint_epoch=1.pt", "checkpoint_epoch=2.pt"]
    if damage_newest:
        newest = ckpt_dir / "checkpoint_epoch=2.pt"
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    resumed = train(tmp_path, data, ckpt_dir, **{"train#resume_from": "latest"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected_start = "checkpoint_epoch=1.pt" if damage_newest else "checkpoint_epoch=2.pt"
    assert f"resuming from {ckpt_dir / expected_start}" in resumed.stdout + resumed.stderr
    if damage_newest:
        assert "skipping damaged checkpoint" in resumed.stdout + resumed.stderr
    state = final_state(ckpt_dir)
    for part in ("model", "meta_network"):
        for name, value in uninterrupted[part].items():
            assert torch.equal(value, state[part][name]), (part, name)


def test_resolve_resume_path(tmp_path):
    assert resolve_resume_path("", str(tmp_path)) == ""
    with pytest.raises(FileNotFoundError, match="no readable checkpoint"):
        resolve_resume_path("latest", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        resolve_resume_path(str(tmp_path / "missing.pt"), str(tmp_path))
    for epoch in (2, 10, 1):  # written in this order: the newest file wins, whatever its name
        torch.save({"trainer": {"iteration": 4 * epoch, "epoch_length": 4}}, tmp_path / f"checkpoint_epoch={epoch}.pt")
        time.sleep(0.01)
    assert resolve_resume_path("latest", str(tmp_path)).endswith("checkpoint_epoch=1.pt")
    (tmp_path / "checkpoint_final.pt").write_bytes(b"not a checkpoint")
    assert resolve_resume_path("latest", str(tmp_path), max_epochs=5).endswith("checkpoint_epoch=1.pt")
    with pytest.raises(ValueError, match="saved at epoch 10, and epochs is 10"):
        resolve_resume_path(str(tmp_path / "checkpoint_epoch=10.pt"), str(tmp_path), max_epochs=10)


def test_rng_state_round_trip():
    transforms = Compose([RandFlipd(keys="x", prob=0.5)]).set_random_state(3)
    rng = RNGState([transforms])
    buffer = io.BytesIO()
    torch.save(rng.state_dict(), buffer)

    def draw() -> tuple:
        return torch.rand(3).tolist(), transforms.transforms[0].R.rand(), random.random(), np.random.rand()

    first = draw()
    buffer.seek(0)
    rng.load_state_dict(torch.load(buffer, weights_only=True))  # loadable as plain tensors and containers
    assert draw() == first


def test_checkpointer_keeps_the_newest_and_writes_atomically(tmp_path):
    from ignite.engine import Engine

    model = torch.nn.Linear(2, 2)
    engine = Engine(lambda e, b: None)
    checkpointer = TrainingCheckpointer(str(tmp_path), {"model": model, "trainer": engine, "scaler": None}, n_saved=2)
    checkpointer.attach(engine)
    engine.run([0], max_epochs=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=3.pt", "checkpoint_epoch=4.pt", "checkpoint_final.pt"]
    assert set(checkpointer.save_dict) == {"model", "trainer"}  # no AMP scaler without AMP
    assert set(torch.load(tmp_path / "checkpoint_final.pt", weights_only=True)) == {"model", "trainer"}
    with pytest.raises(ValueError, match="n_saved"):
        TrainingCheckpointer(str(tmp_path), {"model": model}, n_saved=0)
