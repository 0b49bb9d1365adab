"""Helpers shared by the bundle and its tools, one of each: the split names and the datalist's file name, Dice of
masks and a NaN-skipping mean, number checks, and atomic writers of text, JSON, CSV, NIfTI and figures (a failure
leaves the previous file, or none, never half a file), with off-screen matplotlib figures."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import numbers
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

__all__ = [
    "DATALIST",
    "BundleInputError",
    "ProblemsError",
    "as_flag",
    "SPLITS",
    "atomic_path",
    "atomic_temporary_target",
    "check_number",
    "check_range",
    "dice",
    "figure",
    "file_hash",
    "free_space",
    "nanmean",
    "nearest_existing",
    "json_text",
    "number_problem",
    "save_figure",
    "size_text",
    "write_csv",
    "write_json",
    "write_nifti",
    "write_text",
]


class BundleInputError(ValueError):
    """An input or setting the bundle refuses before long work starts. Its message is printed last when a
    ``python -m monai.bundle`` command stops on it (``scripts.checks.install_excepthook``), so that it does not
    hide above MONAI's "Failed to instantiate component" traceback."""


class ProblemsError(BundleInputError):
    """A :py:class:`BundleInputError` that lists every problem a check found, one per line under ``heading``
    (each line prefixed by ``indent``); ``problems`` keeps the list."""

    heading = "check failed"
    indent = ""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__(f"{self.heading}:\n" + "\n".join(self.indent + p for p in self.problems))


def as_flag(name: str, value: object) -> bool:
    """``value`` as a bool: a bool, or the text ``true``/``false`` (any case) that ``--name true`` gives on the
    command line, where fire reads only ``True``/``False`` as booleans; a :py:class:`BundleInputError` otherwise."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise BundleInputError(f"{name} must be true or false, got {value!r}.")


def set_cudnn_benchmark(enabled: bool) -> bool:
    """Let cuDNN time its convolution algorithms for the run's fixed patch shape and keep the fastest (``enabled``;
    faster on CUDA, not bit-for-bit repeatable), or keep deterministic algorithms. To be called after MONAI's
    ``set_determinism``, which turns benchmarking off and determinism on; no effect on the CPU. Returns ``enabled``."""
    torch.backends.cudnn.benchmark = enabled
    torch.backends.cudnn.deterministic = not enabled
    return enabled


# the datalist's splits: noisy training cases, trusted (clean) meta cases, validation and test cases
SPLITS = ("training", "meta", "validation", "test")
# the file name of a dataset's datalist that the generators and converters write into its folder
DATALIST = "datalist.json"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks; NaN when both are empty, where the overlap is undefined (as MONAI's
    ``DiceMetric(ignore_empty=True)`` gives), so that means over cases must skip it (:py:func:`nanmean`)."""
    total = np.count_nonzero(a) + np.count_nonzero(b)
    return 2.0 * np.count_nonzero(np.logical_and(a, b)) / total if total else float("nan")


def nanmean(values: Sequence[float]) -> float:
    """Mean of the finite values; NaN when there are none (no warning, unlike ``np.nanmean``)."""
    finite = [float(v) for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def number_problem(
    name: str, value: Any, low: float = -math.inf, high: float = math.inf, integer: bool = False, low_open: bool = False
) -> str | None:
    """What is wrong with ``value`` as a number (an integer if ``integer``) in ``[low, high]`` (``(low, high]``
    if ``low_open``), naming ``name``; None when nothing is. Booleans are not numbers here."""
    kind = numbers.Integral if integer else numbers.Real
    in_range = isinstance(value, kind) and not isinstance(value, bool) and (value > low if low_open else value >= low)
    if in_range and value <= high:
        return None
    if low > -math.inf and high < math.inf:
        allowed = f" in {'(' if low_open else '['}{low}, {high}]"
    elif low > -math.inf:
        allowed = f" {'>' if low_open else '>='} {low}"
    else:
        allowed = f" <= {high}" if high < math.inf else ""
    return f"{name} must be {'an integer' if integer else 'a number'}{allowed}, got {value!r}"


def check_number(
    name: str, value: Any, low: float = -math.inf, high: float = math.inf, integer: bool = False, low_open: bool = False
) -> Any:
    """``value`` as an int (``integer``) or float; a ValueError with :py:func:`number_problem`'s message if it
    is not one in range."""
    problem = number_problem(name, value, low, high, integer, low_open)
    if problem:
        raise ValueError(problem + ".")
    return int(value) if integer else float(value)


def check_range(name: str, value: Any, low: float = -math.inf, high: float = math.inf, integer: bool = False) -> tuple:
    """``value`` as a ``(min, max)`` pair of ints (``integer``) or floats with ``low <= min <= max <= high``;
    a ValueError naming ``name`` otherwise."""
    kind = numbers.Integral if integer else numbers.Real
    if (
        np.ndim(value) != 1
        or len(value) != 2
        or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value)
        or not low <= value[0] <= value[1] <= high
    ):
        kind_name = "integers" if integer else "numbers"
        upper = f" <= {high}" if high < math.inf else ""
        raise ValueError(f"{name} must be two {kind_name} (min, max) with {low} <= min <= max{upper}, got {value!r}.")
    cast = int if integer else float
    return cast(value[0]), cast(value[1])


