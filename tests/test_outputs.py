"""A training run never replaces what a user made: the output-folder guard (scripts/outputs.py) on its own and
through `monai.bundle run`, and the flows that own their folders passing `overwrite` themselves."""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser

from scripts.checkpointing import TrainingCheckpointer
from scripts.outputs import (
    DatasetFolderError,
    ExistingRunError,
    ForeignWeightsError,
    ShippedWeightsError,
    check_training_outputs,
)
from scripts.utils import BundleInputError, as_flag
from tests.conftest import BUNDLE_ROOT, CONFIGS, TINY, bundle, tiny_unet

SHIPPED_LIST = BUNDLE_ROOT / "large_files.yml"
SHIPPED = ("model.pt", "meta_network.pt")


def snapshot(folder: Path) -> dict[str, str]:
    """The md5 of every file in ``folder``."""
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def check(folder: Path, dataset: Path, **kwargs) -> None:
    """The guard of a run writing everything into ``folder``."""
    check_training_outputs(
        ckpt_dir=folder, model_dir=folder, output_dir=folder, dataset_dir=dataset, shipped_list=SHIPPED_LIST, **kwargs
    )


def earlier_run(folder: Path) -> Path:
    """``folder`` holding what a bundle training run leaves: epoch and final checkpoints and best weights."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("checkpoint_epoch=3.pt", "checkpoint_epoch=4.pt", "checkpoint_final.pt"):
        torch.save({"trainer": {"iteration": 8, "epoch_length": 2}}, folder / name)
    torch.save(tiny_unet().state_dict(), folder / "model.pt")
    torch.save({"model": tiny_unet().state_dict()}, folder / "meta_network.pt")
    return folder


# the guard on its own


def test_an_empty_or_new_folder_is_accepted(tmp_path):
    check(tmp_path / "new", tmp_path / "data")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("mine")
    check(tmp_path / "empty", tmp_path / "data")


@pytest.mark.parametrize("name", ["ckpt_dir", "model_dir", "output_dir"])
@pytest.mark.parametrize("where", ["equal", "inside"])
def test_an_output_folder_in_the_dataset_folder_is_refused(tmp_path, name, where):
    dataset = tmp_path / "data"
    folders = {"ckpt_dir": tmp_path / "run", "model_dir": tmp_path / "run", "output_dir": tmp_path / "run"}
    folders[name] = dataset if where == "equal" else dataset / "runs" / "x"
    with pytest.raises(DatasetFolderError, match=re.escape(f"{name} {folders[name]} is the dataset folder")) as error:
        check_training_outputs(**folders, dataset_dir=dataset, overwrite=True)
    assert str(dataset) in str(error.value) and isinstance(error.value, BundleInputError)


@pytest.mark.parametrize("content", [b"my own notes", "a list"])
def test_a_model_pt_the_bundle_did_not_write_is_refused_even_with_overwrite(tmp_path, content):
    folder = tmp_path / "run"
    folder.mkdir()
    if isinstance(content, bytes):
        (folder / "model.pt").write_bytes(content)
    else:
        torch.save([1, 2, 3], folder / "model.pt")
    refusal = re.escape(f"not weights this bundle wrote: {folder / 'model.pt'} (")
    for kwargs in ({}, {"overwrite": True}, {"resume_path": str(folder / "checkpoint_final.pt"), "overwrite": "true"}):
        with pytest.raises(ForeignWeightsError, match=refusal):
            check(folder, tmp_path / "data", **kwargs)
    assert folder / "model.pt" in list(folder.iterdir())


def test_shipped_weights_are_replaced_only_with_overwrite(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    for name in SHIPPED:
        shutil.copy(BUNDLE_ROOT / "models" / name, folder / name)
    for resume_path in ("", str(folder / "checkpoint_final.pt")):
        with pytest.raises(ShippedWeightsError, match="shipped weights .*model.pt, meta_network.pt.*--overwrite true"):
            check(folder, tmp_path / "data", resume_path=resume_path)
    check(folder, tmp_path / "data", overwrite=True)
    assert snapshot(folder) == snapshot(BUNDLE_ROOT / "models")  # replaced only by the run itself, at validation


def test_a_fresh_run_into_an_earlier_run_is_refused(tmp_path):
    folder = earlier_run(tmp_path / "run")
    before = snapshot(folder)
    with pytest.raises(ExistingRunError) as error:
        check(folder, tmp_path / "data")
    message = str(error.value)
    assert str(folder) in message and all(name in message for name in before)
    assert "--train#resume_from latest" in message and "--overwrite true" in message
    assert snapshot(folder) == before
    check(folder, tmp_path / "data", resume_path=str(folder / "checkpoint_epoch=4.pt"))  # resuming it is fine


def test_best_weights_in_model_dir_alone_also_count(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    torch.save(tiny_unet().state_dict(), models / "model.pt")
    with pytest.raises(ExistingRunError, match=re.escape(f"{models}: model.pt")):
        check_training_outputs(tmp_path / "ckpt", models, tmp_path / "out", tmp_path / "data")


def test_overwrite_deletes_the_earlier_checkpoints_and_keeps_the_rest(tmp_path, caplog):
    folder = earlier_run(tmp_path / "run")
    (folder / "notes.txt").write_text("mine")
    (folder / "checkpoint_epoch=best.pt").write_text("not a name the bundle writes")
    files = sorted(p.name for p in folder.iterdir())
    with caplog.at_level(logging.INFO, logger="scripts.outputs"):
        check(folder, tmp_path / "data", overwrite="true")
    # the check only allows the start-over: a later refusal (data check, NaN voxels) must find the files intact
    assert sorted(p.name for p in folder.iterdir()) == files
    assert "will be deleted when training starts" in caplog.text
    assert "will be replaced at this run's first validation" in caplog.text
    checkpointer = TrainingCheckpointer(str(folder), {"model": torch.nn.Linear(1, 1)}, overwrite="true")
    engine = Engine(lambda engine, batch: None)
    checkpointer.attach(engine)
    with caplog.at_level(logging.INFO, logger="scripts.checkpointing"):
        engine.fire_event(Events.STARTED)
    remaining = sorted(p.name for p in folder.iterdir())
    assert remaining == ["checkpoint_epoch=best.pt", "meta_network.pt", "model.pt", "notes.txt"]
    assert f"deleted the earlier run's checkpoint {folder / 'checkpoint_epoch=3.pt'}" in caplog.text


def test_overwrite_is_a_flag():
    assert as_flag("overwrite", True) and as_flag("overwrite", "True") and as_flag("overwrite", "true")
    assert not as_flag("overwrite", False) and not as_flag("overwrite", "false")
    with pytest.raises(BundleInputError, match="overwrite must be true or false, got 'yes'"):
        as_flag("overwrite", "yes")


# through monai.bundle run


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory) -> Path:
    """A 2-epoch run's folder: its checkpoints, model.pt and meta_network.pt in ``<run>/models``."""
    run = tmp_path_factory.mktemp("run")
    bundle(
        "run", ["train.json"], run, bundle_root=BUNDLE_ROOT, dataset_dir=dataset, ckpt_dir=run / "models",
        output_dir=run, **TINY,
    )
    return run


