"""The whole-run timing trains each method through ``monai.bundle run`` and reports its wall time against plain."""

from __future__ import annotations

from scripts.experiments.run_timing import main
from tests.conftest import TINY


def test_whole_runs_are_timed_against_plain_training(dataset, tmp_path):
    overrides = [f"--override={key}={value}" for key, value in {**TINY, "epochs": 1, "mcpm#warmup_epochs": 0}.items()]
    table = main(["--dataset_dir", str(dataset), "--work_dir", str(tmp_path), "--methods", "mcpm", *overrides])
    rows = [line.strip("| ").split(" | ") for line in table.splitlines()[2:]]
    assert [row[0] for row in rows] == ["plain", "mcpm"] and rows[0][2] == "1.00×"
    assert all(float(row[1]) > 0 for row in rows)
    assert (tmp_path / "mcpm" / "models" / "model.pt").is_file() and (tmp_path / "run_timing.md").is_file()
    assert "meta_loss" in (tmp_path / "mcpm" / "train.log").read_text()  # MCPM trained, with meta steps
