"""What training refuses before long work starts, each refusal named last: unknown override keys, an empty
validation split, NaN voxels, a test case that is a symlink or a copy of a training case; and what it warns
about (an image of one value, AMP on a CPU)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from scripts.checks import (
    BundleInputError,
    CheckImaged,
    ChecksFailed,
    DatalistError,
    OverrideError,
    bundle_error,
    check_before_training,
    check_override_keys,
    check_training_config,
    errors,
    override_problems,
    run_checks,
    validate_datalist,
)
from tests.conftest import BUNDLE_ROOT, TINY, bundle

# ITK's SWIG bindings warn about their own types when they load
pytestmark = pytest.mark.filterwarnings("ignore:builtin type .* has no __module__ attribute:DeprecationWarning")

TRAIN = str(BUNDLE_ROOT / "configs" / "train.json")
BUNDLE_MAIN = "/venv/lib/python3.11/site-packages/monai/bundle/__main__.py"
CONFIG = dict(learning_rate=0.01, epochs=2, val_interval=1, batch_size=2, num_classes=3, patch_size=[16, 16, 16])


@pytest.fixture
def copy(dataset: Path, tmp_path: Path) -> Path:
    """A copy of the tiny dataset, free to break."""
    return shutil.copytree(dataset, tmp_path / "data")


def edit(datalist: Path, change) -> None:
    content = json.loads(datalist.read_text())
    change(content)
    datalist.write_text(json.dumps(content))


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_override_of_an_unknown_key_lists_the_closest_known_keys():
    problems = override_problems(["run", "--config_file", TRAIN, "--epoch", "2", "--train#resume_form", "latest"])
    assert len(problems) == 2
    assert problems[0].startswith("--epoch: no key of that name") and "did you mean --epochs," in problems[0]
    assert problems[1].startswith("--train#resume_form:") and "--train#resume_from" in problems[1]
    known = ["--epochs", "2", "--mcpm#virtual_lr=0.2", "--network_def#dropout", "0.1", "--tracking", "mlflow"]
    assert override_problems(["run", "--config_file", TRAIN, *known, "--tracking_uri", "x", "--run_id", "run"]) == []
    stacked = repr([TRAIN, str(BUNDLE_ROOT / "configs" / "evaluate.json")])
    assert override_problems(["run", "--config_file", stacked, "--eval_split", "validation"]) == []


def test_an_abbreviated_key_is_suggested_by_its_words():
    problems = override_problems(["run", "--config_file", TRAIN, "--mcpm#meta_lr", "-1", "--ckpt", "runs/a"])
    assert "did you mean --mcpm#meta_learning_rate," in problems[0]  # lr: learning rate, first of the suggestions
    assert "did you mean --ckpt_dir" in problems[1]


def test_override_check_runs_only_for_monai_bundle_commands():
    check_override_keys(["server.py", "--conf", "x"])  # MONAI Label's process: its argv are not overrides
    with pytest.raises(OverrideError, match="--epoch: no key"):
        check_override_keys([BUNDLE_MAIN, "run", "--config_file", TRAIN, "--epoch", "2"])


def test_typo_in_an_override_stops_the_run_and_is_the_last_line(dataset, tmp_path):
    result = bundle(
        "run", ["train.json"], tmp_path, expect_success=False, bundle_root=BUNDLE_ROOT, dataset_dir=dataset,
        ckpt_dir=tmp_path / "models", output_dir=tmp_path, **{**TINY, "epoch": 1},
    )
    assert result.returncode != 0 and "did you mean --epochs," in last_line(result.stderr)
    assert not (tmp_path / "models").exists()  # refused before any training


def test_a_typo_in_an_evaluation_override_is_refused(dataset, tmp_path):
    result = bundle(
        "run", ["train.json", "evaluate.json"], tmp_path, expect_success=False, bundle_root=BUNDLE_ROOT,
        dataset_dir=dataset, model_dir=tmp_path, output_dir=tmp_path, eval_splt="validation",
    )
    assert "--eval_splt: no key of that name" in result.stderr and "did you mean --eval_split" in result.stderr


def test_empty_validation_split_is_refused(copy):
    edit(copy / "datalist.json", lambda d: d.update(validation=[]))
    with pytest.raises(DatalistError, match="without one no model.pt would be saved"):
        check_before_training(copy / "datalist.json", copy, num_classes=3)


def test_every_problem_the_run_knows_of_is_in_one_message(copy, tmp_path):
    edit(copy / "datalist.json", lambda d: d.update(validation=[]))
    result = bundle(
        "run", ["train.json"], tmp_path, expect_success=False, bundle_root=BUNDLE_ROOT, dataset_dir=copy,
        ckpt_dir=copy / "models", output_dir=tmp_path, **{**TINY, "epochs": 0},
    )
    message = result.stderr[result.stderr.rindex("error: the run was refused for several reasons") :]
    assert "epochs must be an integer >= 1, got 0" in message  # the config
    assert "the dataset folder (dataset_dir" in message  # the output folders
    assert "split 'validation' is empty" in message  # the data
    assert not (copy / "models").exists()


def test_run_checks_raises_a_single_refusal_as_it_is_and_lets_other_errors_through():
    def refuse(message):
        def check():
            raise BundleInputError(message)
        return check

    with pytest.raises(BundleInputError, match="^one$") as single:
        run_checks([None, refuse("one"), lambda: None])
    assert type(single.value) is BundleInputError
    with pytest.raises(ChecksFailed) as several:
        run_checks([refuse("one"), refuse("two")])
    assert several.value.problems == ["one", "two"]
    with pytest.raises(ZeroDivisionError):
        run_checks([lambda: 1 / 0, refuse("never reached")])
    with pytest.raises(BundleInputError, match="^unknown key$"):  # the checks would read what it invalidated
        run_checks([refuse("never reached")], prerequisites=[refuse("unknown key")])


def test_nan_voxel_stops_training_naming_the_case(copy, tmp_path):
    path = copy / "imagesTr" / "case_001.nii.gz"
    image = nib.load(path)
    data = np.asanyarray(image.dataobj).astype(np.float32)
    data[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(data, image.affine), path)
    result = bundle(
        "run", ["train.json"], tmp_path, expect_success=False, bundle_root=BUNDLE_ROOT, dataset_dir=copy,
        ckpt_dir=tmp_path / "models", output_dir=tmp_path, **TINY,
    )
    assert result.returncode != 0
    assert "case_001.nii.gz: 1 of 4096 voxels are NaN, infinite" in last_line(result.stderr)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e30])
def test_check_imaged_refuses_non_finite_and_overflowing_voxels(bad):
    image = MetaTensor(torch.zeros(1, 4, 4, 4), meta={"filename_or_obj": "/data/case_7.nii.gz"})
    image[0, 1, 2, 3] = bad
    with pytest.raises(BundleInputError, match=r"^/data/case_7.nii.gz: 1 of 64 voxels"):
        CheckImaged(keys="image")({"image": image})


def test_check_imaged_warns_about_an_image_of_one_value(caplog):
    image = MetaTensor(torch.full((1, 4, 4, 4), 2.0), meta={"filename_or_obj": "case_8.nii.gz"})
    with caplog.at_level(logging.WARNING, logger="scripts.checks"):
        out = CheckImaged(keys="image")({"image": image, "label": 1})
    assert out["label"] == 1 and "case_8.nii.gz: every voxel is 2" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="scripts.checks"):
        CheckImaged(keys="image")({"image": torch.arange(8.0).reshape(1, 2, 2, 2)})
    assert caplog.text == ""


def test_a_test_case_that_is_a_symlink_or_a_copy_of_a_training_case_is_leakage(copy):
    datalist = copy / "datalist.json"
    test_image = copy / json.loads(datalist.read_text())["test"][0]["image"]
    training_image = copy / json.loads(datalist.read_text())["training"][0]["image"]
    test_image.unlink()
    os.symlink(training_image, test_image)
    with pytest.raises(DatalistError, match=r"test\[0\] .*: image also listed as training\[0\]"):
        validate_datalist(datalist, copy)
    test_image.unlink()
    shutil.copyfile(training_image, test_image)
    with pytest.raises(DatalistError, match=r"test\[0\] .*: image is a copy of training\[0\]"):
        validate_datalist(datalist, copy)


def test_a_meta_case_saved_again_in_another_format_for_training_is_leakage(copy):
    datalist = copy / "datalist.json"
    content = json.loads(datalist.read_text())
    meta = content["meta"][0]
    nib.save(nib.load(copy / meta["image"]), copy / "imagesTr" / "again.nii")  # the same voxels, other bytes
    content["training"][0] = {"image": "imagesTr/again.nii", "label": meta["label"]}
    datalist.write_text(json.dumps(content))
    validate_datalist(datalist, copy)  # the files' bytes differ: the datalist check cannot see it
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update({"bundle_root": str(BUNDLE_ROOT), "dataset_dir": str(copy)})
    parser.get_parsed_content("train#dataset")  # training's cache loads the copy
    with pytest.raises(Exception) as raised:
        parser.get_parsed_content("train#meta_dataset")
    message = str(bundle_error(raised.value))
    assert message.startswith(f"meta[0] {copy / meta['image']}: same voxels and affine as training[0] ")
    assert "again.nii" in message and "data leakage" in message


def test_the_bundles_message_is_the_last_line_and_exit_handlers_still_run():
    script = f"""
