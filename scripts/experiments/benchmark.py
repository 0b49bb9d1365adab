"""Benchmark MCPM against its baselines over noise settings and seeds, with one command.

For every setting (a noise model and strength) and seed it generates a dataset (synthetic, or real LIDC-IDRI
nodules with single-reader labels), trains each method on it through ``python -m monai.bundle run`` with the
bundle's own configs (same network, data, schedule and number of updates for all), evaluates on the clean test
labels with ``evaluate.json``, and scores the training labels with the trained networks (:py:mod:`scripts.audit`).
Then it writes into ``--out_dir``:

- ``results.csv``: one row per run (Dice per class, HD95, training time, corruption detection);
- ``results.md``: mean +- std over seeds per setting and method, gap closed, detection figures;
- ``dice_vs_noise.png``: Dice against noise strength per method;
- ``weight_maps.png``: image, clean label, corrupted label and MCPM weight map of a few training cases.

Finished runs are kept (``<out_dir>/runs/<setting>/seed<k>/<method>/result.json``), so an interrupted benchmark
continues where it stopped and more seeds can be added later.

    python -m scripts.experiments.benchmark --mode quick   # 2 CPU cores, under 30 minutes
    python -m scripts.experiments.benchmark --mode full    # meant for a GPU
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import platform
import subprocess
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

from scripts.audit import CaseScore, detection_summary, load_trained, score_cases
from scripts.data.synthetic import generate_dataset

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = BUNDLE_ROOT / "configs"


@dataclass(frozen=True)
class Method:
    """A training method: the configs merged for it, and whether it learns a meta mask network."""

    label: str
    configs: tuple[str, ...]
    meta_network: bool = False
    # plain training on the meta set alone sees fewer cases per epoch; its epochs are scaled to the same updates
    meta_set_only: bool = False


METHODS: dict[str, Method] = {
    "clean": Method("clean labels (upper bound)", ("train.json", "train_baseline.json", "train_clean_labels.json")),
    "plain": Method("plain, noisy labels", ("train.json", "train_baseline.json")),
    "small_loss": Method("small-loss truncation", ("train.json", "train_baseline.json", "train_small_loss.json")),
    "l2rw": Method("pixel-wise L2RW", ("train.json", "train_l2rw.json")),
    "meta_only": Method("meta set only", ("train.json", "train_baseline.json", "train_meta_only.json"), meta_set_only=True),
    "mcpm": Method("MCPM", ("train.json",), meta_network=True),
}


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
    return Setting(f"alpha={alpha:g}, r={radius[0]}-{radius[1]}", alpha, {"model": "erode_dilate", "radius": list(radius)})


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

    settings: dict[str, Setting]
    seeds: tuple[int, ...]
    shape: tuple[int, int, int]
    epochs: int
    val_interval: int
    warmup_epochs: int
    # cases per split: training, meta, validation, test
    cases: tuple[int, int, int, int] = (16, 4, 4, 6)
    methods: tuple[str, ...] = tuple(METHODS)
    extra: dict[str, Any] = field(default_factory=dict)


# Radii are in voxels: on the quick mode's 32^3 volumes the structures are 2/3 the size of those at 48^3, and the
# radii are scaled with them, so that each setting corrupts a similar share of every structure in both modes.
MODES: dict[str, Mode] = {
    "quick": Mode(
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
    "full": Mode(
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
    return {Path(r["filename"]).name.split(".")[0]: [float(r[c]) for c in classes] for r in rows}


def nanmean(values: Sequence[float]) -> float:
    """Mean of the finite values (an empty prediction gives NaN Dice or infinite HD95); NaN if there are none."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def class_names(dataset_dir: Path) -> list[str]:
    """Names of the foreground classes in the order of the label values, from the dataset's datalist."""
    labels = json.loads((dataset_dir / "datalist.json").read_text())["labels"]
    return [labels[value] for value in sorted(labels, key=int) if value != "0"]


def _batch_size() -> int:
    return int(json.loads((CONFIGS / "train.json").read_text())["batch_size"])


def _updates_per_epoch(num_cases: int) -> int:
    return math.ceil(num_cases / _batch_size())


