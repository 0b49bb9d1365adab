"""The meta mask network's inputs: the loss map and the optional maps beside it (probability, image, one-hot label,
distance to the label's boundary)."""

from __future__ import annotations

import pytest
import torch

from scripts.meta_net import BOUNDARY_CAP, MetaMaskNet, boundary_distance


def test_boundary_distance_counts_voxels_to_the_nearest_other_class():
    label = torch.zeros(1, 12, 12, 12, dtype=torch.long)
    label[:, 2:10, 2:10, 2:10] = 1  # a cube: its faces at 2 and 9 along every axis
    distance = boundary_distance(label, num_classes=2)[0, 0] * BOUNDARY_CAP
    line = distance[:, 6, 6].tolist()
    # 0 on both sides of a face (the 3x3x3 neighbourhood holds both classes), then one more per voxel inwards
    assert line == [1, 0, 0, 1, 2, 3, 3, 2, 1, 0, 0, 1]
    assert distance.max() <= BOUNDARY_CAP and distance.min() == 0
    uniform = boundary_distance(torch.zeros(1, 6, 6, 6, dtype=torch.long), num_classes=3)
    assert torch.equal(uniform, torch.ones_like(uniform))  # no boundary anywhere: the cap


def test_inputs_stack_into_the_channels_they_need():
    logits, loss_map = torch.randn(2, 3, 8, 8, 8), torch.rand(2, 8, 8, 8)
    label, image = torch.randint(0, 3, (2, 1, 8, 8, 8)), torch.randn(2, 1, 8, 8, 8)
    network = MetaMaskNet(inputs=("loss", "probability", "image", "label", "boundary"), num_classes=3)
    stacked = network.build_input(loss_map, logits, label, image)
    assert stacked.shape == (2, 1 + 1 + 1 + 3 + 1, 8, 8, 8)
    assert torch.equal(stacked[:, 3:6].argmax(1), label[:, 0])  # the one-hot label
    weights = network(stacked)
    assert weights.shape == (2, 8, 8, 8) and torch.allclose(weights, torch.full_like(weights, 0.5))


@pytest.mark.parametrize(
    "kwargs",
    [{"inputs": ("probability",)}, {"inputs": ("loss", "loss")}, {"inputs": ("loss", "label")}, {"inputs": ("loss", "edge")}],
)
def test_bad_inputs_are_refused(kwargs):
    with pytest.raises(ValueError, match="inputs|num_classes"):
        MetaMaskNet(**kwargs)