import atexit, sys
sys.argv[0] = {BUNDLE_MAIN!r}
sys.path.insert(0, {str(BUNDLE_ROOT)!r})
import scripts.checks
from scripts.utils import BundleInputError
atexit.register(lambda: print("exit handlers ran", flush=True))
try:
    raise BundleInputError("the bundle's message")
except BundleInputError as error:
    raise RuntimeError("Failed to evaluate ConfigExpression") from error
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and last_line(result.stderr) == "error: the bundle's message"
    assert result.stdout.strip() == "exit handlers ran"  # a normal exit: TensorBoard's and MLflow's flushes run
    assert sys.excepthook is not errors._excepthook  # this process imported the checks as any tool does: no hook


def test_the_model_zoo_unit_test_override_epochs_1_trains_and_validates(dataset, tmp_path):
    tiny = {k: v for k, v in TINY.items() if k not in ("epochs", "val_interval", "mcpm#warmup_epochs")}
    result = bundle(
        "run", ["train.json"], tmp_path, bundle_root=BUNDLE_ROOT, dataset_dir=dataset,
        ckpt_dir=tmp_path / "models", output_dir=tmp_path, epochs=1, **tiny,
    )
    log = result.stdout + result.stderr
    assert "val_interval (2) is larger than epochs (1): validating at the last epoch instead" in log
    assert "warmup_epochs (2) is not below max_epochs (1): the re-weighting never starts" in log
    assert (tmp_path / "models" / "model.pt").is_file()


