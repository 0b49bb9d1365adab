"""
Nodules across readers: one scan's annotations grouped by geometry, their masks on a common box, the readers'
consensus, and which reader gives a training label.

The database does not say which radiologist drew which annotation, so nodules are formed by geometry
(:py:func:`cluster_annotations`) with at most four annotations each.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.sparse.csgraph import connected_components

from scripts.lidc.database import LIDC, MAX_READERS, Scan
from scripts.lidc.raster import BoxMask, annotation_mask

__all__ = [
    "LIDC_LABELS",
    "Nodule",
    "NoduleCase",
    "choose_reader",
    "cluster_annotations",
    "consensus",
    "nodule_cases",
    "parse_reader",
    "scan_nodules",
]

# the label values of the datasets made of nodule patches (scripts.lidc convert and scripts.lidc.phantom)
LIDC_LABELS = {"0": "background", "1": "nodule"}


# ---------------------------------------------------------------------------------------------------------------
# grouping annotations into nodules


def _overlaps(masks: Sequence[BoxMask]) -> np.ndarray:
    """Matrix of the number of voxels each pair of masks shares (sizes on the diagonal)."""
    n = len(masks)
    shared = np.zeros((n, n), dtype=np.int64)
    for i in range(n):
        shared[i, i] = masks[i].voxels
        for j in range(i + 1, n):
            start = np.maximum(masks[i].offset, masks[j].offset)
            stop = np.minimum(np.add(masks[i].offset, masks[i].shape), np.add(masks[j].offset, masks[j].shape))
            if np.all(stop > start):
                size = tuple(int(v) for v in stop - start)
                both = masks[i].crop(start, size) & masks[j].crop(start, size)
                shared[i, j] = shared[j, i] = int(np.count_nonzero(both))
    return shared


def _centroids_and_radii(masks: Sequence[BoxMask], spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Centroid (mm, grid frame) and equivalent-sphere radius (mm) of each mask; NaN for empty masks."""
    centroids = np.full((len(masks), 3), np.nan)
    radii = np.full(len(masks), np.nan)
    for i, mask in enumerate(masks):
        index = np.argwhere(mask.array)
        if len(index):
            centroids[i] = (index.mean(0) + mask.offset) * np.asarray(spacing)
            radii[i] = (3 * len(index) * float(np.prod(spacing)) / (4 * math.pi)) ** (1 / 3)
    return centroids, radii


def _groups(members: np.ndarray, score: np.ndarray, thresholds: Sequence[float], max_size: int) -> list[list[int]]:
    """Connected components of ``score > thresholds[0]``; a component too big is split at the next threshold."""
    sub = score[np.ix_(members, members)] > thresholds[0]
    count, labels = connected_components(sub, directed=False)
    groups: list[list[int]] = []
    for label in range(count):
        group = members[labels == label]
        if len(group) > max_size and len(thresholds) > 1:
            groups.extend(_groups(group, score, thresholds[1:], max_size))
        else:
            groups.append(sorted(int(g) for g in group))
    return groups


def cluster_annotations(
    masks: Sequence[BoxMask], spacing: Sequence[float], max_readers: int = MAX_READERS
) -> list[list[int]]:
    """Group one scan's annotation masks into nodules; returns lists of indices into ``masks``.

    Two annotations are linked when their masks share a voxel, or when one's centroid is within the other's
    equivalent-sphere radius (for small outlines on neighbouring slices). Nodules are the connected groups.
    The database does not identify readers, so "one annotation per reader" cannot be enforced; instead a group
    of more than ``max_readers`` (LIDC had four radiologists) is split by keeping only links whose Dice
    exceeds 0.1, then 0.2, ... 0.9, until every part is small enough. Dice, being symmetric, keeps a reader
    who outlined two lesions as one from chaining them; such groups are rare (10 of 2664 in LIDC, where a
    reader split or doubled a nodule), and their split is a heuristic. Pass masks that include the outline
    (``include_outline=True``) so that no annotation is empty. Groups are ordered by their first slice, then
    first row and column.
    """
    n = len(masks)
    if n == 0:
        return []
    shared = _overlaps(masks)
    sizes = np.diag(shared).astype(float)
    score = 2 * shared / np.maximum(np.add.outer(sizes, sizes), 1)
    centroids, radii = _centroids_and_radii(masks, spacing)
    distance = np.linalg.norm(centroids[:, None] - centroids[None], axis=-1)
    with np.errstate(invalid="ignore"):
        near = distance <= np.maximum.outer(radii, radii)
    score = np.where((shared == 0) & near, 1e-6, score)
    np.fill_diagonal(score, 1.0)
    groups = _groups(np.arange(n), score, [0.0] + [t / 10 for t in range(1, 10)], max_readers)

    def first_voxel(group: list[int]) -> tuple:
        return min((masks[i].offset[2], masks[i].offset[0], masks[i].offset[1], i) for i in group)

    return sorted(groups, key=first_voxel)