def bundle_overrides(mode: Mode, setting_name: str, dataset_dir: Path, run_dir: Path) -> dict[str, Any]:
    """The config overrides every run of a setting gets: its data, output folders, size, schedule and extras."""
    return {
        "bundle_root": str(BUNDLE_ROOT),
        "dataset_dir": str(dataset_dir),
        "ckpt_dir": str(run_dir / "models"),
        "output_dir": str(run_dir),
        "epochs": mode.epochs,
        "val_interval": mode.val_interval,
        "patch_size": list(setting_shape(mode, setting_name)),
        "mcpm#warmup_epochs": mode.warmup_epochs,
        **mode.settings[setting_name].overrides,
        **mode.extra,
    }


def train_and_evaluate(
    method: Method, dataset_dir: Path, run_dir: Path, mode: Mode, setting_name: str, seed: int, log_path: Path
) -> dict[str, Any]:
    """Train one method with ``python -m monai.bundle run``, evaluate it on the test split and score its training labels."""
    epochs, val_interval = mode.epochs, mode.val_interval
    if method.meta_set_only:
        factor = _updates_per_epoch(mode.cases[0]) / _updates_per_epoch(mode.cases[1])
        epochs, val_interval = max(1, round(epochs * factor)), max(1, round(val_interval * factor))
    overrides = {**bundle_overrides(mode, setting_name, dataset_dir, run_dir), "seed": seed, "epochs": epochs, "val_interval": val_interval}
    configs = [str(CONFIGS / name) for name in method.configs]
    start = time.time()
    bundle_run(method.configs, log_path=log_path, **overrides)
    train_seconds = time.time() - start

    # in-process: an evaluation is too short to pay for a new interpreter; its results are in the CSVs, not the log
    logging.disable(logging.WARNING)
    try:
        run_workflow(config_file=[*configs, str(CONFIGS / "evaluate.json")], logging_file=False, **overrides)
    finally:
        logging.disable(logging.NOTSET)
    dice = read_case_dice(run_dir / "val_mean_dice_raw.csv")
    hd95 = read_case_dice(run_dir / "val_hd95_raw.csv")
    models = load_trained(configs, overrides, with_meta_network=method.meta_network)
    detection = detection_summary(list(score_cases(models)))
    return {
        "dice": nanmean([nanmean(v) for v in dice.values()]),
        **{f"dice_{name}": nanmean([v[i] for v in dice.values()]) for i, name in enumerate(class_names(dataset_dir))},
        "hd95": nanmean([nanmean(v) for v in hd95.values()]),
        "epochs": epochs,
        "train_seconds": round(train_seconds, 1),
        **detection,
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
                "shape": list(setting_shape(mode, setting_name)),
                "cases": list(mode.cases),
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
        from scripts.lidc.phantom import generate_lidc_phantom  # reads the LIDC database, which only this needs

        return generate_lidc_phantom(folder, **common)
    if setting.generator != "synthetic":
        raise ValueError(f"unknown generator {setting.generator!r} of setting {setting_name!r}.")
    return generate_dataset(folder, corrupt_fraction=setting.alpha, corruption=setting.corruption, **common)


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


def run_benchmark(mode: Mode, out_dir: Path) -> list[dict[str, Any]]:
    """Run (or reuse) every setting x seed x method of ``mode``; returns one row per run."""
    saved = saved_results(mode, out_dir)
    rows = []
    total = len(mode.settings) * len(mode.seeds) * len(mode.methods)
    start = time.time()
    for setting_name, setting in mode.settings.items():
        for seed in mode.seeds:
            datalist = dataset_for(mode, setting_name, seed, out_dir)
            strength = changed_voxel_fraction(datalist)
            for method_name in mode.methods:
                run_dir = _run_dir(out_dir, setting_name, seed, method_name)
                if run_dir in saved:
                    result, status = saved[run_dir], "reused"
                else:
                    run_dir.mkdir(parents=True, exist_ok=True)
                    result = train_and_evaluate(METHODS[method_name], datalist.parent, run_dir, mode, setting_name, seed, run_dir / "bundle.log")
                    spec = run_spec(mode, setting_name, seed, method_name)
                    (run_dir / "result.json").write_text(json.dumps({"spec": spec, "result": result}, indent=2) + "\n")
                    status = f"{result['train_seconds']:.0f} s training"
                rows.append(
                    {
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


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """One row per run; settings with other classes leave the per-class Dice columns of the rest empty."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
        writer.writeheader()
        writer.writerows(rows)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return float(np.mean(finite)), float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"


def _fmt_mean_std(values: Sequence[float], digits: int = 3) -> str:
    mean, std = _mean_std(values)
    return "n/a" if not math.isfinite(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def summarise(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (setting, method): the runs' values by column, the seed-mean Dice and the gap closed."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        group = groups.setdefault((row["setting"], row["method"]), {"rows": []})
        group["rows"].append(row)
    for (setting, method), group in groups.items():
        group["dice"] = _mean_std([r["dice"] for r in group["rows"]])[0]
    for (setting, method), group in groups.items():
        plain, clean = groups.get((setting, "plain")), groups.get((setting, "clean"))
        gap = math.nan
        if plain and clean and clean["dice"] - plain["dice"] > 0:
            gap = (group["dice"] - plain["dice"]) / (clean["dice"] - plain["dice"])
        group["gap_closed"] = gap
        group["vs_plain"] = group["dice"] - plain["dice"] if plain else math.nan
    return groups


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """One block per setting: Dice, HD95, gap closed and corruption detection of every method, mean ± std over seeds."""
    groups = summarise(rows)
    header = (
        "| setting | method | seeds | Dice | Dice per class | HD95 (mm) | Δ Dice vs plain | gap closed "
        "| AUROC 1−w | AUROC loss | w corrupted | w unchanged |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for (setting, method), group in groups.items():
        runs = group["rows"]
        first = runs[0]

        def values(key: str) -> list[float]:
            return [r[key] for r in runs]

        lines.append(
            "| "
            + " | ".join(
                [
                    f"{setting} ({first['setting_label']}, {100 * _mean_std(values('changed_fraction'))[0]:.0f}% changed)",
                    METHODS[method].label if method in METHODS else method,
                    str(len(runs)),
                    _fmt_mean_std(values("dice")),
                    ", ".join(f"{key[5:]} {_fmt_mean_std(values(key))}" for key in first if key.startswith("dice_")),
                    _fmt_mean_std(values("hd95"), 2),
                    "" if method in ("plain", "clean") else f"{group['vs_plain']:+.3f}",
                    "" if method in ("plain", "clean") else _fmt(group["gap_closed"], 2),
                    _fmt_mean_std(values("auroc_weight")),
                    _fmt_mean_std(values("auroc_loss")),
                    _fmt_mean_std(values("weight_corrupted")),
                    _fmt_mean_std(values("weight_unchanged")),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def target_checks(rows: Sequence[dict[str, Any]], noisy: str = "ed_a0.5", noise_free: str = "ed_a0") -> list[str]:
    """The issue's targets, each with the measured value and whether it is met (only where both settings ran)."""
    groups = summarise(rows)
    checks = []
    if (noisy, "mcpm") in groups:
        mcpm = groups[(noisy, "mcpm")]
        gap = mcpm["gap_closed"]
        checks.append(f"{noisy}: MCPM closes {_fmt(gap, 2)} of the gap to clean labels (target ≥ 0.5): {_met(gap >= 0.5)}")
        others = {m: g["dice"] for (s, m), g in groups.items() if s == noisy and m not in ("mcpm", "clean")}
        if others:
            best = max(others, key=others.get)
            checks.append(
                f"{noisy}: MCPM Dice {mcpm['dice']:.3f} against the best other baseline, {METHODS[best].label} "
                f"{others[best]:.3f} (target: MCPM higher): {_met(mcpm['dice'] > others[best])}"
            )
        auroc = _mean_std([r["auroc_weight"] for r in mcpm["rows"]])[0]
        checks.append(f"{noisy}: AUROC of 1 − weight {_fmt(auroc)} (target ≥ 0.85): {_met(auroc >= 0.85)}")
    if (noise_free, "mcpm") in groups and (noise_free, "plain") in groups:
        delta = groups[(noise_free, "mcpm")]["vs_plain"]
        checks.append(f"{noise_free}: MCPM − plain Dice {delta:+.4f} (target ≥ −0.0100): {_met(delta >= -0.01)}")
    return checks


def _met(condition: bool) -> str:
    return "met" if condition else "**not met**"


def plot_dice_vs_noise(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Mean ± std Dice against the measured share of changed foreground voxels, one panel per noise family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(r["family"] for r in rows))
    widths = [max(1.5, len({r["setting"] for r in rows if r["family"] == f})) for f in families]
    fig, axes = plt.subplots(1, len(families), figsize=(3 + 1.5 * sum(widths), 4.5), sharey=True, squeeze=False, width_ratios=widths)
    for ax, family in zip(axes[0], families):
        settings = list(dict.fromkeys(r["setting"] for r in rows if r["family"] == family))
        for method in dict.fromkeys(r["method"] for r in rows):
            points = []
            for setting in settings:
                runs = [r for r in rows if r["setting"] == setting and r["method"] == method]
                if runs:
                    x = 100 * float(np.mean([r["changed_fraction"] for r in runs]))
                    points.append((x, *_mean_std([r["dice"] for r in runs])))
            if points:
                x, mean, std = map(np.array, zip(*sorted(points)))
                ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=METHODS[method].label if method in METHODS else method)
        ax.set_title(family.replace(" (", "\n("), fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean Dice on clean test labels (± std over seeds)")
    fig.supxlabel("changed voxels, % of the clean training foreground", fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_weight_maps(scores: Sequence[CaseScore], clean_labels: dict[str, np.ndarray], path: Path, title: str) -> None:
    """Image | clean label | corrupted label (changed voxels outlined) | MCPM weight, on the slice with most changes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(scores), 4, figsize=(12, 3 * len(scores)), squeeze=False)
    for row, case in zip(axes, scores):
        z = int(np.argmax(case.corruption_mask.sum(axis=(0, 1)))) if case.corruption_mask.any() else case.label.shape[2] // 2
        panels = [
            (case.image[..., z], "gray", None, "image"),
            (clean_labels[case.name][..., z], "viridis", (0, 2), "clean label"),
            (case.label[..., z], "viridis", (0, 2), "corrupted label (changed outlined)"),
            (case.weight[..., z], "magma", (0, 1), "MCPM weight"),
        ]
        for ax, (image, cmap, limits, name) in zip(row, panels):
            shown = ax.imshow(image.T, cmap=cmap, origin="lower", **({} if limits is None else {"vmin": limits[0], "vmax": limits[1]}))
            ax.set_title(f"{case.name} z={z}: {name}", fontsize=8)
            ax.axis("off")
        row[2].contour(case.corruption_mask[..., z].T, levels=[0.5], colors="red", linewidths=0.8)
        fig.colorbar(shown, ax=row[3], fraction=0.046)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def weight_figure_setting(mode: Mode) -> str | None:
    """The setting drawn in weight_maps.png: erosion/dilation at alpha = 0.5, else the first corrupted one."""
    corrupted = [name for name, setting in mode.settings.items() if setting.alpha > 0]
    preferred = [n for n in corrupted if mode.settings[n].alpha == 0.5 and mode.settings[n].family == "erosion/dilation"]
    return (preferred or corrupted or [None])[0]


def weight_map_figure(mode: Mode, out_dir: Path, setting_name: str, seed: int, num_cases: int = 3) -> Path | None:
    """Draw ``weight_maps.png`` from the MCPM run of one setting and seed: its most corrupted training cases."""
    run_dir = _run_dir(out_dir, setting_name, seed, "mcpm")
    if not (run_dir / "result.json").is_file():
        return None
    dataset_dir = out_dir / "data" / setting_name / f"seed{seed}"
    overrides = bundle_overrides(mode, setting_name, dataset_dir, run_dir)
    models = load_trained([str(CONFIGS / "train.json")], overrides)
    scores = sorted(score_cases(models), key=lambda c: int(c.corruption_mask.sum()), reverse=True)[:num_cases]
    preprocessing = models.parser.get_parsed_content("validate#preprocessing")
    entries = {Path(e["label"]).name.split(".")[0]: e for e in json.loads((dataset_dir / "datalist.json").read_text())["training"]}
    clean = {
        case.name: np.asarray(
            preprocessing({"image": str(dataset_dir / entries[case.name]["image"]), "label": str(dataset_dir / entries[case.name]["clean_label"])})["label"][0]
        )
        for case in scores
    }
    path = out_dir / "weight_maps.png"
    plot_weight_maps(scores, clean, path, f"MCPM weights after training: {setting_name} ({mode.settings[setting_name].label}), seed {seed}")
    return path


def machine_description() -> str:
    """The machine a benchmark ran on, for its report."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU"


def write_report(mode_name: str, mode: Mode, rows: Sequence[dict[str, Any]], out_dir: Path, command: str, seconds: float) -> Path:
    """Write results.md: how it was run, the table and the targets."""
    figure_setting = weight_figure_setting(mode)
    lines = [
        f"# MCPM benchmark, {mode_name} mode",
        "",
        f"- command: `{command}`",
        f"- machine: {machine_description()}; torch {torch.__version__}",
        f"- duration of this invocation: {seconds / 60:.1f} min (runs reused from an earlier invocation count zero)",
        f"- volumes {'x'.join(map(str, mode.shape))}, cases (training, meta, validation, test) = {mode.cases}, "
        f"{mode.epochs} epochs (meta set only: scaled to the same number of updates), seeds {list(mode.seeds)}",
        "",
        "Dice and HD95 on the clean test labels, mean ± std over seeds. Gap closed = (Dice − Dice_plain) / "
        "(Dice_clean − Dice_plain), from the seed means. AUROC 1−w: how well one minus the MCPM weight singles out "
        "the corrupted training voxels; AUROC loss: the same for the trained network's per-voxel loss (the "
        "small-loss criterion); both scored after training with the saved networks.",
        "",
        markdown_table(rows),
        "",
        "## Targets",
        "",
        *[f"- {check}" for check in target_checks(rows)],
        "",
        "Figures: `dice_vs_noise.png`" + (f", `weight_maps.png` ({figure_setting}, seed {mode.seeds[0]})" if figure_setting else ""),
        "",
    ]
    path = out_dir / "results.md"
    path.write_text("\n".join(lines))
    return path


def _parse_override(parser: argparse.ArgumentParser, text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as JSON where it is JSON, else kept as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        parser.error(f"--override needs KEY=VALUE, got {text!r}.")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def parse_mode(argv: Sequence[str] | None) -> tuple[str, Mode, Path]:
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
    parser.add_argument("--shape", type=int, nargs=3, help="volume and patch size of the synthetic settings (lidc_readers keeps its own 32x32x16)")
    parser.add_argument("--cases", type=int, nargs=4, metavar=("TRAIN", "META", "VAL", "TEST"))
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
        "extra": {**mode.extra, **dict(_parse_override(parser, text) for text in args.override)} if args.override else None,
    }
    mode = replace(mode, **{k: v for k, v in changes.items() if v is not None})
    return args.mode, mode, args.out_dir or BUNDLE_ROOT / "runs" / f"benchmark_{args.mode}"


def main(argv: Sequence[str] | None = None) -> Path:
    """Run the benchmark and write its CSV, Markdown report and figures; returns the report's path."""
    mode_name, mode, out_dir = parse_mode(argv)
    start = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = run_benchmark(mode, out_dir)
    write_csv(rows, out_dir / "results.csv")
    plot_dice_vs_noise(rows, out_dir / "dice_vs_noise.png")
    figure_setting = weight_figure_setting(mode)
    if figure_setting and "mcpm" in mode.methods:
        weight_map_figure(mode, out_dir, figure_setting, mode.seeds[0])
    command = "python -m scripts.experiments.benchmark " + " ".join(sys.argv[1:] if argv is None else argv)
    report = write_report(mode_name, mode, rows, out_dir, command.strip(), time.time() - start)
    print("\n" + report.read_text())
    return report


if __name__ == "__main__":
    main()
