"""The benchmark's quick mode, shrunk to a micro setting, runs end to end and writes every output."""

from __future__ import annotations

import csv
import json
import math

import matplotlib.image
import pytest

from scripts.experiments import benchmark
from scripts.experiments.methods import METHODS
from scripts.experiments.report import (
    TARGETS,
    best_baseline,
    paired_deltas,
    paired_table,
    t_interval,
    target_checks,
    write_report,
)
from scripts.utils import write_csv
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
# every override file whose data, sampler, handler, loss or trainer differs, each trained once through
# `python -m monai.bundle run`; the methods that change a loss or an MCPM option only are checked by
# test_every_method_configures (the losses and options have unit tests of their own)
MICRO_METHODS = ["clean", "plain", "union", "balanced", "finetune", "l2rw", "small_loss", "meta_only", "mcpm"]


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("benchmark")
    report = benchmark.main(["--mode", "quick", "--out_dir", str(out_dir), *MICRO, "--methods", *MICRO_METHODS])
    return out_dir, report


def test_writes_every_output(micro_run):
    out_dir, report = micro_run
    with open(out_dir / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == MICRO_METHODS
    assert all(0.0 <= float(r["dice"]) <= 1.0 and 0.0 <= float(r["val_dice"]) <= 1.0 for r in rows)
    assert {r["setting"] for r in rows} == {"quick/ed_severe"} and float(rows[0]["changed_fraction"]) > 0
    mcpm = next(r for r in rows if r["method"] == "mcpm")
    assert 0.0 <= float(mcpm["auroc_weight"]) <= 1.0
    # the meta loss of the first and last epoch with meta steps, read from the run's log
    assert float(mcpm["meta_loss_first"]) > 0 and float(mcpm["meta_loss_last"]) > 0
    assert 0.0 < float(mcpm["weight_corrupted"]) < 1.0 and 0.0 < float(mcpm["weight_unchanged"]) < 1.0
    # only the meta network's weights can be scored; the loss of every trained network can
    assert all(math.isnan(float(r["auroc_weight"])) for r in rows if not METHODS[r["method"]].meta_network)
    assert all(0.0 <= float(r["auroc_loss"]) <= 1.0 for r in rows)
    # each method trained its segmentation network, and only the meta-network methods saved a meta network
    runs = out_dir / "runs" / "ed_severe" / "seed0"
    assert all((runs / name / "models" / "model.pt").is_file() for name in MICRO_METHODS)
    saved = [name for name in MICRO_METHODS if (runs / name / "models" / "meta_network.pt").exists()]
    assert saved == [name for name in MICRO_METHODS if METHODS[name].meta_network]
    text = report.read_text()
    assert "| ed_severe" in text and "## Targets" in text and "## Paired differences" in text
    assert all(METHODS[name].label in text for name in MICRO_METHODS)
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
    benchmark.main(["--mode", "quick", "--out_dir", str(out_dir), *MICRO, "--methods", *MICRO_METHODS])
    assert capsys.readouterr().out.count("(reused)") == len(MICRO_METHODS)
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_imports_the_runs_of_a_results_csv(micro_run, tmp_path, capsys):
    out_dir, _ = micro_run
    source = tmp_path / "results.csv"
    source.write_text((out_dir / "results.csv").read_text())
    fresh = tmp_path / "fresh"  # a fresh clone: no runs folder, only the CSV kept with the docs
    args = ["--mode", "quick", *MICRO, "--methods", *MICRO_METHODS, "--import_results", str(source)]
    benchmark.main([*args, "--out_dir", str(fresh), "--report_only"])
    out = capsys.readouterr().out
    assert f"{len(MICRO_METHODS)} runs taken from" in out and out.count("(reused)") == len(MICRO_METHODS)
    assert (fresh / "results.csv").read_text() == source.read_text()
    assert not list(fresh.rglob("model.pt")) and not (fresh / "weight_maps.png").exists()
    benchmark.main([*args, "--out_dir", str(fresh), "--report_only"])
    assert "0 runs taken from" in capsys.readouterr().out  # the runs it has are left alone

    # rows of other parameters or other data are refused, before any run is written
    with pytest.raises(ValueError, match="line 2 .* trained 2 epochs, this benchmark 3"):
        benchmark.main([*[a if a != "2" else "3" for a in args], "--out_dir", str(tmp_path / "epochs")])
    with open(source, newline="") as f:
        rows = list(csv.DictReader(f))
    other = tmp_path / "other.csv"
    write_csv([{**row, "changed_fraction": "0.9999"} for row in rows], other)
    other_args = [*args[:-1], str(other), "--out_dir", str(tmp_path / "data")]
    with pytest.raises(ValueError, match="0.9999 of its voxels changed; the one generated here has"):
        benchmark.main(other_args)
    assert not (tmp_path / "epochs" / "runs").exists() and not (tmp_path / "data" / "runs").exists()


def test_report_only_reads_the_finished_runs(micro_run, capsys):
    out_dir, _ = micro_run
    before = {p: p.stat().st_mtime_ns for p in (out_dir / "runs").rglob("model.pt")}
    args = ["--mode", "quick", "--out_dir", str(out_dir), *MICRO, "--report_only", "--reference", "l2rw"]
    report = benchmark.main([*args, "--methods", "plain", "gce", "l2rw"])  # gce never ran
    assert capsys.readouterr().out.count("(reused)") == 2
    with open(out_dir / "results.csv", newline="") as f:
        assert [r["method"] for r in csv.DictReader(f)] == ["plain", "l2rw"]
    assert "pixel-wise L2RW − method" in report.read_text()  # and no weight map figure: L2RW has no meta network
    assert not (out_dir / "runs" / "ed_severe" / "seed0" / "gce").exists()
    assert {p: p.stat().st_mtime_ns for p in before} == before
    with pytest.raises(SystemExit, match="no finished runs"):
        benchmark.main([*args, "--methods", "gce"])


def test_refuses_results_of_other_parameters(micro_run):
    out_dir, _ = micro_run
    changed = [a if a != "2" else "3" for a in MICRO]  # other epochs
    with pytest.raises(ValueError, match="result.json holds a run with other parameters"):
        benchmark.main(["--mode", "quick", "--out_dir", str(out_dir), *changed, "--methods", *MICRO_METHODS])


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
    micro = [*MICRO[2:], "--settings", "lidc_readers", "--methods", "mcpm"]  # its own 32x32x16 volumes
    benchmark.main(["--mode", "quick", "--out_dir", str(tmp_path), *micro])
    with open(tmp_path / "results.csv", newline="") as f:
        (row,) = csv.DictReader(f)
    assert row["method"] == "mcpm" and 0.0 <= float(row["dice_nodule"]) <= 1.0
    # every training label is a single reader's outline: some voxels always differ from the consensus
    assert float(row["changed_fraction"]) > 0 and 0.0 <= float(row["auroc_weight"]) <= 1.0


def _row(setting: str, method: str, dice: float, seed: int = 0, **values: float) -> dict:
    """One run's row as run_benchmark returns it, with the values the report reads."""
    keys = ("hd95", "auroc_weight", "auroc_loss", "weight_corrupted", "weight_unchanged", "meta_loss_first")
    row = {"setting": setting, "setting_label": setting, "family": "erosion/dilation", "seed": seed, "method": method}
    defaults = {"changed_fraction": 0.3, "dice": dice, "dice_blob": dice, "val_dice": dice, "meta_loss_last": 0.5}
    return row | defaults | {k: values.get(k, math.nan) for k in keys} | values


def test_t_interval_and_paired_deltas():
    mean, low, high = t_interval([0.01, 0.03, 0.02, 0.04, 0.00])
    # mean 0.02, sd 0.0158, t(0.975, 4) = 2.776: half-width 0.0196
    assert math.isclose(mean, 0.02) and math.isclose(high - mean, 0.019633, rel_tol=1e-3)
    assert math.isclose(mean - low, high - mean)
    assert all(math.isnan(v) for v in t_interval([0.1])[1:]) and math.isnan(t_interval([])[0])
    rows = [_row("s", "mcpm", 0.7 + k / 100, seed=k) for k in range(3)] + [_row("s", "plain", 0.6, seed=k) for k in (0, 2)]
    assert paired_deltas(rows, "s", "mcpm", "plain") == pytest.approx({0: 0.1, 2: 0.12})  # only the shared seeds


def test_best_baseline_is_chosen_on_validation():
    rows = [_row("s", "plain", 0.9, val_dice=0.6), _row("s", "union", 0.7, val_dice=0.8)]
    rows += [_row("s", "clean", 0.95), _row("s", "mcpm_clean", 0.99)]  # neither is a baseline
    assert best_baseline(rows, "s") == "union"


def test_report_checks_the_bundles_targets(tmp_path):
    """The report lists the bundle's targets and marks each measured one met or not, without any training."""
    rows = []
    for seed, delta in enumerate([0.02, 0.03, 0.04]):
        rows += [_row("ed_a0.5", "plain", 0.6, seed), _row("ed_a0.5", "clean", 0.8, seed)]
        rows += [_row("ed_a0.5", "union", 0.7, seed), _row("ed_a0.5", "small_loss", 0.62, seed)]
        rows += [_row("ed_a0.5", "mcpm", 0.7 + delta, seed, auroc_weight=0.95, auroc_loss=0.9, meta_loss_first=0.6)]
        rows += [_row("ed_a0", "union", 0.8, seed), _row("ed_a0", "mcpm", 0.78, seed)]
    checks = target_checks(rows)
    assert checks[0].startswith("ed_a0.5: MCPM − plain on noisy + clean cases (best baseline) +0.030, 95% interval")
    assert checks[0].endswith(": met")
    assert checks[1].startswith("ed_a0.5: MCPM closes 0.30 of the gap") and checks[1].endswith("**not met**")
    assert "over 3 seeds" in checks[1]
    assert checks[2].startswith("ed_a0: MCPM − union -0.0200 over 3 seeds") and checks[2].endswith("**not met**")
    assert "weight 0.950 against the loss's 0.900" in checks[3] and checks[3].endswith(": met")
    # the ed_a0 runs have no meta loss recorded; the three ed_a0.5 ones fell from 0.6 to 0.5
    assert checks[4] == "the meta loss falls over training on 3 of 3 MCPM runs: met"
    assert len(TARGETS) == 6
    table = paired_table(rows)
    assert "| ed_a0.5 | plain on noisy + clean cases (best baseline) | 3 | +0.030 | [+0.005, +0.055] | 3/3 |" in table
    text = write_report(tmp_path / "results.md", "quick", rows, "python -m x", 60.0, "volumes 16x16x16").read_text()
    assert "The bundle's targets:" in text and all(target in text for target in TARGETS)
    assert "| ed_a0.5 (ed_a0.5, 30% changed) | MCPM | 3 | 0.730 ± 0.010 |" in text
    assert text.rstrip().endswith("Figures: `dice_vs_noise.png`")  # no weight_maps.png when none was drawn


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_configures(name):
    """Every method's config stack parses, every value it sets is a key of that stack, and an MCPM method's options
    pass the bundle's checks together (e.g. the reuse variant without the default's Dice term)."""
    from monai.bundle import ConfigParser

    from scripts.experiments.methods import CONFIGS
    from scripts.options import option_problems

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / c) for c in METHODS[name].configs])
    for key in METHODS[name].overrides:
        assert key in parser, key
        parser[key] = METHODS[name].overrides[key]
    expected = "scripts.trainer.MCPMTrainer" if METHODS[name].meta_network else None
    assert parser["train#trainer#_target_"] == expected or not METHODS[name].meta_network
    if METHODS[name].meta_network:
        assert option_problems(parser["mcpm"], "mcpm") == []