def nearest_existing(path: str | os.PathLike) -> Path:
    """``path`` made absolute, or its nearest existing parent when it does not exist yet (a folder a run will make)."""
    existing = Path(path).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing


def size_text(size: float) -> str:
    """A number of bytes for a message: ``"56 KB"``, ``"5.2 MB"``, ``"1.3 GB"``."""
    if size >= 2**30:
        return f"{size / 2**30:.1f} GB"
    return f"{size / 2**20:.1f} MB" if size >= 2**20 else f"{int(size) // 2**10} KB"


def free_space(folder: str | os.PathLike) -> str:
    """The free space on the disk of ``folder`` (or of its nearest existing parent) for a message
    (:py:func:`size_text`); ``"unknown"`` when it cannot be told."""
    try:
        return size_text(shutil.disk_usage(nearest_existing(folder)).free)
    except OSError:
        return "unknown"


def _umask() -> int:
    """The process's umask, read once at import (reading it means setting it for a moment)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


# the mode a file created here gets (``0o666`` less the umask), which atomic_path's files get too
NEW_FILE_MODE = 0o666 & ~_umask()
# the random part tempfile.mkstemp puts in a name: 8 characters of [a-z0-9_]
_RANDOM_PART = re.compile(r"[a-z0-9_]{8}")


def atomic_temporary_target(name: str) -> str | None:
    """The name of the file that ``name`` is an :py:func:`atomic_path` temporary of (``.<file>.XXXXXXXX<suffixes
    of file>``), or None when it is none: what a process killed while writing leaves behind."""
    if not name.startswith("."):
        return None
    for end in range(2, len(name) - 8):
        target, rest = name[1:end], name[end:]
        if rest.startswith(".") and _RANDOM_PART.fullmatch(rest[1:9]) and rest[9:] == "".join(Path(target).suffixes):
            return target
    return None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; it replaces ``path`` when the block ends without an error
    and is removed when it raises. The folder of ``path`` is created if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # keep the file's suffixes (``.nii.gz``) so that writers that choose a format by name choose the right one
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix="".join(path.suffixes), dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, NEW_FILE_MODE)  # a file like any other, not mkstemp's private 0o600
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def json_text(value: Any, indent: int = 4) -> str:
    """``value`` as the JSON text this project writes: indented, keys in their order, ASCII, a final newline (the
    model zoo's ``pretty-format-json --indent=4 --no-sort-keys`` format at the default indent)."""
    return json.dumps(value, indent=indent, ensure_ascii=True) + "\n"


def file_hash(path: str | os.PathLike, hash_type: str = "sha256") -> str:
    """Hex digest of the bytes of ``path`` (``hash_type``: ``"md5"``, ``"sha256"``, ...); ``""`` when it is not a
    file, which never matches a recorded hash."""
    path = Path(path)
    if not path.is_file():
        return ""
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, hash_type).hexdigest()


def write_text(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` to ``path`` atomically; return the path."""
    with atomic_path(path) as temporary:
        temporary.write_text(text)
    return Path(path)


def write_json(value: Any, path: str | os.PathLike, indent: int = 4) -> Path:
    """Write ``value`` as :py:func:`json_text` atomically; return the path."""
    return write_text(json_text(value, indent), path)


def write_csv(
    rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, fieldnames: Sequence[str] | None = None
) -> Path:
    """Write ``rows`` as a CSV file atomically; the columns are ``fieldnames``, or every key in the order the
    rows first name it. Floats are written as they are; format them in the rows where a file wants fewer digits."""
    columns = list(fieldnames) if fieldnames is not None else list(dict.fromkeys(key for row in rows for key in row))
    with atomic_path(path) as temporary:
        with open(temporary, "w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    return Path(path)


def write_nifti(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike, units: str | None = None) -> Path:
    """Write ``array`` as NIfTI with ``affine`` as both qform and sform (code 1, scanner frame), atomically;
    ``units`` (e.g. ``"mm"``) sets the header's spatial units."""
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    if units is not None:
        image.header.set_xyzt_units(units)
    with atomic_path(path) as temporary:
        nib.save(image, temporary)
    return Path(path)


def figure(**kwargs: Any) -> Any:
    """A matplotlib ``Figure`` drawn off-screen, without pyplot and without changing matplotlib's global backend
    (``Figure.savefig`` renders with Agg); ``kwargs`` go to ``Figure``."""
    from matplotlib.figure import Figure  # deferred: training and inference never draw, so they never load it

    return Figure(**kwargs)


def save_figure(fig: Any, path: str | os.PathLike, **kwargs: Any) -> Path:
    """Save the matplotlib figure ``fig`` to ``path`` atomically (the format from the suffix); ``kwargs`` go to
    ``Figure.savefig``."""
    with atomic_path(path) as temporary:
        fig.savefig(temporary, **kwargs)
    return Path(path)
