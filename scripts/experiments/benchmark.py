"""Benchmark MCPM against its baselines over noise settings and seeds, with one command.

For every setting (a noise model and strength) and seed it generates a dataset (synthetic, or real LIDC-IDRI
nodules with single-reader labels), trains each method on it through ``python -m monai.bundle run`` with the
bundle's own configs (same network, data, schedule and number of updates for all), evaluates on the clean test
labels with ``evaluate.json``, and scores the training labels with the trained networks (:py:mod:`scripts.audit`).
Then it writes into ``--out_dir``:

- ``results.csv``: one row per run (mode/setting, seed, method, test and validation Dice, Dice per class, HD95,
  training time, the meta loss of the first and last epoch, corruption detection, and the bundle version and CPU
  thread count it ran with: runs repeat bit for bit only on the same machine, version and thread count);
- ``results.md``: mean +- std over seeds per setting and method, gap closed, detection figures;
- ``dice_vs_noise.png``: Dice against noise strength per method;
- ``weight_maps.png``: image, clean label, corrupted label and MCPM weight map of a few training cases.

Finished runs are kept (``<out_dir>/runs/<setting>/seed<k>/<method>/result.json``), so an interrupted benchmark
continues where it stopped and more seeds can be added later. A fresh clone has no ``runs/`` folder:
``--import_results docs/results.csv`` takes the runs recorded there as finished (their data is checked first).

This module holds the settings, the modes, the orchestration and the result cache; the methods and how a run
is launched are in :py:mod:`scripts.experiments.methods`, the statistics, table, targets and figures in
:py:mod:`scripts.experiments.report`.

    python -m scripts.experiments.benchmark --mode quick     # 32^3, 2 CPU cores, under 30 minutes a seed
    python -m scripts.experiments.benchmark --mode small     # 48^3, 16 noisy cases: the small-data setting
    python -m scripts.experiments.benchmark --mode default   # 48^3, 48 noisy cases of wide variety: the default data
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.bundle import run as run_workflow

from scripts.audit import detection_summary, load_trained, score_cases
from scripts.cases import case_id
from scripts.data.synthetic import DEFAULT_SPLITS, DEFAULT_VARIETY, generate_dataset
from scripts.experiments.methods import (
    BUNDLE_ROOT,
    CONFIGS,
    METHODS,
    Method,
    bundle_run,
    class_names,
    read_case_dice,
    run_folders,
)
from scripts.experiments.report import plot_dice_vs_noise, plot_weight_maps, write_report
from scripts.lidc.phantom import generate_lidc_phantom
from scripts.utils import DATALIST, nanmean, write_csv, write_json


@dataclass(frozen=True)
class Setting:
    """A noise setting: the data generator and, for the synthetic data, a corruption spec of
    :py:func:`scripts.data.corruption.make_corruption` applied to a fraction ``alpha`` of the training cases."""

    label: str
    alpha: float
    corruption: dict[str, Any] | None
    # settings of one family are drawn as one line in dice_vs_noise.png, in order of strength
    family: str = "erosion/dilation"
    # "synthetic" (scripts.data) or "lidc_phantom" (scripts.lidc.phantom: real LIDC nodules, single-reader labels)
    generator: str = "synthetic"
    # volume and patch size, when it is not the mode's
    shape: tuple[int, int, int] | None = None
    # bundle config overrides this data needs, e.g. its number of classes
    overrides: dict[str, Any] = field(default_factory=dict)


def _erode_dilate(alpha: float, radius: tuple[int, int]) -> Setting:
    return Setting(
        f"alpha={alpha:g}, r={radius[0]}-{radius[1]}", alpha, {"model": "erode_dilate", "radius": list(radius)}
    )


def _markov(alpha: float, steps: int) -> Setting:
    spec = {"model": "markov", "steps": steps, "expand_prob": 0.5, "flip_prob": 0.05}
    return Setting(f"alpha={alpha:g}, T={steps}", alpha, spec, family="Markov boundary")


# every training label is one radiologist's outline of a real LIDC-IDRI nodule; the clean label is the consensus
LIDC_READERS = Setting(
    "single reader vs consensus, >= 3 readers",
    alpha=1.0,
    corruption=None,
    family="LIDC readers (semi-synthetic)",
    generator="lidc_phantom",
    shape=(32, 32, 16),
    overrides={"num_classes": 2},
)


@dataclass(frozen=True)
class Mode:
    """Everything a benchmark run varies: settings, seeds, volume and schedule."""

    name: str
    settings: dict[str, Setting]
    seeds: tuple[int, ...]
    shape: tuple[int, int, int]
    epochs: int
    val_interval: int
    warmup_epochs: int
    # cases per split: training, meta, validation, test
    cases: tuple[int, int, int, int] = (16, 4, 4, 6)
    # how much the synthetic cases differ (scripts.data.synthetic.VARIETIES)
    variety: str = "standard"
    methods: tuple[str, ...] = tuple(METHODS)
    extra: dict[str, Any] = field(default_factory=dict)


# Radii are in voxels: on the quick mode's 32^3 volumes the structures are 2/3 the size of those at 48^3, and the
# radii are scaled with them, so that each setting corrupts a similar share of every structure in both modes.
MODES: dict[str, Mode] = {
    "quick": Mode(
        "quick",
        settings={
            "ed_a0": _erode_dilate(0.0, (1, 2)),
            "ed_a0.5": _erode_dilate(0.5, (1, 2)),
            "ed_severe": _erode_dilate(0.9, (2, 3)),
            "markov_a0.5": _markov(0.5, 40),
            "lidc_readers": LIDC_READERS,
        },
        seeds=(0,),
        shape=(32, 32, 32),
        epochs=30,
        val_interval=5,
        warmup_epochs=5,
    ),
    # today's small-data setting: 16 noisy cases of the standard variety, where 4 clean cases come close to 16
    "small": Mode(
        "small",
        settings={
            "ed_a0": _erode_dilate(0.0, (2, 3)),
            "ed_a0.25": _erode_dilate(0.25, (2, 3)),
            "ed_a0.5": _erode_dilate(0.5, (2, 3)),
            "ed_severe": _erode_dilate(0.9, (3, 5)),
            "markov_a0.5": _markov(0.5, 80),
            "lidc_readers": LIDC_READERS,
        },
        seeds=(0, 1, 2),
        shape=(48, 48, 48),
        epochs=40,
        val_interval=5,
        warmup_epochs=5,
    ),
    # the default data's regime: 48 noisy cases that vary more, 4 clean ones; 16 epochs of 24 updates (384, about
    # the small setting's 320), so that a run costs about the same
    "default": Mode(
        "default",
        settings={
            "ed_a0": _erode_dilate(0.0, (2, 3)),
            "ed_a0.5": _erode_dilate(0.5, (2, 3)),
            "ed_severe": _erode_dilate(0.9, (3, 5)),
            "markov_a0.5": _markov(0.5, 80),
            "lidc_readers": LIDC_READERS,
        },
        seeds=(0, 1, 2, 3, 4),
        shape=(48, 48, 48),
        epochs=16,
        val_interval=2,
        warmup_epochs=2,
        cases=DEFAULT_SPLITS,
        variety=DEFAULT_VARIETY,
    ),
}


def _batch_size() -> int:
    """The training batch size of ``configs/train.json``, which every method keeps."""
    return int(json.loads((CONFIGS / "train.json").read_text())["batch_size"])


def _updates_per_epoch(num_cases: int) -> int:
    """Optimiser updates per epoch over ``num_cases`` cases (the last batch may be short)."""
    return math.ceil(num_cases / _batch_size())


def bundle_overrides(mode: Mode, setting_name: str, dataset_dir: Path, run_dir: Path) -> dict[str, Any]:
    """The config overrides every run of a setting gets: its data, output folders, size, schedule and extras."""
    return {
        **run_folders(dataset_dir, run_dir),
        "epochs": mode.epochs,
        "val_interval": mode.val_interval,
        "patch_size": list(setting_shape(mode, setting_name)),
        "mcpm#warmup_epochs": mode.warmup_epochs,
        **mode.settings[setting_name].overrides,
        **mode.extra,
    }


def method_schedule(method: Method, mode: Mode) -> tuple[int, int]:
    """Epochs and validation interval of one method: the meta set alone sees fewer cases per epoch, so its epochs
    are scaled to the same number of updates."""
    if not method.meta_set_only:
        return mode.epochs, mode.val_interval
    factor = _updates_per_epoch(mode.cases[0]) / _updates_per_epoch(mode.cases[1])
    return max(1, round(mode.epochs * factor)), max(1, round(mode.val_interval * factor))


def bundle_version() -> str:
    """The bundle's version (``configs/metadata.json``), recorded with each run."""
    return str(json.loads((CONFIGS / "metadata.json").read_text())["version"])


