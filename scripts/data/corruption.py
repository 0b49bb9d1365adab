"""
Synthetic label corruption models used to simulate noisy segmentation annotations.

Every model is a randomizable dictionary transform derived from :py:class:`RandLabelCorruptiond`: with probability
``prob`` (α, the fraction of corrupted cases) it corrupts the label and writes the voxels whose value changed to
``mask_key``, the ground truth for corrupted-pixel mining. Each model has one strength parameter β:

========================================  ====================================================================
model                                     strength β
========================================  ====================================================================
:py:class:`RandErodeDilateLabeld`         ``radius``: ball radius range in voxels
:py:class:`RandMarkovNoiseLabeld`         ``steps``: number T of Markov steps of the boundary random walk
:py:class:`RandAffineLabeld`              ``shift`` (voxels) and ``rotation`` (degrees) ranges
:py:class:`RandDropComponentLabeld`       ``num_components``: range of the number of structures removed
:py:class:`RandAddBlobLabeld`             ``radius``: range of the semi-axes of the false-positive blob in voxels
:py:class:`RandElasticLabeld`             ``magnitude``: range of the displacement standard deviation in voxels
========================================  ====================================================================

:py:class:`RandMixedCorruptiond` applies one of several models (or all in order) per case, and
:py:func:`make_corruption` builds any of them from a spec or from one of the published settings in :py:data:`PRESETS`.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Hashable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import MAX_SEED, convert_to_dst_type, convert_to_numpy, ensure_tuple_rep
from scipy import ndimage
from scipy.spatial.transform import Rotation

from scripts.utils import check_number, check_range

__all__ = [
    "MODELS",
    "MORPH_OPERATIONS",
    "PRESETS",
    "RandAddBlobLabeld",
    "RandAffineLabeld",
    "RandDropComponentLabeld",
    "RandElasticLabeld",
    "RandErodeDilateLabeld",
    "RandLabelCorruptiond",
    "RandMarkovNoiseLabeld",
    "RandMixedCorruptiond",
    "add_blob",
    "affine_label",
    "apply_per_class",
    "ball",
    "drop_components",
    "elastic_label",
    "make_corruption",
    "markov_noise",
    "morph_per_class",
]

MORPH_OPERATIONS = ("erode", "dilate")


def ball(radius: int, norm: float = 2) -> np.ndarray:
    """
    Boolean 3D ball of shape ``(2r+1,) * 3``: voxels within distance ``radius`` of the centre in the ``norm``-norm.

    ``norm=2`` is the Euclidean ball, ``norm=np.inf`` the cube of side ``2r+1`` and ``norm=1`` the octahedron that
    ``radius`` iterations of a 6-connected dilation reach.
    """
    grid = np.mgrid[-radius : radius + 1, -radius : radius + 1, -radius : radius + 1]
    return np.linalg.norm(grid, ord=norm, axis=0) <= radius


def apply_per_class(
    label: np.ndarray, corrupt_mask: Callable[[np.ndarray], np.ndarray], background: float = 0
) -> np.ndarray:
    """
    Corrupt the binary mask of every foreground class of a label map separately and merge the results.

    Each class is corrupted from its mask in the original ``label``, so one class's change never feeds into another's.
    Voxels a class loses become ``background``; a class only gains voxels that are ``background`` in the original
    label, never another class's voxels, and where several classes gain the same voxel the lower class value wins.

    Args:
        label: label map of any shape.
        corrupt_mask: maps the boolean mask of one class to its corrupted boolean mask of the same shape.
        background: the background value.

    Returns:
        a new array with the dtype of ``label`` whose values are a subset of the values of ``label``.
    """
    out = label.copy()
    free = label == background
    for value in np.unique(label[~free]):
        mask = label == value
        corrupted = corrupt_mask(mask)
        out[mask & ~corrupted] = background
        out[corrupted & free & (out == background)] = value
    return out


def morph_per_class(
    label: np.ndarray, operation: str, radius: int, background: float = 0, norm: float = 2
) -> np.ndarray:
    """
    Erode or dilate every foreground class of a label map separately with a ball of ``radius`` voxels.

    The classes are merged by :py:func:`apply_per_class`: erosion turns the removed voxels of a class into
    ``background`` and dilation only grows a class into voxels that are ``background`` in the original label.
    For erosion the volume border counts as inside the structure so that objects cut by the field of view do not
    shrink from the border.

    Args:
        label: spatial ``(X, Y, Z)`` or channel-first ``(C, X, Y, Z)`` label map (channels are processed
            independently).
        operation: ``"erode"`` or ``"dilate"``.
        radius: ball radius in voxels (the voxel spacing is not considered); 0 leaves the label unchanged.
        background: the background value.
        norm: norm of the ball, see :py:func:`ball`.

    Returns:
        a new array with the dtype of ``label`` whose values are a subset of the values of ``label``.
    """
    if operation not in MORPH_OPERATIONS:
        raise ValueError(f"operation must be one of {MORPH_OPERATIONS}, got {operation!r}.")
    if label.ndim not in (3, 4):
        raise ValueError(f"label must have shape (X, Y, Z) or (C, X, Y, Z), got shape {label.shape}.")
    structure = ball(radius, norm).reshape((1,) * (label.ndim - 3) + (2 * radius + 1,) * 3)
    if operation == "erode":
        return apply_per_class(label, partial(ndimage.binary_erosion, structure=structure, border_value=1), background)
    return apply_per_class(label, partial(ndimage.binary_dilation, structure=structure), background)


def markov_noise(
    mask: np.ndarray,
    expand: Sequence[bool],
    flip_prob: float,
    noise_prob: float,
    sigma: float,
    rng: np.random.RandomState,
) -> np.ndarray:
    """
    Markov boundary noise of a binary mask (Yao et al., Spatial Correction, ICLR 2023).

    At each step the boundary is the background voxels 6-adjacent to the mask when expanding, else the mask voxels
    6-adjacent to background (the volume border is not a boundary), and every boundary voxel is flipped with
    probability ``flip_prob``. After the steps every voxel is flipped with probability ``noise_prob``, and the result
    is smoothed by a Gaussian of ``sigma`` voxels and thresholded at 0.5, which removes isolated flips.

    Args:
        mask: boolean mask.
        expand: one entry per step, True to expand and False to shrink in that step.
        flip_prob: probability θ2 that a boundary voxel flips in a step.
        noise_prob: probability θ3 that any voxel flips after the steps.
        sigma: standard deviation of the Gaussian blur in voxels; 0 skips the blur.
        rng: random state of the flips.

    Returns:
        the corrupted boolean mask.
    """
    out = mask.copy()
    for grow in expand:
        boundary = ndimage.binary_dilation(out) & ~out if grow else out & ~ndimage.binary_erosion(out, border_value=1)
        boundary[boundary] = rng.random_sample(np.count_nonzero(boundary)) < flip_prob
        out ^= boundary
    out ^= rng.random_sample(out.shape) < noise_prob
    return ndimage.gaussian_filter(out.astype(np.float32), sigma, mode="nearest") > 0.5


def affine_label(
    label: np.ndarray, shift: Sequence[float], rotation: Sequence[float], scale: float = 1.0, background: float = 0
) -> np.ndarray:
    """
    Move the whole label map: scale and rotate it about the centroid of its foreground, then translate it.

    Nearest-neighbour resampling keeps the label values; voxels that come from outside the volume take the value of
    the nearest border voxel, as if the structures continued beyond the field of view. A label without foreground
    is returned unchanged.

    Args:
        label: spatial label map.
        shift: translation in voxels, one entry per axis.
        rotation: rotation vector in degrees (the rotation axis scaled by the angle).
        scale: isotropic scale factor, > 1 enlarges the structures.
        background: the background value.
    """
    foreground = label != background
    if not foreground.any():
        return label.copy()
    centre = np.array(ndimage.center_of_mass(foreground))
    matrix = Rotation.from_rotvec(rotation, degrees=True).as_matrix().T / scale
    offset = centre - matrix @ (centre + np.asarray(shift))
    return ndimage.affine_transform(label, matrix, offset, order=0, mode="nearest")


def drop_components(
    label: np.ndarray, num_components: int, rng: np.random.RandomState, background: float = 0
) -> np.ndarray:
    """
    Set ``num_components`` connected components to background, each of a class drawn uniformly from those left.

    Components are 26-connected (3D). Fewer are removed when the foreground runs out.
    """
    out = label.copy()
    connectivity = ndimage.generate_binary_structure(label.ndim, label.ndim)
    for _ in range(num_components):
        classes = np.unique(out[out != background])
        if classes.size == 0:
            break
        components, count = ndimage.label(out == classes[rng.randint(classes.size)], connectivity)
        out[components == rng.randint(1, count + 1)] = background
    return out


def add_blob(
    label: np.ndarray, radii: Sequence[float], rng: np.random.RandomState, background: float = 0
) -> np.ndarray:
    """
    Paint an axis-aligned ellipsoid of a foreground class drawn uniformly into the background (a false positive).

    The centre is drawn uniformly from the background voxels farther than the largest semi-axis from every
    structure, so that the blob is a separate structure, or from all background voxels when there are none. Only
    background voxels are painted. A label without foreground (no class to draw) or without background is returned
    unchanged.

    Args:
        label: spatial label map.
        radii: semi-axes of the ellipsoid in voxels, one per axis.
        rng: random state of the class and the centre.
        background: the background value.
    """
    free = label == background
    classes = np.unique(label[~free])
    if classes.size == 0 or not free.any():
        return label.copy()
    far = ndimage.distance_transform_edt(free) > max(radii)
    candidates = np.flatnonzero(far if far.any() else free)
    centre = np.unravel_index(candidates[rng.randint(candidates.size)], label.shape)
    grid = np.ogrid[tuple(slice(0, s) for s in label.shape)]
    blob = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) <= 1
    out = label.copy()
    out[blob & free] = classes[rng.randint(classes.size)]
    return out


def elastic_label(label: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """
    Warp the whole label map with a smooth displacement field given on a coarse grid of control points.

    The control points span the volume from corner to corner; the field between them is a cubic spline
    interpolation, as in ``elasticdeform.deform_grid``. Nearest-neighbour resampling keeps the label values, and
    voxels that come from outside the volume take the value of the nearest border voxel.

    Args:
        label: spatial label map.
        grid: displacements in voxels of the control points, shape ``(label.ndim, P1, P2, ...)``.
    """
    zoom = [size / points for size, points in zip(label.shape, grid.shape[1:], strict=True)]
    field = np.stack([ndimage.zoom(g, zoom, order=3, mode="nearest", grid_mode=False) for g in grid])
    coordinates = np.indices(label.shape, dtype=np.float32) + field
    return ndimage.map_coordinates(label, coordinates, order=0, mode="nearest")


class RandLabelCorruptiond(RandomizableTransform, MapTransform):
    """
    Base of the label corruption transforms: corrupt the labels of a case with probability ``prob``.

    A subclass draws its random choice in :py:meth:`randomize` and applies it in :py:meth:`corrupt`. All random
    numbers are drawn on every call (so the random stream does not depend on the data), and the same choice is
    applied to every key and channel; models whose randomness depends on the data draw a seed ``_seed`` for it.
    The voxels whose value changed are written to ``mask_key`` as a ``uint8`` array of the label's type (all zeros
    when the case is not corrupted); the label keeps its type and dtype. ``_do_transform`` holds whether the last
    case was corrupted.

    Args:
        keys: keys of the label maps to corrupt, channel-first ``(C, X, Y, Z)`` (channels are corrupted separately)
            or spatial ``(X, Y, Z)``; the background value is 0.
        prob: probability of corrupting a case.
        mask_key: key (or one key per label key) to write the corruption mask to.
        allow_missing_keys: don't raise exception if key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        prob: float = 0.5,
        mask_key: str | Sequence[str] = "corruption_mask",
        allow_missing_keys: bool = False,
    ) -> None:
        prob = check_number("prob", prob, 0, 1)
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.mask_keys = ensure_tuple_rep(mask_key, len(self.keys))
        if len(set(self.mask_keys)) != len(self.mask_keys):
            raise ValueError(f"give one distinct mask_key per key, got keys={self.keys}, mask_key={mask_key}.")

    def randomize(self, data: None = None) -> None:
        super().randomize(None)

    @abstractmethod
    def corrupt(self, label: np.ndarray) -> np.ndarray:
        """Corrupted copy of a spatial ``(X, Y, Z)`` label map with the last random choice."""

    def apply(self, label: np.ndarray) -> np.ndarray:
        """``label`` corrupted with the last random choice when the case is corrupted, else ``label`` itself."""
        if not self._do_transform:
            return label
        if label.ndim == 4:
            return np.stack([self.corrupt(channel) for channel in label])
        return self.corrupt(label)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        self.randomize()
        for key, mask_key in self.key_iterator(d, self.mask_keys):
            label = convert_to_numpy(d[key])
            if label.ndim not in (3, 4):
                raise ValueError(f"{key} must have shape (X, Y, Z) or (C, X, Y, Z), got shape {label.shape}.")
            corrupted = self.apply(label)
            d[mask_key] = convert_to_dst_type((corrupted != label).astype(np.uint8), d[key], dtype=np.uint8)[0]
            d[key] = convert_to_dst_type(corrupted, d[key])[0]
        return d


