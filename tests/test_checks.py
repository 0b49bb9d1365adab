"""Tests of the datalist validation run before training."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pytest

from scripts.checks import DatalistError, check_before_training, validate_datalist
from scripts.data.synthetic import SPLITS, generate_dataset

# ITK's SWIG bindings warn about their own types when they load
pytestmark = pytest.mark.filterwarnings("ignore:builtin type .* has no __module__ attribute:DeprecationWarning")

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = {"num_training": 3, "num_meta": 1, "num_validation": 1, "num_test": 1, "shape": (16, 16, 16)}
COUNTS = {"training": 3, "meta": 1, "validation": 1, "test": 1}
# file names of the generated dataset: cases are numbered across the splits training, meta, validation, test
TRAINING_IMAGE, TRAINING_LABEL = "imagesTr/case_000.nii.gz", "labelsTr/case_000.nii.gz"
META_IMAGE, META_LABEL = "imagesTr/case_003.nii.gz", "labelsTr/case_003.nii.gz"
MASK = "corruptionMasks/case_001.nii.gz"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("pristine"), seed=3, **SMALL).parent


@pytest.fixture
def datalist(pristine: Path, tmp_path: Path) -> Path:
    """The datalist of a fresh copy of the small dataset, free to break."""
    return shutil.copytree(pristine, tmp_path / "data") / "datalist.json"


def edit(datalist: Path, change: Callable[[dict], object]) -> None:
    content = json.loads(datalist.read_text())
    change(content)
    datalist.write_text(json.dumps(content))


def rewrite(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> None:
    """Write ``array`` to the NIfTI file ``path``, with the affine of the file there unless another is given."""
    nib.save(nib.Nifti1Image(array, nib.load(path).affine if affine is None else affine), path)


def label_of(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


def problems(datalist: Path, **kwargs) -> list[str]:
    with pytest.raises(DatalistError) as info:
        validate_datalist(datalist, **kwargs)
    assert str(info.value).splitlines()[1:] == info.value.problems
    return info.value.problems


def only(found: list[str], *parts: str) -> None:
    """Check that ``found`` is a single problem that contains every one of ``parts``."""
    assert len(found) == 1, found
    assert all(part in found[0] for part in parts), found[0]


def test_valid_dataset(datalist: Path, caplog):
    with caplog.at_level(logging.WARNING):
        assert validate_datalist(datalist) == COUNTS
    assert not caplog.records


def test_dataset_dir(datalist: Path, tmp_path: Path):
    moved = tmp_path / "elsewhere" / "list.json"
    moved.parent.mkdir()
    shutil.copy(datalist, moved)
    assert validate_datalist(moved, dataset_dir=datalist.parent) == COUNTS
    assert all("not found" in problem for problem in problems(moved))


def test_check_files_false(datalist: Path):
    (datalist.parent / META_LABEL).unlink()
    assert validate_datalist(datalist, check_files=False) == COUNTS


def test_missing_datalist(tmp_path: Path):
    only(problems(tmp_path / "nothing.json"), "nothing.json", "not found")


@pytest.mark.parametrize("text,message", [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object")])
def test_unusable_json(tmp_path: Path, text: str, message: str):
    path = tmp_path / "datalist.json"
    path.write_text(text)
    only(problems(path), str(path), message)


@pytest.mark.parametrize("change", [lambda d: d.pop("meta"), lambda d: d.update(meta=[])], ids=["missing", "empty"])
def test_no_meta_cases(datalist: Path, change: Callable[[dict], object]):
    edit(datalist, change)
    only(problems(datalist), "split 'meta'", "MCPM needs at least one clean meta case")


def test_split_not_a_list(datalist: Path):
    edit(datalist, lambda d: d.update(training={"image": TRAINING_IMAGE}))
    only(problems(datalist), "split 'training'", "expected a list of cases")


def test_optional_split_missing(datalist: Path):
    edit(datalist, lambda d: d.pop("test"))
    assert validate_datalist(datalist) == {"training": 3, "meta": 1, "validation": 1}


def test_entry_structure(datalist: Path):
    def change(content: dict) -> None:
        content["training"][0] = 7
        del content["training"][1]["image"]
        del content["meta"][0]["label"]
        content["validation"][0]["label"] = None

    edit(datalist, change)
    found = problems(datalist)
    assert found == [
        "training[0]: entry is 7, expected an object with an 'image' file",
        "training[1]: no 'image' file",
        f"meta[0] ({META_IMAGE}): no 'label' file",
        "validation[0] (imagesTr/case_004.nii.gz): 'label' is null, expected a file path",
    ]


def test_label_not_required(datalist: Path):
    edit(datalist, lambda d: d["test"][0].pop("label"))
    assert "test[0] (imagesTs/case_005.nii.gz): no 'label' file" in problems(datalist)
    assert validate_datalist(datalist, label_required_splits=("training", "meta", "validation")) == COUNTS


def test_msd_test_list_of_paths(datalist: Path):
    edit(datalist, lambda d: d.update(test=[entry["image"] for entry in d["test"]]))
    assert validate_datalist(datalist, label_required_splits=("training", "meta")) == COUNTS


def test_duplicate_entry(datalist: Path):
    edit(datalist, lambda d: d["training"].append(d["training"][0]))
    only(problems(datalist), f"training[3] ({TRAINING_IMAGE})", "duplicate of training[0]")


def test_meta_case_in_training(datalist: Path):
    edit(datalist, lambda d: d["training"].append(d["meta"][0]))
    only(problems(datalist), f"meta[0] ({META_IMAGE})", "also listed as training[3]", "leakage")


def test_training_case_in_test(datalist: Path):
    edit(datalist, lambda d: d["test"].append({"image": TRAINING_IMAGE, "label": TRAINING_LABEL}))
    only(problems(datalist), f"test[1] ({TRAINING_IMAGE})", "also listed as training[0]", "leakage")


def test_missing_file(datalist: Path):
    (datalist.parent / META_LABEL).unlink()
    only(problems(datalist), f"meta[0] ({META_IMAGE}): label {META_LABEL} not found", str(datalist.parent))


def test_path_to_directory(datalist: Path):
    edit(datalist, lambda d: d["meta"][0].update(label="labelsTr"))
    only(problems(datalist), "meta[0]", "label labelsTr cannot be read")
    (datalist.parent / "folder.nii.gz").mkdir()
    edit(datalist, lambda d: d["meta"][0].update(label="folder.nii.gz"))
    only(problems(datalist), "label folder.nii.gz cannot be read", "is a directory")


@pytest.mark.parametrize("name", [META_IMAGE, META_LABEL])
def test_truncated_nifti(datalist: Path, name: str):
    path = datalist.parent / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    only(problems(datalist), f"meta[0] ({META_IMAGE}):", f"{name} cannot be read")


def test_truncated_uncompressed_image(datalist: Path):
    image = nib.load(datalist.parent / META_IMAGE)
    path = datalist.parent / "image.nii"
    nib.save(image, path)
    path.write_bytes(path.read_bytes()[:-100])
    edit(datalist, lambda d: d["meta"][0].update(image="image.nii"))
    only(problems(datalist), "image image.nii cannot be read", "truncated")


def test_random_bytes(datalist: Path):
    (datalist.parent / META_IMAGE).write_bytes(np.random.default_rng(0).bytes(1000))
    only(problems(datalist), f"image {META_IMAGE} cannot be read", "ImageFileError")


def test_image_channels(datalist: Path):
    path = datalist.parent / META_IMAGE
    image = np.asanyarray(nib.load(path).dataobj)
    rewrite(path, image[..., None])
    assert validate_datalist(datalist) == COUNTS
    rewrite(path, np.stack([image, image], axis=-1))
    only(problems(datalist), f"image {META_IMAGE} has 2 channels (shape (16, 16, 16, 2)), expected 1")
    assert len(problems(datalist, image_channels=2)) == 5  # only the five single-channel images are wrong now
    rewrite(path, image[..., 0])
    only(problems(datalist), f"image {META_IMAGE} is 2D with shape (16, 16)")


def test_shape_mismatch(datalist: Path):
    path = datalist.parent / META_LABEL
    rewrite(path, label_of(path)[:, :, :12])
    only(problems(datalist), f"label {META_LABEL} spatial shape (16, 16, 12) differs from image shape (16, 16, 16)")


def test_spacing_mismatch(datalist: Path):
    path = datalist.parent / META_LABEL
    rewrite(path, label_of(path), np.diag([1.0, 1.0, 1.0, 1.0]))
    spacing_problem = f"label {META_LABEL} voxel spacing [1.0, 1.0, 1.0] differs from image spacing [1.5, 1.5, 2.0]"
    only(problems(datalist), spacing_problem)


def test_affine_mismatch(datalist: Path):
    path = datalist.parent / META_LABEL
    affine = nib.load(path).affine.copy()
    affine[0, 3] += 5.0
    rewrite(path, label_of(path), affine)
    only(problems(datalist), f"label {META_LABEL} affine", "differs from image affine")
    affine[0, 3] -= 5.0 - 1e-4  # well within the tolerance
    rewrite(path, label_of(path), affine)
    assert validate_datalist(datalist) == COUNTS


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda a: a.__setitem__((0, 3), np.nan), "has an affine with NaN values (1 of its 16 entries)"),
        (lambda a: a.__setitem__((2, 3), np.inf), "has an affine with infinite values"),
        (lambda a: a.__setitem__((slice(0, 3), 1), 0.0), "singular affine: voxel size 0 along axis 1"),
    ],
)
def test_a_case_whose_files_all_have_an_unusable_affine_is_refused_saying_why(datalist: Path, change, expected):
    case = json.loads(datalist.read_text())["meta"][0]
    for key in ("image", "label"):
        path = datalist.parent / case[key]
        image = nib.load(path)
        affine = image.affine.copy()
        change(affine)
        broken = nib.Nifti1Image(np.asanyarray(image.dataobj), None, image.header)
        broken.header.set_sform(affine, code=1)  # nibabel's affine is then the sform as stored
        broken.header.set_qform(None, code=0)
        nib.save(broken, path)
    found = problems(datalist)
    assert len(found) == 2 and all(expected in problem for problem in found), found
    assert not any("differs" in problem for problem in found)  # two equal NaN matrices do not "differ"


def test_a_volume_one_voxel_thick_is_warned_about(datalist: Path, caplog):
    case = json.loads(datalist.read_text())["training"][0]
    for key in ("image", "label", "clean_label", "corruption_mask"):
        if key in case:
            rewrite(datalist.parent / case[key], label_of(datalist.parent / case[key])[:, :, 8:9])
    with caplog.at_level(logging.WARNING, logger="scripts.checks"):
        assert validate_datalist(datalist) == COUNTS
    assert f"training[0] ({TRAINING_IMAGE}): image {TRAINING_IMAGE} is one voxel thick along axis [2]" in caplog.text


def test_label_values_out_of_range(datalist: Path):
    path = datalist.parent / META_LABEL
    label = label_of(path).copy()
    label[0, 0, :2] = [3, 7]
    rewrite(path, label)
    only(problems(datalist), f"label {META_LABEL} values [3, 7] outside 0..2")
    assert validate_datalist(datalist, num_classes=8) == COUNTS


def test_float_label(datalist: Path):
    path = datalist.parent / META_LABEL
    label = label_of(path).astype(np.float32)
    rewrite(path, label)
    assert validate_datalist(datalist) == COUNTS  # integer-valued floats are class indices
    label[0, 0, 0] = 0.5
    rewrite(path, label)
    only(problems(datalist), f"label {META_LABEL} has non-integer values [0.5]")
    label[0, 0, 0] = np.float32(1.0000001)  # shown as stored, not rounded to the integer it is refused for
    rewrite(path, label)
    only(problems(datalist), f"label {META_LABEL} has non-integer values [1.0000001]")


def test_corruption_mask_values(datalist: Path):
    path = datalist.parent / MASK
    mask = label_of(path).copy()
    mask[0, 0, 0] = 2
    rewrite(path, mask)
    only(problems(datalist), f"training[1] (imagesTr/case_001.nii.gz): corruption_mask {MASK} values [2] outside 0..1")


def test_corruption_mask_shape(datalist: Path):
    path = datalist.parent / MASK
    rewrite(path, label_of(path)[:8])
    only(problems(datalist), f"corruption_mask {MASK} spatial shape (8, 16, 16) differs from image shape")


def test_all_background_label(datalist: Path, caplog):
    for name in (TRAINING_LABEL, "labelsClean/case_000.nii.gz"):
        rewrite(datalist.parent / name, np.zeros_like(label_of(datalist.parent / name)))
    with caplog.at_level(logging.WARNING):
        assert validate_datalist(datalist) == COUNTS
    assert len(caplog.records) == 2
    assert all(record.getMessage().startswith("warning: training[0]") for record in caplog.records)
    assert "all background" in caplog.records[0].getMessage()
    rewrite(datalist.parent / META_LABEL, np.zeros_like(label_of(datalist.parent / META_LABEL)))
    found = problems(datalist)
    assert found[0].startswith(f"warning: training[0] ({TRAINING_IMAGE}): label {TRAINING_LABEL} is all background")
    assert found[2] == f"meta[0] ({META_IMAGE}): label {META_LABEL} is all background (0), there is nothing to segment"


def test_itk_formats(datalist: Path):
    path = datalist.parent / META_LABEL
    cropped = datalist.parent / "cropped.nii.gz"
    rewrite(cropped, label_of(path)[:, :, :12], nib.load(path).affine)
    for source, name in ((path, "label.nrrd"), (cropped, "short.nrrd")):
        itk.imwrite(itk.imread(str(source)), str(datalist.parent / name))
    edit(datalist, lambda d: d["meta"][0].update(label="label.nrrd"))
    assert validate_datalist(datalist) == COUNTS
    edit(datalist, lambda d: d["meta"][0].update(label="short.nrrd"))
    only(problems(datalist), "label short.nrrd spatial shape (16, 16, 12) differs from image shape (16, 16, 16)")


def test_several_problems_in_one_error(datalist: Path):
    (datalist.parent / "labelsTr/case_002.nii.gz").unlink()
    path = datalist.parent / META_LABEL
    rewrite(path, label_of(path) + 2)
    edit(datalist, lambda d: d["validation"].append(d["validation"][0]))
    found = problems(datalist)
    assert len(found) == 3
    assert "training[2] (imagesTr/case_002.nii.gz): label labelsTr/case_002.nii.gz not found" in found[0]
    assert f"meta[0] ({META_IMAGE}): label {META_LABEL} values [3, 4] outside 0..2" == found[1]
    assert found[2] == "validation[1] (imagesTr/case_004.nii.gz): duplicate of validation[0]"


def test_check_before_training(datalist: Path, caplog):
    with caplog.at_level(logging.INFO, logger="scripts.checks"):
        check_before_training(datalist, datalist.parent, 3)
    assert "OK: training=3 meta=1 validation=1 test=1" in caplog.text
    with pytest.raises(DatalistError, match="outside 0..1"):
        check_before_training(datalist, datalist.parent, 2)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "scripts.checks", *args]
    # the timeout only stops a hung check; importing MONAI alone takes 10-40 s on a loaded 2-core machine
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def test_cli(datalist: Path):
    result = run_cli("--datalist", str(datalist), "--num_classes", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "datalist OK: training=3 meta=1 validation=1 test=1"
    (datalist.parent / META_LABEL).unlink()
    edit(datalist, lambda d: d["training"].append(d["training"][0]))
    result = run_cli("--datalist", str(datalist), "--dataset_dir", str(datalist.parent))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and not result.stdout
    assert f"meta[0] ({META_IMAGE}): label {META_LABEL} not found" in result.stderr
    assert f"training[3] ({TRAINING_IMAGE}): duplicate of training[0]" in result.stderr


def test_cli_missing_datalist(tmp_path: Path):
    result = run_cli("--datalist", str(tmp_path / "nothing.json"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "not found" in result.stderr


JUNK = [0, -1.5, True, None, [], ["imagesTr/case_000.nii.gz"], {}, {"image": 3}, "", "x"]
JUNK_PATHS = ["missing.nii.gz", "missing.nrrd", "imagesTr", ".", "datalist.json", "/", "labelsTr/case_000.nii.gz"]


def mutate(content: dict, rng: np.random.Generator) -> None:
    """Apply one random breaking change to a datalist."""
    split = str(rng.choice(SPLITS))
    entries = content.get(split)
    if not isinstance(entries, list) or not entries:
        content[split] = JUNK[rng.integers(len(JUNK))]
        return
    index = int(rng.integers(len(entries)))
    entry = entries[index]
    key = str(rng.choice(["image", "label", "clean_label", "corruption_mask"]))
    action = rng.integers(6)
    if action == 0 or not isinstance(entry, dict):
        entries[index] = JUNK[rng.integers(len(JUNK))]
    elif action == 1:
        entry.pop(key, None)
    elif action == 2:
        entry[key] = JUNK[rng.integers(len(JUNK))]
    elif action == 3:
        entry[key] = JUNK_PATHS[rng.integers(len(JUNK_PATHS))]
    elif action == 4:
        targets = [name for name, value in content.items() if name in SPLITS and isinstance(value, list)]
        content[str(rng.choice(targets))].append(entry)
    else:
        del content[split]


@pytest.mark.parametrize("seed", range(30))
def test_fuzz_only_datalist_errors(pristine: Path, seed: int, tmp_path: Path):
    rng = np.random.default_rng(seed)
    content = json.loads((pristine / "datalist.json").read_text())
    for _ in range(rng.integers(1, 5)):
        mutate(content, rng)
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(content))
    try:
        validate_datalist(path, dataset_dir=pristine)
    except DatalistError as error:
        assert error.problems and all(isinstance(problem, str) for problem in error.problems)


# --- training settings -------------------------------------------------------------------------------------

from scripts.checks import (  # noqa: E402
    ConfigError,
    check_inference_config,
    check_training_config,
    patch_size_problem,
    validation_interval,
)

GOOD_SETTINGS = {
    "learning_rate": 0.002,
    "epochs": 10,
    "val_interval": 1,
    "batch_size": 2,
    "num_classes": 3,
    "patch_size": [48, 48, 48],
    "strides": [2, 2, 2],
    "mcpm": {"meta_gradient": "jvp", "virtual_lr": 0.1, "weight_normalisation": "sum", "meta_interval": 1, "warmup_epochs": 5,
             "virtual_step_params": None, "max_nonfinite_steps": 5, "meta_learning_rate": 0.001, "meta_batch_size": 2},
}


def test_good_training_settings_pass(tmp_path):
    check_training_config(**GOOD_SETTINGS, output_dirs={"ckpt_dir": str(tmp_path / "new" / "models")})
    assert not (tmp_path / "new").exists()  # the check creates nothing


def test_every_bad_training_setting_is_reported_at_once(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    bad = {
        **GOOD_SETTINGS,
        "learning_rate": -0.1,
        "epochs": 0,
        "patch_size": [20, 48, 48],
        "mcpm": {
            **GOOD_SETTINGS["mcpm"], "meta_interval": 0, "meta_gradient": "hessian", "meta_intervall": 2,
            "correction": "teacher",  # valid alone, not with weight_normalisation 'sum'
        },
    }
    output_dirs = {"ckpt_dir": str(blocker / "models"), "output_dir": str(tmp_path)}
    with pytest.raises(ConfigError) as error:
        check_training_config(**bad, output_dirs=output_dirs, min_free_mb=1e12)
    message = str(error.value)
    for expected in (
        "learning_rate must be a number > 0, got -0.1",
        "epochs must be an integer >= 1, got 0",
        "divisible by 8",
        "mcpm#meta_interval must be an integer >= 1, got 0",
        "mcpm#meta_gradient must be one of ('jvp', 'second_order'), got 'hessian'",
        "unknown keys ['meta_intervall']",
        "mcpm#correction 'teacher' makes every voxel's target w·label + (1 − w)·teacher",
        "set mcpm#weight_normalisation 'mean', got 'sum'",
        f"{blocker} is a file",
        "free on its disk, need at least 976562500.0 GB",
    ):
        assert expected in message
    assert len(error.value.problems) == 9


def test_a_validation_interval_beyond_the_epochs_validates_at_the_last_epoch(caplog):
    with caplog.at_level(logging.WARNING, logger="scripts.checks"):
        check_training_config(**{**GOOD_SETTINGS, "epochs": 4, "val_interval": 5})  # warned about, not refused
        assert validation_interval(5, 4) == 4
    assert "val_interval (5) is larger than epochs (4): validating at the last epoch instead" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="scripts.checks"):
        assert validation_interval(2, 4) == 2 and validation_interval("2", 4) == "2"  # the config check reports it
    assert caplog.text == ""


@pytest.mark.parametrize("patch_size", [[20, 20, 20], [24, 24], "[24,24,24]", [24, 24, 0]])
def test_inference_refuses_the_patch_sizes_training_refuses(patch_size):
    with pytest.raises(ConfigError) as error:
        check_inference_config(patch_size, strides=[2, 2, 2])
    assert error.value.problems == [patch_size_problem(patch_size, [2, 2, 2])]
    assert "divisible by 8" in error.value.problems[0] and repr(patch_size) in error.value.problems[0]
    check_inference_config([24, 24, 32], strides=[2, 2, 2])