def train_and_evaluate(
    method: Method, dataset_dir: Path, run_dir: Path, mode: Mode, setting_name: str, seed: int, log_path: Path
) -> dict[str, Any]:
    """Train one method with ``python -m monai.bundle run``, evaluate it on the test split and score its training
    labels."""
    epochs, val_interval = method_schedule(method, mode)
    overrides = {
        **bundle_overrides(mode, setting_name, dataset_dir, run_dir),
        **method.overrides,
        "seed": seed,
        "epochs": epochs,
        "val_interval": val_interval,
    }
    configs = [str(CONFIGS / name) for name in method.configs]
    start = time.time()
    # a run folder without a result.json is (re)started from scratch: an interrupted run's files there are replaced
    bundle_run(method.configs, log_path=log_path, overwrite=True, **overrides)
    train_seconds = time.time() - start

    # in-process: an evaluation is too short to pay for a new interpreter; its results are in the CSVs, not the log.
    # The validation split (what defaults are chosen on) goes to its own folder, the test split to the run's.
    logging.disable(logging.WARNING)
    try:
        evaluation = [*configs, str(CONFIGS / "evaluate.json")]
        validation_dir = run_dir / "validation"
        run_workflow(
            config_file=evaluation, logging_file=False, **{**overrides, "output_dir": str(validation_dir)},
            eval_split="validation",
        )
        run_workflow(config_file=evaluation, logging_file=False, **overrides)
    finally:
        logging.disable(logging.NOTSET)
    val_dice = read_case_dice(validation_dir / "val_mean_dice_raw.csv")
    dice = read_case_dice(run_dir / "val_mean_dice_raw.csv")
    hd95 = read_case_dice(run_dir / "val_hd95_raw.csv")
    models = load_trained(configs, overrides, with_meta_network=method.meta_network)
    detection = detection_summary(list(score_cases(models)))
    per_class = {
        f"dice_{name}": nanmean([v[i] for v in dice.values()]) for i, name in enumerate(class_names(dataset_dir))
    }
    return {
        "dice": nanmean([nanmean(v) for v in dice.values()]),
        "val_dice": nanmean([nanmean(v) for v in val_dice.values()]),
        **per_class,
        "hd95": nanmean([nanmean(v) for v in hd95.values()]),
        "epochs": epochs,
        "train_seconds": round(train_seconds, 1),
        **meta_loss_trend(log_path),
        **detection,
        "version": bundle_version(),
        # the training's process inherits this one's environment, so it has this thread count too
        "threads": torch.get_num_threads(),
    }