class RandErodeDilateLabeld(RandLabelCorruptiond):
    """
    Randomly erode or dilate all foreground classes of a label to simulate under- or over-segmentation.

    With probability ``prob`` (the fraction of corrupted cases), the operation is chosen as erosion or dilation
    with equal probability and a ball radius (the strength β) is drawn uniformly from the integers in ``radius``.
    See :py:func:`morph_per_class` for the per-class rules. After each call ``_operation`` and ``_radius`` hold the
    last random choice.

    Args:
        keys: keys of the label maps to corrupt, see :py:class:`RandLabelCorruptiond`.
        prob: probability of corrupting a case.
        radius: inclusive integer range ``(min, max)`` of the ball radius in voxels.
        norm: norm of the ball, see :py:func:`ball`: 2 (Euclidean ball), ``np.inf`` (cube) or 1 (octahedron).
        mask_key: key (or one key per label key) to write the corruption mask to.
        allow_missing_keys: don't raise exception if key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        prob: float = 0.5,
        radius: tuple[int, int] = (1, 3),
        norm: float = 2,
        mask_key: str | Sequence[str] = "corruption_mask",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, prob, mask_key, allow_missing_keys)
        self.radius = check_range("radius", radius, 0, integer=True)
        self.norm = check_number("norm", norm, 1)
        self._operation = MORPH_OPERATIONS[0]
        self._radius = self.radius[0]

    def randomize(self, data: None = None) -> None:
        super().randomize(None)
        self._operation = MORPH_OPERATIONS[self.R.randint(len(MORPH_OPERATIONS))]
        self._radius = int(self.R.randint(self.radius[0], self.radius[1] + 1))

    def corrupt(self, label: np.ndarray) -> np.ndarray:
        return morph_per_class(label, self._operation, self._radius, norm=self.norm)


class RandMarkovNoiseLabeld(RandLabelCorruptiond):
    """
    Markov boundary noise per foreground class (Spatial Correction, ICLR 2023), see :py:func:`markov_noise`.

    Each of the ``steps`` steps (T, the strength β) expands the class with probability ``expand_prob`` (θ1) or shrinks
    it, flipping each boundary voxel with probability ``flip_prob`` (θ2), so the boundary random-walks further with
    more steps. Expansion outpaces shrinkage, because the roughened surface has more voxels outside than inside it: a
    class grows at ``expand_prob=0.5``. Classes are merged by :py:func:`apply_per_class`, so a class only grows into
    background. After each call ``_expand`` holds the direction of every step and ``_seed`` the seed of the flips.

    Args:
        keys: keys of the label maps to corrupt, see :py:class:`RandLabelCorruptiond`.
        prob: probability of corrupting a case.
        steps: number of Markov steps T.
        expand_prob: probability θ1 that a step expands the class.
        flip_prob: probability θ2 that a boundary voxel flips in a step.
        noise_prob: probability θ3 that any voxel flips after the steps (0 for the published 3D settings).
        sigma: standard deviation in voxels of the final Gaussian blur (1 in 3D, 2 in 2D in the original).
        mask_key: key (or one key per label key) to write the corruption mask to.
        allow_missing_keys: don't raise exception if key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        prob: float = 0.5,
        steps: int = 80,
        expand_prob: float = 0.5,
        flip_prob: float = 0.05,
        noise_prob: float = 0.0,
        sigma: float = 1.0,
        mask_key: str | Sequence[str] = "corruption_mask",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, prob, mask_key, allow_missing_keys)
        self.steps = check_number("steps", steps, 0, integer=True)
        self.expand_prob = check_number("expand_prob", expand_prob, 0, 1)
        self.flip_prob = check_number("flip_prob", flip_prob, 0, 1)
        self.noise_prob = check_number("noise_prob", noise_prob, 0, 1)
        self.sigma = check_number("sigma", sigma, 0)
        self._expand = np.zeros(self.steps, bool)
        self._seed = 0

    def randomize(self, data: None = None) -> None:
        super().randomize(None)
        self._expand = self.R.rand(self.steps) < self.expand_prob
        self._seed = int(self.R.randint(MAX_SEED, dtype="uint32"))

    def corrupt(self, label: np.ndarray) -> np.ndarray:
        noise = partial(
            markov_noise,
            expand=self._expand,
            flip_prob=self.flip_prob,
            noise_prob=self.noise_prob,
            sigma=self.sigma,
            rng=np.random.RandomState(self._seed),
        )
        return apply_per_class(label, noise)


