"""
Check a Decathlon-style datalist and every file it references before training starts.

A training run that silently learns from a misaligned label, or stops after hours on a missing file, costs far
more than reading all headers up front. :py:func:`validate_datalist` collects every problem it finds and raises
them together in one :py:class:`DatalistError`, one problem per line.

Usage from the bundle root::

    python -m scripts.checks --datalist data/default/datalist.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from scripts.checks.errors import MAX_LISTED, brief_error
from scripts.checks.volumes import Volume, affine_problem, channel_problem, read_volume, thin_axes
from scripts.utils import SPLITS, ProblemsError, file_hash

__all__ = ["DatalistError", "check_before_training", "load_datalist", "main", "validate_datalist"]

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


class DatalistError(ProblemsError):
    """A datalist or the files it references cannot be used; ``problems`` lists every problem found."""

    heading = "datalist check failed"


def _listed(values: np.ndarray) -> str:
    """``values`` as a short list, each exactly as its data type holds it (``[3, 7]``, ``[1.0000001, ...]``), so
    that a value close to an integer does not read as one."""
    items = [str(value) for value in values[:MAX_LISTED]]
    return "[" + ", ".join(items + ["..."] * (len(values) > MAX_LISTED)) + "]"


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
        shape_problem = shape_problem or affine_problem(volume.affine)
        if shape_problem:
            problems.append(f"{prefix} {shape_problem}")
            continue
        if key == "image" and thin_axes(volume.shape):
            problems.append(
                f"{WARNING}{prefix} is one voxel thick along axis {thin_axes(volume.shape)} (shape "
                f"{volume.shape[:3]}): a 2D slice stored as 3D, padded to the 3D patch to train"
            )
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


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point: print a summary and return 0, or print the problems to stderr and return 1."""
    parser = argparse.ArgumentParser(prog="python -m scripts.checks", description=__doc__.strip().splitlines()[0])
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
