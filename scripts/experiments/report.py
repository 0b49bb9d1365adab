"""The benchmark's report: statistics over seeds, the Markdown table, the bundle's targets, the figures and
``results.md``.

Everything here works on the rows :py:func:`scripts.experiments.benchmark.run_benchmark` returns (one dict per
setting, seed and method), so a report can be redrawn from a ``results.csv`` without training anything.
Figures are drawn on a matplotlib ``Figure`` of :py:func:`scripts.utils.figure`, which leaves pyplot and the
global backend alone.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from scripts.audit import CaseScore
from scripts.experiments.methods import METHODS
from scripts.utils import figure, save_figure, write_text

__all__ = [
    "TARGETS",
    "best_baseline",
    "machine_description",
    "markdown_table",
    "paired_deltas",
    "paired_table",
    "t_interval",
    "plot_dice_vs_noise",
    "plot_weight_maps",
    "summarise",
    "target_checks",
    "write_report",
]

# The bundle's targets, checked by target_checks on the noisy setting (alpha = 0.5 erosion/dilation), the severe one
# and the noise-free control (alpha = 0); docs/results.md lists them with the measured values. "Best baseline" is
# the method other than MCPM and clean labels with the highest mean validation Dice (chosen on validation, never
# on test); every Δ is paired by seed (same data and initialisation) with a 95% t-interval over the seeds.
TARGETS = (
    "α = 0.5: MCPM beats the best baseline, the paired 95% interval of Δ Dice above zero",
    "α = 0.5: MCPM closes at least 60% of the Dice gap between the best baseline and clean labels",
    "severe: MCPM at least as good as the best baseline (mean Δ Dice ≥ 0)",
    "α = 0: MCPM costs at most 1 Dice point against union training (mean Δ Dice ≥ −0.01)",
    "α = 0.5: the AUROC of 1 − MCPM weight for the corrupted training voxels beats the loss's AUROC",
    "every setting: the meta loss falls over training (last post-warm-up epoch below the first) on every seed",
)
# the default MCPM, which every other method is compared with
REFERENCE = "mcpm"


def _method_label(method: str) -> str:
    return METHODS[method].label if method in METHODS else method


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value) of the finite values; NaNs when there are none."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return float(np.mean(finite)), float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"


def _fmt_mean_std(values: Sequence[float], digits: int = 3) -> str:
    mean, std = _mean_std(values)
    return "n/a" if not math.isfinite(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """The mean of the finite ``values`` and the two-sided Student-t confidence interval of that mean at ``level``;
    NaN bounds for fewer than two values (an interval needs a spread)."""
    finite = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    if finite.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(finite.mean())
    if finite.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, finite.size - 1) * finite.std(ddof=1) / math.sqrt(finite.size))
    return mean, mean - half, mean + half


def paired_deltas(
    rows: Sequence[dict[str, Any]], setting: str, method: str, other: str, key: str = "dice"
) -> dict[int, float]:
    """``method`` minus ``other`` in ``key`` per seed of ``setting``, over the seeds where both ran: each seed is one
    dataset and one initialisation shared by the two, so the difference is paired and the seeds are the samples."""
    values: dict[str, dict[int, float]] = {method: {}, other: {}}
    for row in rows:
        if row["setting"] == setting and row["method"] in values:
            values[row["method"]][int(row["seed"])] = float(row[key])
    return {seed: values[method][seed] - values[other][seed] for seed in sorted(values[method]) if seed in values[other]}


def baselines(rows: Sequence[dict[str, Any]], setting: str) -> list[str]:
    """The methods of ``setting`` a user could run instead of MCPM: all but the meta-network ones and clean labels
    (an upper bound that needs every label clean)."""
    methods = dict.fromkeys(r["method"] for r in rows if r["setting"] == setting)
    return [m for m in methods if m != "clean" and not (m in METHODS and METHODS[m].meta_network)]


def best_baseline(rows: Sequence[dict[str, Any]], setting: str) -> str | None:
    """The baseline of ``setting`` with the highest mean validation Dice (test Dice where a run has no validation
    Dice recorded), so that the comparison MCPM faces is chosen without looking at the test split."""

    def score(method: str) -> float:
        runs = [r for r in rows if r["setting"] == setting and r["method"] == method]
        return _mean_std([float(r.get("val_dice", r["dice"])) for r in runs])[0]

    candidates = [m for m in baselines(rows, setting) if math.isfinite(score(m))]
    return max(candidates, key=score) if candidates else None


def paired_table(rows: Sequence[dict[str, Any]], reference: str = REFERENCE, key: str = "dice") -> str:
    """One line per setting and method: ``reference`` minus that method in ``key``, paired by seed, with its 95%
    t-interval, and on how many seeds ``reference`` was ahead. The best baseline (by validation Dice) is marked."""
    header = f"| setting | {_method_label(reference)} − method | seeds | mean Δ | 95% interval | seeds ahead |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for setting in dict.fromkeys(r["setting"] for r in rows):
        best = best_baseline(rows, setting)
        for method in dict.fromkeys(r["method"] for r in rows if r["setting"] == setting):
            deltas = paired_deltas(rows, setting, reference, method, key)
            if method == reference or not deltas:
                continue
            mean, low, high = t_interval(list(deltas.values()))
            ahead = sum(d > 0 for d in deltas.values())
            name = _method_label(method) + (" (best baseline)" if method == best else "")
            interval = _interval(low, high)
            lines.append(f"| {setting} | {name} | {len(deltas)} | {mean:+.3f} | {interval} | {ahead}/{len(deltas)} |")
    return "\n".join(lines)


def summarise(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (setting, method): the runs' values by column, the seed-mean Dice and the gap closed."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        group = groups.setdefault((row["setting"], row["method"]), {"rows": []})
        group["rows"].append(row)
    for group in groups.values():
        group["dice"] = _mean_std([r["dice"] for r in group["rows"]])[0]
    for (setting, _), group in groups.items():
        plain, clean = groups.get((setting, "plain")), groups.get((setting, "clean"))
        gap = math.nan
        if plain and clean and clean["dice"] - plain["dice"] > 0:
            gap = (group["dice"] - plain["dice"]) / (clean["dice"] - plain["dice"])
        group["gap_closed"] = gap
        group["vs_plain"] = group["dice"] - plain["dice"] if plain else math.nan
    return groups


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """One block per setting: Dice, HD95, gap closed and corruption detection of every method, mean ± std over
    seeds."""
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

        changed = 100 * _mean_std(values("changed_fraction"))[0]
        baseline = method in ("plain", "clean")
        cells = [
            f"{setting} ({first['setting_label']}, {changed:.0f}% changed)",
            _method_label(method),
            str(len(runs)),
            _fmt_mean_std(values("dice")),
            ", ".join(f"{key[5:]} {_fmt_mean_std(values(key))}" for key in first if key.startswith("dice_")),
            _fmt_mean_std(values("hd95"), 2),
            "" if baseline else f"{group['vs_plain']:+.3f}",
            "" if baseline else _fmt(group["gap_closed"], 2),
            _fmt_mean_std(values("auroc_weight")),
            _fmt_mean_std(values("auroc_loss")),
            _fmt_mean_std(values("weight_corrupted")),
            _fmt_mean_std(values("weight_unchanged")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _met(condition: bool) -> str:
    return "met" if condition else "**not met**"


def _delta_check(
    rows: Sequence[dict[str, Any]], setting: str, reference: str, other: str
) -> tuple[float, float, float, int]:
    deltas = paired_deltas(rows, setting, reference, other)
    return (*t_interval(list(deltas.values())), len(deltas))


def _interval(low: float, high: float) -> str:
    return f"[{low:+.3f}, {high:+.3f}]" if math.isfinite(low) else "n/a (one seed)"


def target_checks(
    rows: Sequence[dict[str, Any]],
    noisy: str = "ed_a0.5",
    severe: str = "ed_severe",
    noise_free: str = "ed_a0",
    reference: str = REFERENCE,
) -> list[str]:
    """The bundle's :py:data:`TARGETS` for the MCPM method ``reference``, each with the measured value and whether it
    is met (only where the settings and methods ran). Settings match with or without their mode
    (``default/ed_a0.5`` as a results.csv names it)."""
    rows = [{**row, "setting": str(row["setting"]).split("/")[-1]} for row in rows]
    groups = summarise(rows)
    checks = []
    best = best_baseline(rows, noisy)
    if (noisy, reference) in groups and best:
        mean, low, high, n = _delta_check(rows, noisy, reference, best)
        checks.append(
            f"{noisy}: {_method_label(reference)} − {_method_label(best)} (best baseline) {mean:+.3f}, 95% interval "
            f"{_interval(low, high)} over {n} seeds (target: above zero): {_met(low > 0)}"
        )
        if (noisy, "clean") in groups:
            # over the seeds where all three ran, so that the three means are of the same datasets
            gained, gaps = paired_deltas(rows, noisy, reference, best), paired_deltas(rows, noisy, "clean", best)
            seeds = sorted(set(gained) & set(gaps))
            gap = float(np.mean([gaps[k] for k in seeds])) if seeds else math.nan
            closed = float(np.mean([gained[k] for k in seeds])) / gap if gap > 0 else math.nan
            checks.append(
                f"{noisy}: {_method_label(reference)} closes {_fmt(closed, 2)} of the gap between {_method_label(best)} "
                f"and clean labels over {len(seeds)} seeds (target ≥ 0.60): {_met(closed >= 0.6)}"
            )
    best_severe = best_baseline(rows, severe)
    if (severe, reference) in groups and best_severe:
        mean, low, high, n = _delta_check(rows, severe, reference, best_severe)
        checks.append(
            f"{severe}: {_method_label(reference)} − {_method_label(best_severe)} (best baseline) {mean:+.3f} over "
            f"{n} seeds (target ≥ 0): {_met(mean >= 0)}"
        )
    if (noise_free, reference) in groups and (noise_free, "union") in groups:
        mean, low, high, n = _delta_check(rows, noise_free, reference, "union")
        checks.append(
            f"{noise_free}: {_method_label(reference)} − union {mean:+.4f} over {n} seeds (target ≥ −0.0100): "
            f"{_met(mean >= -0.01)}"
        )
    if (noisy, reference) in groups:
        runs = groups[(noisy, reference)]["rows"]
        weight, loss = (_mean_std([r[key] for r in runs])[0] for key in ("auroc_weight", "auroc_loss"))
        checks.append(
            f"{noisy}: AUROC of 1 − weight {_fmt(weight)} against the loss's {_fmt(loss)} (target: higher): "
            f"{_met(weight > loss)}"
        )
    falling = [
        (r["setting"], r["seed"], r["meta_loss_first"], r["meta_loss_last"])
        for r in rows
        if r["method"] == reference and math.isfinite(float(r.get("meta_loss_first", math.nan)))
    ]
    if falling:
        rising = [f"{s} seed {k} ({a:.3f} → {b:.3f})" for s, k, a, b in falling if not float(b) < float(a)]
        checks.append(
            f"the meta loss falls over training on {len(falling) - len(rising)} of {len(falling)} MCPM runs"
            + (f"; it rose on {', '.join(rising)}" if rising else "")
            + f": {_met(not rising)}"
        )
    return checks


def plot_dice_vs_noise(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Mean ± std Dice against the measured share of changed foreground voxels, one panel per noise family."""
    families = list(dict.fromkeys(r["family"] for r in rows))
    widths = [max(1.5, len({r["setting"] for r in rows if r["family"] == f})) for f in families]
    fig = figure(figsize=(3 + 1.5 * sum(widths), 4.5))
    axes = fig.subplots(1, len(families), sharey=True, squeeze=False, width_ratios=widths)
    for ax, family in zip(axes[0], families, strict=True):
        settings = list(dict.fromkeys(r["setting"] for r in rows if r["family"] == family))
        for method in dict.fromkeys(r["method"] for r in rows):
            points = []
            for setting in settings:
                runs = [r for r in rows if r["setting"] == setting and r["method"] == method]
                if runs:
                    x = 100 * float(np.mean([r["changed_fraction"] for r in runs]))
                    points.append((x, *_mean_std([r["dice"] for r in runs])))
            if points:
                x, mean, std = map(np.array, zip(*sorted(points), strict=True))
                ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=_method_label(method))
        ax.set_title(family.replace(" (", "\n("), fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean Dice on clean test labels (± std over seeds)")
    fig.supxlabel("changed voxels, % of the clean training foreground", fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    save_figure(fig, path, dpi=120, bbox_inches="tight")


def plot_weight_maps(scores: Sequence[CaseScore], clean_labels: dict[str, np.ndarray], path: Path, title: str) -> None:
    """Image | clean label | corrupted label (changed voxels outlined) | MCPM weight, on the slice with most
    changes."""
    fig = figure(figsize=(12, 3 * len(scores)))
    axes = fig.subplots(len(scores), 4, squeeze=False)
    for row, case in zip(axes, scores, strict=True):
        mask = case.corruption_mask
        z = int(np.argmax(mask.sum(axis=(0, 1)))) if mask.any() else case.label.shape[2] // 2
        panels = [
            (case.image[..., z], "gray", None, "image"),
            (clean_labels[case.name][..., z], "viridis", (0, 2), "clean label"),
            (case.label[..., z], "viridis", (0, 2), "corrupted label (changed outlined)"),
            (case.weight[..., z], "magma", (0, 1), "MCPM weight"),
        ]
        for ax, (image, cmap, limits, name) in zip(row, panels, strict=True):
            limits_kwargs = {} if limits is None else {"vmin": limits[0], "vmax": limits[1]}
            shown = ax.imshow(image.T, cmap=cmap, origin="lower", **limits_kwargs)
            ax.set_title(f"{case.name} z={z}: {name}", fontsize=8)
            ax.axis("off")
        row[2].contour(mask[..., z].T, levels=[0.5], colors="red", linewidths=0.8)
        fig.colorbar(shown, ax=row[3], fraction=0.046)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def machine_description() -> str:
    """The machine a benchmark ran on, for its report."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores"
    return f"{_cpu_name()}, {os.cpu_count()} CPU cores, no GPU"


def _cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows: figures differ across CPUs in
    their last digits, so every report names it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_report(
    path: Path,
    mode_name: str,
    rows: Sequence[dict[str, Any]],
    command: str,
    seconds: float,
    setup: str,
    weight_maps: str | None = None,
    reference: str = REFERENCE,
) -> Path:
    """Write ``results.md`` to ``path``: how the benchmark was run, the table and the targets.

    Args:
        path: the report's file.
        mode_name: the benchmark mode, for the title.
        rows: one row per run.
        command: the command line of this invocation.
        seconds: the duration of this invocation.
        setup: one line on volumes, cases, epochs and seeds.
        weight_maps: what ``weight_maps.png`` shows (setting and seed), or None when it was not drawn.
        reference: the MCPM method the paired differences and the targets are of.
    """
    lines = [
        f"# MCPM benchmark, {mode_name} mode",
        "",
        f"- command: `{command}`",
        f"- machine: {machine_description()}; torch {torch.__version__}",
        f"- duration of this invocation: {seconds / 60:.1f} min (runs reused from an earlier invocation count zero)",
        f"- {setup}",
        "",
        "Dice and HD95 on the clean test labels, mean ± std over seeds. Gap closed = (Dice − Dice_plain) / "
        "(Dice_clean − Dice_plain), from the seed means. AUROC 1−w: how well one minus the MCPM weight singles out "
        "the corrupted training voxels; AUROC loss: the same for the trained network's per-voxel loss (the "
        "small-loss criterion); both scored after training with the saved networks.",
        "",
        markdown_table(rows),
        "",
        "## Paired differences",
        "",
        f"{_method_label(reference)} minus each method, per seed (same data and initialisation), mean and 95% "
        "t-interval over the seeds, on the clean test labels and on the validation split (what defaults are chosen "
        "on). The best baseline is the one with the highest mean validation Dice.",
        "",
        "On the clean test labels:",
        "",
        paired_table(rows, reference),
        "",
        "On the validation split:" if all("val_dice" in r for r in rows) else "",
        "",
        paired_table(rows, reference, key="val_dice") if all("val_dice" in r for r in rows) else "",
        "",
        "## Targets",
        "",
        "The bundle's targets:",
        "",
        *[f"- {target}" for target in TARGETS],
        "",
        "Measured (only where the settings ran):",
        "",
        *[
            f"- {check}"
            for check in target_checks(rows, reference=reference) or [f"none: {reference} did not run on ed_a0.5"]
        ],
        "",
        "Figures: `dice_vs_noise.png`" + (f", `weight_maps.png` ({weight_maps})" if weight_maps else ""),
        "",
    ]
    write_text("\n".join(lines), path)
    return path
