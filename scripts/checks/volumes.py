"""Read a volume's shape and affine (and its voxels where needed) as training would, and say why a shape is not
a 3D volume with the network's channels."""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.transforms import LoadImage

__all__ = ["Volume", "affine_problem", "channel_problem", "read_volume", "thin_axes"]


@dataclass(frozen=True)
class Volume:
    """Shape and voxel-to-world (RAS) affine of a file, with its voxels when they were read."""

    shape: tuple[int, ...]
    affine: np.ndarray
    data: np.ndarray | None = None


def _nifti_data_size(path: Path, expected: int) -> int:
    """
    Bytes stored in the NIfTI file ``path``, found without reading the voxels where possible: the file size if
    it is not compressed, the uncompressed size recorded in the gzip trailer (modulo 2**32) if that matches
    ``expected``, and by decompressing the whole file otherwise (truncated or multi-member gzip files).
    """
    if path.suffix != ".gz":
        return path.stat().st_size
    with path.open("rb") as stream:
        stream.seek(-4, os.SEEK_END)
        if int.from_bytes(stream.read(4), "little") == expected % 2**32:
            return expected
    size = 0
    with gzip.open(path) as stream:
        while chunk := stream.read(1 << 24):
            size += len(chunk)
    return size


def _read_nifti(path: Path, with_data: bool) -> Volume:
    """Read the header of a NIfTI file with nibabel, and the voxels if ``with_data``, else check their size."""
    image = nib.load(path)
    if with_data:
        return Volume(tuple(image.shape), image.affine, np.asanyarray(image.dataobj))
    proxy = image.dataobj
    expected = proxy.offset + proxy.dtype.itemsize * int(np.prod(proxy.shape))
    size = _nifti_data_size(path, expected)
    if size < expected:
        raise ValueError(f"file is truncated: {size} bytes, the header declares {expected}")
    return Volume(tuple(image.shape), image.affine)


def _read_itk(path: Path, with_data: bool) -> Volume:
    """Read a non-NIfTI file or DICOM folder with MONAI's ITK reader, as training would (the voxels are read)."""
    image, meta = LoadImage(image_only=False, reader="ITKReader", dtype=None)(str(path))
    data, affine = np.asarray(image), np.asarray(meta["affine"], dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"has {affine.shape[0] - 1} spatial dimensions (shape {data.shape}), expected 3")
    return Volume(data.shape, affine, data if with_data else None)


def read_volume(path: Path, with_data: bool) -> Volume:
    """Read ``path``: NIfTI files with nibabel, anything else with ITK."""
    if path.name.endswith((".nii", ".nii.gz")):
        if path.is_dir():
            raise IsADirectoryError("is a directory, expected a NIfTI file")
        return _read_nifti(path, with_data)
    return _read_itk(path, with_data)


def channel_problem(shape: tuple[int, ...], channels: int) -> str | None:
    """
    Why ``shape`` is not a 3D volume with ``channels`` channels: ``(X, Y, Z)`` stands for one channel and
    ``(X, Y, Z, C)`` has the channels last, as NIfTI and ITK store them.
    """
    if len(shape) < 3:
        return f"is {len(shape)}D with shape {shape}, expected a 3D volume"
    if len(shape) > 4:
        return f"is {len(shape)}D with shape {shape}, expected (X, Y, Z) or (X, Y, Z, C)"
    found = shape[3] if len(shape) == 4 else 1
    if found != channels:
        return f"has {found} channels (shape {shape}), expected {channels}"
    return None


def affine_problem(affine: np.ndarray) -> str | None:
    """Why ``affine`` cannot map voxels to the world: it holds NaN or infinite values, or its 3x3 part is singular
    (a zero column is a voxel size of 0). MONAI's readers replace such an affine by one made from the voxel sizes,
    so that a prediction would come out on another grid than its image; None when the affine is usable."""
    matrix = np.asarray(affine, dtype=np.float64)
    bad = ~np.isfinite(matrix)
    if bad.any():
        found = (("NaN", np.isnan(matrix)), ("infinite", np.isinf(matrix)))
        kinds = " and ".join(name for name, mask in found if mask.any())
        return f"has an affine with {kinds} values ({int(bad.sum())} of its {matrix.size} entries)"
    sizes = np.linalg.norm(matrix[:3, :3], axis=0)
    zero = [axis for axis, size in enumerate(sizes) if size == 0]
    if zero:
        return f"has a singular affine: voxel size 0 along axis {', '.join(map(str, zero))} (a zero column)"
    if abs(np.linalg.det(matrix[:3, :3])) <= 1e-9 * float(np.prod(sizes)):
        return "has a singular affine: its voxel axes are not independent (determinant 0)"
    return None


def thin_axes(shape: tuple[int, ...]) -> list[int]:
    """The spatial axes (of the first three) along which ``shape`` is one voxel thick: a 2D slice stored as 3D."""
    return [axis for axis, size in enumerate(shape[:3]) if size == 1]
