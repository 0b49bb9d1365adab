"""Tests of the synthetic dataset generator."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.data import load_decathlon_datalist

from scripts.data.synthetic import SPLITS, generate_dataset, main, make_case

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = {"num_training": 3, "num_meta": 1, "num_validation": 1, "num_test": 1, "shape": (16, 18, 20)}


def load(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


def entries(datalist_path: Path) -> list[tuple[str, dict]]:
    datalist = json.loads(datalist_path.read_text())
    return [(split, entry) for split in SPLITS for entry in datalist[split]]


def arrays(datalist_path: Path) -> dict[str, np.ndarray]:
    """Every array of the dataset, keyed by its relative path."""
    return {
        name: load(datalist_path.parent / name)
        for _, entry in entries(datalist_path)
        for key, name in entry.items()
        if key != "corrupted"
    }


def stat_files(out_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(out_dir)): p.stat().st_mtime_ns for p in sorted(out_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A small dataset in which every training label is corrupted."""
    return generate_dataset(tmp_path_factory.mktemp("data"), seed=7, corrupt_fraction=1.0, radius=(1, 2), **SMALL)


def test_make_case():
    shape = (24, 20, 16)
    image, label = make_case(np.random.default_rng(0), shape)
    assert image.shape == label.shape == shape
    assert image.dtype == np.float32 and label.dtype == np.uint8
    assert set(np.unique(label)) <= {0, 1, 2} and (label == 1).any()
    assert np.isfinite(image).all()
    assert image.std() > 0
    again, again_label = make_case(np.random.default_rng(0), shape)
    assert np.array_equal(image, again) and np.array_equal(label, again_label)


def test_make_case_draws_tubes_in_most_cases():
    rng = np.random.default_rng(0)
    n, prob = 60, 0.85
    with_tube = sum((make_case(rng, (16, 16, 16))[1] == 2).any() for _ in range(n))
    assert abs(with_tube - n * prob) <= 4 * np.sqrt(n * prob * (1 - prob)) and with_tube < n


def test_make_case_contrast():
    for seed in range(4):
        image, label = make_case(np.random.default_rng(seed))
        background = image[label == 0].mean()
        assert image[label == 1].mean() > background
        assert not (label == 2).any() or image[label == 2].mean() < background


def test_files_and_headers(dataset):
    datalist = json.loads(dataset.read_text())
    generator = datalist["generator"]
    assert datalist["labels"] == {"0": "background", "1": "blob", "2": "tube"}
    assert datalist["numTraining"] == len(datalist["training"]) == SMALL["num_training"]
    assert generator["shape"] == list(SMALL["shape"]) and generator["seed"] == 7
    spacing = np.asarray(generator["spacing"])
    training_keys = {"clean_label", "corruption_mask", "corrupted"}
    for split, entry in entries(dataset):
        expected = {"image", "label"} | (training_keys if split == "training" else set())
        assert set(entry) == expected
        for key in expected - {"corrupted"}:
            image = nib.load(dataset.parent / entry[key])
            assert image.shape == SMALL["shape"]
            assert image.get_data_dtype() == (np.float32 if key == "image" else np.uint8)
            assert np.allclose(image.header.get_zooms(), spacing)
            assert np.allclose(image.affine[:3, :3], np.diag(spacing))
            assert int(image.header["qform_code"]) == int(image.header["sform_code"]) == 1
            assert np.allclose(image.get_qform(), image.get_sform())
            centre = image.affine @ [*((np.asarray(SMALL["shape"]) - 1) / 2), 1]
            assert np.allclose(centre[:3], 0)


def test_labels_and_corruption_masks(dataset):
    for split, entry in entries(dataset):
        label = load(dataset.parent / entry["label"])
        assert set(np.unique(label)) <= {0, 1, 2}
        if split == "training":
            clean = load(dataset.parent / entry["clean_label"])
            mask = load(dataset.parent / entry["corruption_mask"])
            assert set(np.unique(clean)) <= {0, 1, 2}
            assert np.array_equal(mask, (label != clean).astype(np.uint8))
            assert entry["corrupted"] == bool(mask.any())
            assert entry["corrupted"]  # corrupt_fraction=1.0 and every label has foreground and background


