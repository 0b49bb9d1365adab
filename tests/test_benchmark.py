"""The benchmark's quick mode, shrunk to a micro setting, runs end to end and writes every output."""

from __future__ import annotations

import csv
import json
import math

import matplotlib.image
import pytest

from scripts.experiments import benchmark
from scripts.experiments.methods import METHODS
from scripts.experiments.report import TARGETS, target_checks, write_report
from tests.conftest import needs_lidc_database

# one corrupted setting, a tiny network on 16^3 volumes, 2 epochs: every method, every output, in about 2 minutes
MICRO = [
    "--settings", "ed_severe",
    "--shape", "16", "16", "16",
    "--cases", "4", "2", "1", "1",
    "--epochs", "2", "--val_interval", "1", "--warmup_epochs", "1",
    "--override", "network_def#channels=[4,8,16]",
    "--override", "network_def#strides=[2,2]",
    "--override", "network_def#num_res_units=1",
]  # fmt: skip


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("benchmark")
    report = benchmark.main(["--mode", "quick", "--out_dir", str(out_dir), *MICRO])
    return out_dir, report


def test_writes_every_output(micro_run):
    out_dir, report = micro_run
    with open(out_dir / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == list(METHODS)
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)
    assert {r["setting"] for r in rows} == {"ed_severe"} and float(rows[0]["changed_fraction"]) > 0
    mcpm = next(r for r in rows if r["method"] == "mcpm")
    assert 0.0 <= float(mcpm["auroc_weight"]) <= 1.0
    assert 0.0 < float(mcpm["weight_corrupted"]) < 1.0 and 0.0 < float(mcpm["weight_unchanged"]) < 1.0
    # only the meta network's weights can be scored; the loss of every trained network can
    assert all(math.isnan(float(r["auroc_weight"])) for r in rows if r["method"] != "mcpm")
    assert all(0.0 <= float(r["auroc_loss"]) <= 1.0 for r in rows)
    text = report.read_text()
    assert "| ed_severe" in text and "## Targets" in text
    assert all(method.label in text for method in METHODS.values())
    for figure in ("dice_vs_noise.png", "weight_maps.png"):
        assert matplotlib.image.imread(out_dir / figure).ndim == 3


def test_meta_set_only_gets_the_same_number_of_updates(micro_run):
    out_dir, _ = micro_run
    result = json.loads((out_dir / "runs" / "ed_severe" / "seed0" / "meta_only" / "result.json").read_text())
    # 4 training cases make 2 batches per epoch, 2 meta cases make 1: twice the epochs
    assert result["result"]["epochs"] == 2 * result["spec"]["epochs"]


def test_a_second_invocation_reuses_finished_runs(micro_run, capsys):
    out_dir, _ = micro_run
    before = {p: p.stat().st_mtime_ns for p in (out_dir / "runs").rglob("model.pt")}
    benchmark.main(["--mode", "quick", "--out_dir", str(out_dir), *MICRO])
    assert capsys.readouterr().out.count("(reused)") == len(METHODS)
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_refuses_results_of_other_parameters(micro_run):
    out_dir, _ = micro_run
    changed = [a if a != "2" else "3" for a in MICRO]  # other epochs
    with pytest.raises(ValueError, match="result.json holds a run with other parameters"):
        benchmark.main(["--mode", "quick", "--out_dir", str(out_dir), *changed])


def test_rejects_unknown_setting_and_malformed_override(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--mode", "quick", "--settings", "ed_a0.25"])
    assert "unknown settings ['ed_a0.25']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark.main(["--override", "amp"])
    assert "KEY=VALUE" in capsys.readouterr().err


@needs_lidc_database
def test_lidc_reader_setting_trains_on_single_readers(tmp_path):
    """The semi-synthetic LIDC setting: two classes, one nodule per case, every training label one reader's."""
    micro = [*MICRO[2:], "--settings", "lidc_readers", "--methods", "plain", "mcpm"]  # its own 32x32x16 volumes
    benchmark.main(["--mode", "quick", "--out_dir", str(tmp_path), *micro])
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["plain", "mcpm"]
    assert all(0.0 <= float(r["dice_nodule"]) <= 1.0 for r in rows)
    # every training label is a single reader's outline: some voxels always differ from the consensus
    assert float(rows[0]["changed_fraction"]) > 0 and 0.0 <= float(rows[1]["auroc_weight"]) <= 1.0


def _row(setting: str, method: str, dice: float, **values: float) -> dict:
    """One run's row as run_benchmark returns it, with the values the report reads."""
    keys = ("hd95", "auroc_weight", "auroc_loss", "weight_corrupted", "weight_unchanged")
    row = {"setting": setting, "setting_label": setting, "family": "erosion/dilation", "seed": 0, "method": method}
    return row | {"changed_fraction": 0.3, "dice": dice, "dice_blob": dice} | {k: values.get(k, math.nan) for k in keys}


def test_report_checks_the_bundles_targets(tmp_path):
    """The report lists the bundle's targets and marks each measured one met or not, without any training."""
    rows = [_row("ed_a0.5", "plain", 0.6), _row("ed_a0.5", "clean", 0.8), _row("ed_a0.5", "small_loss", 0.62)]
    rows += [_row("ed_a0.5", "mcpm", 0.75, auroc_weight=0.9), _row("ed_a0", "plain", 0.8), _row("ed_a0", "mcpm", 0.78)]
    checks = target_checks(rows)
    assert len(checks) == len(TARGETS) == 4
    assert checks[0].startswith("ed_a0.5: MCPM closes 0.75 of the gap") and checks[0].endswith(": met")
    assert "small-loss truncation 0.620" in checks[1] and checks[2].endswith(": met")
    assert checks[3].startswith("ed_a0: MCPM − plain Dice -0.0200") and checks[3].endswith("**not met**")
    text = write_report(tmp_path / "results.md", "quick", rows, "python -m x", 60.0, "volumes 16x16x16").read_text()
    assert "The bundle's targets:" in text and all(target in text for target in TARGETS)
    assert "| ed_a0.5 (ed_a0.5, 30% changed) | MCPM | 1 | 0.750 ± 0.000 |" in text
    assert text.rstrip().endswith("Figures: `dice_vs_noise.png`")  # no weight_maps.png when none was drawn