class RandAffineLabeld(RandLabelCorruptiond):
    """
    Shift, rotate and scale the whole label map (misregistered annotation), see :py:func:`affine_label`.

    The strength β is the translation length, drawn uniformly from ``shift`` in a uniformly random direction, and
    the rotation angle, drawn uniformly from ``rotation`` about a uniformly random axis through the centroid of the
    foreground; the isotropic scale factor is drawn uniformly from ``scale``. All classes move together, so a voxel
    can change from one class to another. After each call ``_shift`` (voxels per axis), ``_rotation`` (rotation
    vector in degrees) and ``_scale`` hold the last random choice.

    Args:
        keys: keys of the label maps to corrupt, see :py:class:`RandLabelCorruptiond`.
        prob: probability of corrupting a case.
        shift: range ``(min, max)`` of the translation length in voxels.
        rotation: range ``(min, max)`` of the rotation angle in degrees, within [0, 180].
        scale: range ``(min, max)`` of the scale factor, within [0.1, 10].
        mask_key: key (or one key per label key) to write the corruption mask to.
        allow_missing_keys: don't raise exception if key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        prob: float = 0.5,
        shift: tuple[float, float] = (1.0, 3.0),
        rotation: tuple[float, float] = (0.0, 5.0),
        scale: tuple[float, float] = (1.0, 1.0),
        mask_key: str | Sequence[str] = "corruption_mask",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, prob, mask_key, allow_missing_keys)
        self.shift = check_range("shift", shift, 0)
        self.rotation = check_range("rotation", rotation, 0, 180)
        self.scale = check_range("scale", scale, 0.1, 10)
        self._shift = np.zeros(3)
        self._rotation = np.zeros(3)
        self._scale = 1.0

    def _random_direction(self) -> np.ndarray:
        direction = self.R.normal(size=3)
        return direction / np.linalg.norm(direction)

    def randomize(self, data: None = None) -> None:
        super().randomize(None)
        self._shift = self.R.uniform(*self.shift) * self._random_direction()
        self._rotation = self.R.uniform(*self.rotation) * self._random_direction()
        self._scale = self.R.uniform(*self.scale)

    def corrupt(self, label: np.ndarray) -> np.ndarray:
        return affine_label(label, self._shift, self._rotation, self._scale)


class RandDropComponentLabeld(RandLabelCorruptiond):
    """
    Remove whole structures (missed annotation), see :py:func:`drop_components`.

    The number of removed connected components (the strength β) is drawn uniformly from the integers in
    ``num_components``; each is a random component of a random foreground class, set to background, so no other
    class changes. After each call ``_num_components`` and ``_seed`` (of the class and component choices) hold the
    last random choice.

    Args:
        keys: keys of the label maps to corrupt, see :py:class:`RandLabelCorruptiond`.
        prob: probability of corrupting a case.
        num_components: inclusive integer range ``(min, max)`` of the number of components removed.
        mask_key: key (or one key per label key) to write the corruption mask to.
        allow_missing_keys: don't raise exception if key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        prob: float = 0.5,
        num_components: tuple[int, int] = (1, 1),
        mask_key: str | Sequence[str] = "corruption_mask",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, prob, mask_key, allow_missing_keys)
        self.num_components = check_range("num_components", num_components, 0, integer=True)
        self._num_components = self.num_components[0]
        self._seed = 0

    def randomize(self, data: None = None) -> None:
        super().randomize(None)
        self._num_components = int(self.R.randint(self.num_components[0], self.num_components[1] + 1))
        self._seed = int(self.R.randint(MAX_SEED, dtype="uint32"))

    def corrupt(self, label: np.ndarray) -> np.ndarray:
        return drop_components(label, self._num_components, np.random.RandomState(self._seed))