def test_only_training_labels_are_corrupted(dataset, tmp_path):
    clean = generate_dataset(tmp_path, seed=7, corrupt_fraction=0.0, radius=(1, 2), **SMALL)
    for (split, entry), (_, clean_entry) in zip(entries(dataset), entries(clean), strict=True):
        assert entry["image"] == clean_entry["image"]
        assert np.array_equal(load(dataset.parent / entry["image"]), load(tmp_path / entry["image"]))
        if split == "training":
            assert not clean_entry["corrupted"] and not load(tmp_path / clean_entry["corruption_mask"]).any()
            assert np.array_equal(load(tmp_path / clean_entry["label"]), load(dataset.parent / entry["clean_label"]))
        else:
            assert np.array_equal(load(tmp_path / clean_entry["label"]), load(dataset.parent / entry["label"]))


def test_case_ids_unique_and_datalist_resolves(dataset):
    images = [entry["image"] for _, entry in entries(dataset)]
    assert len(set(images)) == len(images) == sum(v for k, v in SMALL.items() if k.startswith("num_"))
    for split in SPLITS:
        for item in load_decathlon_datalist(dataset, True, split, base_dir=dataset.parent):
            for key, value in item.items():
                assert key == "corrupted" or Path(value).is_file()


def test_deterministic(tmp_path):
    kwargs = {**SMALL, "num_training": 2, "corrupt_fraction": 0.5}
    first = generate_dataset(tmp_path / "a", seed=3, **kwargs)
    second = generate_dataset(tmp_path / "b", seed=3, **kwargs)
    other = generate_dataset(tmp_path / "c", seed=4, **kwargs)
    assert first.read_text() == second.read_text()
    a, b, c = arrays(first), arrays(second), arrays(other)
    assert a.keys() == b.keys() == c.keys()
    assert all(np.array_equal(a[name], b[name]) for name in a)
    assert all(not np.array_equal(a[name], c[name]) for name in a if name.startswith("imagesTr"))


def test_cases_do_not_depend_on_other_split_sizes(tmp_path):
    small = entries(generate_dataset(tmp_path / "a", seed=1, **{**SMALL, "num_training": 1}))
    large = entries(generate_dataset(tmp_path / "b", seed=1, **{**SMALL, "num_training": 2}))
    meta_small = next(entry for split, entry in small if split == "meta")
    meta_large = next(entry for split, entry in large if split == "meta")
    assert meta_small["image"] != meta_large["image"]  # ids are numbered across the splits
    assert np.array_equal(load(tmp_path / "a" / meta_small["image"]), load(tmp_path / "b" / meta_large["image"]))


def test_existing_folder(tmp_path):
    kwargs = {**SMALL, "num_training": 1}
    path = generate_dataset(tmp_path, seed=0, **kwargs)
    before = stat_files(tmp_path)
    assert generate_dataset(tmp_path, seed=0, **kwargs) == path
    assert stat_files(tmp_path) == before

    with pytest.raises(FileExistsError, match="overwrite=True") as error:
        generate_dataset(tmp_path, seed=1, **kwargs)
    assert str(tmp_path) in str(error.value)
    assert stat_files(tmp_path) == before

    (tmp_path / "notes.txt").write_text("user file")
    image = tmp_path / entries(path)[0][1]["image"]
    old_image = load(image)
    assert generate_dataset(tmp_path, seed=1, overwrite=True, **kwargs) == path
    assert json.loads(path.read_text())["generator"]["seed"] == 1
    assert not np.array_equal(load(image), old_image)
    assert (tmp_path / "notes.txt").read_text() == "user file"


