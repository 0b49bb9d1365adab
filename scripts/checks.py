"""
Check a Decathlon-style datalist and every file it references before training starts.

A training run that silently learns from a misaligned label, or stops after hours on a missing file, costs far
more than reading all headers up front. :py:func:`validate_datalist` collects every problem it finds and raises
them together in one :py:class:`DatalistError`, one problem per line. :py:func:`check_training_config` does the
same for the training settings of ``configs/train.json`` (one :py:class:`ConfigError`).

Usage from the bundle root::

    python -m scripts.checks --datalist data/default/datalist.json
"""

from __future__ import annotations

import argparse
import ast
import difflib
import gzip
import inspect
import json
import logging
import os
import shutil
import sys
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.bundle.scripts import run
from monai.bundle.utils import DEFAULT_MLFLOW_SETTINGS
from monai.config import KeysCollection
from monai.transforms import LoadImage, MapTransform

from scripts.options import option_problems
from scripts.utils import SPLITS, BundleInputError, ProblemsError, file_hash, number_problem

__all__ = [
    "BundleInputError",
    "CheckImaged",
    "ConfigError",
    "DatalistError",
    "OverrideError",
    "brief_error",
    "bundle_error",
    "channel_problem",
    "check_before_training",
    "check_override_keys",
    "check_training_config",
    "install_excepthook",
    "load_datalist",
    "output_dir_problem",
    "override_problems",
    "read_volume",
    "validate_datalist",
]

logger = logging.getLogger(__name__)

FILE_KEYS = ("image", "label", "clean_label", "corruption_mask")
LABEL_KEYS = ("label", "clean_label")
WARNING = "warning: "
SPACING_RTOL = 1e-3
AFFINE_ATOL = 1e-3
REQUIRED_BECAUSE = {
    "training": "at least one training case is needed",
    "meta": "MCPM needs at least one clean meta case to learn the voxel weights from",
    "validation": "the best model.pt is chosen on the validation cases: without one no model.pt would be saved",
}
MAX_LISTED = 8
MAX_MESSAGE = 200


PACKAGE_DIR = Path(__file__).resolve().parent


def _raised_here(error: BaseException) -> bool:
    """Whether ``error`` was raised by this bundle's own code (the last frame of its traceback is in ``scripts``)."""
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and PACKAGE_DIR in Path(frame.tb_frame.f_code.co_filename).resolve().parents


def bundle_error(error: BaseException | None) -> BaseException | None:
    """The bundle's own error behind ``error`` (its cause or context chain): a :py:class:`BundleInputError`, or
    else the first cause that the bundle's code raised (a missing resume checkpoint, too many non-finite steps),
    whose message is meant for the user as well."""
    chain: list[BaseException] = []
    while error is not None and all(error is not e for e in chain):
        if isinstance(error, BundleInputError):
            return error
        chain.append(error)
        error = error.__cause__ or error.__context__
    return next((e for e in chain if _raised_here(e)), None)


def _excepthook(kind: type[BaseException], error: BaseException, traceback: Any) -> None:
    """Print the traceback as Python does, then the bundle's own message again as the last lines, and exit 1."""
    _previous_excepthook(kind, error, traceback)
    cause = bundle_error(error)
    if cause is None:
        return
    if cause is not error:
        print(f"\nerror: {cause}", file=sys.stderr)
    # end here: at interpreter shutdown, threads of native libraries can print after the message (seen:
    # "terminate called without an active exception"), and nothing started by then needs a clean exit
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


_previous_excepthook = sys.excepthook


def install_excepthook() -> None:
    """Make the message of an uncaught :py:class:`BundleInputError`, or of another error the bundle's code raised
    (also one wrapped by MONAI's config parser), the last thing a command prints; the exit status is 1.
    Installed when this module is imported, which every bundle config does through its checks; calling it again
    does nothing."""
    if sys.excepthook is not _excepthook:
        global _previous_excepthook
        _previous_excepthook = sys.excepthook
        sys.excepthook = _excepthook


install_excepthook()


class DatalistError(ProblemsError):
    """A datalist or the files it references cannot be used; ``problems`` lists every problem found."""

    heading = "datalist check failed"


@dataclass(frozen=True)
class Volume:
    """Shape and voxel-to-world (RAS) affine of a file, with its voxels when they were read."""

    shape: tuple[int, ...]
    affine: np.ndarray
    data: np.ndarray | None = None


