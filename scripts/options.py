"""The MCPM options, defined once: the names of the ``mcpm`` section of ``configs/train.json`` and the values each
accepts. ``check_training_config`` (``scripts/checks.py``) checks that section with them before anything runs, and
the trainers (``scripts/trainer.py``) check their arguments with them, so the two checks cannot disagree."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from scripts.utils import number_problem

__all__ = [
    "CORRECTIONS",
    "META_GRADIENT_MODES",
    "MCPM_OPTIONS",
    "VIRTUAL_STEPS",
    "WEIGHT_NORMALISATIONS",
    "check_options",
    "option_problems",
]

META_GRADIENT_MODES = ("jvp", "second_order")
WEIGHT_NORMALISATIONS = ("sum", "class_sum", "mean", "none")
VIRTUAL_STEPS = ("sgd", "adam")
CORRECTIONS = ("none", "teacher")

# what is wrong with a value of the named option, naming it; None when nothing is
OptionCheck = Callable[[str, Any], str | None]


def one_of(choices: Sequence[str]) -> OptionCheck:
    """A check that the value is one of ``choices``."""

    def problem(name: str, value: Any) -> str | None:
        return None if value in choices else f"{name} must be one of {tuple(choices)}, got {value!r}"

    return problem


def number(low: float, high: float = math.inf, integer: bool = False, low_open: bool = False) -> OptionCheck:
    """A check that the value is a number (an integer if ``integer``) of at least ``low`` (above it if ``low_open``)
    and at most ``high``, with :py:func:`scripts.utils.number_problem`."""
    return lambda name, value: number_problem(name, value, low, high, integer=integer, low_open=low_open)


def boolean(name: str, value: Any) -> str | None:
    """A check that the value is true or false."""
    return None if isinstance(value, bool) else f"{name} must be true or false, got {value!r}"


def parameter_prefixes(name: str, value: Any) -> str | None:
    """A check that the value is None (every parameter) or a non-empty list of parameter name prefixes; whether each
    prefix matches a parameter only the network can tell (``scripts.meta_gradient.virtual_step_parameters``)."""
    if value is None or (isinstance(value, (list, tuple)) and value and all(isinstance(p, str) and p for p in value)):
        return None
    return f"{name} must be null (every parameter) or a non-empty list of parameter name prefixes, got {value!r}"


# every option of the ``mcpm`` section; docs/mcpm.md says what each does and why it has its default
MCPM_OPTIONS: dict[str, OptionCheck] = {
    "meta_gradient": one_of(META_GRADIENT_MODES),
    "virtual_lr": number(0, low_open=True),
    "virtual_step": one_of(VIRTUAL_STEPS),
    "weight_normalisation": one_of(WEIGHT_NORMALISATIONS),
    "meta_interval": number(1, integer=True),
    "warmup_epochs": number(0, integer=True),
    "virtual_step_params": parameter_prefixes,
    "max_nonfinite_steps": number(1, integer=True),
    "meta_learning_rate": number(0, low_open=True),
    "meta_batch_size": number(1, integer=True),
    "clean_loss_weight": number(0),
    "dice_loss_weight": number(0),
    "clean_loss_interval": number(1, integer=True),
    "correction": one_of(CORRECTIONS),
    "teacher_decay": number(0, 1),
    "reuse_virtual_gradient": boolean,
}


def combination_problems(options: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Problems of options that are valid alone but not together."""
    correction, normalisation = options.get("correction", "none"), options.get("weight_normalisation", "mean")
    problems = []
    if correction == "teacher" and normalisation != "mean":
        problems.append(
            f"{prefix}correction 'teacher' makes every voxel's target w·label + (1 − w)·teacher, so each voxel's "
            f"loss counts 1/N: set {prefix}weight_normalisation 'mean', got {normalisation!r}"
        )
    if options.get("reuse_virtual_gradient") is True:
        # the reused gradients are the jvp mode's, of every parameter, and cover the cross-entropy terms only
        clashes = {
            "meta_gradient": ("jvp", options.get("meta_gradient", "jvp")),
            "virtual_step_params": (None, options.get("virtual_step_params")),
            "dice_loss_weight": (0, options.get("dice_loss_weight", 0)),
        }
        for name, (needed, value) in clashes.items():
            if value != needed:
                problems.append(
                    f"{prefix}reuse_virtual_gradient takes the real step from the jvp meta step's gradients of every "
                    f"parameter and the cross-entropy terms: set {prefix}{name} {needed!r}, got {value!r}"
                )
    return problems


def option_problems(options: Mapping[str, Any], section: str = "") -> list[str]:
    """Every problem of ``options``, each with its value and what is allowed: unknown names (most likely typos) first,
    then values of the wrong type or out of range. With ``section`` (``"mcpm"``) the names read as config keys."""
    prefix = f"{section}#" if section else ""
    unknown = sorted(set(options) - set(MCPM_OPTIONS))
    problems = []
    if unknown:
        known = sorted(MCPM_OPTIONS)
        problems.append(f"{section or 'the MCPM options'} has unknown keys {unknown}; known keys: {known}")
    for name, value in options.items():
        problem = MCPM_OPTIONS[name](prefix + name, value) if name in MCPM_OPTIONS else None
        if problem:
            problems.append(problem)
    return problems + combination_problems(options, prefix)


def check_options(**options: Any) -> None:
    """Raise a ValueError listing every problem of the MCPM ``options`` (the arguments of a trainer)."""
    problems = option_problems(options)
    if problems:
        raise ValueError("invalid MCPM options: " + "; ".join(problems) + ".")