def consensus(masks: np.ndarray, fraction: float = 0.5) -> np.ndarray:
    """Voxels marked by at least ``fraction`` of the readers: ``masks`` is (readers, ...) on a common box.

    With the default one half this is LIDC's usual "50% consensus": 1 of 2, 2 of 3 or 2 of 4 readers.
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim < 2 or len(masks) == 0:
        raise ValueError(f"consensus needs a stack of reader masks, got shape {masks.shape}.")
    needed = max(1, math.ceil(fraction * len(masks) - 1e-9))
    return masks.sum(0) >= needed


@dataclass(eq=False)
class Nodule:
    """The readers' masks of one nodule on a common box of its scan's grid, ``masks[r]`` for ``annotation_ids[r]``."""

    scan_id: int
    annotation_ids: tuple[int, ...]
    offset: tuple[int, int, int]
    masks: np.ndarray
    spacing: tuple[float, float, float]

    def consensus(self, fraction: float = 0.5) -> np.ndarray:
        """The voxels marked by at least ``fraction`` of this nodule's readers (see :py:func:`consensus`)."""
        return consensus(self.masks, fraction)


def scan_nodules(db: LIDC, scan_id: int, include_outline: bool = False, pad: int = 1) -> list[Nodule]:
    """The nodules of one scan: annotations clustered (:py:func:`cluster_annotations`), masks on a common box.

    The box is the union of the readers' boxes padded by ``pad`` voxels (clipped at 0), so that surfaces on
    the box's edge are still surfaces.
    """
    scan, annotations = db.scans[scan_id], db.annotations.get(scan_id, [])
    if not annotations:
        return []
    contours = [db.contours[a.id] for a in annotations]
    closed = [annotation_mask(c, scan, include_outline=True) for c in contours]
    nodules = []
    for group in cluster_annotations(closed, scan.spacing):
        offset, shape = BoxMask.bounding(closed[i] for i in group)
        low = tuple(max(o - pad, 0) for o in offset)
        shape = tuple(o + s + pad - lo for o, s, lo in zip(offset, shape, low, strict=True))
        masks = np.stack([annotation_mask(contours[i], scan, include_outline, low, shape).array for i in group])
        ids = tuple(annotations[i].id for i in group)
        nodules.append(Nodule(scan_id, ids, low, masks, scan.spacing))  # type: ignore[arg-type]
    return nodules


# ---------------------------------------------------------------------------------------------------------------
# nodules as dataset cases


@dataclass(eq=False)
class NoduleCase:
    """One nodule to convert: its case id, its scan, its index among the scan's nodules and the readers' masks."""

    case_id: str
    scan: Scan
    index: int
    nodule: Nodule


def nodule_cases(db: LIDC, scan_ids: Iterable[int], min_readers: int = 2, fraction: float = 0.5) -> list[NoduleCase]:
    """Nodules of ``scan_ids`` with at least ``min_readers`` readers and a non-empty consensus, in scan order.

    The index is the nodule's position in :py:func:`scan_nodules` (as in the ``stats`` CSV); the case id is
    ``<patient id>_s<scan id, 4 digits>_n<index, 2 digits>``, e.g. ``LIDC-IDRI-0078_s0001_n00``.
    """
    cases = []
    for scan_id in scan_ids:
        scan = db.scans[scan_id]
        for index, nodule in enumerate(scan_nodules(db, scan_id)):
            if len(nodule.annotation_ids) >= min_readers and nodule.consensus(fraction).any():
                cases.append(NoduleCase(f"{scan.patient_id}_s{scan_id:04d}_n{index:02d}", scan, index, nodule))
    return cases


def parse_reader(value: str | int) -> str | int:
    """``"first"``, ``"random"`` or a non-negative reader index (see :py:func:`choose_reader`)."""
    text = str(value).strip().lower()
    if text in ("first", "random"):
        return text
    if text.isdigit():
        return int(text)
    raise ValueError(f"reader must be 'first', 'random' or a reader index >= 0, got {value!r}.")


def choose_reader(rule: str | int, n_readers: int, seed: int, scan_id: int, index: int) -> int:
    """Which of a nodule's readers (in annotation-id order) gives its training label.

    ``"first"``: reader 0; an index N: reader N modulo the number of readers (so N = 0..3 give four label sets,
    each a single reader's); ``"random"``: drawn from ``default_rng([seed, scan_id, index])``, the same for a
    nodule whatever else is converted. The database does not say which radiologist drew an annotation.
    """
    if rule == "first":
        return 0
    if rule == "random":
        return int(np.random.default_rng([seed, scan_id, index]).integers(n_readers))
    return int(rule) % n_readers
