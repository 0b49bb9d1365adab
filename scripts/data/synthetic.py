"""
Deterministic synthetic 3D segmentation dataset with partly corrupted training labels.

Each case contains bright ellipsoidal "blobs" (class 1) and one dark curved "tube" (class 2) in a textured
background, imaged with partial-volume blur, a smooth bias field and noise. The training labels of a random
fraction of the cases are eroded or dilated by :py:class:`RandErodeDilateLabeld`; the clean labels and the masks
of changed voxels are kept alongside for evaluation. The files follow the Medical Segmentation Decathlon layout.

Usage from the bundle root::

    python -m scripts.data --out_dir data/default --seed 0
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from scripts.data.corruption import RandErodeDilateLabeld, RandLabelCorruptiond, make_corruption
from scripts.utils import DATALIST, SPLITS, check_number, write_json, write_nifti

__all__ = [
    "case_files",
    "centred_affine",
    "DEFAULT_SPLITS",
    "DEFAULT_VARIETY",
    "dataset_parser",
    "generate_dataset",
    "make_case",
    "plan_cases",
    "reuse_existing",
    "smooth_noise",
    "VARIETIES",
    "Variety",
]

LABELS = {"0": "background", "1": "blob", "2": "tube"}
MIN_SIZE = 16
# geometry is defined in the voxel units of a reference 48^3 volume and scaled per axis to the requested shape
REF_SIZE = 48.0
NO_TUBE_PROB = 0.15
# the default data (data/default, the one the model card reports): cases per split (training, meta, validation,
# test) and their variety. 48 noisy cases that vary more than the standard ones and only 4 clean cases, the regime
# where a noisy-label method can matter: trained on the 4 clean cases alone, the network is 8 Dice points below
# the 48 with clean labels (docs/results.md, section 1)
DEFAULT_SPLITS = (48, 4, 8, 8)
DEFAULT_VARIETY = "wide"


@dataclass(frozen=True)
class Variety:
    """How much cases differ: the ranges each case's structures and imaging are drawn from (reference 48^3 voxels).
    A range whose ends are equal is a constant and draws nothing, so adding a range leaves the other cases' draws
    (and the ``standard`` datasets) unchanged."""

    blob_count: tuple[int, int] = (1, 3)
    blob_radius: tuple[float, float] = (4.0, 11.0)
    blob_contrast: tuple[float, float] = (0.4, 1.0)
    tube_radius: tuple[float, float] = (2.0, 4.0)
    tube_contrast: tuple[float, float] = (0.4, 0.8)
    texture: tuple[float, float] = (0.05, 0.12)
    blur: tuple[float, float] = (1.0, 1.0)
    bias: tuple[float, float] = (0.1, float(np.log(1.3)))
    noise: tuple[float, float] = (0.1, 0.25)


# ``standard``: the cases of the small-data setting; ``wide``: structures, contrast, blur, bias and noise that vary
# more between cases, so that four clean cases no longer show what forty-eight noisy ones do (docs/results.md)
VARIETIES = {
    "standard": Variety(),
    "wide": Variety(
        blob_count=(1, 5),
        blob_radius=(3.0, 12.0),
        blob_contrast=(0.35, 1.2),
        tube_radius=(1.5, 4.5),
        tube_contrast=(0.35, 0.9),
        texture=(0.04, 0.15),
        blur=(0.7, 1.3),
        bias=(0.1, float(np.log(1.5))),
        noise=(0.08, 0.28),
    ),
}


def _draw(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    """A uniform draw from ``bounds``; the constant itself, drawing nothing, when both ends are equal."""
    return float(bounds[0]) if bounds[0] == bounds[1] else float(rng.uniform(*bounds))


def _reference_grid(shape: Sequence[int]) -> np.ndarray:
    """Voxel-centre coordinates in reference units, shape ``(*shape, 3)``."""
    axes = [(np.arange(n) + 0.5) * REF_SIZE / n for n in shape]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly distributed 3D rotation matrix (QR decomposition of a Gaussian matrix)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    return q * np.sign(np.linalg.det(q))


def _ellipsoid(rng: np.random.Generator, grid: np.ndarray, radius: tuple[float, float]) -> np.ndarray:
    """Mask of one randomly placed, oriented and sized ellipsoid."""
    centre = rng.uniform(0.25 * REF_SIZE, 0.75 * REF_SIZE, size=3)
    radii = rng.uniform(*radius, size=3)
    local = (grid - centre) @ _random_rotation(rng)
    return ((local / radii) ** 2).sum(axis=-1) <= 1.0


def _tube(rng: np.random.Generator, grid: np.ndarray, radius_range: tuple[float, float]) -> np.ndarray:
    """Mask of a tube of constant radius around a smooth sinusoidal path that crosses most of the volume."""
    axis = rng.integers(3)
    t = np.linspace(0.0, 1.0, 16 * int(REF_SIZE))
    path = np.empty((t.size, 3))
    start, stop = rng.uniform(0.0, 0.2) * REF_SIZE, rng.uniform(0.8, 1.0) * REF_SIZE
    path[:, axis] = start + (stop - start) * t
    for other in np.delete(np.arange(3), axis):
        centre = rng.uniform(0.35, 0.65) * REF_SIZE
        amplitude = rng.uniform(0.08, 0.2) * REF_SIZE
        cycles, phase = rng.uniform(0.5, 1.5), rng.uniform(0.0, 2 * np.pi)
        path[:, other] = centre + amplitude * np.sin(2 * np.pi * cycles * t + phase)
    radius = rng.uniform(*radius_range)
    distance, _ = cKDTree(path).query(grid.reshape(-1, 3), distance_upper_bound=radius)
    return np.isfinite(distance).reshape(grid.shape[:-1])


def smooth_noise(rng: np.random.Generator, shape: Sequence[int], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to unit standard deviation."""
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma)
    return field / field.std()


