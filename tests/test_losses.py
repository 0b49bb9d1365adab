"""Voxel-wise losses: the loss map MCPM re-weights, and small-loss truncation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scripts.losses import SmallLossTruncatedLoss, VoxelCrossEntropyLoss, voxel_cross_entropy


def _batch():
    logits = torch.randn(2, 3, 4, 4, 4)
    label = torch.randint(0, 3, (2, 1, 4, 4, 4)).float()
    return logits, label


def test_loss_map_is_per_voxel_cross_entropy():
    logits, label = _batch()
    expected = F.cross_entropy(logits, label[:, 0].long(), reduction="none")
    assert torch.allclose(voxel_cross_entropy(logits, label), expected)
    assert torch.allclose(VoxelCrossEntropyLoss("mean")(logits, label), expected.mean())
    with pytest.raises(ValueError, match="does not match"):
        voxel_cross_entropy(logits, label[..., :2])


def test_small_loss_truncation_drops_the_highest_losses():
    logits, label = _batch()
    losses = voxel_cross_entropy(logits, label).flatten().sort().values
    assert torch.allclose(SmallLossTruncatedLoss(0.25)(logits, label), losses[: 96].mean())
    assert torch.allclose(SmallLossTruncatedLoss(0.0)(logits, label), losses.mean())
    with pytest.raises(ValueError, match="drop_fraction"):
        SmallLossTruncatedLoss(1.0)