# the epoch metrics StatsHandler logs for the trainer: "Epoch[7] Metrics -- ... meta_loss: 0.1234 ..."
META_LOSS_PATTERN = re.compile(r"Epoch\[(\d+)\] Metrics -- .*?\bmeta_loss: ([-+0-9.eE]+|nan)")


def meta_loss_trend(log_path: Path) -> dict[str, float]:
    """The epoch mean of the meta loss in the first and the last epoch with meta steps, from a run's log (NaN for a
    method without a meta loss): whether the meta steps lowered the loss on the clean cases over training."""
    losses = [float(m.group(2)) for m in META_LOSS_PATTERN.finditer(log_path.read_text(errors="replace"))]
    return {
        "meta_loss_first": losses[0] if losses else math.nan,
        "meta_loss_last": losses[-1] if losses else math.nan,
    }


def changed_voxel_fraction(datalist_path: Path) -> float:
    """Share of the clean training foreground voxels whose label the corruption changed (a measured strength)."""
    datalist = json.loads(datalist_path.read_text())
    changed = foreground = 0
    for entry in datalist["training"]:
        changed += int(np.asarray(nib.load(datalist_path.parent / entry["corruption_mask"]).dataobj).astype(bool).sum())
        foreground += int((np.asarray(nib.load(datalist_path.parent / entry["clean_label"]).dataobj) > 0).sum())
    return changed / max(foreground, 1)