def brief_error(error: Exception) -> str:
    """First line of a library's error message, shortened, with the exception type."""
    lines = str(error).strip().splitlines() or [""]
    message = lines[0] if len(lines[0]) <= MAX_MESSAGE else lines[0][:MAX_MESSAGE] + "..."
    return f"{type(error).__name__}: {message}"


def _listed(values: np.ndarray) -> str:
    """``values`` as a short list, e.g. ``[3, 7]`` or ``[0.5, ...]``."""
    items = [f"{value:g}" for value in values[:MAX_LISTED].tolist()]
    return "[" + ", ".join(items + ["..."] * (len(values) > MAX_LISTED)) + "]"


def _nifti_data_size(path: Path, expected: int) -> int:
    """
    Bytes stored in the NIfTI file ``path``, found without reading the voxels where possible: the file size if
    it is not compressed, the uncompressed size recorded in the gzip trailer (modulo 2**32) if that matches
    ``expected``, and by decompressing the whole file otherwise (truncated or multi-member gzip files).
    """
    if path.suffix != ".gz":
        return path.stat().st_size
    with path.open("rb") as stream:
        stream.seek(-4, os.SEEK_END)
        if int.from_bytes(stream.read(4), "little") == expected % 2**32:
            return expected
    size = 0
    with gzip.open(path) as stream:
        while chunk := stream.read(1 << 24):
            size += len(chunk)
    return size


def _read_nifti(path: Path, with_data: bool) -> Volume:
    """Read the header of a NIfTI file with nibabel, and the voxels if ``with_data``, else check their size."""
    image = nib.load(path)
    if with_data:
        return Volume(tuple(image.shape), image.affine, np.asanyarray(image.dataobj))
    proxy = image.dataobj
    expected = proxy.offset + proxy.dtype.itemsize * int(np.prod(proxy.shape))
    size = _nifti_data_size(path, expected)
    if size < expected:
        raise ValueError(f"file is truncated: {size} bytes, the header declares {expected}")
    return Volume(tuple(image.shape), image.affine)


def _read_itk(path: Path, with_data: bool) -> Volume:
    """Read a non-NIfTI file or DICOM folder with MONAI's ITK reader, as training would (the voxels are read)."""
    image, meta = LoadImage(image_only=False, reader="ITKReader", dtype=None)(str(path))
    data, affine = np.asarray(image), np.asarray(meta["affine"], dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"has {affine.shape[0] - 1} spatial dimensions (shape {data.shape}), expected 3")
    return Volume(data.shape, affine, data if with_data else None)


def read_volume(path: Path, with_data: bool) -> Volume:
    """Read ``path``: NIfTI files with nibabel, anything else with ITK."""
    if path.name.endswith((".nii", ".nii.gz")):
        if path.is_dir():
            raise IsADirectoryError("is a directory, expected a NIfTI file")
        return _read_nifti(path, with_data)
    return _read_itk(path, with_data)


# intensities this large overflow float32 arithmetic (the square in a standard deviation) during normalisation
OVERFLOW = 1e18


class CheckImaged(MapTransform):
    """Refuse an image with NaN, infinite or overflowing voxels, naming its file, and warn about one whose voxels
    all have one value. The datalist check reads headers only; this reads the voxels once, where they are loaded
    anyway: put it right after ``LoadImaged`` among the cached (deterministic) transforms."""

    def __init__(self, keys: KeysCollection = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key])
            name = getattr(d[key], "meta", {}).get("filename_or_obj", f"the {key!r} of a case")
            bad = int((~(torch.isfinite(image) & (image.abs() <= OVERFLOW))).sum())
            if bad:
                raise BundleInputError(
                    f"{name}: {bad} of {image.numel()} voxels are NaN, infinite or beyond +-{OVERFLOW:g}; "
                    "repair or remove the case (a single such voxel makes the whole normalised image NaN)"
                )
            if image.numel() and bool(image.max() == image.min()):
                logger.warning(
                    f"{name}: every voxel is {float(image.flatten()[0]):g}; the image carries no information"
                )
        return d


