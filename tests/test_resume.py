"""Safe checkpoints: a run killed with SIGKILL mid-epoch resumes from its newest complete checkpoint (or the
one before, when the newest is damaged) and ends exactly where an uninterrupted run ends; a resumed run keeps the
best validation score so far and rotates the checkpoints written before the resume."""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import Compose, RandFlipd

from scripts.checkpointing import KeyMetricState, RNGState, TrainingCheckpointer, resolve_resume_path
from scripts.data.synthetic import generate_dataset
from tests.conftest import BUNDLE_ROOT, CONFIGS, TINY, bundle

SETTINGS = {**TINY, "epochs": 4, "val_interval": 2}  # 2 iterations per epoch; shuffling and augmentation on
# validation scores a prediction of no foreground at all: a Dice of 0, worse than any real one
NO_FOREGROUND = (
    "$lambda out: ([p * 0 for p in monai.handlers.from_engine(['pred'])(out)[0]], "
    "monai.handlers.from_engine(['label'])(out)[0])"
)


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


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def resumed_worse(data, tmp_path_factory) -> dict:
    """2 epochs validated each epoch, then a resume for a 3rd epoch whose validation scores worse than both."""
    tmp = tmp_path_factory.mktemp("resumed_worse")
    ckpt_dir, settings = tmp / "models", {"epochs": 2, "val_interval": 1}
    first = train(tmp, data, ckpt_dir, **settings)
    assert first.returncode == 0, first.stderr[-3000:]
    scores = re.findall(r"Got new best metric of val_mean_dice: ([\d.]+)", first.stdout + first.stderr)
    best = max(float(v) for v in scores)
    model_md5 = _md5(ckpt_dir / "model.pt")
    worse = tmp / "worse.json"
    worse.write_text(json.dumps({"validate#key_metric#val_mean_dice#output_transform": NO_FOREGROUND}))
    resumed = train(tmp, data, ckpt_dir, worse, **{**settings, "epochs": 3, "train#resume_from": "latest"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {"ckpt_dir": ckpt_dir, "best": best, "model_md5": model_md5, "log": resumed.stdout + resumed.stderr}


def test_resume_keeps_the_better_model_pt(resumed_worse):
    assert resumed_worse["best"] > 0
    assert "Epoch[3] Metrics -- val_mean_dice: 0.0000" in resumed_worse["log"]  # the resumed validation was worse
    assert _md5(resumed_worse["ckpt_dir"] / "model.pt") == resumed_worse["model_md5"]
    assert f"keeps its best score {resumed_worse['best']:.4f} from before the resume" in resumed_worse["log"]


def test_rotation_after_a_resume_keeps_n_saved(resumed_worse):
    names = sorted(p.name for p in resumed_worse["ckpt_dir"].glob("checkpoint_epoch=*.pt"))
    assert names == ["checkpoint_epoch=2.pt", "checkpoint_epoch=3.pt"]  # n_saved=2, epoch 1 rotated out


def test_checkpointer_rotation_continues_after_a_resume(tmp_path):
    from ignite.engine import Engine

    model = torch.nn.Linear(2, 2)
    first = Engine(lambda e, b: None)
    TrainingCheckpointer(str(tmp_path), {"model": model, "trainer": first}, n_saved=2).attach(first)
    first.run([0], max_epochs=4)
    resumed = Engine(lambda e, b: None)
    path = tmp_path / "checkpoint_epoch=4.pt"
    TrainingCheckpointer(str(tmp_path), {"model": model, "trainer": resumed}, n_saved=2, resume_path=str(path)).attach(
        resumed
    )
    resumed.load_state_dict(torch.load(path, weights_only=True)["trainer"])
    resumed.run([0], max_epochs=6)
    expected = ["checkpoint_epoch=5.pt", "checkpoint_epoch=6.pt", "checkpoint_final.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == expected  # not 3 and 4 as well


def test_key_metric_state_keeps_the_best_score_across_a_resume(tmp_path):
    from ignite.engine import Engine
    from monai.handlers import CheckpointSaver

    model = torch.nn.Linear(2, 2)

    def saver(folder: Path) -> CheckpointSaver:
        return CheckpointSaver(str(folder), {"model": model}, save_key_metric=True, key_metric_filename="model.pt")

    def validate(handler: CheckpointSaver, score: float) -> None:
        engine = Engine(lambda e, b: None)
        engine.state.metrics, engine.state.key_metric_name = {"val_mean_dice": score}, "val_mean_dice"
        handler.metrics_completed(engine)

    def saved(folder: Path) -> torch.Tensor:
        return torch.load(folder / "model.pt", weights_only=True)["weight"]

    evaluator = Engine(lambda e, b: None)
    evaluator.state.best_metric, evaluator.state.best_metric_epoch = 0.5, 2
    before = saver(tmp_path)
    validate(before, 0.5)
    buffer = io.BytesIO()
    torch.save(KeyMetricState([before], evaluator).state_dict(), buffer)

    def resumed(folder: Path) -> tuple[CheckpointSaver, Engine]:
        handler, engine = saver(folder), Engine(lambda e, b: None)
        engine.state.best_metric, engine.state.best_metric_epoch = -1, -1
        buffer.seek(0)
        KeyMetricState([handler, "not a saver"], engine).load_state_dict(torch.load(buffer, weights_only=True))
        return handler, engine

    best = model.weight.detach().clone()
    handler, engine = resumed(tmp_path)
    assert (engine.state.best_metric, engine.state.best_metric_epoch) == (0.5, 2)
    with torch.no_grad():
        model.weight.add_(1.0)
    validate(handler, 0.3)
    assert torch.equal(saved(tmp_path), best)  # worse than before the resume: kept
    validate(handler, 0.7)
    assert torch.equal(saved(tmp_path), model.weight)  # better: replaced
    elsewhere = tmp_path / "elsewhere"  # resumed into a folder without that model.pt: the first validation saves
    handler, engine = resumed(elsewhere)
    assert engine.state.best_metric == -1
    validate(handler, 0.3)
    assert torch.equal(saved(elsewhere), model.weight)


def test_two_mcpm_trainings_at_two_threads_end_with_the_same_weights(tmp_path, monkeypatch):
    """Two runs of one seed on one machine give the same weights bit for bit at 2 threads, on patches of 2 x 48^3
    voxels: large enough for the CPU kernels that parallelise over voxels (at 16^3 they run serially)."""
    data = generate_dataset(tmp_path / "data", seed=5, num_training=2, num_meta=2, num_validation=1, num_test=1,
                            shape=(48, 48, 48)).parent
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    states = []
    for name in ("first", "second"):
        result = train(tmp_path, data, tmp_path / name, epochs=2, val_interval=2, patch_size="[48,48,48]",
                       **{"mcpm#warmup_epochs": 0, "mcpm#meta_batch_size": 1})
        assert result.returncode == 0, result.stderr[-3000:]
        states.append(final_state(tmp_path / name))
    first, second = ({k: v for k, v in s.items() if k in ("model", "meta_network", "optimizer")} for s in states)
    assert torch.equal(torch.cat([t.flatten() for t in first["meta_network"].values()]),
                       torch.cat([t.flatten() for t in second["meta_network"].values()]))
    assert all(torch.equal(first["model"][k], second["model"][k]) for k in first["model"])