class RandAddBlobLabeld(RandLabelCorruptiond):
    """
    Add a false-positive blob of a random foreground class in the background, see :py:func:`add_blob`.

    The three semi-axes of the ellipsoid (the strength β) are drawn uniformly and independently from ``radius``;
    only background voxels change. After each call ``_radii`` and ``_seed`` (of the class and centre choices) hold
    the last random choice.

    Args:
        keys: keys of the label maps to corrupt, see :py:class:`RandLabelCorruptiond`.
        prob: probability of corrupting a case.
        radius: range ``(min, max)`` of the semi-axes in voxels, min >= 1.
        mask_key: key (or one key per label key) to write the corruption mask to.
        allow_missing_keys: don't raise exception if key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        prob: float = 0.5,
        radius: tuple[float, float] = (2.0, 4.0),
        mask_key: str | Sequence[str] = "corruption_mask",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, prob, mask_key, allow_missing_keys)
        self.radius = check_range("radius", radius, 1)
        self._radii = np.full(3, self.radius[0])
        self._seed = 0

    def randomize(self, data: None = None) -> None:
        super().randomize(None)
        self._radii = self.R.uniform(*self.radius, size=3)
        self._seed = int(self.R.randint(MAX_SEED, dtype="uint32"))

    def corrupt(self, label: np.ndarray) -> np.ndarray:
        return add_blob(label, self._radii, np.random.RandomState(self._seed))


class RandElasticLabeld(RandLabelCorruptiond):
    """
    Elastic deformation of the whole label map, see :py:func:`elastic_label`.

    The displacements of a ``points`` x ``points`` x ``points`` grid of control points are drawn from a normal
    distribution whose standard deviation in voxels (the strength β) is drawn uniformly from ``magnitude``, as
    ``sigma`` in ``elasticdeform.deform_random_grid`` (used for LIDC by Reliable Mutual Distillation). Fewer points
    give smoother deformations. All classes move together, so a voxel can change from one class to another. After
    each call ``_magnitude`` and ``_grid`` (the control-point displacements) hold the last random choice.

    Args:
        keys: keys of the label maps to corrupt, see :py:class:`RandLabelCorruptiond`.
        prob: probability of corrupting a case.
        magnitude: range ``(min, max)`` of the standard deviation of the displacements in voxels.
        points: number of control points per axis, >= 2.
        mask_key: key (or one key per label key) to write the corruption mask to.
        allow_missing_keys: don't raise exception if key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        prob: float = 0.5,
        magnitude: tuple[float, float] = (1.0, 3.0),
        points: int = 5,
        mask_key: str | Sequence[str] = "corruption_mask",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, prob, mask_key, allow_missing_keys)
        self.magnitude = check_range("magnitude", magnitude, 0)
        self.points = check_number("points", points, 2, integer=True)
        self._magnitude = self.magnitude[0]
        self._grid = np.zeros((3,) + (self.points,) * 3)

    def randomize(self, data: None = None) -> None:
        super().randomize(None)
        self._magnitude = self.R.uniform(*self.magnitude)
        self._grid = self.R.normal(scale=self._magnitude, size=(3,) + (self.points,) * 3)

    def corrupt(self, label: np.ndarray) -> np.ndarray:
        return elastic_label(label, self._grid)


