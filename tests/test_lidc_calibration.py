"""Tests of the LIDC-calibrated corruption preset and its calibration on LIDC-IDRI reader disagreement."""

from __future__ import annotations

import numpy as np
import pytest

from scripts.data.corruption import PRESETS, RandMarkovNoiseLabeld, RandMixedCorruptiond, ball, make_corruption
from scripts.lidc import Nodule
from scripts.lidc.calibration import (
    QUANTILES,
    calibrate_lidc_preset,
    compare,
    corrupted_statistics,
    default_grid,
    format_table,
    main,
    reader_pairs,
    shrink_balanced_spec,
)
from tests.conftest import needs_lidc_database

FIRST_SCANS = list(range(1, 21))


def blob_label() -> np.ndarray:
    """A small 3D nodule-like ball of class 1 touching a box of class 2."""
    label = np.zeros((16, 16, 12), np.uint8)
    label[2:11, 2:11, 1:10][ball(4)] = 1
    label[11:15, 5:10, 3:8] = 2
    return label


def test_preset_builds_and_keeps_labels_valid():
    transform = make_corruption("lidc_calibrated", keys="seg", mask_key="noise").set_random_state(0)
    assert isinstance(transform, RandMixedCorruptiond) and transform.prob == 1.0 and not transform.chain
    assert all(isinstance(c, RandMarkovNoiseLabeld) and c.sigma == 0.0 for c in transform.corruptions)
    assert np.allclose(transform.weights, [1 / 3, 2 / 3])
    label = blob_label()
    chosen = set()
    for _ in range(12):
        d = transform({"seg": label})
        out, mask = np.asarray(d["seg"]), np.asarray(d["noise"])
        assert out.dtype == label.dtype and set(np.unique(out)) <= {0, 1, 2}
        assert mask.dtype == np.uint8 and np.array_equal(mask, (out != label).astype(np.uint8)) and mask.any()
        assert 0.5 < np.count_nonzero(out == 1) / np.count_nonzero(label == 1) < 2  # boundary noise, not a new shape
        chosen.add(transform._index)
    assert chosen == {0, 1}


def test_preset_is_an_entry_of_the_default_grid():
    grid = default_grid()
    assert PRESETS["lidc_calibrated"] == grid["1:2 shrink T6 f0.15 + balanced T3 f0.15"]
    assert len(grid) == 15 and all(make_corruption(spec).prob == 1.0 for spec in grid.values())


def test_statistics_without_database():
    # a synthetic "nodule" of three readers: the ball and the ball shifted by one voxel in either direction
    masks = np.zeros((3, 14, 14, 8), bool)
    for r, shift in enumerate((0, 1, -1)):
        masks[r, 2 + 1 + shift : 11 + 1 + shift, 2:11, 0:9][ball(4)[:, :, :8]] = True
    nodule = Nodule(1, (10, 11, 12), (0, 0, 0), masks, (0.7, 0.7, 1.25))
    refs, target, skipped = reader_pairs([nodule], "others")
    assert len(refs) == 3 and target.shape == (3, 2) and skipped == 0
    assert np.all((target[:, 0] > 0.5) & (target[:, 0] < 1))
    _, target_all, _ = reader_pairs([nodule], "all")
    assert np.all(target_all[:, 0] >= target[:, 0])  # the reader is part of the full consensus
    with pytest.raises(ValueError, match="reference"):
        reader_pairs([nodule], "mine")

    same = corrupted_statistics({"model": "erode_dilate", "radius": (0, 0)}, refs)
    assert np.allclose(same, 1.0)
    noisy = corrupted_statistics("lidc_calibrated", refs, seed=1)
    assert noisy.shape == (3, 2) and np.all(noisy[:, 0] < 1) and np.array_equal(
        noisy, corrupted_statistics("lidc_calibrated", refs, seed=1)
    )
    result = compare(target, target)
    assert result["ks_dice"] == result["ks_volume_ratio"] == result["score"] == 0.0
    assert len(result["dice"]) == len(QUANTILES)


@needs_lidc_database
def test_tiny_calibration_run():
    grid = {
        "mild": shrink_balanced_spec((4, 0.2), (3, 0.15)),
        "strong": {"model": "erode_dilate", "radius": (1, 1)},
    }
    result = calibrate_lidc_preset(num_nodules=10, seed=0, grid=grid, scan_ids=FIRST_SCANS)
    assert result["num_nodules"] == 10 and result["reference"] == "others"
    assert result["num_pairs"] + result["skipped"] >= 20  # every sampled nodule has two or more readers
    assert [r["name"] for r in result["results"]] == ["mild", "strong"] and result["best"] == "mild"
    scores = [r["score"] for r in result["results"]]
    assert scores == sorted(scores)
    for entry in [result["target"], *result["results"]]:
        for measure in ("dice", "volume_ratio"):
            assert len(entry[measure]) == len(QUANTILES) and np.all(np.diff(entry[measure]) >= 0)
    for r in result["results"]:
        assert 0 <= r["ks_dice"] <= 1 and 0 <= r["ks_volume_ratio"] <= 1 and r["spec"] is grid[r["name"]]
    table = format_table(result)
    assert table.splitlines()[2].startswith("| readers |") and "best: mild" in table
    again = calibrate_lidc_preset(num_nodules=10, seed=0, grid=grid, scan_ids=FIRST_SCANS)
    assert [r["score"] for r in again["results"]] == scores  # deterministic per seed


@needs_lidc_database
def test_command_line(capsys):
    assert main(["--num_nodules", "4", "--seed", "1", "--max_scans", "10", "--reference", "all"]) == 0
    out = capsys.readouterr().out
    assert "| readers |" in out and "reference: all" in out
    assert len([line for line in out.splitlines() if line.startswith("| ")]) == 2 + len(default_grid())
