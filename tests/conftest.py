"""Shared fixtures: tiny networks and data so the whole suite runs in minutes on 2 CPU cores."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from monai.networks.nets import UNet

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
if str(BUNDLE_ROOT) not in sys.path:
    sys.path.insert(0, str(BUNDLE_ROOT))

TINY_NETWORK = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}


def tiny_unet(norm: str = "batch", out_channels: int = 3) -> UNet:
    return UNet(3, 1, out_channels, norm=norm, **TINY_NETWORK)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