def run_spec(mode: Mode, setting_name: str, seed: int, method_name: str) -> dict[str, Any]:
    """Everything that determines a run's result; a finished run is reused only when its spec is identical."""
    return json.loads(
        json.dumps(
            {
                "setting": setting_name,
                **asdict(mode.settings[setting_name]),
                "seed": seed,
                "method": method_name,
                "configs": list(METHODS[method_name].configs),
                **({"overrides": METHODS[method_name].overrides} if METHODS[method_name].overrides else {}),
                "shape": list(setting_shape(mode, setting_name)),
                "cases": list(mode.cases),
                **({"variety": mode.variety} if mode.variety != "standard" else {}),
                "epochs": mode.epochs,
                "val_interval": mode.val_interval,
                "warmup_epochs": mode.warmup_epochs,
                "extra": mode.extra,
            }
        )
    )


def setting_shape(mode: Mode, setting_name: str) -> tuple[int, int, int]:
    return mode.settings[setting_name].shape or mode.shape


def dataset_for(mode: Mode, setting_name: str, seed: int, out_dir: Path) -> Path:
    """Generate (or reuse) the dataset of one setting and seed; returns its datalist."""
    setting = mode.settings[setting_name]
    num_training, num_meta, num_validation, num_test = mode.cases
    common = {
        "seed": seed,
        "num_training": num_training,
        "num_meta": num_meta,
        "num_validation": num_validation,
        "num_test": num_test,
        "shape": setting_shape(mode, setting_name),
    }
    folder = out_dir / "data" / setting_name / f"seed{seed}"
    if setting.generator == "lidc_phantom":
        return generate_lidc_phantom(folder, **common)
    if setting.generator != "synthetic":
        raise ValueError(f"unknown generator {setting.generator!r} of setting {setting_name!r}.")
    return generate_dataset(
        folder, corrupt_fraction=setting.alpha, corruption=setting.corruption, variety=mode.variety, **common
    )


def _run_dir(out_dir: Path, setting_name: str, seed: int, method_name: str) -> Path:
    return out_dir / "runs" / setting_name / f"seed{seed}" / method_name


def saved_results(mode: Mode, out_dir: Path) -> dict[Path, dict[str, Any]]:
    """The results already in ``out_dir`` for this mode's runs, by run folder; raises before any work is done
    when one of them was made with other parameters."""
    saved = {}
    for setting_name in mode.settings:
        for seed in mode.seeds:
            for method_name in mode.methods:
                run_dir = _run_dir(out_dir, setting_name, seed, method_name)
                result_path = run_dir / "result.json"
                if not result_path.is_file():
                    continue
                record = json.loads(result_path.read_text())
                if record.get("spec") != run_spec(mode, setting_name, seed, method_name):
                    raise ValueError(
                        f"{result_path} holds a run with other parameters than this benchmark's; choose another "
                        "--out_dir, or move that folder away to run it again."
                    )
                saved[run_dir] = record["result"]
    return saved


# the columns of a results.csv row that describe the run; the others are its result, numbers but for TEXT_COLUMNS
RUN_COLUMNS = ("mode", "setting", "family", "setting_label", "alpha", "seed", "method", "changed_fraction")
TEXT_COLUMNS = ("version",)


