"""The meta mask network of MCPM: reads the per-voxel loss map and outputs a per-voxel weight in (0, 1)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

META_INPUTS = ("loss", "probability", "image", "label", "boundary")
# the boundary input is the Chebyshev distance to the nearest voxel of another label class, capped here, over the cap
BOUNDARY_CAP = 4


def boundary_distance(label: torch.Tensor, num_classes: int, cap: int = BOUNDARY_CAP) -> torch.Tensor:
    """(B, 1, *spatial) distance in voxels (Chebyshev, at most ``cap``) from every voxel to the nearest voxel of another
    label class, divided by ``cap``: 0 where a 3x3x3 neighbourhood already holds two classes, 1 far inside a region.
    Corrupted boundaries (erosion, dilation, a reader's outline) lie within a few voxels of the label's boundary."""
    one_hot = F.one_hot(label.long(), num_classes).movedim(-1, 1).float()
    distance = torch.full_like(one_hot[:, :1], float(cap))
    present = one_hot
    for radius in range(1, cap + 1):
        # the classes within Chebyshev distance ``radius`` of each voxel
        present = F.max_pool3d(present, kernel_size=3, stride=1, padding=1)
        near = present.sum(dim=1, keepdim=True) > 1
        distance = torch.minimum(distance, torch.where(near, radius - 1.0, float(cap)))
    return distance / cap


class MetaMaskNet(nn.Module):
    """A small fully convolutional 3D network mapping input maps to a weight map in (0, 1).

    Its input channels are chosen by ``inputs``: ``"loss"`` (the detached per-voxel loss map, the paper's
    input), ``"probability"`` (the predicted probability of the labelled class), ``"image"`` (the image
    channels), ``"label"`` (the one-hot label, ``num_classes`` channels, so the weights can differ by class) and
    ``"boundary"`` (:py:func:`boundary_distance`, where the label's boundary is near). The last layer starts at
    zero, so every voxel starts with the same weight ``sigmoid(initial_logit)`` (0.5 by default): MCPM begins as
    plain training and learns to deviate.

    Args:
        inputs: which maps feed the network, a subset of ``META_INPUTS`` containing ``"loss"``.
        image_channels: number of image channels, used when ``"image"`` is an input.
        num_classes: number of label classes, background included; needed by the ``"label"`` and ``"boundary"``
            inputs.
        hidden_channels: width of each hidden 3x3x3 convolution; its length is the number of hidden layers.
        initial_logit: the bias of the output layer at initialisation.
        channels_last: run the convolutions in the channels-last 3D memory layout; on CPU this makes the
            network's forward and backward 2-4 times faster (``docs/performance.md``).
    """

    def __init__(
        self,
        inputs: Sequence[str] = ("loss",),
        image_channels: int = 1,
        num_classes: int | None = None,
        hidden_channels: Sequence[int] = (8, 8),
        initial_logit: float = 0.0,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        unknown = [name for name in inputs if name not in META_INPUTS]
        if unknown or "loss" not in inputs or len(set(inputs)) != len(inputs):
            raise ValueError(f"inputs must be distinct names from {META_INPUTS} including 'loss', got {list(inputs)}.")
        if not hidden_channels or any(int(c) < 1 for c in hidden_channels):
            raise ValueError(f"hidden_channels must be a non-empty list of positive ints, got {list(hidden_channels)}.")
        if {"label", "boundary"} & set(inputs) and not (isinstance(num_classes, int) and num_classes >= 2):
            raise ValueError(f"the 'label' and 'boundary' inputs need num_classes >= 2, got {num_classes!r}.")
        self.inputs = tuple(inputs)
        self.num_classes = num_classes
        widths = {"image": image_channels, "label": num_classes}
        in_channels = sum(widths.get(name, 1) for name in self.inputs)
        layers: list[nn.Module] = []
        for width in hidden_channels:
            layers += [nn.Conv3d(in_channels, int(width), kernel_size=3, padding=1), nn.LeakyReLU(0.1)]
            in_channels = int(width)
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv3d(in_channels, 1, kernel_size=1)
        nn.init.zeros_(self.head.weight)
        nn.init.constant_(self.head.bias, float(initial_logit))
        self.memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
        self.to(memory_format=self.memory_format)

    def build_input(
        self, loss_map: torch.Tensor, logits: torch.Tensor, label: torch.Tensor, image: torch.Tensor
    ) -> torch.Tensor:
        """Stack the configured input maps, all detached, into (B, C_in, *spatial)."""
        index = label.detach().long() if label.dim() == logits.dim() else label.detach().long().unsqueeze(1)
        maps = []
        for name in self.inputs:
            if name == "loss":
                maps.append(loss_map.detach().unsqueeze(1))
            elif name == "probability":
                maps.append(torch.softmax(logits.detach().float(), dim=1).gather(1, index))
            elif name == "image":
                maps.append(image.detach())
            elif name == "label":
                maps.append(F.one_hot(index[:, 0], self.num_classes).movedim(-1, 1))
            else:
                maps.append(boundary_distance(index[:, 0], self.num_classes))
        return torch.cat([m.to(loss_map.dtype) for m in maps], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the (B, *spatial) weight map in (0, 1) for the stacked inputs ``x``."""
        x = x.contiguous(memory_format=self.memory_format)
        return torch.sigmoid(self.head(self.features(x))).squeeze(1).contiguous()
