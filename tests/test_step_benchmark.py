"""The step benchmark runs every variant through the real trainers and reports ratios to plain training."""

from __future__ import annotations

from scripts.experiments.step_benchmark import VARIANTS, main


def test_step_benchmark_runs_all_variants_on_cpu():
    table = main(
        ["--device", "cpu", "--patch", "16", "--channels", "4", "8", "--res_units", "1"]
        + ["--warmup", "1", "--iterations", "4", "--rounds", "1"]
    )
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert [row.split(" | ")[0][2:] for row in rows] == list(VARIANTS)
    assert rows[0].split(" | ")[3] == "1.00×"
    assert all(float(row.split(" | ")[2]) > 0 for row in rows)
