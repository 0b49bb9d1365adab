"""The check of an image's voxels where they are loaded: a MONAI ``MapTransform`` for the configs' preprocessing."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from scripts.utils import BundleInputError

__all__ = ["OVERFLOW", "CheckImaged", "fingerprint"]

logger = logging.getLogger(__name__)


# intensities this large overflow float32 arithmetic (the square in a standard deviation) during normalisation
OVERFLOW = 1e18


# per datalist, the fingerprint of every image loaded so far and its file: (shape, digest) -> file name
_FINGERPRINTS: dict[str, dict[tuple[tuple[int, ...], str], str]] = {}


def fingerprint(image: torch.Tensor, affine: torch.Tensor | np.ndarray | None) -> str:
    """A digest of an image's voxels and its affine (to a thousandth of a millimetre): equal for the same case
    saved in another format or compression, where the files' bytes differ."""
    digest = hashlib.sha256(np.ascontiguousarray(image.detach().cpu().numpy()))  # hashed in place, not copied
    if affine is not None:
        digest.update(np.round(np.asarray(affine, dtype=np.float64), 3))
    return digest.hexdigest()


def _listed_images(datalist: str) -> dict[str, str]:
    """The images ``datalist`` lists, by real path, each with where it is listed (``meta[0]``); empty when the file
    cannot be read (a tool that passes its own cases, as MONAI Label's scoring does). Read once per version."""
    try:
        return _read_listed_images(datalist, os.stat(datalist).st_mtime_ns)
    except OSError:
        return {}


@functools.lru_cache(maxsize=8)
def _read_listed_images(datalist: str, modified: int) -> dict[str, str]:
    """:py:func:`_listed_images` of the file as it was at ``modified``."""
    try:
        content = json.loads(Path(datalist).read_text())
    except (OSError, ValueError):
        return {}
    listed: dict[str, str] = {}
    for split, entries in content.items() if isinstance(content, dict) else ():
        for index, entry in enumerate(entries if isinstance(entries, list) else []):
            image = entry.get("image") if isinstance(entry, dict) else entry
            if isinstance(image, str):
                listed.setdefault(os.path.realpath(Path(datalist).parent / image), f"{split}[{index}]")
    return listed


class CheckImaged(MapTransform):
    """Refuse an image with NaN, infinite or overflowing voxels, naming its file, and warn about one whose voxels
    all have one value. The datalist check reads headers only; this reads the voxels once, where they are loaded
    anyway: put it right after ``LoadImaged`` among the cached (deterministic) transforms.

    With ``unique_in`` (the datalist), an image whose voxels and affine equal those of another file of that datalist
    loaded before in this process is refused as well: a case saved again in another format (``.nii`` beside
    ``.nii.gz``) is the same case, and in two splits it is leakage that the datalist check, which compares the
    files' bytes, cannot see.
    """

    def __init__(
        self, keys: KeysCollection = "image", allow_missing_keys: bool = False, unique_in: str | None = None
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.unique_in = None if unique_in is None else str(unique_in)

    def _check_unique(self, name: str, image: torch.Tensor, affine: Any) -> None:
        """Refuse ``image`` when another file of the datalist had the same voxels and affine. Files the datalist
        does not list (a tool's own cases) are not compared."""
        listed = _listed_images(self.unique_in) if self.unique_in is not None else {}
        where = listed.get(os.path.realpath(str(name)))
        if where is None:
            return
        seen = _FINGERPRINTS.setdefault(self.unique_in, {})
        first = seen.setdefault((tuple(image.shape), fingerprint(image, affine)), str(name))
        if os.path.realpath(first) != os.path.realpath(str(name)):
            raise BundleInputError(
                f"{where} {name}: same voxels and affine as {listed[os.path.realpath(first)]} {first} of "
                f"{self.unique_in} (a copy in another format?); a case must be listed once, in one split only "
                "(data leakage)"
            )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key])
            name = getattr(d[key], "meta", {}).get("filename_or_obj", f"the {key!r} of a case")
            bad = int((~(torch.isfinite(image) & (image.abs() <= OVERFLOW))).sum())
            if bad:
                raise BundleInputError(
                    f"{name}: {bad} of {image.numel()} voxels are NaN, infinite or beyond +-{OVERFLOW:g}; "
                    "repair or remove the case (a single such voxel makes the whole normalised image NaN)"
                )
            if image.numel() and bool(image.max() == image.min()):
                logger.warning(
                    f"{name}: every voxel is {float(image.flatten()[0]):g}; the image carries no information"
                )
            self._check_unique(name, image, getattr(d[key], "affine", None))
        return d