def test_training_never_replaces_the_shipped_weights(dataset, tmp_path):
    """Training without --ckpt_dir writes into <bundle_root>/models, where the shipped weights are: refused."""
    root = tmp_path / "bundle"  # a copy of the bundle's root as download_large_files leaves it
    (root / "models").mkdir(parents=True)
    shutil.copy(SHIPPED_LIST, root / "large_files.yml")
    for name in SHIPPED:
        shutil.copy(BUNDLE_ROOT / "models" / name, root / "models" / name)
    before = snapshot(root / "models")
    result = bundle(
        "run", ["train.json"], tmp_path, expect_success=False, bundle_root=root, dataset_dir=dataset,
        output_dir=tmp_path / "out", **TINY,
    )
    message = last_line(result.stderr)
    assert f"{root / 'models'} holds the bundle's shipped weights (model.pt, meta_network.pt" in message
    assert "--ckpt_dir runs/<name>/models --output_dir runs/<name>" in message and "--overwrite true" in message
    assert snapshot(root / "models") == before


def test_a_fresh_run_into_a_folder_of_an_earlier_run_is_refused(trained, dataset, tmp_path):
    models = trained / "models"
    before = snapshot(models)
    result = bundle(
        "run", ["train.json"], tmp_path, expect_success=False, bundle_root=BUNDLE_ROOT, dataset_dir=dataset,
        ckpt_dir=models, output_dir=tmp_path, **TINY,
    )
    message = last_line(result.stderr)
    assert str(models) in message and all(name in message for name in before)
    assert "--train#resume_from latest" in message and "--overwrite true" in message
    assert snapshot(models) == before


def test_a_mistyped_resume_key_does_not_start_over(trained, dataset, tmp_path):
    """``--train#resume_form latest`` leaves resume_from empty: a fresh run into the folder, refused."""
    models = trained / "models"
    before = snapshot(models)
    result = bundle(
        "run", ["train.json"], tmp_path, expect_success=False, bundle_root=BUNDLE_ROOT, dataset_dir=dataset,
        ckpt_dir=models, output_dir=tmp_path, **{**TINY, "epochs": 3, "train#resume_form": "latest"},
    )
    assert "--train#resume_from" in result.stderr[-3000:]
    assert snapshot(models) == before


