"""Histograms of the reader-vs-consensus agreement of :py:func:`scripts.lidc.reader_statistics` (``stats --plot``)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from scripts.utils import atomic_path, figure

__all__ = ["plot_statistics"]


def plot_statistics(rows: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """Save histograms of the reader-vs-consensus agreement in ``rows`` (:py:data:`scripts.lidc.STATS_COLUMNS`)
    to ``path``.

    Three panels: Dice to the consensus and leave-one-out Dice (``dice_others``); leave-one-out Dice by the number
    of readers; the volume ratio reader / consensus on a log axis (values beyond 1/8 or 8 are counted in the end
    bins). Rows may come from :py:func:`scripts.lidc.reader_statistics` or from the CSV (strings are converted).
    Drawn on a bare matplotlib ``Figure`` (:py:func:`scripts.utils.figure`), so no pyplot backend is touched; the
    file is written atomically.
    """
    if not rows:
        raise ValueError("no statistics rows to plot.")

    def values(name: str, keep: np.ndarray | None = None) -> np.ndarray:
        column = np.array([float(row[name]) for row in rows])
        column = column if keep is None else column[keep]
        return column[np.isfinite(column)]

    readers = np.array([int(row["n_readers"]) for row in rows])
    nodules = len({(str(row["scan_id"]), str(row["nodule"])) for row in rows})
    fig = figure(figsize=(15, 4.4), layout="constrained")
    left, middle, right = fig.subplots(1, 3)
    dice_bins = np.linspace(0, 1, 41)
    kinds = (("dice", "to the consensus (incl. the reader)"), ("dice_others", "to the other readers' consensus"))
    for name, label in kinds:
        data = values(name)
        left.hist(data, dice_bins, histtype="step", linewidth=1.8, label=f"{label}, median {np.median(data):.3f}")
    left.set(title="Dice of each reader's mask", xlabel="Dice", ylabel="reader masks")
    left.legend(loc="upper left", fontsize=8)
    for n in sorted(set(readers.tolist())):
        data = values("dice_others", readers == n)
        label = f"{n} readers: {len(data)} masks, median {np.median(data):.3f}"
        middle.hist(data, dice_bins, histtype="step", linewidth=1.8, label=label)
    middle.set(title="Leave-one-out Dice by number of readers", xlabel="Dice to the other readers' consensus")
    middle.set(ylabel="reader masks")
    middle.legend(loc="upper left", fontsize=8)
    ratio_bins = np.geomspace(1 / 8, 8, 49)
    ratio = values("volume_ratio")
    quartiles = ", ".join(f"{q:.2f}" for q in np.quantile(ratio, [0.25, 0.5, 0.75]))
    clipped = np.clip(ratio, ratio_bins[0], ratio_bins[-1])
    right.hist(clipped, ratio_bins, color="tab:green", alpha=0.7, label=f"quartiles {quartiles}")
    right.axvline(1.0, color="black", linewidth=1)
    right.set_xscale("log")
    ticks = [1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8]
    right.set_xticks(ticks, ["1/8", "1/4", "1/2", "1", "2", "4", "8"])
    right.set_xticks([], minor=True)
    right.set(title="Volume ratio reader / consensus", ylabel="reader masks")
    right.set(xlabel="volume ratio (log scale; beyond 1/8 or 8 in the end bins)")
    right.legend(loc="upper left", fontsize=8)
    fig.suptitle(f"LIDC-IDRI reader agreement: {len(rows)} reader masks of {nodules} nodules with 2 or more readers")
    with atomic_path(path) as temporary:
        fig.savefig(temporary, dpi=100)
    return Path(path)
