"""
The bundle's checks of its inputs and settings, each module one job:

- :py:mod:`~scripts.checks.datalist`: a Decathlon-style datalist and every file it references
  (``python -m scripts.checks --datalist ...``);
- :py:mod:`~scripts.checks.volumes`: reading a file's shape and affine as training would;
- :py:mod:`~scripts.checks.transforms`: ``CheckImaged``, the check of an image's voxels where they are loaded;
- :py:mod:`~scripts.checks.config`: the training settings of ``configs/train.json``;
- :py:mod:`~scripts.checks.overrides`: command-line overrides of keys that no config file defines;
- :py:mod:`~scripts.checks.combined`: a command's checks run together, every refusal in one message;
- :py:mod:`~scripts.checks.errors`: the bundle's own message as the last line a command prints.

The configs name these through this package (``scripts.checks.CheckImaged``, ...). Where the bundle runs from the
command line (``python -m monai.bundle``), importing it installs the excepthook of :py:mod:`scripts.checks.errors`.
"""

from __future__ import annotations

import sys

from scripts.checks.combined import ChecksFailed, run_checks
from scripts.checks.config import (
    ConfigError,
    check_inference_config,
    check_training_config,
    output_dir_problem,
    patch_size_problem,
    validation_interval,
)
from scripts.checks.datalist import DatalistError, check_before_training, load_datalist, validate_datalist
from scripts.checks.errors import MAX_LISTED, brief_error, bundle_error, install_excepthook
from scripts.checks.overrides import (
    OverrideError,
    check_override_keys,
    override_problems,
    started_as_bundle_command,
)
from scripts.checks.transforms import CheckImaged
from scripts.checks.volumes import Volume, affine_problem, channel_problem, read_volume, thin_axes
from scripts.utils import BundleInputError

__all__ = [
    "MAX_LISTED",
    "BundleInputError",
    "CheckImaged",
    "ChecksFailed",
    "ConfigError",
    "DatalistError",
    "OverrideError",
    "Volume",
    "affine_problem",
    "brief_error",
    "bundle_error",
    "channel_problem",
    "check_before_training",
    "check_inference_config",
    "check_override_keys",
    "check_training_config",
    "install_excepthook",
    "load_datalist",
    "output_dir_problem",
    "override_problems",
    "patch_size_problem",
    "read_volume",
    "run_checks",
    "started_as_bundle_command",
    "thin_axes",
    "validate_datalist",
    "validation_interval",
]

if started_as_bundle_command(sys.argv):
    install_excepthook()
