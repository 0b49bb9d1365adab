"""
Reader agreement: each reader of a nodule against the nodule's consensus (Dice, volume ratio, surface distances),
the rows of the ``stats`` CSV, their quantiles, and the CSV file itself.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from scripts.lidc.database import LIDC, MAX_READERS, Scan
from scripts.lidc.nodules import Nodule, consensus, scan_nodules
from scripts.utils import dice, write_csv

__all__ = [
    "STATS_COLUMNS",
    "read_stats_csv",
    "reader_statistics",
    "summarise",
    "surface_distances",
    "write_stats_csv",
]

STATS_COLUMNS = (
    "scan_id",
    "patient_id",
    "nodule",
    "n_readers",
    "annotation_id",
    "reader_mm3",
    "consensus_mm3",
    "dice",
    "volume_ratio",
    "mssd_mm",
    "hd95_mm",
    "dice_others",
)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it (outside the array counts as outside)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of ``a`` to the nearest surface voxel of ``b``, and from ``b`` to ``a``.

    Surfaces as MONAI's ``get_mask_edges`` (mask XOR its erosion); both empty arrays if either mask is empty.
    """
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if not a.any() or not b.any():
        return np.zeros(0), np.zeros(0)
    a, b = np.pad(a, 1), np.pad(b, 1)
    edge_a, edge_b = _surface(a), _surface(b)
    to_b = ndimage.distance_transform_edt(~edge_b, sampling=spacing)
    to_a = ndimage.distance_transform_edt(~edge_a, sampling=spacing)
    return to_b[edge_a], to_a[edge_b]


def _distance_summary(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> tuple[float, float]:
    """Mean symmetric surface distance and 95th-percentile Hausdorff distance (mm), MONAI's definitions."""
    ab, ba = surface_distances(a, b, spacing)
    if len(ab) == 0:
        return float("nan"), float("nan")
    mssd = float((ab.sum() + ba.sum()) / (len(ab) + len(ba)))
    return mssd, float(max(np.percentile(ab, 95), np.percentile(ba, 95)))


def _nodule_rows(nodule: Nodule, scan: Scan, index: int, fraction: float) -> list[dict]:
    """One row of :py:data:`STATS_COLUMNS` per reader of ``nodule``."""
    voxel_mm3 = float(np.prod(nodule.spacing))
    agreed = nodule.consensus(fraction)
    agreed_voxels = np.count_nonzero(agreed)
    rows = []
    for r, annotation_id in enumerate(nodule.annotation_ids):
        mask = nodule.masks[r]
        others = consensus(np.delete(nodule.masks, r, axis=0), fraction)
        voxels = np.count_nonzero(mask)
        mssd, hd95 = _distance_summary(mask, agreed, nodule.spacing)
        rows.append(
            {
                "scan_id": scan.id,
                "patient_id": scan.patient_id,
                "nodule": index,
                "n_readers": len(nodule.annotation_ids),
                "annotation_id": annotation_id,
                "reader_mm3": voxels * voxel_mm3,
                "consensus_mm3": agreed_voxels * voxel_mm3,
                "dice": dice(mask, agreed),
                "volume_ratio": voxels / agreed_voxels if agreed_voxels else float("nan"),
                "mssd_mm": mssd,
                "hd95_mm": hd95,
                "dice_others": dice(mask, others),
            }
        )
    return rows


def reader_statistics(
    db: LIDC, min_readers: int = 2, fraction: float = 0.5, scan_ids: Iterable[int] | None = None
) -> list[dict]:
    """Each reader's agreement with the consensus of every nodule with at least ``min_readers`` readers.

    Per reader: Dice and volume ratio (reader / consensus) to the ``fraction`` consensus (which includes the
    reader), mean symmetric surface distance and HD95 (mm) to it, and ``dice_others``: Dice to the consensus
    of the other readers alone (leave-one-out, the reader's disagreement with the rest). Dice is NaN where both
    masks are empty (:py:func:`scripts.utils.dice`).
    """
    rows: list[dict] = []
    for scan_id in sorted(db.scans) if scan_ids is None else scan_ids:
        for index, nodule in enumerate(scan_nodules(db, scan_id)):
            if len(nodule.annotation_ids) >= min_readers:
                rows.extend(_nodule_rows(nodule, db.scans[scan_id], index, fraction))
    return rows


def write_stats_csv(rows: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """Write ``rows`` (dicts with :py:data:`STATS_COLUMNS`) to a CSV file atomically, floats with 6 significant
    digits (enough for the measures, and a file that reads well); the folder is created if needed."""
    formatted = [{k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()} for row in rows]
    return write_csv(formatted, path, fieldnames=STATS_COLUMNS)


def read_stats_csv(path: str | os.PathLike) -> list[dict]:
    """The rows of a CSV written by :py:func:`write_stats_csv` (values as strings)."""
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def summarise(rows: Sequence[Mapping], quantiles: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95)) -> str:
    """A Markdown table of the quantiles of each measure over ``rows`` (NaN values left out and counted)."""
    measures = ("dice", "dice_others", "volume_ratio", "mssd_mm", "hd95_mm", "reader_mm3")
    head = "| measure | n | NaN | " + " | ".join(f"q{round(q * 100):02d}" for q in quantiles) + " |"
    lines = [head, "|" + "---|" * (len(quantiles) + 3)]
    for name in measures:
        values = np.array([row[name] for row in rows], dtype=float)
        finite = values[np.isfinite(values)]
        cells = np.quantile(finite, quantiles) if len(finite) else [float("nan")] * len(quantiles)
        numbers = " | ".join(f"{c:.3g}" for c in cells)
        lines.append(f"| {name} | {len(finite)} | {len(values) - len(finite)} | {numbers} |")
    nodules = {(row["scan_id"], row["nodule"]): row["n_readers"] for row in rows}
    counts = np.bincount(np.asarray(list(nodules.values()), dtype=int), minlength=MAX_READERS + 1)
    by_readers = ", ".join(f"{n} readers: {c}" for n, c in enumerate(counts) if c)
    lines.append("")
    lines.append(f"{len(rows)} reader masks of {len(nodules)} nodules ({by_readers or 'none'})")
    return "\n".join(lines)