def channel_problem(shape: tuple[int, ...], channels: int) -> str | None:
    """
    Why ``shape`` is not a 3D volume with ``channels`` channels: ``(X, Y, Z)`` stands for one channel and
    ``(X, Y, Z, C)`` has the channels last, as NIfTI and ITK store them.
    """
    if len(shape) < 3:
        return f"is {len(shape)}D with shape {shape}, expected a 3D volume"
    if len(shape) > 4:
        return f"is {len(shape)}D with shape {shape}, expected (X, Y, Z) or (X, Y, Z, C)"
    found = shape[3] if len(shape) == 4 else 1
    if found != channels:
        return f"has {found} channels (shape {shape}), expected {channels}"
    return None


def _geometry_problem(volume: Volume, reference_key: str, reference: Volume) -> str | None:
    """How the spatial shape, voxel spacing or affine of ``volume`` differs from that of ``reference``."""
    if volume.shape[:3] != reference.shape[:3]:
        return f"spatial shape {volume.shape[:3]} differs from {reference_key} shape {reference.shape[:3]}"
    spacing, reference_spacing = (np.linalg.norm(v.affine[:3, :3], axis=0) for v in (volume, reference))
    if not np.allclose(spacing, reference_spacing, rtol=SPACING_RTOL, atol=0):
        return (
            f"voxel spacing {np.round(spacing, 4).tolist()} differs from {reference_key} spacing "
            f"{np.round(reference_spacing, 4).tolist()}"
        )
    if not np.allclose(volume.affine, reference.affine, rtol=0, atol=AFFINE_ATOL):
        return (
            f"affine (orientation or origin) {np.round(volume.affine[:3], 3).tolist()} differs from "
            f"{reference_key} affine {np.round(reference.affine[:3], 3).tolist()}"
        )
    return None


def _value_problem(data: np.ndarray, num_values: int) -> str | None:
    """Why ``data`` is not made of integers in ``0..num_values-1`` (class indices, or 0/1 for a mask)."""
    if data.dtype.kind not in "biuf":
        return f"has data type {data.dtype}, expected integers in 0..{num_values - 1}"
    values = np.unique(data)
    fractional = values[values != np.round(values)]  # NaN included
    if fractional.size:
        return f"has non-integer values {_listed(fractional)}, expected integers in 0..{num_values - 1}"
    outside = values[(values < 0) | (values >= num_values)]
    if outside.size:
        return f"values {_listed(outside)} outside 0..{num_values - 1}"
    return None


def _content_problems(prefix: str, key: str, data: np.ndarray, split: str, num_classes: int) -> list[str]:
    """
    Problems of the voxels of a label (class indices) or corruption mask (0/1). An all-background label is an
    error in the clean splits, which score or steer training with it, and only a warning in ``training``.
    """
    value_problem = _value_problem(data, num_classes if key in LABEL_KEYS else 2)
    if value_problem:
        return [f"{prefix} {value_problem}"]
    if key in LABEL_KEYS and not data.any():
        severity = WARNING if split == "training" else ""
        return [f"{severity}{prefix} is all background (0), there is nothing to segment"]
    return []


def _case_file_problems(
    where: str, split: str, paths: dict[str, str], dataset_dir: Path, num_classes: int, image_channels: int
) -> list[str]:
    """
    Read and check the files of one case. Images are read header-only; labels and masks are read whole to check
    their values. The geometry of each file is compared to the first readable 3D file of the case, the image
    unless that is unreadable.
    """
    problems = []
    reference: tuple[str, Volume] | None = None
    for key, name in paths.items():
        prefix, path = f"{where}: {key} {name}", dataset_dir / name
        if not path.exists():
            problems.append(f"{prefix} not found (looked for {path})")
            continue
        try:
            volume = read_volume(path, with_data=key != "image")
        except Exception as error:  # any library error of one file becomes a problem of that file
            problems.append(f"{prefix} cannot be read ({brief_error(error)})")
            continue
        shape_problem = channel_problem(volume.shape, image_channels if key == "image" else 1)
        if shape_problem:
            problems.append(f"{prefix} {shape_problem}")
            continue
        geometry_problem = _geometry_problem(volume, *reference) if reference else None
        if geometry_problem:
            problems.append(f"{prefix} {geometry_problem}")
        reference = reference or (key, volume)
        if volume.data is not None:
            problems += _content_problems(prefix, key, volume.data, split, num_classes)
    return problems


