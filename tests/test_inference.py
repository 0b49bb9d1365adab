"""Inference and evaluation refuse bad inputs before any case is segmented or scored: the input folder, every image
in it and the output folder (:py:func:`scripts.cases.inference_cases`, ``configs/inference.json``), and the
evaluation split (:py:func:`scripts.cases.check_eval_data`, the first step of ``configs/evaluate.json``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow
from monai.data import MetaTensor
from monai.transforms import SaveImaged

from scripts.cases import (
    EvaluationDataError,
    InferenceInputError,
    check_eval_data,
    inference_cases,
    prediction_path,
)
from scripts.checks import bundle_error, read_volume
from tests.conftest import BUNDLE_ROOT, CONFIGS, TINY, TINY_NETWORK, bundle, tiny_unet

SHAPE = (16, 16, 16)
AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])
IMAGE_NAMES = ("case_003.nii.gz", "case_004.nii.gz")
TINY_INFERENCE = {"patch_size": "[16,16,16]", **{k: v for k, v in TINY.items() if k.startswith("network_def")}}


def write_nifti(path: Path, shape: tuple[int, ...] = SHAPE, affine: np.ndarray = AFFINE) -> Path:
    """A random float32 NIfTI image of ``shape``."""
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random(shape, dtype=np.float32), affine), path)
    return path


def write_itk(path: Path, shape: tuple[int, ...] = SHAPE) -> Path:
    """A random float32 image written by ITK (``.nrrd``, ``.mha``, ``.mhd`` with its ``.raw``), ``shape`` in x, y, z."""
    image = itk.image_from_array(np.random.default_rng(1).random(shape[::-1], dtype=np.float32))
    image.SetSpacing([1.5, 1.5, 2.0][: len(shape)])
    itk.imwrite(image, str(path))
    return path


def truncate(path: Path) -> Path:
    """Cut ``path`` to half its size, as an interrupted copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture
def images(dataset: Path, tmp_path: Path) -> Path:
    """A folder with a copy of the two 16^3 test images of the tiny dataset, as case_003 and case_004."""
    folder = tmp_path / "images"
    folder.mkdir()
    for name, image in zip(IMAGE_NAMES, sorted((dataset / "imagesTs").iterdir()), strict=True):
        shutil.copy(image, folder / name)
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised tiny UNet saved as ``{"model": state_dict}``, as CheckpointLoader reads it."""
    path = tmp_path_factory.mktemp("models") / "model.pt"
    torch.save({"model": tiny_unet().state_dict()}, path)
    return path


def refused(*args: object, **kwargs: object) -> InferenceInputError:
    """The error :py:func:`inference_cases` raises for these arguments."""
    with pytest.raises(InferenceInputError) as error:
        inference_cases(*args, **kwargs)
    assert error.value.problems and all(isinstance(p, str) for p in error.value.problems)
    return error.value


# --- the images listed ---------------------------------------------------------------------------------------


def test_lists_every_readable_format_and_ignores_other_files(tmp_path: Path):
    folder = tmp_path / "in"
    folder.mkdir()
    expected = [write_nifti(folder / "a.nii"), write_nifti(folder / "b.nii.gz")]
    expected += [write_itk(folder / name) for name in ("c.nrrd", "d.mha", "e.mhd")]  # e.raw comes with e.mhd
    (folder / "notes.txt").write_text("scanner protocol")
    (folder / "._b.nii.gz").write_bytes(b"\0")  # a macOS resource fork: hidden, ignored
    (folder / "old").mkdir()
    cases = inference_cases(folder, tmp_path / "out")
    assert cases == [{"image": str(path)} for path in expected]
    assert not (tmp_path / "out").exists()  # the check creates nothing


def test_prediction_names_are_those_saveimaged_writes(tmp_path: Path):
    saver = SaveImaged("pred", output_dir=tmp_path, output_postfix="seg", separate_folder=False, print_log=False)
    for name in ("case_1.nii.gz", "case_2.nii", "case.3.nrrd", "case_4.mha"):
        image = MetaTensor(torch.zeros(1, 4, 4, 4), meta={"filename_or_obj": f"/data/{name}"})
        saver({"pred": image})
        assert prediction_path(f"/data/{name}", tmp_path, "seg").is_file()
    assert len(list(tmp_path.iterdir())) == 4


@pytest.mark.parametrize("name", ["images", "imagesTS", "nothing_like_it"])
def test_missing_input_folder_is_named(images: Path, name: str):
    missing = images.parent / (name + "_x" if name == "images" else name)
    error = refused(missing, images.parent / "out")
    assert f"input folder {missing} does not exist" in str(error)
    if name == "imagesTS":
        assert f"did you mean {images}?" in str(error)


def test_empty_input_folder_and_one_without_images_say_what_they_hold(tmp_path: Path):
    folder = tmp_path / "in"
    folder.mkdir()
    assert f"input folder {folder} is empty" in str(refused(folder, tmp_path / "out"))
    (folder / "notes.txt").write_text("")
    (folder / "scan.dcm").write_bytes(b"")
    (folder / "series").mkdir()
    error = refused(folder, tmp_path / "out")
    assert f"input folder {folder} holds no image" in str(error) and "notes.txt, scan.dcm, series/" in str(error)
    assert ".nrrd" in str(error) and ".mha" in str(error)  # says what it looked for
    assert f"{folder / 'notes.txt'} is a file" in str(refused(folder / "notes.txt", tmp_path / "out"))


# --- the output folder -------------------------------------------------------------------------------------


@pytest.mark.parametrize("inside", ["", "predictions", "a/b"])
def test_output_folder_in_the_input_folder_is_always_refused(images: Path, inside: str):
    output = images / inside if inside else images
    error = refused(images, output, overwrite=True)
    assert f"output_dir {output} is" in str(error) and "the input folder" in str(error)
    assert "case_003_seg.nii.gz -> case_003_seg_seg.nii.gz" in str(error)  # why: the next run would segment them


def test_existing_predictions_are_refused_unless_overwrite(images: Path, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "case_004_seg.nii.gz").write_bytes(b"earlier run")
    (out / "unrelated_seg.nii.gz").write_bytes(b"")
    for overwrite in (False, "false", "False"):
        error = refused(images, out, overwrite=overwrite)
        assert error.problems == [
            f"output_dir {out} already holds 1 prediction(s) this run would overwrite: case_004_seg.nii.gz; "
            "pass --overwrite true to replace them, or choose another --output_dir"
        ]
    for overwrite in (True, "true", " TRUE "):
        assert len(inference_cases(images, out, overwrite=overwrite)) == 2
    assert "must be true or false, got 'yes'" in str(refused(images, out, overwrite="yes"))
    assert len(inference_cases(images, out, output_postfix="pred")) == 2  # other names overwrite nothing


def test_output_folder_that_is_a_file_is_refused(images: Path, tmp_path: Path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert f"{blocker} is a file, not a folder" in str(refused(images, blocker / "out"))


# --- the images themselves -----------------------------------------------------------------------------------


def test_two_inputs_with_one_output_name_are_named(images: Path, tmp_path: Path):
    shutil.copy(images / "case_003.nii.gz", images / "case_003.nii")  # not a valid .nii, but named before reading
    write_itk(images / "case_005.nrrd")
    write_itk(images / "case_005.mha")
    problems = refused(images, tmp_path / "out").problems
    both = "would both be written as"
    assert f"{images / 'case_003.nii'} and {images / 'case_003.nii.gz'} {both} case_003_seg.nii.gz" in problems[0]
    assert f"{images / 'case_005.mha'} and {images / 'case_005.nrrd'} {both} case_005_seg.nii.gz" in problems[1]
    assert len(problems) == 3  # and the copy named .nii is not a NIfTI file


def test_every_bad_image_is_reported_at_once(images: Path, tmp_path: Path):
    truncate(write_nifti(images / "truncated.nii"))
    truncate(write_nifti(images / "truncated_gz.nii.gz"))
    write_nifti(images / "flat.nii.gz", shape=(16, 16))
    write_nifti(images / "two_channels.nii.gz", shape=(*SHAPE, 2))
    write_itk(images / "flat_itk.mha", shape=(16, 16))
    (images / "text.nii.gz").write_text("not an image")
    error = refused(images, tmp_path / "out")
    expected = {
        "truncated.nii": "cannot be read (ValueError: file is truncated",
        "truncated_gz.nii.gz": "cannot be read (EOFError",
        "flat.nii.gz": "is 2D with shape (16, 16), expected a 3D volume",
        "two_channels.nii.gz": "has 2 channels (shape (16, 16, 16, 2)), expected 1",
        "flat_itk.mha": "cannot be read (ValueError: has 2 spatial dimensions",
        "text.nii.gz": "cannot be read",
    }
    assert len(error.problems) == len(expected), error.problems
    for name, text in expected.items():
        assert any(problem.startswith(f"{images / name} {text}") for problem in error.problems), (name, error)


def test_channels_follow_the_network(images: Path, tmp_path: Path):
    error = refused(images, tmp_path / "out", image_channels=2)
    assert f"{images / 'case_003.nii.gz'} has 1 channels (shape (16, 16, 16)), expected 2" in error.problems
    folder = tmp_path / "two"
    folder.mkdir()
    write_nifti(folder / "a.nii.gz", shape=(*SHAPE, 2))
    assert inference_cases(folder, tmp_path / "out", image_channels=2) == [{"image": str(folder / "a.nii.gz")}]


# --- fuzz: random bad input folders --------------------------------------------------------------------------


def _bad_file(folder: Path, index: int, rng: np.random.Generator) -> tuple[Path, str]:
    """Write one broken image into ``folder``; return it and the text its problem must contain."""
    kind = int(rng.integers(5))
    if kind == 0:
        return truncate(write_nifti(folder / f"bad_{index}.nii")), "file is truncated"
    if kind == 1:
        return truncate(write_nifti(folder / f"bad_{index}.nii.gz")), "cannot be read"
    if kind == 2:
        return write_nifti(folder / f"bad_{index}.nii.gz", shape=(16, 16)), "is 2D"
    if kind == 3:
        return write_nifti(folder / f"bad_{index}.nii.gz", shape=(*SHAPE, 2)), "has 2 channels"
    path = folder / f"bad_{index}.{rng.choice(['nii.gz', 'nrrd', 'mha'])}"
    path.write_text("not an image")
    return path, "cannot be read"


def mutate_folder(images: Path, tmp_path: Path, rng: np.random.Generator) -> tuple[Path, Path, list[list[str]]]:
    """A random bad inference setup made from ``images``: the input and output folder, and for each problem it
    has the texts its line of the error must contain. Harmless changes (non-image files, a folder of old
    predictions, hidden files) are mixed in; an empty or missing input folder is the only problem when chosen."""
    output = tmp_path / "out"
    folder_kind = int(rng.integers(8))
    if folder_kind == 0:
        shutil.rmtree(images)
        return images, output, [[f"input folder {images} does not exist"]]
    if folder_kind == 1:
        shutil.rmtree(images)
        images.mkdir()
        if rng.random() < 0.5:
            (images / "notes.txt").write_text("")
            return images, output, [[f"input folder {images} holds no image", "notes.txt"]]
        return images, output, [[f"input folder {images} is empty"]]
    expected: list[list[str]] = []
    for index in range(int(rng.integers(0, 3))):
        path, text = _bad_file(images, index, rng)
        expected.append([str(path), text])
    if rng.random() < 0.4:  # a second input with the name of a good one: one prediction would overwrite the other
        write_itk(images / "case_003.mha")
        expected.append([str(images / "case_003.mha"), str(images / "case_003.nii.gz"), "would both be written"])
    for name in rng.choice(["README.md", "case_003.json", ".DS_Store", "scan.dcm", "old/"], size=2, replace=False):
        (images / name).mkdir() if name.endswith("/") else (images / name).write_text("")
    output_kind = int(rng.integers(4))
    if output_kind == 1:
        output = images if rng.random() < 0.5 else images / "predictions"
        expected.append([f"output_dir {output} is", "the input folder"])
    elif output_kind == 2:
        output.mkdir()
        (output / "case_004_seg.nii.gz").write_bytes(b"")
        expected.append([f"output_dir {output} already holds 1 prediction(s)", "case_004_seg.nii.gz", "--overwrite"])
    elif output_kind == 3:
        output.write_text("")
        expected.append([f"{output} is a file"])
    return images, output, expected


@pytest.mark.parametrize("seed", range(30))
def test_fuzz_bad_input_folders_give_one_error_naming_each_problem(images: Path, tmp_path: Path, seed: int):
    rng = np.random.default_rng(seed)
    input_dir, output_dir, expected = mutate_folder(images, tmp_path, rng)
    if not expected:
        cases = inference_cases(input_dir, output_dir)
        assert [Path(case["image"]).name for case in cases] == list(IMAGE_NAMES)
        return
    error = refused(input_dir, output_dir)
    assert len(error.problems) == len(expected), (expected, error.problems)
    for texts in expected:
        assert any(all(text in problem for text in texts) for problem in error.problems), (texts, error)


# --- inference through `monai.bundle run` --------------------------------------------------------------------


def run_inference(images: Path, output: Path, checkpoint: Path, expect_success: bool, **overrides: object):
    """``configs/inference.json`` with a tiny network, from ``images`` into ``output``, run from another folder."""
    return bundle(
        "run", ["inference.json"], output.parent, expect_success=expect_success, bundle_root=BUNDLE_ROOT,
        dataset_dir=images, ckpt_path=checkpoint, output_dir=output, **TINY_INFERENCE, **overrides,
    )


def test_inference_segments_every_format_and_refuses_a_second_run(images: Path, checkpoint: Path, tmp_path: Path):
    write_itk(images / "case_005.nrrd", shape=(16, 12, 16))
    write_itk(images / "case_006.mha")
    out = tmp_path / "predictions"
    run_inference(images, out, checkpoint, True)
    names = ["case_003_seg.nii.gz", "case_004_seg.nii.gz", "case_005_seg.nii.gz", "case_006_seg.nii.gz"]
    assert sorted(p.name for p in out.iterdir()) == names
    for image in sorted(images.iterdir()):
        prediction = nib.load(prediction_path(image, out))
        assert prediction.shape == read_volume(image, with_data=False).shape
        assert set(np.unique(np.asarray(prediction.dataobj))) <= {0, 1, 2}
    written = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    result = run_inference(images, out, checkpoint, False)
    assert result.stderr.strip().splitlines()[-1] == (
        f"output_dir {out} already holds 4 prediction(s) this run would overwrite: {', '.join(names)}; "
        "pass --overwrite true to replace them, or choose another --output_dir"
    )
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == written

    run_inference(images, out, checkpoint, True, overwrite="true")
    assert all(p.stat().st_mtime_ns != written[p.name] for p in out.iterdir())


def test_bad_inputs_stop_inference_before_any_case_with_their_files_last(images: Path, checkpoint: Path, tmp_path):
    truncate(write_nifti(images / "case_005.nii.gz"))
    write_nifti(images / "flat.nii.gz", shape=(16, 16))
    out = tmp_path / "predictions"
    result = run_inference(images, out, checkpoint, False)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines[-3] == "error: inference input check failed:"
    assert lines[-2].startswith(f"{images / 'case_005.nii.gz'} cannot be read (EOFError")
    assert lines[-1] == f"{images / 'flat.nii.gz'} is 2D with shape (16, 16), expected a 3D volume"
    assert not out.exists() or not any(out.iterdir())  # no case was segmented


# --- evaluation: the eval split is checked first -------------------------------------------------------------


def _label_with_a_7(data: Path, content: dict) -> list[str]:
    case = content["test"][0]
    label = nib.load(data / case["label"])
    values = np.asarray(label.dataobj).copy()
    values[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(values, label.affine, label.header), data / case["label"])
    return [f"test[0] ({case['image']}): label {case['label']} values [7] outside 0..2"]


def _label_10mm_off(data: Path, content: dict) -> list[str]:
    case = content["test"][1]
    label = nib.load(data / case["label"])
    affine = label.affine.copy()
    affine[0, 3] += 10.0
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj), affine), data / case["label"])
    return [f"test[1] ({case['image']}): label {case['label']} affine (orientation or origin)"]


def _unlabelled(data: Path, content: dict) -> list[str]:
    for case in content["test"]:
        del case["label"]
    return [f"test[{i}] ({case['image']}): no 'label' file" for i, case in enumerate(content["test"])]


def _msd_test_list(data: Path, content: dict) -> list[str]:
    content["test"] = [case["image"] for case in content["test"]]
    return [f"test[{i}] ({image}): no 'label' file" for i, image in enumerate(content["test"])]


def _empty(data: Path, content: dict) -> list[str]:
    content["test"] = []
    return [f"{data / 'datalist.json'}: split 'test' is empty"]


def _missing(data: Path, content: dict) -> list[str]:
    del content["test"]
    return [f"{data / 'datalist.json'}: split 'test' is missing"]


@pytest.mark.parametrize("breakage", [_label_with_a_7, _label_10mm_off, _unlabelled, _msd_test_list, _empty, _missing])
def test_evaluation_checks_its_split_before_scoring(breakage, dataset: Path, checkpoint: Path, tmp_path: Path):
    data = Path(shutil.copytree(dataset, tmp_path / "data"))
    content = json.loads((data / "datalist.json").read_text())
    content["training"][0]["label"] = "labelsTr/not_there.nii.gz"  # evaluation reads no other split
    expected = breakage(data, content)
    (data / "datalist.json").write_text(json.dumps(content))
    shutil.copytree(checkpoint.parent, tmp_path / "models")
    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")], logging_file=False,
        bundle_root=str(BUNDLE_ROOT), dataset_dir=str(data), ckpt_dir=str(tmp_path / "models"),
        output_dir=str(tmp_path / "eval"), patch_size=[16, 16, 16],
        **{f"network_def#{k}": v for k, v in TINY_NETWORK.items()},
    )
    workflow.initialize()
    with pytest.raises(Exception) as raised:
        workflow.run()
    error = bundle_error(raised.value)
    assert isinstance(error, EvaluationDataError), raised.value
    assert len(error.problems) == len(expected), error.problems
    for text in expected:
        assert any(problem.startswith(text) for problem in error.problems), (text, error.problems)
    assert not any((tmp_path / "eval").glob("*"))  # nothing was scored


def test_evaluation_check_passes_a_good_split(dataset: Path, caplog):
    with caplog.at_level("INFO", logger="scripts.cases"):
        assert check_eval_data(dataset / "datalist.json", dataset, "test", 3) == {"test": 2}
    assert "OK: test=2" in caplog.text
    with pytest.raises(EvaluationDataError, match="values \\[2\\] outside 0..1"):
        check_eval_data(dataset / "datalist.json", dataset, "test", num_classes=2)