def _bias_field(rng: np.random.Generator, shape: Sequence[int], strength: tuple[float, float]) -> np.ndarray:
    """Multiplicative field ``exp(p)`` of a random quadratic polynomial ``p`` with ``max|p|`` drawn from ``strength``
    (up to log(1.3) in the standard variety)."""
    x, y, z = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in shape], indexing="ij")
    terms = np.stack([x, y, z, x * y, x * z, y * z, x**2, y**2, z**2], axis=-1)
    poly = terms @ rng.normal(size=terms.shape[-1])
    return np.exp(poly * rng.uniform(*strength) / np.abs(poly).max())


def make_case(
    rng: np.random.Generator, shape: Sequence[int] = (48, 48, 48), variety: str = "standard"
) -> tuple[np.ndarray, np.ndarray]:
    """
    Draw one synthetic case.

    The label has 1-3 ellipsoidal blobs (class 1) and, except in about 15% of the cases, one curved tube
    (class 2). The tube is drawn last and wins where it crosses a blob, like a vessel passing through an organ;
    blobs never overwrite it. Structure sizes scale with ``shape`` (blob radii 4-11, tube radius 2-4 voxels at
    48^3). The image has background texture, blobs brighter and the tube darker than the background with a
    contrast that varies per case from moderate to weak, partial-volume blur, a multiplicative bias field of up
    to about +-30% and Gaussian noise of varying strength; the background is around 0 and all values lie in
    about [-1.6, 2]. These are the ranges of the ``standard`` :py:data:`VARIETIES`; ``wide`` widens them.

    Args:
        rng: random generator; the case is a deterministic function of its state.
        shape: spatial shape of the volume.
        variety: a name of :py:data:`VARIETIES`.

    Returns:
        a float32 image and a uint8 label, both of ``shape``.
    """
    if variety not in VARIETIES:
        raise ValueError(f"variety must be one of {sorted(VARIETIES)}, got {variety!r}.")
    ranges = VARIETIES[variety]
    shape = tuple(int(s) for s in shape)
    grid = _reference_grid(shape)
    label = np.zeros(shape, np.uint8)
    ideal = np.ones(shape)
    blob_contrast = rng.uniform(*ranges.blob_contrast)
    for _ in range(rng.integers(ranges.blob_count[0], ranges.blob_count[1] + 1)):
        blob = _ellipsoid(rng, grid, ranges.blob_radius)
        label[blob] = 1
        ideal[blob] = 1.0 + blob_contrast * rng.uniform(0.8, 1.2)
    if rng.random() >= NO_TUBE_PROB:
        tube = _tube(rng, grid, ranges.tube_radius)
        label[tube] = 2
        ideal[tube] = 1.0 - rng.uniform(*ranges.tube_contrast)
    ideal += rng.uniform(*ranges.texture) * smooth_noise(rng, shape, sigma=2.0)
    blur = _draw(rng, ranges.blur)
    image = ndimage.gaussian_filter(ideal, sigma=blur) * _bias_field(rng, shape, ranges.bias)
    image += rng.normal(scale=rng.uniform(*ranges.noise), size=shape)
    return (image - 1.0).astype(np.float32), label


