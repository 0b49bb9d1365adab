"""Voxel-wise losses: the loss map MCPM re-weights, small-loss truncation and generalised cross-entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scripts.losses import (
    GeneralisedCrossEntropyLoss,
    SmallLossTruncatedLoss,
    VoxelCrossEntropyLoss,
    soft_cross_entropy,
    voxel_cross_entropy,
)


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
    assert torch.allclose(SmallLossTruncatedLoss(0.25, per_class=False)(logits, label), losses[: 96].mean())
    assert torch.allclose(SmallLossTruncatedLoss(0.0)(logits, label), losses.mean())
    with pytest.raises(ValueError, match="drop_fraction"):
        SmallLossTruncatedLoss(1.0)


def test_small_loss_truncation_per_class_keeps_every_class():
    # a rare class whose voxels all have the highest losses: a global cut drops it, a per-class cut keeps 3 of 4
    label = torch.zeros(1, 1, 4, 4, 4)
    label[0, 0, 0, 0, :] = 1
    logits = torch.zeros(1, 2, 4, 4, 4)
    logits[:, 0] = 2.0 + torch.arange(64.0).reshape(4, 4, 4) / 64  # background right, rare class wrong
    losses = voxel_cross_entropy(logits, label).flatten()
    rare = label.flatten() == 1
    expected = torch.cat([losses[~rare].sort().values[:45], losses[rare].sort().values[:3]]).mean()
    assert torch.allclose(SmallLossTruncatedLoss(0.25)(logits, label), expected)
    assert torch.allclose(SmallLossTruncatedLoss(0.25, per_class=False)(logits, label), losses[~rare].sort().values[:48].mean())


def test_generalised_cross_entropy():
    logits, label = _batch()
    p_label = torch.softmax(logits, 1).gather(1, label.long())[:, 0]
    # q = 1 is the mean absolute error of the labelled class's probability
    assert torch.allclose(GeneralisedCrossEntropyLoss(q=1.0, reduction="none")(logits, label), 1 - p_label)
    # q -> 0 approaches the cross-entropy
    assert torch.allclose(GeneralisedCrossEntropyLoss(q=1e-4)(logits, label), voxel_cross_entropy(logits, label).mean(), rtol=1e-3)
    # bounded: a voxel the network contradicts costs at most 1 / q
    confident = torch.zeros(1, 3, 1, 1, 1)
    confident[:, 0] = 30.0
    assert GeneralisedCrossEntropyLoss(q=0.7)(confident, torch.full((1, 1, 1, 1, 1), 2.0)) <= 1 / 0.7
    for bad in ({"q": 0.0}, {"q": 1.5}, {"reduction": "max"}):
        with pytest.raises(ValueError):
            GeneralisedCrossEntropyLoss(**bad)


def test_soft_cross_entropy_of_a_one_hot_target_is_the_cross_entropy():
    logits = torch.randn(2, 3, 4, 4, 4)
    label = torch.randint(0, 3, (2, 1, 4, 4, 4))
    one_hot = F.one_hot(label[:, 0], 3).movedim(-1, 1).float()
    assert torch.allclose(soft_cross_entropy(logits, one_hot), voxel_cross_entropy(logits, label), atol=1e-6)
    assert soft_cross_entropy(logits.half(), one_hot).dtype == torch.float32  # as cross-entropy under autocast
    with pytest.raises(ValueError, match="soft target shape"):
        soft_cross_entropy(logits, one_hot[:, :2])


def test_weighted_soft_dice_is_monai_dice_with_voxel_weights():
    from monai.losses import DiceLoss

    from scripts.losses import weighted_soft_dice

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, 8, generator=g, dtype=torch.float64)
    label = torch.randint(0, 3, (2, 1, 8, 8, 8), generator=g)
    monai_dice = DiceLoss(to_onehot_y=True, softmax=True)
    assert torch.isclose(weighted_soft_dice(logits, label), monai_dice(logits, label))
    # scaling every weight alike changes nothing but the smoothing
    ones = torch.ones(2, 8, 8, 8, dtype=torch.float64)
    assert torch.isclose(weighted_soft_dice(logits, label, 0.5 * ones), monai_dice(logits, label), atol=1e-5)
    # weights of 0 outside a box: the Dice of the box alone
    box = torch.zeros_like(ones)
    box[:, 2:6, 1:7, 3:8] = 1
    cropped = monai_dice(logits[..., 2:6, 1:7, 3:8], label[..., 2:6, 1:7, 3:8])
    assert torch.isclose(weighted_soft_dice(logits, label, box), cropped)