class RandMixedCorruptiond(RandLabelCorruptiond):
    """
    Corrupt a case with one of several models drawn by ``weights``, or with all of them in order (``chain``).

    With probability ``prob`` the case is corrupted; each model then still applies with its own ``prob`` (build them
    with ``prob=1.0`` for the plain mix). Only the models' random choices and :py:meth:`corrupt` are used, not their
    keys. The corruption mask marks the voxels whose final value differs from the original. :py:meth:`set_random_state`
    also seeds the models. After each call ``_index`` holds the index of the chosen model (not drawn with ``chain``).

    Args:
        corruptions: the corruption models.
        weights: relative probabilities of the models, non-negative with a positive sum; None for equal weights. Only
            without ``chain``.
        chain: apply all models in order instead of one.
        keys: keys of the label maps to corrupt, see :py:class:`RandLabelCorruptiond`.
        prob: probability of corrupting a case.
        mask_key: key (or one key per label key) to write the corruption mask to.
        allow_missing_keys: don't raise exception if key is missing.
    """

    def __init__(
        self,
        corruptions: Sequence[RandLabelCorruptiond],
        weights: Sequence[float] | None = None,
        chain: bool = False,
        keys: KeysCollection = "label",
        prob: float = 0.5,
        mask_key: str | Sequence[str] = "corruption_mask",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, prob, mask_key, allow_missing_keys)
        if not corruptions or not all(isinstance(c, RandLabelCorruptiond) for c in corruptions):
            raise ValueError(f"corruptions must be a non-empty sequence of RandLabelCorruptiond, got {corruptions!r}.")
        if chain and weights is not None:
            raise ValueError(f"weights apply only without chain, got weights={weights!r}.")
        weights = np.ones(len(corruptions)) if weights is None else np.asarray(weights, float)
        if weights.shape != (len(corruptions),) or not np.all(weights >= 0) or not weights.sum() > 0:
            raise ValueError(
                f"weights must be {len(corruptions)} non-negative numbers with a positive sum, got {weights.tolist()}."
            )
        self.corruptions = list(corruptions)
        self.weights = weights / weights.sum()
        self.chain = chain
        self._index = 0

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> RandMixedCorruptiond:
        super().set_random_state(seed, state)
        for corruption in self.corruptions:
            corruption.set_random_state(seed=int(self.R.randint(MAX_SEED, dtype="uint32")))
        return self

    def randomize(self, data: None = None) -> None:
        super().randomize(None)
        if not self.chain:
            self._index = int(self.R.choice(len(self.corruptions), p=self.weights))
        for corruption in self.corruptions:
            corruption.randomize()

    def corrupt(self, label: np.ndarray) -> np.ndarray:
        for corruption in self.corruptions if self.chain else [self.corruptions[self._index]]:
            label = corruption.apply(label)
        return label


