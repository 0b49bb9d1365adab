"""The training methods the experiments compare, and how each is run: through ``python -m monai.bundle run`` on
the bundle's own configs, as a user would.

:py:data:`METHODS` is the only record of which config override files stack on ``configs/train.json`` for each
method; :py:mod:`scripts.experiments.benchmark`, :py:mod:`scripts.experiments.report` and
:py:mod:`scripts.experiments.demo` all read it from here.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["BUNDLE_ROOT", "CONFIGS", "METHODS", "Method", "bundle_run", "class_names", "read_case_dice", "run_folders"]

# scripts/experiments/methods.py -> the bundle root, which holds configs/
from scripts.cases import case_id
from scripts.utils import DATALIST

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = BUNDLE_ROOT / "configs"


@dataclass(frozen=True)
class Method:
    """A training method: the configs merged for it, the config values it sets (an MCPM option, say), and whether
    it learns a meta mask network."""

    label: str
    configs: tuple[str, ...]
    meta_network: bool = False
    # plain training on the meta set alone sees fewer cases per epoch; its epochs are scaled to the same updates
    meta_set_only: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)


def _mcpm(label: str, **options: Any) -> Method:
    """MCPM with ``configs/train.json`` and these values of its ``mcpm`` section (or other keys, ``#``-separated)."""
    overrides = {key if "#" in key else f"mcpm#{key}": value for key, value in options.items()}
    return Method(label, ("train.json",), meta_network=True, overrides=overrides)


# MCPM as the paper has it (Wang et al. 2020): plain SGD look-ahead, the noisy cases alone in the real step, one
# weighted mean over all voxels; configs/train_mcpm_paper.json, the override that turns the bundle's default into it
PAPER_OVERRIDE = "train_mcpm_paper.json"
_PAPER_VALUES = json.loads((CONFIGS / PAPER_OVERRIDE).read_text())
PAPER_MCPM = {key.removeprefix("mcpm#"): value for key, value in _PAPER_VALUES.items()}
CLEAN_MCPM = {**PAPER_MCPM, "clean_loss_weight": 1.0}
# the default without its Dice term: the 0.3.0 default, which the cost levers below change one thing of
CE_MCPM = {"dice_loss_weight": 0.0}
# two levers that are more than one option: the teacher correction needs its normalisation, the inputs are a list
TEACHER = {"correction": "teacher", "weight_normalisation": "mean"}
INPUTS = {"meta_network_def#inputs": ["loss", "label", "boundary"]}


BASELINE = ("train.json", "train_baseline.json")

METHODS: dict[str, Method] = {
    "clean": Method("clean labels (upper bound)", (*BASELINE, "train_clean_labels.json")),
    "plain": Method("plain, noisy labels", BASELINE),
    "plain_dicece": Method("plain, noisy labels, DiceCE loss", (*BASELINE, "train_plain_dicece.json")),
    "union": Method("plain on noisy + clean cases", (*BASELINE, "train_union.json")),
    "balanced": Method("plain, 1 clean + 1 noisy per batch", (*BASELINE, "train_balanced.json")),
    "finetune": Method("plain, then fine-tuned on clean", (*BASELINE, "train_finetune.json")),
    "gce": Method("generalised cross-entropy", (*BASELINE, "train_gce.json")),
    "small_loss": Method("small-loss truncation", (*BASELINE, "train_small_loss.json")),
    # L2RW with the cross-entropy alone: train_l2rw.json sets dice_loss_weight 0 itself; the override, which the
    # recorded runs had when the file still took the mcpm section's weight, keeps their run specs
    "l2rw": Method("pixel-wise L2RW", ("train.json", "train_l2rw.json"), overrides={"mcpm#dice_loss_weight": 0.0}),
    "meta_only": Method("meta set only", (*BASELINE, "train_meta_only.json"), meta_set_only=True),
    # the bundle's default: MCPM with the clean loss, class-wise weights and the Dice term (docs/results.md). Its runs
    # before 0.4.0 made it the default were named mcpm_dice (dice_loss_weight 1 as an override: the same merged config)
    "mcpm": Method("MCPM", ("train.json",), meta_network=True),
    # the 0.3.0 default, cross-entropy only; its runs before 0.4.0 were named mcpm (docs/results.csv names them mcpm_ce)
    "mcpm_ce": _mcpm("MCPM, cross-entropy only (0.3.0 default)", **CE_MCPM),
    # the values of configs/train_mcpm_paper.json as overrides, so that runs recorded before that file keep their spec
    "mcpm_paper": _mcpm("MCPM as published", **PAPER_MCPM),
    # the levers of docs/mcpm.md, each one change from the published MCPM
    "mcpm_clean": _mcpm("MCPM + clean loss", **CLEAN_MCPM),
    "mcpm_adam": _mcpm("MCPM, Adam look-ahead", **{**PAPER_MCPM, "virtual_step": "adam", "virtual_lr": 0.002}),
    "mcpm_class": _mcpm("MCPM, class-wise weights", **{**PAPER_MCPM, "weight_normalisation": "class_sum"}),
    "mcpm_teacher": _mcpm("MCPM, teacher correction", **{**PAPER_MCPM, **TEACHER}),
    "mcpm_inputs": _mcpm("MCPM, label + boundary inputs", **PAPER_MCPM, **INPUTS),
    # the levers on top of the clean loss, the best single lever at the default scale (docs/results.md); the
    # clean loss with class-wise weights is the bundle's default, mcpm
    "mcpm_clean_adam": _mcpm(
        "MCPM + clean loss, Adam look-ahead", **{**CLEAN_MCPM, "virtual_step": "adam", "virtual_lr": 0.002}
    ),
    "mcpm_clean_teacher": _mcpm("MCPM + clean loss, teacher correction", **{**CLEAN_MCPM, **TEACHER}),
    "mcpm_clean_inputs": _mcpm("MCPM + clean loss, label + boundary inputs", **CLEAN_MCPM, **INPUTS),
    # the cost lever screened against the 0.4.0 default (the Dice term on): a meta step every 2nd iteration
    "mcpm_interval2": _mcpm("MCPM, a meta step every 2nd iteration", meta_interval=2),
    # the cost levers of docs/performance.md, each one change from the 0.3.0 default (mcpm_ce): fewer meta steps
    "mcpm_interval4": _mcpm("MCPM (CE), a meta step every 4th iteration", **CE_MCPM, meta_interval=4),
    "mcpm_interval8": _mcpm("MCPM (CE), a meta step every 8th iteration", **CE_MCPM, meta_interval=8),
    "mcpm_reuse": _mcpm("MCPM (CE), real step from the meta step's gradients", **CE_MCPM, reuse_virtual_gradient=True),
    # reuse with a meta step and the clean term every k-th iteration: the other iterations are plain ones
    "mcpm_every2": _mcpm(
        "MCPM (CE) reuse, meta step and clean term every 2nd iteration",
        **CE_MCPM, reuse_virtual_gradient=True, meta_interval=2, clean_loss_interval=2,
    ),
    "mcpm_every4": _mcpm(
        "MCPM (CE) reuse, meta step and clean term every 4th iteration",
        **CE_MCPM, reuse_virtual_gradient=True, meta_interval=4, clean_loss_interval=4,
    ),
}


def run_folders(dataset_dir: Path, run_dir: Path) -> dict[str, str]:
    """The overrides that point a run at the bundle, a dataset and its own folder: checkpoints in ``run_dir/models``,
    logs, metrics and predictions in ``run_dir``."""
    return {
        "bundle_root": str(BUNDLE_ROOT),
        "dataset_dir": str(dataset_dir),
        "ckpt_dir": str(run_dir / "models"),
        "output_dir": str(run_dir),
    }


def bundle_run(config_names: Sequence[str], log_path: Path | None = None, **overrides: object) -> None:
    """Run ``python -m monai.bundle run`` on the merged configs with ``--key value`` overrides, as a user would.

    With ``log_path`` the output goes to that file, and a failure raises with the file named and its last lines.
    """
    files = [str(CONFIGS / name) for name in config_names]
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", repr(files)]
    for key, value in overrides.items():
        command += [f"--{key}", repr(value) if isinstance(value, list) else str(value)]
    if log_path is None:
        subprocess.run(command, check=True, cwd=BUNDLE_ROOT)
        return
    with open(log_path, "w") as log:
        completed = subprocess.run(command, cwd=BUNDLE_ROOT, stdout=log, stderr=subprocess.STDOUT)
    if completed.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-20:])
        raise RuntimeError(f"monai.bundle run failed (exit {completed.returncode}); log: {log_path}\n{tail}")


def read_case_dice(csv_path: Path) -> dict[str, list[float]]:
    """Per-case values of each foreground class from a MetricsSaver ``*_raw.csv`` (Dice, HD95, ...)."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    classes = [c for c in rows[0] if c not in ("filename", "mean")]
    return {case_id(r["filename"]): [float(r[c]) for c in classes] for r in rows}


def class_names(dataset_dir: Path) -> list[str]:
    """Names of the foreground classes in the order of the label values, from the dataset's datalist."""
    labels = json.loads((dataset_dir / DATALIST).read_text())["labels"]
    return [labels[value] for value in sorted(labels, key=int) if value != "0"]