def import_results(mode: Mode, out_dir: Path, csv_path: Path) -> int:
    """Write the rows of a results CSV that are runs of this benchmark as finished runs of ``out_dir``; returns
    how many. A fresh clone has no ``runs/`` folder, but it has the CSV kept with the docs, so a benchmark can go
    on from there. The rows must have been made with this benchmark's parameters. Two are checked: each row's
    dataset is generated here and must change the same share of voxels (cases, shape, variety, corruption, seed),
    and its epochs must be this benchmark's. The CSV does not record the validation interval, the warm-up or the
    ``--override`` values: give those of the command that made it. A row whose run folder already has a result is
    left alone. Raises, naming the file and the row, before any run is written.
    """
    if not csv_path.is_file():
        raise FileNotFoundError(f"--import_results: {csv_path} is not a file.")
    with open(csv_path, newline="") as stream:
        reader = csv.DictReader(stream)
        rows = list(reader)
    missing = sorted(set(RUN_COLUMNS) - set(reader.fieldnames or ()))
    if missing:
        raise ValueError(f"--import_results: {csv_path} has no column {missing}; is it a benchmark's results.csv?")
    pending, changed_by_dataset = [], {}
    for line, row in enumerate(rows, start=2):
        mode_name, _, setting_name = row["setting"].partition("/")
        seed, method_name = int(row["seed"]), row["method"]
        if mode_name != mode.name or setting_name not in mode.settings or seed not in mode.seeds:
            continue
        run_dir = _run_dir(out_dir, setting_name, seed, method_name)
        if method_name not in mode.methods or (run_dir / "result.json").is_file():
            continue
        where = f"--import_results: {csv_path} line {line} ({row['setting']} seed {seed} {method_name})"
        result = {
            key: value if key in TEXT_COLUMNS else float(value)
            for key, value in row.items()
            if key not in RUN_COLUMNS and value not in ("", None)
        }
        if "epochs" not in result:
            raise ValueError(f"{where} has no epochs.")
        result["epochs"] = int(result["epochs"])
        if "threads" in result:
            result["threads"] = int(result["threads"])
        epochs, _ = method_schedule(METHODS[method_name], mode)
        if result["epochs"] != epochs:
            raise ValueError(f"{where} trained {result['epochs']} epochs, this benchmark {epochs}.")
        if (setting_name, seed) not in changed_by_dataset:  # one dataset holds the runs of every method
            datalist = dataset_for(mode, setting_name, seed, out_dir)
            changed_by_dataset[setting_name, seed] = round(changed_voxel_fraction(datalist), 4)
        changed = changed_by_dataset[setting_name, seed]
        if not math.isclose(changed, float(row["changed_fraction"]), abs_tol=1e-4):
            raise ValueError(
                f"{where} is of a dataset with {row['changed_fraction']} of its voxels changed; the one generated "
                f"here has {changed}: other data (cases, shape, variety or generator)."
            )
        pending.append((run_dir, {"spec": run_spec(mode, setting_name, seed, method_name), "result": result}))
    for run_dir, record in pending:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json({**record, "imported_from": str(csv_path)}, run_dir / "result.json", indent=2)
    return len(pending)


def run_benchmark(mode: Mode, out_dir: Path, train: bool = True) -> list[dict[str, Any]]:
    """Run (or reuse) every setting x seed x method of ``mode``; returns one row per run. With ``train`` False
    only the finished runs are read (a report of what is there while other runs are still going)."""
    saved = saved_results(mode, out_dir)
    rows = []
    total = len(mode.settings) * len(mode.seeds) * len(mode.methods)
    start = time.time()
    for setting_name, setting in mode.settings.items():
        for seed in mode.seeds:
            if not train and not any(_run_dir(out_dir, setting_name, seed, m) in saved for m in mode.methods):
                continue
            datalist = dataset_for(mode, setting_name, seed, out_dir)
            strength = changed_voxel_fraction(datalist)
            for method_name in mode.methods:
                run_dir = _run_dir(out_dir, setting_name, seed, method_name)
                if run_dir not in saved and (run_dir / "result.json").is_file():
                    # finished since this invocation started, by another one on the same out_dir
                    saved.update(saved_results(replace(mode, settings={setting_name: setting}, seeds=(seed,)), out_dir))
                if run_dir not in saved and not train:
                    continue
                if run_dir in saved:
                    result, status = saved[run_dir], "reused"
                    if "meta_loss_first" not in result and (run_dir / "bundle.log").is_file():
                        # a run saved before the trend was recorded: it is in the run's log
                        result = {**result, **meta_loss_trend(run_dir / "bundle.log")}
                else:
                    run_dir.mkdir(parents=True, exist_ok=True)
                    method = METHODS[method_name]
                    log_path = run_dir / "bundle.log"
                    result = train_and_evaluate(method, datalist.parent, run_dir, mode, setting_name, seed, log_path)
                    spec = run_spec(mode, setting_name, seed, method_name)
                    # atomic: an interrupted write never leaves a result.json that a later invocation would trust
                    write_json({"spec": spec, "result": result}, run_dir / "result.json", indent=2)
                    status = f"{result['train_seconds']:.0f} s training"
                rows.append(
                    {
                        "mode": mode.name,
                        "setting": setting_name,
                        "family": setting.family,
                        "setting_label": setting.label,
                        "alpha": setting.alpha,
                        "seed": seed,
                        "method": method_name,
                        "changed_fraction": round(strength, 4),
                        **result,
                    }
                )
                print(
                    f"[{len(rows)}/{total} {time.time() - start:.0f} s] {setting_name} seed {seed} {method_name}: "
                    f"Dice {result['dice']:.3f} ({status})",
                    flush=True,
                )
    return rows


