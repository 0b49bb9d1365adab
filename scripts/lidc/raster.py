"""
Reader contours rasterised on a scan's voxel grid, and boxes of that grid.

Grid and conventions:

- masks are indexed ``[row, column, slice]`` (pylidc's ``boolean_mask`` order); slices are in ascending z, the
  order of the scan's ``zvals``; MONAI's ``ITKReader`` gives ``[column, row, slice]``, so transpose ``(1, 0, 2)``;
- a pixel's index is its centre; a pixel belongs to a contour's region when its centre lies inside the closed
  polygon through the contour's points; pixels on the polygon (the outline) are not part of the nodule by default.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from scripts.lidc.database import Contour, Scan

__all__ = ["BoxMask", "annotation_mask", "patch_start", "rasterise_polygon"]


@dataclass(eq=False)
class BoxMask:
    """A boolean mask on a box of a scan's voxel grid: ``array[i, j, k]`` is voxel ``offset + (i, j, k)``.

    Any number of axes works the same way (:py:func:`rasterise_polygon` also uses it for 2D windows of one slice).
    """

    array: np.ndarray
    offset: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        """The box's size along each axis."""
        return tuple(self.array.shape)

    @property
    def voxels(self) -> int:
        """The number of voxels in the mask."""
        return int(np.count_nonzero(self.array))

    def crop(self, offset: Sequence[int], shape: Sequence[int]) -> np.ndarray:
        """This mask on the box at ``offset`` of ``shape`` (False outside this mask's own box)."""
        out = np.zeros(tuple(shape), dtype=bool)
        src, dst = [], []
        for own_start, own_size, start, size in zip(self.offset, self.array.shape, offset, shape, strict=True):
            lo, hi = max(own_start, start), min(own_start + own_size, start + size)
            if hi <= lo:
                return out
            src.append(slice(lo - own_start, hi - own_start))
            dst.append(slice(lo - start, hi - start))
        out[tuple(dst)] = self.array[tuple(src)]
        return out

    def to_volume(self, shape: Sequence[int]) -> np.ndarray:
        """This mask in a whole volume of ``shape`` (e.g. the scan's (512, 512, number of slices))."""
        return self.crop((0, 0, 0), shape)

    @staticmethod
    def bounding(masks: Iterable[BoxMask]) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """Offset and shape of the smallest box holding the boxes of all ``masks``."""
        masks = list(masks)
        if not masks:
            raise ValueError("no masks to bound.")
        start = np.min([m.offset for m in masks], axis=0)
        stop = np.max([np.add(m.offset, m.shape) for m in masks], axis=0)
        return tuple(int(v) for v in start), tuple(int(v) for v in stop - start)  # type: ignore[return-value]


