"""Tests of scripts/lidc/phantom.py: LIDC-IDRI consensus nodules in synthetic patches, single-reader training labels."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.data import load_decathlon_datalist

from scripts import lidc
from scripts.checks import validate_datalist
from scripts.lidc import phantom as lidc_phantom
from scripts.lidc.phantom import generate_lidc_phantom, make_phantom
from scripts.utils import SPLITS
from tests.conftest import needs_lidc_database

TINY = {"num_training": 4, "num_meta": 1, "num_validation": 1, "num_test": 1}
SHAPE = (32, 32, 16)


def load(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


def arrays(datalist_path: Path) -> dict[str, np.ndarray]:
    """Every array of the dataset, keyed by its relative path."""
    datalist = json.loads(datalist_path.read_text())
    names = [name for split in SPLITS for entry in datalist[split] for key, name in entry.items() if key != "corrupted"]
    return {name: load(datalist_path.parent / name) for name in names}


def stat_files(out_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(out_dir)): p.stat().st_mtime_ns for p in sorted(out_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return generate_lidc_phantom(tmp_path_factory.mktemp("phantom"), seed=0, **TINY)


def test_make_phantom_intensities():
    nodule = np.zeros(SHAPE, bool)
    nodule[12:20, 13:19, 6:10] = True
    spacing = (0.7, 0.7, 2.5)
    image = make_phantom(np.random.default_rng(0), nodule, spacing)
    assert image.shape == SHAPE and image.dtype == np.float32 and np.isfinite(image).all()
    assert np.array_equal(image, make_phantom(np.random.default_rng(0), nodule, spacing))
    core = np.zeros_like(nodule)
    core[14:18, 15:17, 7:9] = True
    assert -0.3 < np.median(image[core]) < 0.2  # a solid or part-solid nodule near 0 HU
    assert -0.95 < np.median(image[~nodule]) < -0.7 and image.min() >= -1.024  # parenchyma, clipped at air


@needs_lidc_database
def test_files_labels_and_sources(dataset):
    datalist = json.loads(dataset.read_text())
    folder = dataset.parent
    assert datalist["labels"] == {"0": "background", "1": "nodule"}
    assert datalist["generator"]["shape"] == list(SHAPE) and datalist["generator"]["reader"] == "random"
    sources = datalist["sources"]
    assert len(sources) == 7 and all(record["n_readers"] >= 3 for record in sources.values())
    db = lidc.load_database(scan_ids=sorted({record["scan_id"] for record in sources.values()}))
    for split in SPLITS:
        for entry in datalist[split]:
            case = Path(entry["image"]).name.removesuffix(".nii.gz")
            record = sources[case]
            assert record["split"] == split
            image = nib.load(folder / entry["image"])
            assert image.shape == SHAPE and image.get_fdata().dtype.kind == "f"
            np.testing.assert_allclose(np.diag(image.affine)[:3], record["spacing"], rtol=1e-6)
            np.testing.assert_allclose(image.affine @ [*(np.array(SHAPE) - 1) / 2, 1], [0, 0, 0, 1], atol=1e-4)
            label = load(folder / entry["label"])
            assert label.dtype == np.uint8 and set(np.unique(label)) == {0, 1}
            assert np.array_equal(nib.load(folder / entry["label"]).affine, image.affine)
            # the consensus, recomputed from the database, is all in the patch, centred
            nodule = lidc.scan_nodules(db, record["scan_id"])[record["nodule"]]
            clean = load(folder / entry.get("clean_label", entry["label"])).astype(bool)
            assert clean.sum() == nodule.consensus().sum() == record["consensus_voxels"]
            assert np.all(np.abs(np.argwhere(clean).mean(0) - np.array(SHAPE) // 2) <= 0.5)
            if split != "training":
                assert set(entry) == {"image", "label"} and record["reader"] is None
                continue
            reader = record["reader"]
            assert reader == lidc.choose_reader("random", record["n_readers"], 0, record["scan_id"], record["nodule"])
            changed = load(folder / entry["corruption_mask"])
            assert changed.dtype == np.uint8 and np.array_equal(changed.astype(bool), label.astype(bool) != clean)
            assert entry["corrupted"] == bool(changed.any()) and record["changed_voxels"] == changed.sum()
            assert label.sum() == record["label_voxels"] <= nodule.masks[reader].sum()
            assert record["dice"] == pytest.approx(lidc.dice(label.astype(bool), clean), abs=1e-6)


@needs_lidc_database
def test_splits_are_disjoint_by_patient(dataset):
    datalist = json.loads(dataset.read_text())
    patients = {split: set() for split in SPLITS}
    for record in datalist["sources"].values():
        patients[record["split"]].add(record["patient_id"])
    assert sum(map(len, patients.values())) == len(set().union(*patients.values())) == 7


@needs_lidc_database
def test_datalist_is_valid_and_loads_with_monai(dataset):
    assert validate_datalist(dataset, dataset.parent, num_classes=2) == {
        "training": 4,
        "meta": 1,
        "validation": 1,
        "test": 1,
    }
    training = load_decathlon_datalist(dataset, True, "training", base_dir=dataset.parent)
    assert set(training[0]) == {"image", "label", "clean_label", "corruption_mask", "corrupted"}
    assert Path(training[0]["corruption_mask"]).is_file() and isinstance(training[0]["corrupted"], bool)


@needs_lidc_database
def test_deterministic_per_seed_and_stable_evaluation_cases(dataset, tmp_path):
    again = generate_lidc_phantom(tmp_path / "again", seed=0, **TINY)
    assert again.read_text() == dataset.read_text()
    first, second = arrays(dataset), arrays(again)
    assert first.keys() == second.keys() and all(np.array_equal(first[k], second[k]) for k in first)
    other = json.loads(generate_lidc_phantom(tmp_path / "seed1", seed=1, **TINY).read_text())["sources"]
    nodules = {record["nodule_id"] for record in json.loads(dataset.read_text())["sources"].values()}
    assert nodules != {record["nodule_id"] for record in other.values()}
    # more training cases leave the test, validation and meta nodules as they were
    more = json.loads(generate_lidc_phantom(tmp_path / "more", seed=0, **{**TINY, "num_training": 5}).read_text())

    def evaluation(sources: dict) -> list:
        return [(r["split"], r["nodule_id"]) for r in sources.values() if r["split"] != "training"]

    assert evaluation(more["sources"]) == evaluation(json.loads(dataset.read_text())["sources"])


@needs_lidc_database
def test_reuse_refuse_and_command_line(dataset, capsys):
    before = stat_files(dataset.parent)
    assert generate_lidc_phantom(dataset.parent, seed=0, **TINY) == dataset
    assert stat_files(dataset.parent) == before  # reused, nothing rewritten
    with pytest.raises(FileExistsError, match="datalist.json was generated with the parameters"):
        generate_lidc_phantom(dataset.parent, seed=0, **{**TINY, "min_readers": 4})
    args = ["--out_dir", str(dataset.parent), "--seed", "0", "--num_training", "4", "--num_meta", "1"]
    assert lidc_phantom.main([*args, "--num_validation", "1", "--num_test", "1"]) == dataset
    out = capsys.readouterr().out
    assert "training=4" in out and "mean Dice" in out and "% of the consensus foreground" in out
    assert stat_files(dataset.parent) == before


def test_refuses_foreign_files(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "imagesTr" / "case_000.nii.gz").write_bytes(b"")
    with pytest.raises(FileExistsError, match="no datalist.json"):
        generate_lidc_phantom(tmp_path, **TINY)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"num_meta": 0}, "num_meta"),
        ({"num_test": -1}, "num_test"),
        ({"shape": (32, 32)}, "shape"),
        ({"shape": (32, 32, 8)}, "shape entries"),
        ({"min_readers": 5}, "min_readers"),
        ({"reader": "last"}, "reader"),
    ],
)
def test_bad_arguments_are_named(kwargs, name, tmp_path):
    with pytest.raises(ValueError, match=rf"^{name} must"):
        generate_lidc_phantom(tmp_path / "out", **{**TINY, **kwargs})
    assert not (tmp_path / "out").exists()


@needs_lidc_database
def test_too_few_nodules(tmp_path, monkeypatch):
    db = lidc.load_database(scan_ids=list(range(1, 9)))
    monkeypatch.setattr(lidc_phantom, "_database", lambda: db)
    with pytest.raises(ValueError, match="only [0-9]+ of the 8 patients .* but 20 cases were asked for"):
        generate_lidc_phantom(tmp_path / "out", **{**TINY, "num_training": 17})
    assert not (tmp_path / "out" / "datalist.json").exists()