def weight_figure_setting(mode: Mode) -> str | None:
    """The setting drawn in weight_maps.png: erosion/dilation at alpha = 0.5, else the first corrupted one."""
    corrupted = [name for name, setting in mode.settings.items() if setting.alpha > 0]
    preferred = [
        name
        for name in corrupted
        if mode.settings[name].alpha == 0.5 and mode.settings[name].family == "erosion/dilation"
    ]
    return (preferred or corrupted or [None])[0]


def weight_map_figure(
    mode: Mode, out_dir: Path, setting_name: str, seed: int, method_name: str = "mcpm", num_cases: int = 3
) -> Path | None:
    """Draw ``weight_maps.png`` from the run of an MCPM method on one setting and seed: its most corrupted training
    cases; None where the run has not finished here (not run, still running, or imported from a CSV: its networks
    are not the ones of the result)."""
    run_dir = _run_dir(out_dir, setting_name, seed, method_name)
    result_path = run_dir / "result.json"
    if not result_path.is_file() or "imported_from" in json.loads(result_path.read_text()):
        return None
    dataset_dir = out_dir / "data" / setting_name / f"seed{seed}"
    method = METHODS[method_name]
    overrides = {**bundle_overrides(mode, setting_name, dataset_dir, run_dir), **method.overrides}
    models = load_trained([str(CONFIGS / name) for name in method.configs], overrides)
    scores = sorted(score_cases(models), key=lambda c: int(c.corruption_mask.sum()), reverse=True)[:num_cases]
    preprocessing = models.parser.get_parsed_content("validate#preprocessing")
    training = json.loads((dataset_dir / DATALIST).read_text())["training"]
    entries = {case_id(e["label"]): e for e in training}
    clean = {}
    for case in scores:
        files = {"image": entries[case.name]["image"], "label": entries[case.name]["clean_label"]}
        clean[case.name] = np.asarray(preprocessing({k: str(dataset_dir / v) for k, v in files.items()})["label"][0])
    path = out_dir / "weight_maps.png"
    title = f"{method.label} weights after training: {setting_name} ({mode.settings[setting_name].label}), seed {seed}"
    plot_weight_maps(scores, clean, path, title)
    return path


def describe_mode(mode: Mode) -> str:
    """One line of the report: volumes, cases, epochs and seeds of ``mode``."""
    return (
        f"volumes {'x'.join(map(str, mode.shape))}, cases (training, meta, validation, test) = {mode.cases}, "
        f"{mode.epochs} epochs (meta set only: scaled to the same number of updates), seeds {list(mode.seeds)}"
    )