def test_the_recorded_levers_keep_the_cross_entropy_of_their_runs():
    """The runs of the cost levers and of L2RW were made with the 0.3.0 default, without the Dice term; their methods
    pin it to 0 so that the default's new Dice term does not change what they are. mcpm_ce is that default."""
    for name in ("mcpm_ce", "l2rw", "mcpm_interval4", "mcpm_interval8", "mcpm_reuse", "mcpm_every2", "mcpm_every4"):
        assert METHODS[name].overrides["mcpm#dice_loss_weight"] == 0.0, name
    assert METHODS["mcpm_ce"].overrides == {"mcpm#dice_loss_weight": 0.0}


def test_paper_override_restores_the_published_mcpm():
    """configs/train_mcpm_paper.json on top of train.json gives the published MCPM: no clean loss in the real step,
    the SGD look-ahead, weights normalised over all voxels, no Dice term; the bundle's default differs in the first, the
    last and the Dice term."""
    from monai.bundle import ConfigParser

    from scripts.experiments.methods import CONFIGS, PAPER_MCPM, PAPER_OVERRIDE

    default, paper = ConfigParser(), ConfigParser()
    default.read_config(str(CONFIGS / "train.json"))
    paper.read_config([str(CONFIGS / "train.json"), str(CONFIGS / PAPER_OVERRIDE)])
    assert {key: paper[f"mcpm#{key}"] for key in PAPER_MCPM} == {
        "clean_loss_weight": 0.0,
        "virtual_step": "sgd",
        "virtual_lr": 0.1,
        "weight_normalisation": "sum",
        "dice_loss_weight": 0.0,
    }
    # the default is the published MCPM with the clean loss, class-wise weights and the Dice term (its runs before
    # 0.4.0 were named mcpm_dice, dice_loss_weight 1 as an override on the 0.3.0 default, which was the first two as
    # overrides; docs/results.csv names them mcpm, and the 0.3.0 default's runs mcpm_ce)
    assert {key: default[f"mcpm#{key}"] for key in PAPER_MCPM} == {
        **PAPER_MCPM,
        "clean_loss_weight": 1.0,
        "weight_normalisation": "class_sum",
        "dice_loss_weight": 1.0,
    }
    assert {k: v for k, v in paper["mcpm"].items() if k not in PAPER_MCPM} == {
        k: v for k, v in default["mcpm"].items() if k not in PAPER_MCPM
    }