def test_overwrite_starts_over_without_the_earlier_checkpoints(trained, dataset, tmp_path):
    models = shutil.copytree(trained / "models", tmp_path / "models")
    old_model = torch.load(models / "model.pt", weights_only=True)
    result = bundle(
        "run", ["train.json"], tmp_path, bundle_root=BUNDLE_ROOT, dataset_dir=dataset, ckpt_dir=models,
        output_dir=tmp_path, overwrite="true", **{**TINY, "epochs": 1, "mcpm#warmup_epochs": 0, "learning_rate": 0.01},
    )
    assert f"deleted the earlier run's checkpoint {models / 'checkpoint_epoch=2.pt'}" in result.stdout + result.stderr
    files = sorted(p.name for p in models.iterdir())
    assert files == ["checkpoint_epoch=1.pt", "checkpoint_final.pt", "meta_network.pt", "model.pt"]
    final = torch.load(models / "checkpoint_final.pt", weights_only=True)
    assert final["trainer"]["iteration"] == final["trainer"]["epoch_length"]  # the new run's epoch 1
    new_model = torch.load(models / "model.pt", weights_only=True)
    assert all(torch.equal(new_model[k], final["model"][k]) for k in new_model)  # the new run's best
    assert not all(torch.equal(new_model[k], old_model[k]) for k in new_model)


def test_outputs_in_the_dataset_folder_are_refused(dataset, tmp_path):
    """``--output_dir D --ckpt_dir D --dataset_dir D`` would write model.pt over a user's file there."""
    data = shutil.copytree(dataset, tmp_path / "data")
    (data / "model.pt").write_text("the user's own file")
    before = snapshot(data)
    result = bundle(
        "run", ["train.json"], tmp_path, expect_success=False, bundle_root=BUNDLE_ROOT, dataset_dir=data,
        ckpt_dir=data, output_dir=data, overwrite="true", **TINY,
    )
    assert f"output_dir {data} are the dataset folder (dataset_dir {data})" in last_line(result.stderr)
    assert snapshot(data) == before


# the flows that own their folders


def test_monailabel_rounds_overwrite_their_folders():
    config = ConfigParser.load_config_files([CONFIGS / "train.json", CONFIGS / "train_monailabel.json"])
    assert config["overwrite"] is True
    assert ConfigParser.load_config_file(CONFIGS / "train.json")["overwrite"] is False


def test_demo_trains_its_own_folders_with_overwrite(tmp_path, monkeypatch):
    from scripts.experiments import demo

    calls, overwrites = [], []

    def generate(folder, seed, overwrite):
        overwrites.append(overwrite)
        return Path(folder) / "datalist.json"

    monkeypatch.setattr(demo, "generate_dataset", generate)
    monkeypatch.setattr(demo, "bundle_run", lambda configs, **overrides: calls.append((list(configs), overrides)))
    monkeypatch.setattr(demo, "read_case_dice", lambda path: {"case_0": [0.5, 0.5]})
    monkeypatch.setattr(demo, "class_names", lambda folder: ["blob", "tube"])
    demo.main(["--work_dir", str(tmp_path / "demo"), "--dataset_dir", str(tmp_path / "data")])
    training = [overrides for configs, overrides in calls if "evaluate.json" not in configs]
    assert len(training) == len(demo.DEMO_METHODS) and all(o["overwrite"] is True for o in training)
    assert all(str(o["ckpt_dir"]).startswith(str((tmp_path / "demo").resolve())) for o in training)
    assert overwrites == [False]  # a dataset folder of the user's is replaced only with --overwrite_data
    assert "on this one seed" in (tmp_path / "demo" / "results.md").read_text()


def test_demo_labels_its_differences_as_one_seed():
    from scripts.experiments.demo import single_seed_differences

    results = {"MCPM": {"a": [0.8, 0.6], "b": [0.9, float("nan")]}, "plain": {"a": [0.5, 0.5], "b": [0.6, 0.6]}}
    line = single_seed_differences(results)
    assert "one seed" in line and "MCPM - plain +0.250" in line  # (0.7 + 0.9) / 2 - 0.55, NaN classes skipped


def test_benchmark_restarts_a_run_folder_with_overwrite(tmp_path, monkeypatch):
    from scripts.experiments import benchmark
    from scripts.experiments.methods import METHODS

    class StopError(Exception):
        """Raised instead of training."""

    def bundle_run(configs, log_path=None, **overrides):
        calls.append(overrides)
        raise StopError

    calls: list[dict] = []
    monkeypatch.setattr(benchmark, "bundle_run", bundle_run)
    mode = benchmark.MODES["quick"]
    with pytest.raises(StopError):
        benchmark.train_and_evaluate(METHODS["plain"], tmp_path, tmp_path / "run", mode, "ed_a0", 0, tmp_path / "log")
    assert calls[0]["overwrite"] is True and calls[0]["ckpt_dir"] == str(tmp_path / "run" / "models")