def _parse_override(parser: argparse.ArgumentParser, text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as JSON where it is JSON, else kept as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        parser.error(f"--override needs KEY=VALUE, got {text!r}.")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


@dataclass(frozen=True)
class Options:
    """What an invocation does beyond its mode: whether it trains missing runs, which MCPM the report is of, and a
    results CSV whose runs it takes as finished."""

    train: bool = True
    reference: str = "mcpm"
    import_results: Path | None = None


def parse_mode(argv: Sequence[str] | None) -> tuple[str, Mode, Path, Options]:
    """The mode chosen on the command line, with its fields overridden by the options given."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=sorted(MODES), default="quick")
    parser.add_argument("--out_dir", type=Path, help="results folder (default: runs/benchmark_<mode>)")
    parser.add_argument("--settings", nargs="+", help="a subset of the mode's settings")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), help="a subset of the methods")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--val_interval", type=int)
    parser.add_argument("--warmup_epochs", type=int)
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        help="volume and patch size of the synthetic settings (lidc_readers keeps its own 32x32x16)",
    )
    parser.add_argument("--cases", type=int, nargs=4, metavar=("TRAIN", "META", "VAL", "TEST"))
    parser.add_argument(
        "--report_only", action="store_true", help="train nothing: write the report of the runs finished so far"
    )
    parser.add_argument(
        "--import_results",
        type=Path,
        metavar="CSV",
        help="take this benchmark's runs from a results.csv (e.g. docs/results.csv) as finished, where --out_dir has "
        "no result of its own (a fresh clone); each row's data and epochs are checked, the other options must be "
        "those of the command that made the CSV",
    )
    parser.add_argument(
        "--reference", default="mcpm", choices=list(METHODS), help="the MCPM method the paired differences are of"
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a bundle config override for every run, e.g. amp=true or network_def#channels=[8,16,32] (JSON values)",
    )
    args = parser.parse_args(argv)
    mode = MODES[args.mode]
    unknown = sorted(set(args.settings or []) - set(mode.settings))
    if unknown:
        parser.error(f"unknown settings {unknown} for --mode {args.mode}; choose from {sorted(mode.settings)}.")
    changes: dict[str, Any] = {
        "settings": {name: mode.settings[name] for name in args.settings} if args.settings else None,
        "methods": tuple(args.methods) if args.methods else None,
        "seeds": tuple(args.seeds) if args.seeds else None,
        "shape": tuple(args.shape) if args.shape else None,
        "cases": tuple(args.cases) if args.cases else None,
        "epochs": args.epochs,
        "val_interval": args.val_interval,
        "warmup_epochs": args.warmup_epochs,
        "extra": {**mode.extra, **dict(_parse_override(parser, t) for t in args.override)} if args.override else None,
    }
    mode = replace(mode, **{k: v for k, v in changes.items() if v is not None})
    out_dir = args.out_dir or BUNDLE_ROOT / "runs" / f"benchmark_{args.mode}"
    return args.mode, mode, out_dir, Options(
        train=not args.report_only, reference=args.reference, import_results=args.import_results
    )


def main(argv: Sequence[str] | None = None) -> Path:
    """Run the benchmark and write its CSV, Markdown report and figures; returns the report's path."""
    mode_name, mode, out_dir, options = parse_mode(argv)
    start = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    if options.import_results is not None:
        print(f"{import_results(mode, out_dir, options.import_results)} runs taken from {options.import_results}")
    rows = run_benchmark(mode, out_dir, options.train)
    if not rows:
        raise SystemExit(f"no finished runs of these settings, seeds and methods in {out_dir}.")
    # the CSV names each setting with its mode ("default/ed_a0.5"), so that rows of several modes cannot be confused
    write_csv([{**row, "setting": f"{row['mode']}/{row['setting']}"} for row in rows], out_dir / "results.csv")
    plot_dice_vs_noise(rows, out_dir / "dice_vs_noise.png")
    figure_setting, weight_maps, reference = weight_figure_setting(mode), None, options.reference
    if (
        figure_setting
        and reference in mode.methods
        and METHODS[reference].meta_network  # the weights of a meta network; L2RW's are recomputed every step
        and weight_map_figure(mode, out_dir, figure_setting, mode.seeds[0], reference)
    ):
        weight_maps = f"{reference}, {figure_setting}, seed {mode.seeds[0]}"
    command = "python -m scripts.experiments.benchmark " + " ".join(sys.argv[1:] if argv is None else argv)
    seconds = time.time() - start
    report = write_report(
        out_dir / "results.md",
        mode_name,
        rows,
        command.strip(),
        seconds,
        describe_mode(mode),
        weight_maps,
        reference=options.reference,
    )
    print("\n" + report.read_text())
    return report


if __name__ == "__main__":
    main()