def test_refuses_to_overwrite_files_without_datalist(tmp_path):
    path = generate_dataset(tmp_path, seed=0, **SMALL)
    path.unlink()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        generate_dataset(tmp_path, seed=0, **SMALL)
    assert generate_dataset(tmp_path, seed=0, overwrite=True, **SMALL).is_file()


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_training": 0}, "num_training"),
        ({"num_meta": 0}, "num_meta"),
        ({"num_validation": -1}, "num_validation"),
        ({"num_test": -1}, "num_test"),
        ({"shape": (16, 15, 16)}, "shape"),
        ({"shape": (16, 16)}, "shape"),
        ({"spacing": (1.0, 0.0, 1.0)}, "spacing"),
        ({"corrupt_fraction": 1.5}, "corrupt_fraction"),
        ({"corrupt_fraction": -0.1}, "corrupt_fraction"),
        ({"radius": (3, 1)}, "radius"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_argument_validation(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        generate_dataset(tmp_path / "out", **{**SMALL, **kwargs})
    assert not (tmp_path / "out").exists()


def test_cli(tmp_path):
    out_dir = tmp_path / "cli"
    args = ["--out_dir", str(out_dir), "--seed", "2", "--num_training", "2", "--num_meta", "1"]
    args += ["--num_validation", "0", "--num_test", "1", "--shape", "16", "16", "16", "--corrupt_fraction", "1"]
    result = subprocess.run(
        [sys.executable, "-m", "scripts.data", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert Path(lines[0]) == out_dir / "datalist.json" and Path(lines[0]).is_file()
    assert "training=2 (2 corrupted)" in lines[1] and "meta=1" in lines[1] and "test=1" in lines[1]
    datalist = json.loads(Path(lines[0]).read_text())
    assert datalist["generator"]["seed"] == 2 and datalist["generator"]["corrupt_fraction"] == 1.0
    assert len(datalist["validation"]) == 0


def test_other_noise_models_from_the_corruption_library(tmp_path):
    spec = {"model": "affine", "shift": (1.0, 2.0)}  # a tuple, which JSON turns into a list
    kwargs = dict(
        seed=4, num_training=3, num_meta=1, num_validation=0, num_test=0, shape=(16, 16, 16), corrupt_fraction=1.0
    )
    path = generate_dataset(tmp_path / "a", corruption=spec, **kwargs)
    datalist = json.loads(path.read_text())
    assert datalist["generator"]["corruption"] == {"model": "affine", "shift": [1.0, 2.0]}
    assert generate_dataset(tmp_path / "a", corruption=spec, **kwargs) == path  # reused, not refused
    for entry in datalist["training"]:
        label = np.asarray(nib.load(tmp_path / "a" / entry["label"]).dataobj)
        clean = np.asarray(nib.load(tmp_path / "a" / entry["clean_label"]).dataobj)
        mask = np.asarray(nib.load(tmp_path / "a" / entry["corruption_mask"]).dataobj)
        assert entry["corrupted"] and np.array_equal(mask.astype(bool), label != clean)
    again = generate_dataset(tmp_path / "b", corruption=spec, **kwargs)
    first = nib.load(tmp_path / "a" / datalist["training"][0]["label"]).get_fdata()
    assert np.array_equal(first, nib.load(again.parent / datalist["training"][0]["label"]).get_fdata())
    with pytest.raises(ValueError, match="unknown corruption preset"):
        generate_dataset(tmp_path / "c", corruption="no_such_preset", **kwargs)


def test_cli_explains_that_the_corrupt_fraction_is_a_per_case_probability(tmp_path, capsys):
    argv = ["--out_dir", str(tmp_path / "d"), "--seed", "0", "--num_training", "3", "--num_meta", "1"]
    main([*argv, "--num_validation", "0", "--num_test", "0", "--shape", "16", "16", "16"])
    out = capsys.readouterr().out
    assert "training=3 (0 corrupted)" in out
    assert "probability that each training label is corrupted, so 0 of 3 were (expected 1.5)" in out