def _entry_paths(where: str, entry: object, label_required: bool) -> tuple[dict[str, str], list[str]]:
    """The file paths of a datalist entry keyed like :py:data:`FILE_KEYS`, and the problems of its structure."""
    if not isinstance(entry, dict):
        return {}, [f"{where}: entry is {_json(entry)}, expected an object with an 'image' file"]
    required = ("image", "label") if label_required else ("image",)
    problems = [f"{where}: no {key!r} file" for key in required if key not in entry]
    paths = {}
    for key in FILE_KEYS:
        if key not in entry:
            continue
        if isinstance(entry[key], str) and entry[key].strip():
            paths[key] = entry[key]
        else:
            problems.append(f"{where}: {key!r} is {_json(entry[key])}, expected a file path")
    return paths, problems


def _json(value: object) -> str:
    """Short JSON text of a datalist value for a message."""
    text = json.dumps(value)
    return text if len(text) <= 50 else text[:50] + "..."


def _split_entries(content: dict, split: str, required: bool) -> tuple[list | None, list[str]]:
    """
    The entries of ``split``, or None if it is absent or not a list, and its problems. Like
    ``load_decathlon_datalist``, a ``test`` list of plain paths (the MSD layout) stands for ``{"image": path}``.
    """
    need = REQUIRED_BECAUSE.get(split, f"at least one {split} case is needed")
    if split not in content:
        return None, [f"split {split!r} is missing: {need}"] if required else []
    entries = content[split]
    if not isinstance(entries, list):
        return None, [f"split {split!r} is {_json(entries)}, expected a list of cases"]
    if required and not entries:
        return entries, [f"split {split!r} is empty: {need}"]
    if split == "test" and entries and not isinstance(entries[0], dict):
        entries = [{"image": entry} for entry in entries]
    return entries, []


def _overlap_problem(where: str, split: str, index: int, image: Path, seen: dict[Path, tuple[str, int]]) -> str | None:
    """
    Whether ``image`` was listed before, in the same split (a duplicate) or in another one (leakage: the splits
    must be disjoint, above all the trusted meta cases); records where it was first listed in ``seen``.
    """
    first_split, first_index = seen.setdefault(image, (split, index))
    if (first_split, first_index) == (split, index):
        return None
    if first_split == split:
        return f"{where}: duplicate of {split}[{first_index}]"
    first = f"{first_split}[{first_index}]"
    return f"{where}: image also listed as {first}; a case must belong to one split only (data leakage)"


def _copy_problems(listed: Mapping[Path, str]) -> list[str]:
    """Images listed under different paths whose files are byte-identical copies (a case copied into another
    split is leakage just as a symlink is). Only files of equal size are read, so this costs nothing for
    datasets without copies."""
    by_size: dict[int, list[Path]] = {}
    for path in listed:
        if path.is_file():
            by_size.setdefault(path.stat().st_size, []).append(path)
    problems = []
    for paths in by_size.values():
        first: dict[str, Path] = {}
        for path in paths if len(paths) > 1 else []:
            original = first.setdefault(file_hash(path), path)
            if original != path:
                problems.append(
                    f"{listed[path]}: image is a copy of {listed[original]} (identical bytes); a case must belong "
                    "to one split only (data leakage)"
                )
    return problems


def load_datalist(path: Path) -> dict:
    """The datalist as a dict; raise :py:class:`DatalistError` with a single problem if it cannot be."""
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise DatalistError([f"datalist {path} not found"]) from error
    except json.JSONDecodeError as error:
        raise DatalistError([f"datalist {path} is not valid JSON ({error})"]) from error
    except (OSError, UnicodeDecodeError) as error:
        raise DatalistError([f"datalist {path} cannot be read ({brief_error(error)})"]) from error
    if not isinstance(content, dict):
        raise DatalistError([f"datalist {path} holds {_json(content)}, expected a JSON object of splits"])
    return content


