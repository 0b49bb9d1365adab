"""
LIDC-IDRI DICOMs to the bundle's dataset: each scan's series found and checked against the database, a patch cut
around every nodule with two or more readers, and the image, every reader's mask and the consensus written as
NIfTI with the datalist (training labels from single readers, clean labels from the consensus).

NIfTI arrays are ``[column, row, slice]`` (x, y, z), the database masks transposed ``(1, 0, 2)``, with the affine
of the DICOM geometry in RAS. pydicom is imported only where a DICOM file is read, so the rest of
:py:mod:`scripts.lidc` (statistics, the phantom) works without it.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from scripts.data.datalists import split_cases, write_datalist
from scripts.lidc.database import LIDC, Z_TOLERANCE_MM, Scan
from scripts.lidc.nodules import LIDC_LABELS, NoduleCase, choose_reader, nodule_cases, parse_reader
from scripts.lidc.raster import BoxMask, patch_start
from scripts.utils import DATALIST, SPLITS, write_nifti

if TYPE_CHECKING:
    from pydicom import Dataset

__all__ = [
    "AIR_HU",
    "DEFAULT_PATCH",
    "DicomSeries",
    "case_files",
    "check_series",
    "convert_case",
    "convert_lidc",
    "cut_patch",
    "dicom_files",
    "find_series",
    "read_series_headers",
    "select_scans",
]

AIR_HU = -1024
DEFAULT_PATCH = (64, 64, 32)
# the datalist's file name in the output folder, as the dataset generators name theirs
_ORIENTATION_ATOL = 1e-4
_SPACING_ATOL_MM = 1e-3
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # DICOM's patient frame (LPS) to NIfTI's (RAS)


# ---------------------------------------------------------------------------------------------------------------
# the series on disk


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
        import pydicom  # only converting DICOMs needs pydicom (see the module's docstring)

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
    import pydicom  # only converting DICOMs needs pydicom (see the module's docstring)

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
    found: Counter[str] = Counter()
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
    for path, (_, orientation, spacing, size) in zip(paths, geometry, strict=True):
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
    same = np.flatnonzero(np.diff(positions[:, 2]) <= Z_TOLERANCE_MM)
    if len(same):
        k = int(same[0])
        raise ValueError(f"{paths[k]} and {paths[k + 1]} are both at z = {positions[k, 2]} mm: a duplicated slice?")
    folder = Path(os.path.commonpath([str(path.parent) for path in paths]))
    return DicomSeries(folder, series_uid, tuple(paths), positions, first[1], first[2], *first[3])


def _z_range(zs: np.ndarray) -> str:
    """``"first .. last"`` of sorted slice positions, for messages."""
    return f"{zs[0]:g} .. {zs[-1]:g}" if len(zs) else "(none)"


def check_series(series: DicomSeries, scan: Scan) -> None:
    """Raise ValueError naming the series folder unless its slice z positions and pixel spacing are the
    database's for ``scan`` (within 0.01 mm and 0.001 mm): the contours are placed by these."""
    zs, expected = series.zvals, scan.slice_zvals
    where = f"{series.folder}: series {series.series_instance_uid} of {scan.patient_id} (scan {scan.id})"
    if len(zs) != len(expected) or np.abs(zs - expected).max() > Z_TOLERANCE_MM:
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


# ---------------------------------------------------------------------------------------------------------------
# patches


def cut_patch(series: DicomSeries, start: Sequence[int], shape: Sequence[int], fill: float = AIR_HU) -> np.ndarray:
    """HU of the ``[row, column, slice]`` box at ``start`` of ``shape``, ``fill`` (air) where it leaves the scan;
    only the slices it needs are read."""
    out = np.full(tuple(int(s) for s in shape), float(fill))
    source, target = [], []
    for size, first, length in zip(series.shape, start, shape, strict=True):
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


def _write_patch(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a ``[row, column, slice]`` array as NIfTI ``[column, row, slice]`` (x, y, z) with ``affine`` (scanner
    frame) and millimetre units, atomically."""
    write_nifti(np.ascontiguousarray(np.transpose(array, (1, 0, 2))), affine, path, units="mm")


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
    _write_patch(_hu_array(cut_patch(series, start, shape)), affine, out_dir / files["image"])
    _write_patch(clean.astype(np.uint8), affine, out_dir / files["consensus"])
    for r, mask in enumerate(masks):
        _write_patch(mask.astype(np.uint8), affine, out_dir / files[f"reader{r}"])
    entry: dict = {"image": files["image"], "label": files["consensus"]}
    if reader is not None:
        changed = masks[reader] != clean
        _write_patch(changed.astype(np.uint8), affine, out_dir / files["corruption_mask"])
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


# ---------------------------------------------------------------------------------------------------------------
# the whole conversion


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

    ``db`` is the database or any :py:class:`scripts.lidc.LIDC` (the tests build a synthetic one). For each nodule:
    the image (HU, air -1024 beyond the scan) on a ``patch`` = (x, y, z) voxel box centred on the consensus
    centroid, the ``fraction`` consensus and every reader's mask, with the affine of the DICOM geometry. Patients
    are split with :py:func:`scripts.data.datalists.split_cases` (``num_*`` count patients; a patient's nodules stay
    together). Training labels are one reader's mask (:py:func:`scripts.lidc.choose_reader`), with the consensus
    as ``clean_label`` and their difference as ``corruption_mask``; the other splits have the consensus as label.
    ``patients`` (patient ids) limits the conversion to them. Nothing is written in ``dicom_dir``;
    ``out_dir/datalist.json`` is written last, atomically, and replaced only with ``overwrite``. Returns its path.

    Raises:
        FileNotFoundError: a patient folder or series is missing.
        FileExistsError: the datalist exists and ``overwrite`` is False.
        ValueError: a bad argument, a series that disagrees with the database, or too few patients to split.
    """
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
