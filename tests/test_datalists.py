"""Tests of the conversion of MSD and LiTS dataset folders into the bundle's datalist."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.data import load_decathlon_datalist

from scripts.checks import check_before_training, validate_datalist
from scripts.data.datalists import DEFAULT_DATALIST, lits_datalist, main, msd_datalist, split_cases, write_datalist

REPO_ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("training", "meta", "validation", "test")
NUM_CASES = 7
SIZES = {"num_validation": 1, "num_test": 2}
MSD_IDS = [f"liver_{i}" for i in range(NUM_CASES)]
LITS_IDS = [str(i) for i in range(NUM_CASES)]
MSD_HEADER = {
    "name": "Liver",
    "description": "Liver and tumour segmentation",
    "reference": "IRCAD",
    "tensorImageSize": "3D",
    "modality": {"0": "CT"},
    "labels": {"0": "background", "1": "liver", "2": "cancer"},
}


def save(path: Path, label: bool, seed: int) -> None:
    """An 8^3 NIfTI: a float image, or a label with liver (1) and tumour (2) voxels."""
    rng = np.random.default_rng(seed)
    if label:
        array = np.zeros((8, 8, 8), np.uint8)
        array[2:6, 2:6, 2:6] = 1
        array[3:5, 3:5, 3:5] = 2
    else:
        array = rng.normal(size=(8, 8, 8)).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([0.8, 0.8, 2.5, 1.0])), path)


@pytest.fixture
def task_dir(tmp_path: Path) -> Path:
    """A Task03_Liver-like folder: 7 labelled cases and 2 unlabelled test images."""
    task = tmp_path / "Task03_Liver"
    for i, case in enumerate(MSD_IDS):
        save(task / "imagesTr" / f"{case}.nii.gz", False, i)
        save(task / "labelsTr" / f"{case}.nii.gz", True, i)
    for i in (NUM_CASES, NUM_CASES + 1):
        save(task / "imagesTs" / f"liver_{i}.nii.gz", False, i)
    content = {
        **MSD_HEADER,
        "numTraining": NUM_CASES,
        "numTest": 2,
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in MSD_IDS],
        "test": [f"./imagesTs/liver_{i}.nii.gz" for i in (NUM_CASES, NUM_CASES + 1)],
    }
    (task / "dataset.json").write_text(json.dumps(content, indent=4))
    return task


@pytest.fixture
def lits_dir(tmp_path: Path) -> Path:
    """A LiTS-like folder: volumes 0-2 as .nii in batch 1, 3-6 as .nii.gz in batch 2 (segmentation 6 in batch 1)."""
    lits = tmp_path / "LiTS"
    for i in range(NUM_CASES):
        batch, ext = ("Training Batch 1", ".nii") if i < 3 else ("Training Batch 2", ".nii.gz")
        save(lits / batch / f"volume-{i}{ext}", False, i)
        save(lits / ("Training Batch 1" if i == 6 else batch) / f"segmentation-{i}{ext}", True, i)
    save(lits / "Test Data" / "test-volume-0.nii", False, 99)
    return lits


def edit_json(path: Path, change: Callable[[dict], object]) -> None:
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content))


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Size and modification time of every file under ``folder``."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def check_datalist(datalist: dict, dataset_dir: Path, ids: list[str], out: Path) -> None:
    """Splits disjoint and covering ``ids``; every path relative and present; loadable and valid as the bundle reads it."""
    images = {split: [entry["image"] for entry in datalist[split]] for split in SPLITS}
    flat = [image for split in SPLITS for image in images[split]]
    assert len(flat) == len(set(flat)) == len(ids)
    assert datalist["numTraining"] == len(datalist["training"]) and datalist["numTest"] == len(datalist["test"])
    assert datalist["conversion"]["meta_cases"] == [
        Path(Path(i).stem).stem.replace("volume-", "") for i in images["meta"]
    ]
    for split in SPLITS:
        for entry in datalist[split]:
            assert set(entry) == {"image", "label"}
            for path in entry.values():
                assert not Path(path).is_absolute() and not path.startswith("./")
                assert (dataset_dir / path).is_file()
        loaded = load_decathlon_datalist(out, True, split, base_dir=dataset_dir)
        assert all(Path(entry["image"]).is_file() and Path(entry["label"]).is_file() for entry in loaded)
    counts = validate_datalist(out, dataset_dir, num_classes=3)
    assert {split: counts[split] for split in SPLITS} == {split: len(datalist[split]) for split in SPLITS}
    check_before_training(out, dataset_dir, num_classes=3)


def test_msd_random_meta(task_dir: Path):
    before = snapshot(task_dir)
    datalist = msd_datalist(task_dir, num_meta=2, seed=1, **SIZES)
    out = write_datalist(datalist, task_dir / DEFAULT_DATALIST, task_dir)
    assert {k: v for k, v in snapshot(task_dir).items() if k != str(out)} == before
    assert {split: len(datalist[split]) for split in SPLITS} == {"training": 2, "meta": 2, "validation": 1, "test": 2}
    check_datalist(datalist, task_dir, MSD_IDS, out)
    assert {k: datalist[k] for k in MSD_HEADER} == MSD_HEADER
    assert datalist["training"][0]["image"].startswith("imagesTr/liver_")
    assert datalist["unlabelled"] == [{"image": f"imagesTs/liver_{i}.nii.gz"} for i in (NUM_CASES, NUM_CASES + 1)]
    assert datalist["conversion"]["meta_selection"] == "random" and datalist["conversion"]["seed"] == 1


def test_msd_named_meta(task_dir: Path, tmp_path: Path):
    datalist = msd_datalist(task_dir, meta_cases=["liver_5", "liver_2"], **SIZES)
    assert datalist["meta"] == [
        {"image": "imagesTr/liver_2.nii.gz", "label": "labelsTr/liver_2.nii.gz"},
        {"image": "imagesTr/liver_5.nii.gz", "label": "labelsTr/liver_5.nii.gz"},
    ]
    assert datalist["conversion"]["meta_selection"] == "named"
    # elsewhere than the task folder, the paths stay relative to it, for --dataset_dir
    out = write_datalist(datalist, tmp_path / "lists" / "liver.json", task_dir)
    check_datalist(datalist, task_dir, MSD_IDS, out)


def test_msd_skip_unlabelled(task_dir: Path):
    assert "unlabelled" not in msd_datalist(task_dir, num_meta=1, skip_unlabelled=True, **SIZES)


def test_seeds_reproducible(task_dir: Path):
    first = msd_datalist(task_dir, num_meta=2, seed=4, **SIZES)
    assert msd_datalist(task_dir, num_meta=2, seed=4, **SIZES) == first
    # the order in which dataset.json lists the cases does not matter
    edit_json(task_dir / "dataset.json", lambda d: d["training"].reverse())
    assert msd_datalist(task_dir, num_meta=2, seed=4, **SIZES) == first
    others = [msd_datalist(task_dir, num_meta=2, seed=seed, **SIZES) for seed in range(5, 9)]
    assert any(other[split] != first[split] for other in others for split in SPLITS)


def test_split_cases():
    ids = [f"case_{i}" for i in range(30)]
    splits = split_cases(ids, num_meta=3, num_validation=4, num_test=5, seed=2)
    assert sorted(sum(splits.values(), []), key=lambda c: int(c[5:])) == ids
    assert [len(splits[s]) for s in SPLITS] == [18, 3, 4, 5]
    assert splits["training"] == sorted(splits["training"], key=lambda c: int(c[5:]))  # natural order
    # the random meta cases do not depend on the sizes of the other splits
    assert split_cases(ids, num_meta=3, num_validation=9, num_test=0, seed=2)["meta"] == splits["meta"]
    named = split_cases(ids, meta_cases=["case_7"], num_validation=4, num_test=5, seed=2)
    assert named["meta"] == ["case_7"] and "case_7" not in sum((named[s] for s in SPLITS if s != "meta"), [])
    assert split_cases(ids, meta_cases="case_7", num_validation=4, num_test=5, seed=2) == named


def test_lits(lits_dir: Path):
    before = snapshot(lits_dir)
    datalist = lits_datalist(lits_dir, meta_cases=[5, "volume-1"], **SIZES)
    out = write_datalist(datalist, lits_dir / DEFAULT_DATALIST, lits_dir)
    check_datalist(datalist, lits_dir, LITS_IDS, out)
    assert datalist["meta"] == [
        {"image": "Training Batch 1/volume-1.nii", "label": "Training Batch 1/segmentation-1.nii"},
        {"image": "Training Batch 2/volume-5.nii.gz", "label": "Training Batch 2/segmentation-5.nii.gz"},
    ]
    everything = [entry for split in SPLITS for entry in datalist[split]]
    assert {
        "image": "Training Batch 2/volume-6.nii.gz",
        "label": "Training Batch 1/segmentation-6.nii.gz",
    } in everything
    assert datalist["labels"] == {"0": "background", "1": "liver", "2": "tumour"}
    assert datalist["unlabelled"] == [{"image": "Test Data/test-volume-0.nii"}]
    assert lits_datalist(lits_dir, num_meta=2, seed=3, **SIZES) == lits_datalist(lits_dir, num_meta=2, seed=3, **SIZES)
    assert {k: v for k, v in snapshot(lits_dir).items() if k != str(out)} == before


def test_cli_main(task_dir: Path, capsys):
    argv = [
        "msd",
        "--task_dir",
        str(task_dir),
        "--meta_cases",
        "liver_0",
        "liver_6",
        "--num_validation",
        "1",
        "--num_test",
        "1",
    ]
    assert main(argv) == 0
    out = task_dir / DEFAULT_DATALIST
    assert str(out) in capsys.readouterr().out
    first = out.read_text()
    assert [e["image"] for e in json.loads(first)["meta"]] == ["imagesTr/liver_0.nii.gz", "imagesTr/liver_6.nii.gz"]
    # an existing datalist is kept unless --overwrite
    assert main([*argv[:4], "liver_1", *argv[5:]]) == 1
    assert str(out) in capsys.readouterr().err and out.read_text() == first
    assert main([*argv[:4], "liver_1", *argv[5:], "--overwrite"]) == 0
    assert "imagesTr/liver_1.nii.gz" in json.loads(out.read_text())["meta"][0]["image"]
    # errors are printed, not raised
    assert (
        main(
            [
                "msd",
                "--task_dir",
                str(task_dir),
                "--meta_cases",
                "liver_42",
                "--num_validation",
                "1",
                "--num_test",
                "1",
                "--out",
                str(task_dir / "x.json"),
            ]
        )
        == 1
    )
    assert "liver_42" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --meta_cases and --num_meta exclude each other
        main([*argv, "--num_meta", "2"])


def test_cli_subprocess(lits_dir: Path, tmp_path: Path):
    out = tmp_path / "lits.json"
    command = [sys.executable, "-m", "scripts.data.datalists", "lits", "--lits_dir", str(lits_dir), "--num_meta", "2"]
    command += ["--num_validation", "1", "--num_test", "1", "--seed", "7", "--out", str(out), "--check"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "check: every listed file" in result.stdout and f"--dataset_dir {lits_dir}" in result.stdout
    assert json.loads(out.read_text()) == lits_datalist(lits_dir, num_meta=2, num_validation=1, num_test=1, seed=7)


def raises(error: type[Exception], *parts: str, call: Callable[[], object]) -> None:
    """``call()`` raises ``error`` with every one of ``parts`` in its message."""
    with pytest.raises(error) as info:
        call()
    assert all(part in str(info.value) for part in parts), str(info.value)


def test_msd_folder_errors(task_dir: Path, tmp_path: Path):
    raises(
        FileNotFoundError,
        str(tmp_path / "nowhere"),
        call=lambda: msd_datalist(tmp_path / "nowhere", num_meta=1, **SIZES),
    )
    source = task_dir / "dataset.json"
    text = source.read_text()
    source.write_text("{not json")
    raises(ValueError, str(source), "not valid JSON", call=lambda: msd_datalist(task_dir, num_meta=1, **SIZES))
    source.write_text(json.dumps({"name": "Liver"}))
    raises(ValueError, str(source), "'training'", call=lambda: msd_datalist(task_dir, num_meta=1, **SIZES))
    source.unlink()
    raises(FileNotFoundError, str(source), call=lambda: msd_datalist(task_dir, num_meta=1, **SIZES))
    source.write_text(text)
    edit_json(source, lambda d: d["training"].append(d["training"][3]))
    raises(
        ValueError,
        str(source),
        "training[7]",
        "liver_3",
        "unique",
        call=lambda: msd_datalist(task_dir, num_meta=1, **SIZES),
    )
    source.write_text(text)
    edit_json(source, lambda d: d["training"][1].pop("label"))
    raises(ValueError, str(source), "training[1]", "'label'", call=lambda: msd_datalist(task_dir, num_meta=1, **SIZES))


@pytest.mark.parametrize(
    "missing,parts",
    [
        ("imagesTr/liver_2.nii.gz", ["imagesTr/liver_2.nii.gz", "training[2] image"]),
        ("labelsTr/liver_4.nii.gz", ["labelsTr/liver_4.nii.gz", "training[4] label"]),
        ("imagesTs/liver_8.nii.gz", ["imagesTs/liver_8.nii.gz", "test[1]", "--skip_unlabelled"]),
    ],
)
def test_msd_missing_file(task_dir: Path, missing: str, parts: list[str]):
    (task_dir / missing).unlink()
    raises(
        FileNotFoundError,
        str(task_dir / "dataset.json"),
        str(task_dir / missing),
        *parts,
        call=lambda: msd_datalist(task_dir, num_meta=1, **SIZES),
    )


@pytest.mark.parametrize(
    "kwargs,parts",
    [
        ({"meta_cases": ["liver_1", "liver_99"]}, ["liver_99", "not among the 7 labelled cases"]),
        ({"meta_cases": ["liver_1", "liver_1"]}, ["liver_1", "more than once"]),
        ({"meta_cases": []}, ["meta set is empty"]),
        ({"num_meta": 0}, ["meta set is empty"]),
        ({}, ["either meta_cases", "or num_meta"]),
        ({"meta_cases": ["liver_1"], "num_meta": 1}, ["not both"]),
        ({"num_meta": 3, "num_validation": 2}, ["3 meta + 2 validation + 2 test", "only 7 labelled cases", "training"]),
        ({"num_meta": 1, "num_validation": 0}, ["num_validation must be an integer >= 1"]),
        ({"num_meta": 1, "num_test": -1}, ["num_test must be an integer >= 0"]),
        ({"num_meta": 1, "seed": -3}, ["seed must be an integer >= 0"]),
    ],
)
def test_split_errors(task_dir: Path, kwargs: dict, parts: list[str]):
    arguments = {**SIZES, **kwargs}
    raises(ValueError, *parts, call=lambda: msd_datalist(task_dir, **arguments))
    if "liver_99" in parts or "only 7 labelled cases" in parts:  # the source of the case ids is named
        raises(ValueError, str(task_dir / "dataset.json"), call=lambda: msd_datalist(task_dir, **arguments))


def test_lits_errors(lits_dir: Path, tmp_path: Path):
    batch1, batch2 = lits_dir / "Training Batch 1", lits_dir / "Training Batch 2"
    raises(ValueError, str(lits_dir), "'99'", call=lambda: lits_datalist(lits_dir, meta_cases=["99"], **SIZES))
    raises(
        ValueError, "'3'", "more than once", call=lambda: lits_datalist(lits_dir, meta_cases=["3", "volume-3"], **SIZES)
    )
    raises(
        ValueError, str(lits_dir), "only 7 labelled cases", call=lambda: lits_datalist(lits_dir, num_meta=5, **SIZES)
    )
    save(batch1 / "volume-4.nii", False, 4)
    raises(
        ValueError,
        str(batch1 / "volume-4.nii"),
        str(batch2 / "volume-4.nii.gz"),
        call=lambda: lits_datalist(lits_dir, num_meta=1, **SIZES),
    )
    (batch1 / "volume-4.nii").unlink()
    (batch1 / "segmentation-2.nii").unlink()
    (batch2 / "volume-5.nii.gz").unlink()
    raises(
        FileNotFoundError,
        f"{batch1 / 'volume-2.nii'} has no segmentation-2",
        f"{batch2 / 'segmentation-5.nii.gz'} has no volume-5",
        call=lambda: lits_datalist(lits_dir, num_meta=1, **SIZES),
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    raises(FileNotFoundError, str(empty), "no volume-N.nii", call=lambda: lits_datalist(empty, num_meta=1, **SIZES))
    raises(
        FileNotFoundError,
        str(tmp_path / "absent"),
        call=lambda: lits_datalist(tmp_path / "absent", num_meta=1, **SIZES),
    )


def test_write_protects_user_files(task_dir: Path, tmp_path: Path):
    datalist = msd_datalist(task_dir, num_meta=1, **SIZES)
    before = snapshot(task_dir)
    for target in (task_dir / "dataset.json", task_dir / "labelsTr" / "liver_3.nii.gz"):
        raises(
            ValueError,
            str(target),
            "file of the dataset",
            call=lambda: write_datalist(datalist, target, task_dir, overwrite=True),
        )
    raises(
        IsADirectoryError,
        str(task_dir / "imagesTr"),
        call=lambda: write_datalist(datalist, task_dir / "imagesTr", task_dir, overwrite=True),
    )
    out = tmp_path / "mine.json"
    out.write_text("{}")
    raises(FileExistsError, str(out), "--overwrite", call=lambda: write_datalist(datalist, out, task_dir))
    assert out.read_text() == "{}" and snapshot(task_dir) == before
    assert json.loads(write_datalist(datalist, out, task_dir, overwrite=True).read_text()) == datalist
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary file left


def test_doc_overrides_exist():
    """Every override in docs/real_data.md's ``monai.bundle run`` commands is a key of configs/train.json."""
    config = json.loads((REPO_ROOT / "configs" / "train.json").read_text())
    commands = [
        line for line in (REPO_ROOT / "docs" / "real_data.md").read_text().splitlines() if "monai.bundle run" in line
    ]
    keys = {key for line in commands for key in re.findall(r"--([\w#]+)", line)} - {"config_file"}
    assert {"dataset_dir", "datalist", "num_classes", "patch_size"} <= keys
    for key in keys:
        node = config
        for part in key.split("#"):
            node = node[int(part)] if isinstance(node, list) else node[part]
