"""The label-quality audit: voxel AUROC, detection summary, case ranking and the command on the shipped model."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.metrics import compute_roc_auc

from scripts.audit import CaseScore, auroc, case_ranking, detection_summary
from scripts.audit import main as audit_main
from scripts.audit import ranking_quality, suspect_region
from scripts.data.corruption import morph_per_class
from scripts.data.synthetic import generate_dataset
from tests.conftest import BUNDLE_ROOT, CONFIGS


def test_auroc_matches_monai_with_ties():
    rng = np.random.default_rng(0)
    positives = rng.random(500) < 0.3
    # rounded scores have many ties, which both must count as one half
    scores = np.round(rng.normal(size=500) + positives, 1)
    expected = compute_roc_auc(torch.as_tensor(scores), torch.as_tensor(positives.astype(np.float64)))
    assert auroc(scores, positives) == pytest.approx(float(expected), abs=1e-12)


def test_auroc_extremes_and_undefined():
    positives = np.array([0, 0, 1, 1], dtype=bool)
    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), positives) == 1.0
    assert auroc(np.array([0.9, 0.8, 0.2, 0.1]), positives) == 0.0
    assert auroc(np.ones(4), positives) == 0.5
    assert math.isnan(auroc(np.arange(4.0), np.zeros(4, dtype=bool)))
    with pytest.raises(ValueError, match="same size"):
        auroc(np.arange(3.0), positives)


def _case(name: str, loss: np.ndarray, weight: np.ndarray | None, mask: np.ndarray | None) -> CaseScore:
    zeros = np.zeros_like(loss)
    return CaseScore(
        name=name,
        image=zeros,
        label=zeros,
        prediction=zeros,
        loss=loss,
        weight=weight,
        corruption_mask=mask,
        affine=np.eye(4),
    )


def test_detection_summary_pools_cases_and_reads_weights():
    mask = np.array([[1, 0], [0, 0]], dtype=bool)
    low_on_corrupted = np.where(mask, 0.1, 0.6)
    cases = [
        _case("a", np.where(mask, 3.0, 0.5), low_on_corrupted, mask),
        _case("b", np.full((2, 2), 0.2), np.full((2, 2), 0.6), np.zeros((2, 2), dtype=bool)),
        _case("unknown", np.full((2, 2), 9.0), np.zeros((2, 2)), None),  # no mask: left out
    ]
    summary = detection_summary(cases)
    assert summary["auroc_loss"] == 1.0
    assert summary["auroc_weight"] == 1.0
    assert summary["weight_corrupted"] == pytest.approx(0.1)
    assert summary["weight_unchanged"] == pytest.approx(0.6)


def test_detection_summary_without_meta_network_or_masks():
    mask = np.array([1, 0, 0, 1], dtype=bool)
    summary = detection_summary([_case("a", np.array([2.0, 1.0, 0.0, 0.5]), None, mask)])
    assert summary["auroc_loss"] == 0.75
    assert all(math.isnan(summary[k]) for k in ("auroc_weight", "weight_corrupted", "weight_unchanged"))
    assert all(math.isnan(v) for v in detection_summary([_case("a", np.zeros(4), np.zeros(4), None)]).values())


def test_case_ranking_puts_the_distrusted_label_first():
    label = np.zeros((8, 8, 8), dtype=np.uint8)
    label[2:6, 2:6, 2:6] = 1
    weight = np.full(label.shape, 0.5)
    suspect = weight.copy()
    suspect[2:6, 2:6, 2:4] = 0.05  # half of its structure distrusted
    noise = weight.copy()
    noise[0, 0, 0] = 0.0  # one far background voxel: outside the neighbourhood, must not count
    mask = np.zeros(label.shape, dtype=bool)
    cases = [
        _case("clean", np.zeros(label.shape), noise, mask),
        _case("suspect", np.zeros(label.shape), suspect, mask | (suspect < 0.1)),
    ]
    for case in cases:
        case.label = case.prediction = label
    rows = case_ranking(cases)
    assert [r["case"] for r in rows] == ["suspect", "clean"] and [r["rank"] for r in rows] == [1, 2]
    assert rows[0]["low_weight_inside"] == pytest.approx(0.5)
    assert rows[1]["score"] == 0.0
    assert rows[0]["corrupted"] and not rows[1]["corrupted"]
    # the distrusted half of the cube is the suspect region; the clean case has none near its structure
    assert rows[0]["region_min"] == [2, 2, 2] and rows[0]["region_max"] == [5, 5, 3] and rows[0]["region_voxels"] == 32
    assert rows[0]["region_centre"] == [3.5, 3.5, 2.5] and rows[1]["region_voxels"] == 0
    # label and prediction agree and the loss is 0 everywhere: the simple scores cannot tell the cases apart
    assert all(r["dice_disagreement"] == 0.0 and r["mean_loss"] == 0.0 for r in rows)
    assert ranking_quality(rows) == {
        "case_auroc": 1.0, "precision_at_k": 1.0, "k": 1, "case_auroc_mean_loss": 0.5,
        "case_auroc_dice_disagreement": 0.5,
    }  # fmt: skip
    with pytest.raises(ValueError, match="meta network"):
        case_ranking([_case("a", np.zeros(4), None, None)])
    # a case with no structure in its label or prediction has nothing to distrust: score 0, not NaN
    empty = _case("empty", np.zeros(label.shape), np.full(label.shape, 0.01), None)
    ranked = case_ranking([empty, *cases])
    assert ranked[0]["case"] == "suspect" and all(math.isfinite(r["score"]) for r in ranked)
    assert next(r for r in ranked if r["case"] == "empty")["score"] == 0.0


def test_suspect_region_is_the_largest_component_in_world_coordinates():
    suspect = np.zeros((10, 10, 10), dtype=bool)
    suspect[1, 1, 1] = True  # a lone voxel
    suspect[4:7, 5:9, 2:4] = True  # the largest component
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    affine[:3, 3] = [-10.0, 0.0, 5.0]
    region = suspect_region(suspect, affine)
    assert region == {
        "region_min": [4, 5, 2], "region_max": [6, 8, 3], "region_centre": [0.0, 13.0, 12.5], "region_voxels": 24
    }  # fmt: skip
    assert suspect_region(np.zeros((3, 3, 3), dtype=bool), affine)["region_voxels"] == 0


def test_audit_of_the_shipped_model_ranks_a_deliberately_corrupted_label_first(tmp_path):
    """The shipped MCPM model and meta network, on fresh cases, one with its label dilated by 3 voxels; the cases are
    smaller than the 48³ patch, so the weight maps are padded for the network and must come back on their own grid."""
    dataset_dir = tmp_path / "data"
    datalist_path = generate_dataset(
        dataset_dir, seed=11, num_training=5, num_meta=1, num_validation=1, num_test=0, corrupt_fraction=0.0,
        shape=(40, 44, 36),
    )  # fmt: skip
    entry = json.loads(datalist_path.read_text())["training"][2]
    label_file = nib.load(dataset_dir / entry["label"])
    label = np.asarray(label_file.dataobj)
    dilated = morph_per_class(label, "dilate", 3)
    nib.save(nib.Nifti1Image(dilated, label_file.affine), dataset_dir / entry["label"])
    nib.save(
        nib.Nifti1Image((dilated != label).astype(np.uint8), label_file.affine), dataset_dir / entry["corruption_mask"]
    )

    out_dir = tmp_path / "audit"
    summary = audit_main(
        ["--bundle_root", str(BUNDLE_ROOT), "--config_file", str(CONFIGS / "train.json"),
         "--dataset_dir", str(dataset_dir), "--ckpt_dir", str(BUNDLE_ROOT / "models"), "--out_dir", str(out_dir)]
    )  # fmt: skip
    with open(out_dir / "ranking.csv", newline="") as f:
        ranking = list(csv.DictReader(f))
    corrupted_case = Path(entry["label"]).name.split(".")[0]
    assert ranking[0]["case"] == corrupted_case and len(ranking) == 5
    assert summary["precision_at_k"] == 1.0 and summary["k"] == 1
    assert summary["auroc_weight"] > 0.5
    assert {"case_auroc_mean_loss", "case_auroc_dice_disagreement"} <= set(summary)
    assert json.loads(ranking[0]["region_min"]) and json.loads(ranking[0]["region_voxels"]) > 0
    weight = nib.load(out_dir / "weights" / f"{corrupted_case}_weight.nii.gz")
    assert weight.shape == label.shape and np.allclose(weight.affine, label_file.affine)
    assert matplotlib.image.imread(out_dir / "overview.png").ndim == 3
