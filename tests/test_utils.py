"""Tests of scripts/utils.py, the one home of the helpers the bundle and its tools share."""

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest

from scripts.utils import (
    atomic_path,
    check_number,
    check_range,
    dice,
    figure,
    nanmean,
    number_problem,
    write_csv,
    write_json,
    write_nifti,
)


def test_dice_of_masks_and_nan_when_both_are_empty():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert math.isnan(dice(a, b))  # undefined, as MONAI's DiceMetric(ignore_empty=True) gives
    a[0, :2] = True
    assert dice(a, b) == 0.0 and dice(a, a) == 1.0
    b[0, 1:3] = True
    assert dice(a, b) == pytest.approx(0.5)
    assert nanmean([dice(a, b), float("nan"), 1.0]) == pytest.approx(0.75) and math.isnan(nanmean([float("nan")]))


@pytest.mark.parametrize(
    "args, message",
    [
        (("p", 2, 0, 1), "p must be a number in [0, 1], got 2"),
        (("n", 1.5, 1, math.inf, True), "n must be an integer >= 1, got 1.5"),
        (("lr", 0, 0, math.inf, False, True), "lr must be a number > 0, got 0"),
        (("flag", True, 0), "flag must be a number >= 0, got True"),
        (("x", "3", 0), "x must be a number >= 0, got '3'"),
    ],
)
def test_number_problem_names_the_value_and_the_allowed_range(args, message):
    assert number_problem(*args) == message
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_number(*args)


def test_check_number_and_check_range_return_the_cast_values():
    assert number_problem("k", np.int64(3), 1, integer=True) is None
    assert check_number("k", np.int64(3), 1, integer=True) == 3 and isinstance(check_number("k", 3, 0), float)
    assert check_range("r", (1, 3), 0, integer=True) == (1, 3)
    for bad in [(3, 1), (1,), (1.5, 2), (True, 2), (-1, 2)]:
        with pytest.raises(ValueError, match="^r must be two integers"):
            check_range("r", bad, 0, integer=True)


def test_atomic_path_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "sub" / "table.csv"
    write_csv([{"a": 1, "b": 2.5}, {"b": 3, "c": "x"}], path)
    with open(path, newline="") as stream:
        assert list(csv.DictReader(stream)) == [{"a": "1", "b": "2.5", "c": ""}, {"a": "", "b": "3", "c": "x"}]
    before = path.read_text()

    def failing_write() -> None:
        with atomic_path(path) as temporary:
            temporary.write_text("half a file")
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        failing_write()
    assert path.read_text() == before and sorted(p.name for p in path.parent.iterdir()) == ["table.csv"]


def test_write_json_and_write_nifti(tmp_path):
    value = {"z": [1, 2], "a": {"b": None}}
    path = write_json(value, tmp_path / "d.json")
    assert path.read_text() == json.dumps(value, indent=4) + "\n" and list(json.loads(path.read_text())) == ["z", "a"]
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    image = nib.load(write_nifti(array, affine, tmp_path / "v.nii.gz", units="mm"))
    assert np.array_equal(np.asarray(image.dataobj), array) and np.allclose(image.affine, affine)
    assert image.header.get_xyzt_units()[0] == "mm" and int(image.header["qform_code"]) == 1


def test_figure_renders_without_changing_the_global_backend(tmp_path):
    import matplotlib

    backend = matplotlib.get_backend()
    fig = figure(figsize=(2, 2))
    fig.add_subplot().plot([0, 1], [1, 0])
    fig.savefig(tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and matplotlib.get_backend() == backend