def validate_datalist(
    datalist: str | Path,
    dataset_dir: str | Path | None = None,
    num_classes: int = 3,
    splits_required: Sequence[str] = ("training", "meta"),
    label_required_splits: Sequence[str] = SPLITS,
    check_files: bool = True,
    image_channels: int = 1,
    splits: Sequence[str] = SPLITS,
) -> dict[str, int]:
    """
    Check a Decathlon-style datalist and every file it references, and report all problems at once.

    The splits ``training, meta, validation, test`` (and any named in the arguments) are checked: required
    splits must be non-empty lists; entries must be objects with an ``image`` (and a ``label`` where required)
    whose values are paths; an image may appear only once in all splits (no duplicates, no leakage between
    splits). With ``check_files``, every ``image``, ``label``, ``clean_label`` and ``corruption_mask`` must be
    readable; images must be 3D, or 4D with ``image_channels`` channels last; labels and masks must have the
    spatial shape, spacing and affine of the image; labels must hold integers in ``0..num_classes-1`` and masks
    0/1. NIfTI images are read header-only (plus a check of their size against truncation); labels, masks and
    non-NIfTI files are read whole.

    An all-background label is an error in ``meta``, ``validation`` and ``test`` but only a warning in
    ``training``, where a noisy label may well miss a small structure: warnings start with ``"warning: "``, are
    logged, and are listed in the error only when there are errors as well.

    Args:
        datalist: path of the datalist JSON file.
        dataset_dir: folder the relative paths are resolved against; defaults to the datalist's folder, as in
            ``monai.data.load_decathlon_datalist``.
        num_classes: number of label classes, background included.
        splits_required: splits that must be present and non-empty.
        label_required_splits: splits whose entries must have a ``label``.
        check_files: whether to read the files; if False only the datalist itself is checked.
        image_channels: number of image channels the network takes.
        splits: the splits to check besides the required ones (evaluation checks its split alone).

    Returns:
        the number of cases of every split present in the datalist.

    Raises:
        DatalistError: listing every problem, one per line, when any is not a warning.
    """
    path = Path(datalist)
    content = load_datalist(path)
    dataset_dir = path.parent if dataset_dir is None else Path(dataset_dir)
    if check_files and not dataset_dir.is_dir():
        raise DatalistError([f"dataset_dir {dataset_dir} is not a directory"])
    problems: list[str] = []
    counts: dict[str, int] = {}
    seen: dict[Path, tuple[str, int]] = {}
    listed: dict[Path, str] = {}
    for split in dict.fromkeys([*splits, *splits_required, *label_required_splits]):
        entries, split_problems = _split_entries(content, split, split in splits_required)
        problems += split_problems
        if entries is None:
            continue
        counts[split] = len(entries)
        for index, entry in enumerate(entries):
            image = entry.get("image") if isinstance(entry, dict) else None
            where = f"{split}[{index}]" + (f" ({image})" if isinstance(image, str) else "")
            paths, entry_problems = _entry_paths(where, entry, split in label_required_splits)
            problems += entry_problems
            if "image" in paths:
                # the real path, so that a symlink to a case of another split is the same case
                image_path = Path(os.path.realpath(dataset_dir / paths["image"]))
                problems.append(_overlap_problem(where, split, index, image_path, seen))
                listed.setdefault(image_path, where)
            if check_files:
                problems += _case_file_problems(where, split, paths, dataset_dir, num_classes, image_channels)
    if check_files:
        problems += _copy_problems(listed)
    problems = [problem for problem in problems if problem]
    if any(not problem.startswith(WARNING) for problem in problems):
        raise DatalistError(problems)
    for warning in problems:
        logger.warning(warning)
    return counts


def _summary(counts: dict[str, int]) -> str:
    """``training=16 meta=4 ...``"""
    return " ".join(f"{split}={count}" for split, count in counts.items())


def check_before_training(datalist: str | Path, dataset_dir: str | Path, num_classes: int) -> None:
    """
    Validate the datalist as the first step of a bundle's ``run`` list (``check_data`` in ``configs/train.json``,
    a ``_target_`` component, so that ``scripts`` is importable from any folder), so that a broken dataset stops
    the run before any training. Raises :py:class:`DatalistError` listing the problems.
    """
    counts = validate_datalist(datalist, dataset_dir, num_classes, splits_required=("training", "meta", "validation"))
    logger.info(f"datalist {datalist} OK: {_summary(counts)}")


class ConfigError(ProblemsError):
    """Training settings with a wrong type or out of range; ``problems`` lists each with value and range."""

    heading = "config check failed"
    indent = "  "


