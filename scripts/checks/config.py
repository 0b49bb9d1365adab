"""Check the training settings of ``configs/train.json`` before anything runs: every problem at once."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from scripts.options import option_problems
from scripts.utils import ProblemsError, free_space, nearest_existing, number_problem, size_text

__all__ = [
    "ConfigError",
    "check_inference_config",
    "check_training_config",
    "output_dir_problem",
    "patch_size_problem",
    "validation_interval",
]

logger = logging.getLogger(__name__)


class ConfigError(ProblemsError):
    """Training settings with a wrong type or out of range; ``problems`` lists each with value and range."""

    heading = "config check failed"
    indent = "  "


def output_dir_problem(name: str, folder: str | Path, min_free_mb: float) -> str | None:
    """Whether ``folder`` (or its nearest existing parent, as it may not exist yet) is writable with room."""
    existing = nearest_existing(folder)
    if not existing.is_dir():
        return f"{name} {folder}: {existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{name} {folder}: {existing} is not writable"
    free_mb = shutil.disk_usage(existing).free / 2**20
    if free_mb < min_free_mb:
        need = size_text(min_free_mb * 2**20)
        return f"{name} {folder}: only {free_space(existing)} free on its disk, need at least {need}"
    return None


def _is_integer(value: object, low: int) -> bool:
    """Whether ``value`` is an integer of at least ``low``, as :py:func:`scripts.utils.number_problem` checks."""
    return number_problem("value", value, low, integer=True) is None


def patch_size_problem(patch_size: object, strides: Sequence[int]) -> str | None:
    """Why ``patch_size`` is not 3 positive integers divisible by the product of the network's ``strides`` (the
    U-Net halves the patch at each stride and must be able to put it back together); None when it is."""
    factor = int(np.prod(strides))
    if (
        isinstance(patch_size, Sequence)
        and not isinstance(patch_size, str)
        and len(patch_size) == 3
        and all(_is_integer(p, 1) and p % factor == 0 for p in patch_size)
    ):
        return None
    return (
        f"patch_size must be 3 positive integers divisible by {factor} (the product of the network's strides), "
        f"got {patch_size!r}"
    )


def validation_interval(val_interval: int, epochs: int) -> int:
    """The epochs between validations: ``val_interval``, or ``epochs`` when that is smaller, so that a short run
    (the model zoo's tests override ``epochs`` 1) still validates at its last epoch and saves a ``model.pt``; the
    change is warned about. Values that are not positive integers pass through for the config check to report."""
    if _is_integer(val_interval, 1) and _is_integer(epochs, 1) and val_interval > epochs:
        logger.warning(
            f"val_interval ({val_interval}) is larger than epochs ({epochs}): validating at the last epoch instead, "
            "so that the run saves a model.pt"
        )
        return epochs
    return val_interval


def check_inference_config(patch_size: object, strides: Sequence[int]) -> None:
    """Check the settings of ``configs/inference.json`` (and evaluation) before any case runs: the sliding
    window's ``patch_size``, with the same rule as training. Raises :py:class:`ConfigError`."""
    problem = patch_size_problem(patch_size, strides)
    if problem:
        raise ConfigError([problem])


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
    CUDA only. A ``val_interval`` above ``epochs`` is warned about, not refused (:py:func:`validation_interval`), as
    is a ``warmup_epochs`` not below ``epochs``, by the trainer. Raises :py:class:`ConfigError` listing every
    problem.
    """
    if amp and torch.device(device).type != "cuda":
        logger.warning(
            f"amp is true but the device is {device}: MCPM and L2RW training autocast to bfloat16 there, but the "
            "baselines (MONAI's SupervisedTrainer) use mixed precision on CUDA only and train in float32"
        )
    problems = [
        number_problem("learning_rate", learning_rate, 0, low_open=True),
        number_problem("epochs", epochs, 1, integer=True),
        number_problem("val_interval", val_interval, 1, integer=True),
        number_problem("batch_size", batch_size, 1, integer=True),
    ]
    classes_problem = number_problem("num_classes", num_classes, 2, integer=True)
    if classes_problem:
        problems.append(f"{classes_problem} (background and at least one class)")
    problems.append(patch_size_problem(patch_size, strides))
    if mcpm is not None:
        problems += option_problems(mcpm, section="mcpm")
    problems += [output_dir_problem(name, folder, min_free_mb) for name, folder in (output_dirs or {}).items()]
    problems = [problem for problem in problems if problem]
    if problems:
        raise ConfigError(problems)
