"""Synthetic label corruption models used to simulate noisy segmentation annotations."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_dst_type, convert_to_numpy, ensure_tuple_rep
from scipy import ndimage

__all__ = ["MORPH_OPERATIONS", "RandErodeDilateLabeld", "ball", "morph_per_class"]

MORPH_OPERATIONS = ("erode", "dilate")


def ball(radius: int) -> np.ndarray:
    """Boolean 3D ball of shape ``(2r+1,) * 3``: voxels within Euclidean distance ``radius`` of the centre."""
    grid = np.mgrid[-radius : radius + 1, -radius : radius + 1, -radius : radius + 1]
    return (grid**2).sum(axis=0) <= radius**2


def morph_per_class(label: np.ndarray, operation: str, radius: int, background: float = 0) -> np.ndarray:
    """
    Erode or dilate every foreground class of a label map separately with a ball of ``radius`` voxels.

    The mask of each class is taken from the original ``label``, so one class's change never feeds into another's.
    Erosion turns the removed voxels of a class into ``background``; the volume border counts as inside the
    structure so that objects cut by the field of view do not shrink from the border. Dilation only grows a class
    into voxels that are ``background`` in the original label, never into another class; where two classes grow
    into the same voxel, the lower class value wins.

    Args:
        label: spatial ``(X, Y, Z)`` or channel-first ``(C, X, Y, Z)`` label map (channels are processed
            independently).
        operation: ``"erode"`` or ``"dilate"``.
        radius: ball radius in voxels (the voxel spacing is not considered); 0 leaves the label unchanged.
        background: the background value.

    Returns:
        a new array with the dtype of ``label`` whose values are a subset of the values of ``label``.
    """
    if operation not in MORPH_OPERATIONS:
        raise ValueError(f"operation must be one of {MORPH_OPERATIONS}, got {operation!r}.")
    if label.ndim not in (3, 4):
        raise ValueError(f"label must have shape (X, Y, Z) or (C, X, Y, Z), got shape {label.shape}.")
    structure = ball(radius).reshape((1,) * (label.ndim - 3) + (2 * radius + 1,) * 3)
    out = label.copy()
    for value in np.unique(label[label != background]):
        mask = label == value
        if operation == "erode":
            out[mask & ~ndimage.binary_erosion(mask, structure, border_value=1)] = background
        else:
            out[ndimage.binary_dilation(mask, structure) & (out == background)] = value
    return out


class RandErodeDilateLabeld(RandomizableTransform, MapTransform):
    """
    Randomly erode or dilate all foreground classes of a label to simulate under- or over-segmentation.

    With probability ``prob`` (the fraction of corrupted cases), the operation is chosen as erosion or dilation
    with equal probability and a ball radius is drawn uniformly from the integers in ``radius``; the same choice
    is applied to every key. See :py:func:`morph_per_class` for the per-class rules. The voxels whose value
    changed are written to ``mask_key`` as a ``uint8`` array of the label's type (all zeros when the case is not
    corrupted), which is the ground truth for corrupted-pixel mining.

    After each call, ``_do_transform``, ``_operation`` and ``_radius`` hold the last random choice; the latter two
    are drawn on every call (so the random stream does not depend on the data) and only apply when
    ``_do_transform`` is True.

    Args:
        keys: keys of the label maps to corrupt, channel-first ``(1, X, Y, Z)`` or spatial ``(X, Y, Z)``.
        prob: probability of corrupting a case.
        radius: inclusive integer range ``(min, max)`` of the ball radius in voxels.
        mask_key: key (or one key per label key) to write the corruption mask to.
        allow_missing_keys: don't raise exception if key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        prob: float = 0.5,
        radius: tuple[int, int] = (1, 3),
        mask_key: str | Sequence[str] = "corruption_mask",
        allow_missing_keys: bool = False,
    ) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}.")
        if (
            len(radius) != 2
            or not all(isinstance(r, (int, np.integer)) and not isinstance(r, bool) for r in radius)
            or not 0 <= radius[0] <= radius[1]
        ):
            raise ValueError(f"radius must be two integers (min, max) with 0 <= min <= max, got {radius}.")
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.radius = (int(radius[0]), int(radius[1]))
        self.mask_keys = ensure_tuple_rep(mask_key, len(self.keys))
        if len(set(self.mask_keys)) != len(self.mask_keys):
            raise ValueError(f"give one distinct mask_key per key, got keys={self.keys}, mask_key={mask_key}.")
        self._operation = MORPH_OPERATIONS[0]
        self._radius = self.radius[0]

    def randomize(self, data: None = None) -> None:
        super().randomize(None)
        self._operation = MORPH_OPERATIONS[self.R.randint(len(MORPH_OPERATIONS))]
        self._radius = int(self.R.randint(self.radius[0], self.radius[1] + 1))

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        self.randomize()
        for key, mask_key in self.key_iterator(d, self.mask_keys):
            label = convert_to_numpy(d[key])
            corrupted = morph_per_class(label, self._operation, self._radius) if self._do_transform else label
            d[mask_key] = convert_to_dst_type((corrupted != label).astype(np.uint8), d[key], dtype=np.uint8)[0]
            d[key] = convert_to_dst_type(corrupted, d[key])[0]
        return d