def test_amp_on_a_cpu_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="scripts.checks"):
        check_training_config(**CONFIG, strides=[2, 2], amp=True, device=torch.device("cpu"))
    assert "amp is true but the device is cpu" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="scripts.checks"):
        check_training_config(**CONFIG, strides=[2, 2], amp=False, device="cpu")
    assert caplog.text == ""


@pytest.mark.parametrize("text, flag", [("false", False), ("true", True), ("False", False), (True, True)])
def test_boolean_settings_read_the_lowercase_words_the_command_line_gives(text, flag):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(TRAIN)
    for name in ("amp", "validate_data", "save_meta_network"):
        parser[name] = text  # fire passes `--amp false` as the string "false", which Python reads as true
    assert all(parser.get_parsed_content(f"flags#{name}") is flag for name in ("amp", "validate_data"))
    assert parser.get_parsed_content("check_data#_disabled_") is (not flag)  # the datalist check is skipped


def test_a_missing_resume_checkpoint_is_named_on_the_last_line(dataset, tmp_path):
    result = bundle(
        "run", ["train.json"], tmp_path, expect_success=False, bundle_root=BUNDLE_ROOT, dataset_dir=dataset,
        ckpt_dir=tmp_path / "models", output_dir=tmp_path, **{**TINY, "train#resume_from": "lastest"},
    )
    assert result.returncode != 0 and last_line(result.stderr) == "error: resume_from: no checkpoint file at lastest."