MODELS: dict[str, type[RandLabelCorruptiond]] = {
    "erode_dilate": RandErodeDilateLabeld,
    "markov": RandMarkovNoiseLabeld,
    "affine": RandAffineLabeld,
    "drop_component": RandDropComponentLabeld,
    "add_blob": RandAddBlobLabeld,
    "elastic": RandElasticLabeld,
}

# Published noise settings, from the paper (or, for PyMIC, the public demo) named at each preset, as specs for
# make_corruption. "prob" is the
# fraction of corrupted training cases in the original. Radii and displacements are kept in voxels as published,
# without rescaling to this bundle's volumes, so presets from 2D images (marked 2D) move more, relative to 3D
# structures of a few voxels, than in their paper; pass overrides to rescale them.
PRESETS: dict[str, dict[str, Any]] = {
    # Spatial Correction (Yao et al., ICLR 2023), BraTS2020, 3D: every training label noisy; T=80, theta1=0.7 / 0.3,
    # theta2=0.05, theta3=0 and blur sigma=1 (the defaults). The original binarises the label (whole tumour) while
    # this applies the noise per class.
    "spatial_correction_B1": {"model": "markov", "prob": 1.0, "steps": 80, "expand_prob": 0.7, "flip_prob": 0.05},
    "spatial_correction_B2": {"model": "markov", "prob": 1.0, "steps": 80, "expand_prob": 0.3, "flip_prob": 0.05},
    # the original thresholds a distance transform at d ~ U(3, 5) (continuous); an integer ball radius in {3, 4, 5}
    # has the same mean distance
    "spatial_correction_B3": {"model": "erode_dilate", "prob": 1.0, "radius": (3, 5)},
    # MTCL (Xu et al., TMI 2022), left atrium, 3D: 72 of 80 training labels eroded or dilated (50/50) by a cube of side
    # U{3..15}; a cube of half-width 1..7 (odd sides) stands in for all sides
    "mtcl_la": {"model": "erode_dilate", "prob": 0.9, "radius": (1, 7), "norm": np.inf},
    # PyMIC JSRT demo, 2D: 171 of 180 training labels dilated or eroded by U{6..12} iterations of a 4-connected step
    # (an L1 ball, norm 1 here); the original's third option (30%, "edge distortion": discs added and removed on 10%
    # of the edge pixels) has no counterpart here, so dilation and erosion share all corrupted cases
    "pymic_jsrt": {"model": "erode_dilate", "prob": 0.95, "radius": (6, 12), "norm": 1},
    # Reliable Mutual Distillation, LIDC-IDRI 128x128 crops, 2D: 60% of the training labels deformed by
    # elasticdeform.deform_random_grid(sigma=U(1, 11), points=5, rotate=U(-45, 45), zoom=U(0.8, 2)); here the elastic
    # warp and the rotation (about a random 3D axis) and zoom are two nearest-neighbour resamplings instead of one
    # linear one
    "rmd_lidc": {
        "prob": 0.6,
        "chain": [
            {"model": "elastic", "magnitude": (1.0, 11.0), "points": 5},
            {"model": "affine", "shift": (0.0, 0.0), "rotation": (0.0, 45.0), "scale": (0.8, 2.0)},
        ],
    },
    # LIDC-IDRI reader disagreement (docs/corruption.md, docs/lidc.md), for nodule labels on their native CT
    # grid: one of a shrinking (theta1=0.25, T=6, theta2=0.15) and a balanced (theta1=0.5, T=3, theta2=0.15) Markov
    # boundary noise, weights 1:2, without the final blur (sigma=1 erases nodules a few slices thick). Chosen by
    # `python -m scripts.lidc.calibration --num_nodules 300 --seed 0` (best of 15 specs, ~40 s): against 956 reader
    # masks of 300 nodules, each compared with the consensus of the other readers, quantiles 5/25/50/75/95 % are
    #   Dice          readers 0.54 0.71 0.79 0.85 0.92, preset 0.58 0.71 0.79 0.85 0.91 (KS 0.036)
    #   volume ratio  readers 0.46 0.76 0.97 1.22 1.77, preset 0.53 0.80 0.95 1.18 1.56 (KS 0.074)
    # The preset's volume ratio has a lighter upper tail, and its Dice depends more on nodule size than the readers'.
    "lidc_calibrated": {
        "prob": 1.0,
        "one_of": [
            {"model": "markov", "steps": 6, "expand_prob": 0.25, "flip_prob": 0.15, "sigma": 0.0},
            {"model": "markov", "steps": 3, "expand_prob": 0.5, "flip_prob": 0.15, "sigma": 0.0},
        ],
        "weights": [1.0, 2.0],
    },
    # this bundle's own mixed setting for its 48^3 synthetic volumes (not from a paper): one model per corrupted case
    "mixed": {
        "prob": 0.5,
        "one_of": [
            {"model": "erode_dilate", "radius": (1, 3)},
            {"model": "markov", "steps": 80, "expand_prob": 0.5, "flip_prob": 0.05},
            {"model": "affine", "shift": (1.0, 3.0), "rotation": (0.0, 10.0)},
            {"model": "drop_component", "num_components": (1, 1)},
            {"model": "add_blob", "radius": (2.0, 5.0)},
            {"model": "elastic", "magnitude": (1.0, 3.0), "points": 5},
        ],
    },
}


