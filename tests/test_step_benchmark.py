"""The step benchmark runs every variant through the real trainers, at each patch and batch size it is given, and
reports ratios to plain training, the parts of an exact iteration with their floor, and the scaling plot."""

from __future__ import annotations

from scripts.experiments.step_benchmark import DICE_PART, VARIANTS, build_trainer, floor_ms, main, parse_args
from scripts.trainer import MCPMTrainer

TINY = ["--device", "cpu", "--channels", "4", "8", "--res_units", "1", "--warmup", "1", "--rounds", "1"]


def _rows(table: str) -> list[list[str]]:
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    return [line.strip("| ").split(" | ") for line in lines if not line.startswith(("| variant", "| part"))]


def test_step_benchmark_runs_all_variants_on_cpu():
    table = main([*TINY, "--patch", "16", "--iterations", "8"])
    rows = [row for row in _rows(table) if row[0] in VARIANTS]
    assert [row[0] for row in rows] == list(VARIANTS)
    assert rows[0][5] == "1.00×" and all(float(row[3]) > 0 and float(row[6]) > 0 for row in rows)


def test_variants_start_from_the_bundle_defaults_and_change_one_thing():
    import torch

    args = parse_args(TINY)
    batch = {"image": torch.zeros(2, 1, 16, 16, 16), "label": torch.zeros(2, 1, 16, 16, 16)}
    default = build_trainer(VARIANTS["mcpm (default)"], args, batch, torch.device("cpu"), amp=False)
    interval = build_trainer(VARIANTS["mcpm meta_interval 4"], args, batch, torch.device("cpu"), amp=False)
    published = build_trainer(VARIANTS["mcpm as published"], args, batch, torch.device("cpu"), amp=False)
    assert isinstance(default, MCPMTrainer) and default.clean_loss_weight == 1.0 and default.meta_interval == 1
    assert default.weight_normalisation == "class_sum"
    assert interval.meta_interval == 4 and interval.clean_loss_weight == default.clean_loss_weight
    assert published.clean_loss_weight == 0.0 and published.weight_normalisation == "sum"
    small = build_trainer(VARIANTS["mcpm meta batch 1"], args, batch, torch.device("cpu"), amp=False)
    assert small.meta_data_loader[0]["image"].shape[0] == 1


def test_scaling_sweep_components_and_plot(tmp_path):
    plot = tmp_path / "scaling.png"
    table = main(
        [*TINY, "--patch", "16", "24", "--batch", "1", "2", "--iterations", "2", "--variants", "plain", "mcpm (default)"]
        + ["--components", "--plot", str(plot)]
    )
    rows = [row for row in _rows(table) if row[0] in VARIANTS]
    assert {(row[1], row[2]) for row in rows} == {("16³", "1"), ("16³", "2"), ("24³", "1"), ("24³", "2")}
    assert len(rows) == 8 and plot.stat().st_size > 0
    parts = {row[0]: row[1] for row in _rows(table) if row[0] not in VARIANTS}
    floor = float(parts["**floor of an exact iteration** (meta batch twice)"])
    named = {name: float(ms) for name, ms in parts.items() if not name.startswith(("**", "measured"))}
    # the six passes of an exact iteration, and the Dice terms, which the default's dice_loss_weight 1 adds
    assert len(named) == 7 and DICE_PART in named and all(ms > 0 for ms in named.values())
    assert abs(floor - floor_ms(named, clean_loss=True)) < 0.5  # the sum of the printed parts, each rounded
    assert "× floor" in parts["measured `mcpm (default)` iteration (median)"]