def centred_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """Diagonal voxel-to-world affine with the volume centred at the world origin."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -0.5 * (np.asarray(shape) - 1) * np.asarray(spacing)
    return affine


def case_files(split: str, case_id: str) -> dict[str, str]:
    """Datalist entry of one case: the files relative to the dataset folder (test cases in ``*Ts`` as in MSD)."""
    suffix = "Ts" if split == "test" else "Tr"
    files = {"image": f"images{suffix}/{case_id}.nii.gz", "label": f"labels{suffix}/{case_id}.nii.gz"}
    if split == "training":
        files.update(clean_label=f"labelsClean/{case_id}.nii.gz", corruption_mask=f"corruptionMasks/{case_id}.nii.gz")
    return files


def _validate(generator: dict) -> None:
    """Check the generation parameters recorded under ``generator``."""
    check_number("seed", generator["seed"], 0, integer=True)
    for split in SPLITS:
        name = f"num_{split}"
        check_number(name, generator[name], 1 if split in ("training", "meta") else 0, integer=True)
    for name, size in (("shape", 3), ("spacing", 3), ("radius", 2)):
        if len(generator[name]) != size:
            raise ValueError(f"{name} must have {size} entries, got {generator[name]}.")
    for size in generator["shape"]:
        check_number("shape entries", size, MIN_SIZE, integer=True)
    for step in generator["spacing"]:
        if not step > 0:
            raise ValueError(f"spacing entries must be > 0, got {generator['spacing']}.")
    check_number("corrupt_fraction", generator["corrupt_fraction"], 0.0, 1.0)
    if generator.get("variety", "standard") not in VARIETIES:
        raise ValueError(f"variety must be one of {sorted(VARIETIES)}, got {generator['variety']!r}.")


def reuse_existing(out_dir: Path, generator: dict, files: list[str], overwrite: bool) -> bool:
    """
    Whether ``out_dir`` already holds this exact dataset; raise FileExistsError if it holds anything this
    generator would overwrite and ``overwrite`` is False.
    """
    if overwrite:
        return False
    datalist = out_dir / DATALIST
    if datalist.is_file():
        recorded = json.loads(datalist.read_text()).get("generator")
        if recorded == generator:
            return True
        raise FileExistsError(
            f"{datalist} was generated with the parameters {recorded}, not the requested {generator}; "
            "choose another out_dir or pass overwrite=True to regenerate it."
        )
    existing = [name for name in files if (out_dir / name).exists()]
    if existing:
        raise FileExistsError(
            f"{out_dir} already contains {existing[0]} (and {len(existing) - 1} more files this generator writes) "
            "but no datalist.json; choose another out_dir or pass overwrite=True to replace these files."
        )
    return False


def plan_cases(seed: int, counts: dict[str, int]) -> list[tuple[str, np.random.SeedSequence, str]]:
    """``(split, seed sequence, case id)`` of every case; ids are numbered across the splits."""
    seeds = [
        (split, np.random.SeedSequence(seed, spawn_key=(split_index, index)))
        for split_index, split in enumerate(SPLITS)
        for index in range(counts[split])
    ]
    return [(split, case_seed, f"case_{number:03d}") for number, (split, case_seed) in enumerate(seeds)]


def _write_case(
    out_dir: Path,
    split: str,
    case_seed: np.random.SeedSequence,
    case_id: str,
    shape: Sequence[int],
    affine: np.ndarray,
    corrupter: RandLabelCorruptiond,
    variety: str = "standard",
) -> dict:
    """Draw one case, corrupt its label if it is a training case, write its files and return its datalist entry."""
    image, label = make_case(np.random.default_rng(case_seed), shape, variety)
    arrays = {"image": image, "label": label}
    if split == "training":
        corrupted = corrupter({"label": label})
        arrays.update(label=corrupted["label"], clean_label=label, corruption_mask=corrupted["corruption_mask"])
    entry: dict = case_files(split, case_id)
    for key, name in entry.items():
        write_nifti(arrays[key], affine, out_dir / name)
    if split == "training":
        entry["corrupted"] = bool(arrays["corruption_mask"].any())
    return entry


def generate_dataset(
    out_dir: str | Path,
    seed: int = 0,
    num_training: int = DEFAULT_SPLITS[0],
    num_meta: int = DEFAULT_SPLITS[1],
    num_validation: int = DEFAULT_SPLITS[2],
    num_test: int = DEFAULT_SPLITS[3],
    shape: Sequence[int] = (48, 48, 48),
    spacing: Sequence[float] = (1.5, 1.5, 2.0),
    corrupt_fraction: float = 0.5,
    radius: Sequence[int] = (2, 3),
    corruption: str | Mapping[str, Any] | None = None,
    variety: str = DEFAULT_VARIETY,
    overwrite: bool = False,
) -> Path:
    """
    Write a synthetic dataset in the Medical Segmentation Decathlon layout and return the path of its datalist.

    Cases are numbered ``case_000, case_001, ...`` across the splits ``training, meta, validation, test``. Every
    case is drawn from its own seed ``SeedSequence(seed, spawn_key=(split, index))``, so a case does not change
    when the sizes of the other splits change. The training labels are corrupted by
    :py:class:`RandErodeDilateLabeld` with ``prob=corrupt_fraction`` and ``radius``, seeded from ``seed``; the
    clean labels go to ``labelsClean`` and the masks of changed voxels to ``corruptionMasks``. The labels of the
    meta, validation and test cases are clean. ``datalist.json`` is written last and records the parameters
    under ``generator``; if it already exists with the same parameters the folder is reused as it is.

    Args:
        out_dir: dataset folder, created if needed.
        seed: non-negative integer seed; the same seed gives identical arrays and datalist.
        num_training: number of (partly corrupted) training cases, >= 1.
        num_meta: number of clean meta cases, >= 1.
        num_validation: number of validation cases, >= 0.
        num_test: number of test cases, >= 0.
        shape: spatial shape of every volume, entries >= 16.
        spacing: voxel spacing written to the NIfTI headers.
        corrupt_fraction: probability that a training label is corrupted, in [0, 1].
        radius: inclusive integer range of the erosion/dilation radius in voxels.
        corruption: another noise model instead of erosion/dilation: a preset name or spec of
            :py:func:`scripts.data.corruption.make_corruption` (``radius`` is then unused); recorded in the datalist.
        variety: how much the cases differ, a name of :py:data:`VARIETIES`; recorded in the datalist unless
            ``standard``.
        overwrite: replace the files this generator writes if ``out_dir`` already holds any of them.

    Raises:
        ValueError: when an argument is out of range.
        FileExistsError: when ``out_dir`` holds a different dataset or other files this generator would
            overwrite, and ``overwrite`` is False.
    """
    check_number("seed", seed, 0, integer=True)
    counts = {"training": num_training, "meta": num_meta, "validation": num_validation, "test": num_test}
    generator = {
        "seed": int(seed),
        **{f"num_{split}": count for split, count in counts.items()},
        "shape": [int(s) for s in shape],
        "spacing": [float(s) for s in spacing],
        "corrupt_fraction": float(corrupt_fraction),
        "radius": [int(r) for r in radius],
        # as JSON gives it back, so that a spec with tuples still matches the recorded one when reused
        **({"corruption": json.loads(json.dumps(corruption))} if corruption is not None else {}),
        # recorded only when not the standard variety, so that the datalists written before it existed still match
        **({"variety": variety} if variety != "standard" else {}),
    }
    _validate(generator)
    if corruption is None:
        corrupter: RandLabelCorruptiond = RandErodeDilateLabeld(
            keys="label", prob=corrupt_fraction, radius=tuple(generator["radius"])
        )
    else:
        corrupter = make_corruption(corruption, prob=corrupt_fraction)
    corruption_seed = np.random.SeedSequence(generator["seed"], spawn_key=(len(SPLITS),)).generate_state(1)[0]
    corrupter.set_random_state(int(corruption_seed))

    out_dir = Path(out_dir)
    cases = plan_cases(generator["seed"], counts)
    all_files = [name for split, _, case_id in cases for name in case_files(split, case_id).values()]
    if reuse_existing(out_dir, generator, [*all_files, DATALIST], overwrite):
        return out_dir / DATALIST

    entries: dict[str, list[dict]] = {split: [] for split in SPLITS}
    affine = centred_affine(generator["shape"], generator["spacing"])
    for folder in {Path(name).parent for name in all_files}:
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
    for split, case_seed, case_id in cases:
        entries[split].append(
            _write_case(out_dir, split, case_seed, case_id, generator["shape"], affine, corrupter, variety)
        )

    datalist = {
        "name": "SyntheticBlobsTubes",
        "description": "Synthetic 3D blobs and tubes; part of the training labels are eroded or dilated.",
        "tensorImageSize": "3D",
        "modality": {"0": "synthetic"},
        "labels": LABELS,
        "numTraining": num_training,
        "numTest": num_test,
        "generator": generator,
        **entries,
    }
    return write_json(datalist, out_dir / DATALIST)


def dataset_parser(
    prog: str, description: str, out_dir: str, shape: Sequence[int], splits: Sequence[int] = (16, 4, 4, 6)
) -> argparse.ArgumentParser:
    """The options every dataset generator takes: folder, seed, split sizes (default ``splits``: training, meta,
    validation, test), volume shape and overwrite."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--out_dir", default=out_dir, help=f"dataset folder (default: {out_dir})")
    parser.add_argument("--seed", type=int, default=0)
    for split, count in zip(SPLITS, splits, strict=True):
        parser.add_argument(f"--num_{split}", type=int, default=count)
    parser.add_argument("--shape", type=int, nargs=3, default=list(shape), help="volume shape x y z")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an existing dataset")
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    """Command line entry point: generate the dataset and print the datalist path and a summary."""
    description = __doc__.strip().splitlines()[0]
    parser = dataset_parser("python -m scripts.data", description, "data/default", (48, 48, 48), DEFAULT_SPLITS)
    parser.add_argument("--spacing", type=float, nargs=3, default=[1.5, 1.5, 2.0])
    parser.add_argument(
        "--corrupt_fraction",
        type=float,
        default=0.5,
        help="probability that each training label is corrupted, drawn per case (not an exact share of the cases)",
    )
    parser.add_argument("--radius", type=int, nargs=2, default=[2, 3], help="min and max erosion/dilation radius")
    parser.add_argument(
        "--variety",
        choices=sorted(VARIETIES),
        default=DEFAULT_VARIETY,
        help=f"how much the cases differ (default: {DEFAULT_VARIETY})",
    )
    parser.add_argument(
        "--corruption",
        type=lambda text: json.loads(text) if text.lstrip().startswith("{") else text,
        help="another noise model: a preset name of scripts.data.corruption.PRESETS or a JSON spec "
        "(default: erosion/dilation)",
    )
    args = vars(parser.parse_args(argv))
    path = generate_dataset(**args)
    datalist = json.loads(path.read_text())
    num_corrupted = sum(entry["corrupted"] for entry in datalist["training"])
    print(path)
    print(
        f"training={len(datalist['training'])} ({num_corrupted} corrupted) meta={len(datalist['meta'])} "
        f"validation={len(datalist['validation'])} test={len(datalist['test'])}"
    )
    expected = args["corrupt_fraction"] * len(datalist["training"])
    if abs(num_corrupted - expected) >= 1:
        print(
            f"note: --corrupt_fraction {args['corrupt_fraction']:g} is the probability that each training label is "
            f"corrupted, so {num_corrupted} of {len(datalist['training'])} were (expected {expected:g}); another "
            "--seed draws again"
        )
    return path


if __name__ == "__main__":
    main()