def make_corruption(
    spec: str | Mapping[str, Any],
    prob: float | None = None,
    keys: KeysCollection = "label",
    mask_key: str | Sequence[str] = "corruption_mask",
    allow_missing_keys: bool = False,
    **overrides: Any,
) -> RandLabelCorruptiond:
    """
    Build a corruption transform from the name of a preset in :py:data:`PRESETS` or from a spec.

    A spec is ``{"model": name, **arguments}`` with a name in :py:data:`MODELS`, or ``{"one_of": [specs],
    "weights": [...]}`` or ``{"chain": [specs]}`` for a :py:class:`RandMixedCorruptiond`, each optionally with
    ``"prob"`` (default 1.0; the models inside a mix keep their own, also 1.0 by default).

    Args:
        spec: preset name or spec.
        prob: probability of corrupting a case; None for the spec's.
        keys: keys of the label maps to corrupt.
        mask_key: key (or one key per label key) to write the corruption mask to.
        allow_missing_keys: don't raise exception if key is missing.
        overrides: entries replacing those of the spec, e.g. ``radius=(1, 2)`` for a single model.
    """
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(f"unknown corruption preset {spec!r}, choose one of {sorted(PRESETS)}.")
        spec = PRESETS[spec]
    arguments = {**spec, **overrides}
    spec_prob = arguments.pop("prob", 1.0)
    common = {
        "keys": keys,
        "prob": spec_prob if prob is None else prob,
        "mask_key": mask_key,
        "allow_missing_keys": allow_missing_keys,
    }
    if "model" in arguments:
        model = arguments.pop("model")
        if model not in MODELS:
            raise ValueError(f"unknown corruption model {model!r}, choose one of {sorted(MODELS)}.")
        return MODELS[model](**arguments, **common)
    chain = "chain" in arguments
    if not chain and "one_of" not in arguments:
        raise ValueError(f"a spec needs 'model', 'one_of' or 'chain', got {sorted(arguments)}.")
    corruptions = [make_corruption(member) for member in arguments.pop("chain" if chain else "one_of")]
    return RandMixedCorruptiond(corruptions, chain=chain, **arguments, **common)
