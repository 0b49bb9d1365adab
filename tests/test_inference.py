"""Inference and evaluation refuse bad inputs before any case is segmented or scored: the input folder, every image
in it and the output folder (:py:func:`scripts.cases.inference_cases`, ``configs/inference.json``), and the
evaluation split (:py:func:`scripts.cases.check_eval_data`, the first step of ``configs/evaluate.json``)."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from collections import namedtuple
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow
from monai.data import ITKWriter, MetaTensor, NibabelWriter
from monai.transforms import SaveImaged

from scripts.cases import (
    EvaluationDataError,
    InferenceInputError,
    check_eval_data,
    inference_cases,
    prediction_path,
)
from scripts.checks import bundle_error, patch_size_problem, read_volume
from scripts.saving import AtomicSaveImaged, PredictionWriteError
from scripts.utils import BundleInputError
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


@pytest.mark.parametrize("saver_class", [SaveImaged, AtomicSaveImaged])
def test_prediction_names_are_those_saveimaged_writes(tmp_path: Path, saver_class: type):
    saver = saver_class("pred", output_dir=tmp_path, output_postfix="seg", separate_folder=False, print_log=False)
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


def test_links_that_lead_to_no_image_are_refused_by_name(images: Path, tmp_path: Path):
    (images / "a.nii.gz").symlink_to("b.nii.gz")
    (images / "b.nii.gz").symlink_to("a.nii.gz")
    (images / "case.nii.gz").symlink_to(tmp_path / "gone.nii.gz")
    (images / "folder.nii.gz").symlink_to(tmp_path)
    (images / "notes.txt").symlink_to("nowhere.txt")  # not an image name: ignored as before
    (images / "copy.nii.gz").symlink_to(images / "case_003.nii.gz")  # a link to an image is an image
    assert refused(images, tmp_path / "out").problems == [
        f"{images / 'a.nii.gz'} is a symbolic link in a loop (a.nii.gz -> b.nii.gz -> a.nii.gz); replace it with "
        "the image or remove it",
        f"{images / 'b.nii.gz'} is a symbolic link in a loop (b.nii.gz -> a.nii.gz -> b.nii.gz); replace it with "
        "the image or remove it",
        f"{images / 'case.nii.gz'} is a symbolic link to a file that does not exist (case.nii.gz -> "
        f"{tmp_path / 'gone.nii.gz'}); replace it with the image or remove it",
        f"{images / 'folder.nii.gz'} is a symbolic link to a folder (folder.nii.gz -> {tmp_path}), not an image file",
    ]
    for name in ("a.nii.gz", "b.nii.gz", "case.nii.gz", "folder.nii.gz"):
        (images / name).unlink()
    assert [Path(case["image"]).name for case in inference_cases(images, tmp_path / "out")] == [
        "case_003.nii.gz", "case_004.nii.gz", "copy.nii.gz"
    ]


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


def test_empty_predictions_of_an_interrupted_run_are_named_as_such(images: Path, tmp_path: Path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    (out / "case_003_seg.nii.gz").write_bytes(b"")  # a run killed while writing it
    (out / "case_004_seg.nii.gz").write_bytes(b"earlier run")
    (out / ".case_004_seg.nii.gz.x1y2z3w4.nii.gz").write_bytes(b"\x1f")  # the temporary of a killed atomic write
    assert refused(images, out).problems == [
        f"output_dir {out} already holds 2 prediction(s) this run would overwrite: case_003_seg.nii.gz, "
        "case_004_seg.nii.gz (1 of them empty, 0 bytes, from an interrupted write: case_003_seg.nii.gz); "
        "pass --overwrite true to replace them, or choose another --output_dir"
    ]
    with caplog.at_level(logging.WARNING, logger="scripts.cases"):
        assert len(inference_cases(images, out, overwrite=True)) == 2
    assert f"output_dir {out} holds 1 temporary file(s) of an interrupted run" in caplog.text
    assert ".case_004_seg.nii.gz.x1y2z3w4.nii.gz" in caplog.text


DiskUsage = namedtuple("DiskUsage", "total used free")


def test_free_space_for_the_predictions_is_checked_before_any_case(images: Path, tmp_path: Path, monkeypatch):
    big = images / "big.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((128, 128, 96), np.uint8), AFFINE), big)  # 1.5 MB of uint8 prediction
    monkeypatch.setattr(shutil, "disk_usage", lambda path: DiskUsage(2**30, 2**30 - 2**20, 2**20))  # 1 MB free
    problems = refused(images, tmp_path / "out").problems
    assert len(problems) == 1 and problems[0].startswith(f"output_dir {tmp_path / 'out'}: only 1.0 MB free"), problems
    assert problems[0].endswith(
        "need at least 1.5 MB (the largest prediction takes 1.5 MB as uncompressed uint8 voxels); free disk space or "
        "choose another --output_dir"
    )
    big.unlink()  # 2 x 16^3 voxels: the floor of 1 MB applies
    monkeypatch.setattr(shutil, "disk_usage", lambda path: DiskUsage(2**30, 2**30 - 2**16, 2**16))  # 64 KB
    assert "only 64 KB free on its disk, need at least 1.0 MB (the largest" in str(refused(images, tmp_path / "out"))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: DiskUsage(2**30, 0, 2**21))
    assert len(inference_cases(images, tmp_path / "out")) == 2


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


@pytest.mark.parametrize("patch_size", [[20, 20, 20], [24, 24]])
def test_a_patch_size_training_refuses_stops_inference_before_any_case(images: Path, tmp_path: Path, patch_size):
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "inference.json"), logging_file=False, bundle_root=str(BUNDLE_ROOT),
        dataset_dir=str(images), output_dir=str(tmp_path / "out"), patch_size=patch_size,
    )
    workflow.initialize()
    with pytest.raises(Exception) as raised:
        workflow.run()
    assert str(bundle_error(raised.value)) == f"config check failed:\n  {patch_size_problem(patch_size, [2, 2, 2])}"
    assert "divisible by 8" in str(bundle_error(raised.value)) and not (tmp_path / "out").exists()


def set_affine(path: Path, change) -> None:
    """Store the affine of ``path`` changed by ``change`` as its sform (code 1), without a qform (code 0)."""
    image = nib.load(path)
    affine = image.affine.copy()
    change(affine)
    broken = nib.Nifti1Image(np.asanyarray(image.dataobj), None, image.header)
    broken.header.set_sform(affine, code=1)
    broken.header.set_qform(None, code=0)
    nib.save(broken, path)


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda a: a.__setitem__((0, 3), np.nan), "has an affine with NaN values (1 of its 16 entries)"),
        (lambda a: a.__setitem__((1, 3), np.inf), "has an affine with infinite values (1 of its 16 entries)"),
        (lambda a: a.__setitem__((slice(0, 3), 2), 0.0), "has a singular affine: voxel size 0 along axis 2 (a zero "
         "column)"),
    ],
)
def test_an_image_whose_affine_cannot_place_its_prediction_is_refused(images: Path, tmp_path: Path, change, expected):
    path = images / IMAGE_NAMES[0]
    set_affine(path, change)
    assert refused(images, tmp_path / "out").problems == [f"{path} {expected}"]


def inference_workflow(images: Path, output: Path, checkpoint: Path, **overrides: object) -> ConfigWorkflow:
    """``configs/inference.json`` with a tiny network, in this process (so that a test can fake a full disk)."""
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "inference.json"), logging_file=False, bundle_root=str(BUNDLE_ROOT),
        dataset_dir=str(images), ckpt_path=str(checkpoint), output_dir=str(output), patch_size=[16, 16, 16],
        **{f"network_def#{k}": v for k, v in TINY_NETWORK.items()}, **overrides,
    )
    workflow.initialize()
    return workflow


def disk_full(writer: object, filename: str, *args: object, **kwargs: object) -> None:
    """A writer's ``write`` on a full disk: the start of a gzip stream, then ENOSPC."""
    Path(filename).write_bytes(b"\x1f\x8b\x08" + bytes(61))
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def cut_silently(writer: object, filename: str, *args: object, **kwargs: object) -> None:
    """A writer's ``write`` that swallows a failed write (ITK on a full disk): a cut file and no error."""
    Path(filename).write_bytes(b"\x1f\x8b\x08")


