"""Predictions written whole or not at all. MONAI's ``SaveImaged`` writes straight to the final name and, when a
writer fails, logs it at INFO and tries the next one: on a disk that fills during inference that ends with a cut
gzip and a 0-byte file, and exit status 0. :py:class:`AtomicSaveImaged` (``configs/inference.json``) writes to a
temporary name beside the file, checks that the file reads back whole, and only then renames it into place; a
failed write stops the run with a :py:class:`PredictionWriteError` naming the file and the reason."""

from __future__ import annotations

import errno
import logging
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import ImageWriter, MetaTensor
from monai.transforms import SaveImage, SaveImaged
from monai.utils import MetaKeys, ensure_tuple

from scripts.checks import brief_error, read_volume
from scripts.utils import BundleInputError, atomic_path, free_space

__all__ = ["AtomicSaveImaged", "PredictionWriteError", "save_atomically"]

logger = logging.getLogger(__name__)


class PredictionWriteError(BundleInputError):
    """A prediction could not be written whole; the message names the file, the reason and the free disk space.
    A :py:class:`scripts.utils.BundleInputError`, so that a bundle command prints it as its last line."""


class _NotWritten(Exception):
    """Why a temporary file was not written whole (its writers failed, or it does not read back)."""


def _write_failure(path: Path, reason: str, disk_full: bool = False) -> PredictionWriteError:
    """The error of a prediction ``path`` that could not be written, with the free space of its folder."""
    return PredictionWriteError(
        f"cannot write the prediction {path}: {reason} ({free_space(path.parent)} free on the disk of "
        f"{path.parent}); no partial file was left under its name"
        + (": free disk space or choose another --output_dir" if disk_full else "")
    )


def _channel_dim(saver: SaveImage, img: Any, meta_data: Mapping | None) -> int | None:
    """The channel axis of ``img``: none when the metadata's ``spatial_shape`` covers all its axes, as
    ``SaveImage`` decides (without changing the saver's options, which ``SaveImage`` does)."""
    spatial_shape = ensure_tuple(meta_data.get(MetaKeys.SPATIAL_SHAPE, ())) if meta_data else ()
    return None if len(spatial_shape) >= len(img.shape) else saver.data_kwargs["channel_dim"]


def _set_data(writer: ImageWriter, img: Any, channel_dim: int | None, squeeze_end_dims: bool) -> None:
    """Give ``img`` to ``writer`` channel-last, dropping a single channel when ``squeeze_end_dims``, but never a
    spatial axis: MONAI squeezes every trailing axis of length 1, which saves a (1, 24, 24, 1) prediction of a
    (24, 24, 1) image as a 2D (24, 24) file."""
    writer.set_data_array(data_array=img, channel_dim=channel_dim, squeeze_end_dims=False)
    data = writer.data_obj
    if squeeze_end_dims and data.ndim == 4 and data.shape[-1] == 1:  # (X, Y, Z, 1): one channel, drop it
        writer.data_obj = data[..., 0]
        if hasattr(writer, "channel_dim"):  # ITKWriter: the data has no channel axis any more
            writer.channel_dim = None


def _write(saver: SaveImage, img: Any, meta_data: Mapping | None, filename: Path) -> tuple[ImageWriter, tuple]:
    """Write ``img`` to ``filename`` with the first of ``saver.writers`` that can; return it and the shape it wrote.

    A writer that fails otherwise than with an ``OSError`` (a missing library, a format it cannot store) makes way
    for the next, as in ``SaveImage``; an ``OSError`` (a full disk, a lost mount) stops at once, since the next
    writer would meet the same disk, and one that swallows the error could leave a cut file.
    """
    channel_dim = _channel_dim(saver, img, meta_data)
    failures = []
    for writer_class in saver.writers:
        writer = writer_class(**saver.init_kwargs)
        try:
            _set_data(writer, img, channel_dim, saver.data_kwargs["squeeze_end_dims"])
            writer.set_metadata(meta_dict=meta_data, **saver.meta_kwargs)
            shape = tuple(writer.data_obj.shape)
            writer.write(str(filename), **saver.write_kwargs)
        except OSError:
            raise
        except Exception as error:  # any other library error: try the next writer, as SaveImage does
            logger.debug(f"{writer_class.__name__} cannot write {filename}", exc_info=True)
            failures.append(f"{writer_class.__name__}: {brief_error(error)}")
        else:
            return writer, shape
    raise _NotWritten("no writer could write it (" + "; ".join(failures or ["no writer for this format"]) + ")")


def _check_written(filename: Path, shape: tuple) -> None:
    """Raise :py:class:`_NotWritten` unless ``filename`` is whole: a NIfTI file must read back with ``shape`` and
    the voxel bytes its header declares (for ``.nii.gz`` the gzip trailer, the whole stream only if that differs);
    a file of another format must not be empty (ITK raises on failed writes, but cannot read back every type)."""
    if not filename.name.endswith((".nii", ".nii.gz")):
        if filename.stat().st_size == 0:
            raise _NotWritten("the writer left an empty file")
        return
    try:
        written = read_volume(filename, with_data=False).shape
    except Exception as error:  # a writer that swallowed a failed write leaves a file that does not read back
        raise _NotWritten(f"the written file does not read back ({brief_error(error)})") from error
    if written != shape:
        raise _NotWritten(f"the written file has shape {written}, expected {shape}")


def save_atomically(saver: SaveImage, img: torch.Tensor | np.ndarray, meta_data: Mapping | None = None) -> Path:
    """Save ``img`` where ``saver`` would, through a temporary file beside it that replaces the file only after
    it was written and read back whole; return the path.

    Raises:
        PredictionWriteError: naming the file and why it was not written (a full disk, a writer error, a file that
            does not read back); the temporary file is removed and an existing file under the name is kept.
    """
    meta_data = img.meta if isinstance(img, MetaTensor) else meta_data
    path = Path(saver.folder_layout.filename(**saver.fname_formatter(meta_data, saver)))
    try:
        with atomic_path(path) as temporary:
            writer, shape = _write(saver, img, meta_data, temporary)
            _check_written(temporary, shape)
    except OSError as error:  # its strerror ("No space left on device") without the temporary file's name
        disk_full = error.errno in (errno.ENOSPC, errno.EDQUOT)
        raise _write_failure(path, error.strerror or brief_error(error), disk_full) from error
    except _NotWritten as error:
        raise _write_failure(path, str(error)) from error
    saver.writer_obj = writer
    saver._data_index += 1  # SaveImage's running index, which names images without metadata
    if saver.savepath_in_metadict and meta_data is not None:
        meta_data[MetaKeys.SAVED_TO] = str(path)
    return path


class AtomicSaveImaged(SaveImaged):
    """
    ``SaveImaged`` (the same arguments and file names) whose files are complete or absent: each is written to a
    temporary name in its folder (with its suffix, so that the writer picks the same format), read back, and then
    renamed into place, and a failed write raises a :py:class:`PredictionWriteError` instead of trying another
    writer on a full disk. ``squeeze_end_dims`` drops a single channel only, so that the file has the spatial
    shape of its image even when an axis is one voxel thick.

    A subclass, so that MONAI Label's bundle inference, which leaves out ``SaveImaged`` transforms and saves the
    result itself, leaves it out too.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, meta_key, meta_key_postfix in self.key_iterator(d, self.meta_keys, self.meta_key_postfix):
            if meta_key is None and meta_key_postfix is not None:
                meta_key = f"{key}_{meta_key_postfix}"
            save_atomically(self.saver, d[key], d.get(meta_key) if meta_key is not None else None)
        return d