def output_dir_problem(name: str, folder: str | Path, min_free_mb: float) -> str | None:
    """Whether ``folder`` (or its nearest existing parent, as it may not exist yet) is writable with room."""
    existing = Path(folder).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{name} {folder}: {existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{name} {folder}: {existing} is not writable"
    free_mb = shutil.disk_usage(existing).free / 2**20
    if free_mb < min_free_mb:
        return f"{name} {folder}: only {free_mb:.0f} MB free on its disk, need at least {min_free_mb:.0f} MB"
    return None


def _is_integer(value: object, low: int) -> bool:
    """Whether ``value`` is an integer of at least ``low``, as :py:func:`scripts.utils.number_problem` checks."""
    return number_problem("value", value, low, integer=True) is None


def check_training_config(
    learning_rate: object,
    epochs: object,
    val_interval: object,
    batch_size: object,
    num_classes: object,
    patch_size: object,
    strides: Sequence[int],
    mcpm: Mapping[str, object] | None = None,
    output_dirs: Mapping[str, str] | None = None,
    min_free_mb: float = 200.0,
    amp: bool = False,
    device: torch.device | str = "cpu",
) -> None:
    """Check the training settings of ``configs/train.json`` before anything runs, all at once.

    ``mcpm`` is the config's ``mcpm`` section, checked against the options of ``scripts/options.py`` (an unknown
    key there is reported: it is most likely a typo); ``output_dirs`` maps config keys to folders that must be
    writable, with ``min_free_mb`` free. ``amp`` on a device other than CUDA is warned about: MCPM's trainers
    autocast there too (bfloat16), but MONAI's ``SupervisedTrainer``, which the baselines train with, autocasts on
    CUDA only. Raises :py:class:`ConfigError` listing every problem.
    """
    if amp and torch.device(device).type != "cuda":
        logger.warning(
            f"amp is true but the device is {device}: MCPM and L2RW training autocast to bfloat16 there, but the "
            "baselines (MONAI's SupervisedTrainer) use mixed precision on CUDA only and train in float32"
        )
    epochs_problem = number_problem("epochs", epochs, 1, integer=True)
    interval_problem = number_problem("val_interval", val_interval, 1, integer=True)
    problems = [
        number_problem("learning_rate", learning_rate, 0, low_open=True),
        epochs_problem,
        interval_problem,
        number_problem("batch_size", batch_size, 1, integer=True),
    ]
    if not epochs_problem and not interval_problem and val_interval > epochs:
        problems.append(
            f"val_interval ({val_interval}) is larger than epochs ({epochs}): no validation would run, so no "
            "model.pt would be saved"
        )
    warmup = (mcpm or {}).get("warmup_epochs", 0)
    if not epochs_problem and _is_integer(warmup, 0) and warmup >= epochs:
        problems.append(
            f"mcpm#warmup_epochs ({warmup}) is not below epochs ({epochs}): the meta-reweighting would never start"
        )
    classes_problem = number_problem("num_classes", num_classes, 2, integer=True)
    if classes_problem:
        problems.append(f"{classes_problem} (background and at least one class)")
    factor = int(np.prod(strides))
    if not (
        isinstance(patch_size, Sequence)
        and len(patch_size) == 3
        and all(_is_integer(p, 1) and p % factor == 0 for p in patch_size)
    ):
        problems.append(
            f"patch_size must be 3 positive integers divisible by {factor} (the product of the network's strides), "
            f"got {patch_size!r}"
        )
    if mcpm is not None:
        problems += option_problems(mcpm, section="mcpm")
    problems += [output_dir_problem(name, folder, min_free_mb) for name, folder in (output_dirs or {}).items()]
    problems = [problem for problem in problems if problem]
    if problems:
        raise ConfigError(problems)


class OverrideError(ProblemsError):
    """Command-line overrides of keys that no loaded config file defines: MONAI would add them unused."""

    heading = (
        "override check failed: an override must name a key that a config file defines (MONAI would add an "
        "unknown one unused)"
    )
    indent = "  "


def _raw_overrides(argv: Sequence[str]) -> dict[str, str]:
    """``--key value`` and ``--key=value`` pairs of a ``python -m monai.bundle`` command line, as given."""
    found: dict[str, str] = {}
    tokens = list(argv)
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if token.startswith("--") and len(token) > 2:
            key, has_value, value = token[2:].partition("=")
            if not has_value and index + 1 < len(tokens) and not tokens[index + 1].startswith("--"):
                index += 1
                value = tokens[index]
            found[key.replace("::", "#")] = value
        index += 1
    return found


def _file_list(value: str) -> list[str]:
    """The config files of ``--config_file``: one path, a Python list literal, or comma-separated paths."""
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    if isinstance(parsed, (list, tuple)):
        return [str(item) for item in parsed]
    return [part for part in str(parsed).split(",") if part]


def _config_keys(config: Any, prefix: str = "") -> tuple[set[str], set[str]]:
    """Every key path of ``config`` (``train#dataset#data``, list items by index) and the paths of its components
    (dicts with a ``_target_``, whose arguments an override may add)."""
    keys: set[str] = set()
    components: set[str] = set()
    if isinstance(config, Mapping):
        if "_target_" in config:
            components.add(prefix.rstrip("#"))
        items: Any = config.items()
    elif isinstance(config, list):
        items = enumerate(config)
    else:
        return keys, components
    for name, value in items:
        path = f"{prefix}{name}"
        keys.add(path)
        sub_keys, sub_components = _config_keys(value, f"{path}#")
        keys |= sub_keys
        components |= sub_components
    return keys, components


def override_problems(argv: Sequence[str]) -> list[str]:
    """The overrides on the ``monai.bundle`` command line ``argv`` (without the program) whose key no config file
    of ``--config_file`` (nor ``--args_file``) defines, each with the closest known keys. Known as well: the
    arguments of ``monai.bundle run``, the settings ``--tracking`` adds, ``_meta_`` keys, and new arguments of a
    component (a dict with ``_target_``), which MONAI passes to its constructor, so that a wrong one fails there."""
    raw = _raw_overrides(argv)
    if "args_file" in raw:
        args = ConfigParser.load_config_file(raw["args_file"])
        raw = {**{str(k): str(v) for k, v in args.items()}, **raw}
    run_arguments = set(inspect.signature(run).parameters) - {"override"}
    keys: set[str] = set(DEFAULT_MLFLOW_SETTINGS["configs"])
    components: set[str] = set()
    files = _file_list(raw.get("config_file", ""))
    for file in files:
        file_keys, file_components = _config_keys(ConfigParser.load_config_file(file))
        keys |= file_keys
        components |= file_components
    problems = []
    for key in raw:
        parent = key.rsplit("#", 1)[0] if "#" in key else None
        if key in run_arguments or key in keys or key.split("#")[0] == "_meta_" or parent in components:
            continue
        close = difflib.get_close_matches(key, sorted(keys | run_arguments), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
        problems.append(f"--{key}: no key of that name in {', '.join(files) or 'the config files'}{hint}")
    return problems


def _started_as_bundle_command(argv: Sequence[str]) -> bool:
    """Whether this process is ``python -m monai.bundle ...`` (its ``argv[0]`` is monai/bundle/__main__.py)."""
    return bool(argv) and Path(argv[0]).parts[-3:] == ("monai", "bundle", "__main__.py")


def check_override_keys(argv: Sequence[str] | None = None) -> None:
    """Refuse command-line overrides of unknown keys (``--epoch 2`` for ``--epochs``): MONAI adds such a key to
    the config, where nothing reads it, and the run goes on with the default. Does nothing unless the process is
    a ``python -m monai.bundle`` command (MONAI Label and tests that run configs in-process pass no overrides on
    the command line). Raises :py:class:`OverrideError` listing every unknown key."""
    argv = sys.argv if argv is None else argv
    if not _started_as_bundle_command(argv):
        return
    problems = override_problems(argv[1:])
    if problems:
        raise OverrideError(problems)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point: print a summary and return 0, or print the problems to stderr and return 1."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--datalist", default="data/default/datalist.json")
    parser.add_argument("--dataset_dir", default=None, help="folder of the relative paths (default: the datalist's)")
    parser.add_argument("--num_classes", type=int, default=3, help="label classes, background included")
    parser.add_argument("--image_channels", type=int, default=1, help="image channels the network takes")
    try:
        counts = validate_datalist(**vars(parser.parse_args(argv)))
    except DatalistError as error:
        print(error, file=sys.stderr)
        return 1
    print(f"datalist OK: {_summary(counts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