def test_a_full_disk_stops_inference_naming_the_file_and_leaves_no_partial_file(
    images: Path, checkpoint: Path, tmp_path: Path, monkeypatch
):
    monkeypatch.setattr(NibabelWriter, "write", disk_full)
    monkeypatch.setattr(ITKWriter, "write", cut_silently)  # the next writer MONAI tries
    out = tmp_path / "predictions"
    workflow = inference_workflow(images, out, checkpoint)
    with pytest.raises(Exception) as raised:
        workflow.run()
    error = bundle_error(raised.value)
    assert isinstance(error, PredictionWriteError) and isinstance(error, BundleInputError), raised.value
    assert str(error).startswith(
        f"cannot write the prediction {out / 'case_003_seg.nii.gz'}: No space left on device ("
    ), error
    assert str(error).endswith(
        f"free on the disk of {out}); no partial file was left under its name: free disk space or choose another "
        "--output_dir"
    )
    assert not any(out.iterdir())  # neither a cut prediction nor a temporary file


def test_failed_writes_keep_the_previous_prediction_and_name_each_writer(tmp_path: Path, monkeypatch):
    out = tmp_path / "out"
    saver = AtomicSaveImaged("pred", output_dir=out, output_postfix="seg", separate_folder=False, print_log=False)
    image = MetaTensor(torch.ones(1, 4, 4, 4), meta={"filename_or_obj": "/data/case.nii.gz"})
    saver({"pred": image})
    prediction = out / "case_seg.nii.gz"
    previous = prediction.read_bytes()
    (tmp_path / "new_file").touch()
    assert prediction.stat().st_mode == (tmp_path / "new_file").stat().st_mode  # not mkstemp's private 0o600
    monkeypatch.setattr(NibabelWriter, "write", cut_silently)
    with pytest.raises(PredictionWriteError, match="the written file does not read back"):
        saver({"pred": image})
    monkeypatch.setattr(NibabelWriter, "write", lambda *args, **kwargs: 1 / 0)
    monkeypatch.setattr(ITKWriter, "write", lambda *args, **kwargs: [][0])
    with pytest.raises(PredictionWriteError) as raised:
        saver({"pred": image})
    assert str(raised.value).startswith(
        f"cannot write the prediction {prediction}: no writer could write it (NibabelWriter: ZeroDivisionError: "
        "division by zero; ITKWriter: IndexError: list index out of range) ("
    )
    assert [p.name for p in out.iterdir()] == ["case_seg.nii.gz"]  # no temporary file left
    assert prediction.read_bytes() == previous


def test_a_one_voxel_thick_image_gets_a_prediction_of_its_shape(images: Path, checkpoint: Path, tmp_path, caplog):
    for image in images.iterdir():
        image.unlink()
    thin = write_nifti(images / "thin.nii.gz", shape=(24, 24, 1))
    out = tmp_path / "predictions"
    with caplog.at_level(logging.WARNING, logger="scripts.cases"):
        inference_workflow(images, out, checkpoint).run()
    prediction = nib.load(out / "thin_seg.nii.gz")
    assert prediction.shape == (24, 24, 1)  # not the (24, 24) of SaveImaged, which squeezes every trailing 1
    np.testing.assert_allclose(prediction.affine, AFFINE)
    assert "1 image(s) one voxel thick along an axis" in caplog.text and f"{thin} (24, 24, 1)" in caplog.text


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