def patch_start(centre: Sequence[float], shape: Sequence[int]) -> tuple[int, int, int]:
    """Corner voxel of a box of ``shape`` whose voxel ``shape // 2`` is the voxel nearest to ``centre``."""
    corner = (int(math.floor(c + 0.5)) - int(s) // 2 for c, s in zip(centre, shape, strict=True))
    return tuple(corner)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------------
# polygons


def _next(values: np.ndarray) -> np.ndarray:
    """Each polygon vertex's successor, the last one's being the first (``np.roll(values, -1, 0)``, faster)."""
    return np.concatenate([values[1:], values[:1]])


def _outline_points(points: np.ndarray) -> np.ndarray:
    """All lattice points (x, y) on the closed polygon through ``points``: each edge's end points and between."""
    start = points
    delta = _next(points) - start
    steps = np.maximum(np.gcd(np.abs(delta[:, 0]), np.abs(delta[:, 1])), 1)
    edge = np.repeat(np.arange(len(points)), steps)
    t = np.arange(int(steps.sum())) - np.repeat(np.cumsum(steps) - steps, steps)
    return start[edge] + (delta[edge] // steps[edge, None]) * t[:, None]


def _winding(points: np.ndarray, origin: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """Winding number of the closed polygon around every pixel centre of the (row, column) window.

    A horizontal ray from each centre to the left crosses the edges that span its row (half-open in y, so a
    vertex on the row counts once); each crossing at x < column adds the edge's direction. Exact integer
    arithmetic; centres lying on the polygon get an arbitrary value (callers treat them with the outline).
    """
    (row0, col0), (height, width) = origin, shape
    x0, y0 = points[:, 0], points[:, 1]
    x1, y1 = _next(x0), _next(y0)
    low, count = np.minimum(y0, y1), np.abs(y1 - y0)
    edge = np.repeat(np.arange(len(points)), count)
    rows = low[edge] + np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
    dy = (y1 - y0)[edge]
    # first column strictly right of the crossing x = x0 + (row - y0) * dx / dy: floor(x) + 1, in integers
    first = x0[edge] + np.floor_divide((rows - y0[edge]) * (x1 - x0)[edge], dy) + 1
    flat = (rows - row0) * (width + 1) + np.clip(first - col0, 0, width)
    steps = np.bincount(flat, weights=np.sign(dy), minlength=height * (width + 1)).reshape(height, width + 1)
    return np.cumsum(steps, axis=1)[:, :width]


def rasterise_polygon(
    points: np.ndarray, origin: Sequence[int] | None = None, shape: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """The pixels inside, and the pixels on, the closed polygon through ``points`` ((x, y) = (column, row)).

    Pixel-centre convention: pixel (row r, column c) is the point (x=c, y=r), the centre of the square
    [c - 1/2, c + 1/2] x [r - 1/2, r + 1/2], in the coordinates of the contour points (LIDC's pixel indices).

    - ``inside``: centres strictly inside the polygon by the nonzero winding rule (a loop drawn twice stays
      filled; for a simple polygon it equals the even-odd rule). For a simple polygon its count is exactly
      Pick's interior count ``area - boundary / 2 + 1`` (area by the shoelace formula, boundary the lattice
      points on the polygon).
    - ``on``: centres on the polygon: the points and the lattice points along each edge (the outline).

    The window is (row, column) ``origin`` and ``shape``, by default the points' bounding box; the returned
    origin says where it starts. Nothing outside the bounding box can be inside, so a larger window only pads.
    """
    points = np.asarray(points, dtype=np.int64).reshape(-1, 2)
    if len(points) == 0:
        raise ValueError("a polygon needs at least one point.")
    if origin is None or shape is None:
        low, high = points.min(0), points.max(0)
        origin, shape = (int(low[1]), int(low[0])), (int(high[1] - low[1] + 1), int(high[0] - low[0] + 1))
    origin = (int(origin[0]), int(origin[1]))
    shape = (int(shape[0]), int(shape[1]))
    # winding on the bounding box (where crossings live), then copied into the requested window
    low, high = points.min(0), points.max(0)
    box_origin = (int(low[1]), int(low[0]))
    box_shape = (int(high[1] - low[1] + 1), int(high[0] - low[0] + 1))
    inside = BoxMask(_winding(points, box_origin, box_shape) != 0, box_origin).crop(origin, shape)
    on = np.zeros(shape, dtype=bool)
    outline = _outline_points(points)
    rows, cols = outline[:, 1] - origin[0], outline[:, 0] - origin[1]
    keep = (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])
    on[rows[keep], cols[keep]] = True
    return inside & ~on, on, origin


# ---------------------------------------------------------------------------------------------------------------
# annotations


def _contour_box(contours: Sequence[Contour], scan: Scan) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Offset and shape of the box holding all points of ``contours`` on ``scan``'s grid."""
    points = np.concatenate([c.points for c in contours])
    ks = scan.slice_index([c.image_z_position for c in contours])
    low = (int(points[:, 1].min()), int(points[:, 0].min()), int(ks.min()))
    high = (int(points[:, 1].max()), int(points[:, 0].max()), int(ks.max()))
    return low, tuple(h - lo + 1 for lo, h in zip(low, high, strict=True))  # type: ignore[return-value]


def annotation_mask(
    contours: Sequence[Contour],
    scan: Scan,
    include_outline: bool = False,
    offset: Sequence[int] | None = None,
    shape: Sequence[int] | None = None,
) -> BoxMask:
    """One reader's nodule as a boolean mask on ``scan``'s grid (rows, columns, slices in ascending z).

    Each contour's slice is the scan slice at its ``image_z_position`` (the ``zvals`` table holds every
    slice's z; all LIDC contours lie on one). On a slice the nodule is the union of the inclusion contours'
    regions minus the exclusion contours' regions (holes), each region from :py:func:`rasterise_polygon`:

    - ``include_outline=False`` (default, like pylidc's ``boolean_mask``): inclusion regions are the pixels
      strictly inside, exclusion regions the pixels inside or on their outline; so no outline pixel is nodule;
    - ``include_outline=True``: inclusion regions take their outline pixels, exclusion holes do not.

    The box is ``offset``/``shape`` if given (contours outside it are cropped), else the contours' bounding box.
    """
    if not contours:
        raise ValueError("an annotation needs at least one contour.")
    if offset is None or shape is None:
        offset, shape = _contour_box(contours, scan)
    offset, shape = tuple(int(v) for v in offset), tuple(int(v) for v in shape)
    keep = np.zeros(shape, dtype=bool)
    drop = np.zeros(shape, dtype=bool)
    slices = scan.slice_index([c.image_z_position for c in contours]) - offset[2]
    for contour, k in zip(contours, slices, strict=True):
        if not 0 <= k < shape[2]:
            continue
        inside, on, _ = rasterise_polygon(contour.points, offset[:2], shape[:2])
        if contour.inclusion:
            keep[..., k] |= (inside | on) if include_outline else inside
        else:
            drop[..., k] |= inside if include_outline else (inside | on)
    return BoxMask(keep & ~drop, offset)  # type: ignore[arg-type]
