"""Safe training checkpoints: atomic, rotating, complete enough to resume a run exactly, and a resume path
that skips a damaged newest file instead of failing or silently starting over."""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.transforms import Compose, Randomizable

logger = logging.getLogger(__name__)

EPOCH_PATTERN = "checkpoint_epoch={global_step}.pt"
FINAL_NAME = "checkpoint_final.pt"


def _numpy_state_to_tensors(state: tuple) -> dict[str, Any]:
    """A ``RandomState.get_state()`` tuple as tensors and numbers, loadable with ``weights_only=True``."""
    name, keys, pos, has_gauss, cached = state
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}


def _numpy_state_from_tensors(state: Mapping[str, Any]) -> tuple:
    return (state["name"], state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"], state["cached"])


class RNGState:
    """The random number generators a training run draws from, as a checkpointable object.

    Covers torch (CPU and CUDA), NumPy's and Python's global generators, and the private generators of the
    random MONAI transforms in ``transforms`` (crops, flips), so that a resumed run draws the same data order
    and augmentation as an uninterrupted one.
    """

    def __init__(self, transforms: Compose | None = None) -> None:
        self.transforms = [t for t in (transforms.flatten().transforms if transforms else ()) if isinstance(t, Randomizable)]

    def state_dict(self) -> dict[str, Any]:
        python_version, python_state, python_gauss = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": _numpy_state_to_tensors(np.random.get_state()),
            "python": {"version": python_version, "state": torch.tensor(python_state, dtype=torch.int64), "gauss": python_gauss},
            "transforms": [_numpy_state_to_tensors(t.R.get_state()) for t in self.transforms],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if len(state["transforms"]) != len(self.transforms):
            raise ValueError(
                f"the checkpoint holds the states of {len(state['transforms'])} random transforms, this run has "
                f"{len(self.transforms)}: resume with the preprocessing the checkpoint was made with."
            )
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        np.random.set_state(_numpy_state_from_tensors(state["numpy"]))
        python = state["python"]
        random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
        for transform, transform_state in zip(self.transforms, state["transforms"]):
            transform.R.set_state(_numpy_state_from_tensors(transform_state))


class TrainingCheckpointer:
    """Save ``save_dict`` atomically (a temporary file, then a rename) every ``save_interval`` epochs as
    ``checkpoint_epoch=N.pt``, keeping the newest ``n_saved``, and as ``checkpoint_final.pt`` at the end.

    A run killed at any moment leaves only complete checkpoints under these names. Entries that are None
    (such as the AMP gradient scaler of a run without AMP) are left out; ``save_dict`` is what a
    ``CheckpointLoader`` should load into.
    """

    def __init__(self, save_dir: str, save_dict: dict, n_saved: int = 2, save_interval: int = 1) -> None:
        if n_saved < 1 or save_interval < 1:
            raise ValueError(f"n_saved and save_interval must be >= 1, got {n_saved} and {save_interval}.")
        self.save_dir = save_dir
        self.save_dict = {name: obj for name, obj in save_dict.items() if obj is not None}
        self.n_saved = n_saved
        self.save_interval = save_interval

    def _checkpoint(self, pattern: str, n_saved: int) -> Checkpoint:
        return Checkpoint(
            to_save=self.save_dict,
            save_handler=DiskSaver(self.save_dir, atomic=True, require_empty=False),
            filename_pattern=pattern,
            n_saved=n_saved,
            global_step_transform=lambda engine, _: engine.state.epoch,
        )

    def attach(self, engine: Engine) -> None:
        for event, checkpoint in (
            (Events.EPOCH_COMPLETED(every=self.save_interval), self._checkpoint(EPOCH_PATTERN, self.n_saved)),
            (Events.COMPLETED, self._checkpoint(FINAL_NAME, 1)),
        ):
            engine.add_event_handler(event, checkpoint)
            if idist.get_rank() == 0:  # the rank that writes
                engine.add_event_handler(event, lambda _, c=checkpoint: logger.info(f"saved checkpoint {Path(self.save_dir) / c.last_checkpoint}"))


def _epoch_of(path: Path) -> int:
    match = re.fullmatch(r"checkpoint_epoch=(\d+)\.pt", path.name)
    return int(match.group(1)) if match else -1


def resolve_resume_path(resume_from: str, ckpt_dir: str) -> str:
    """The checkpoint to resume from: ``""`` for none, a file path as given, or ``"latest"`` for the newest
    complete checkpoint in ``ckpt_dir`` (the final one first, then by epoch), skipping any that cannot be read.
    """
    if not resume_from:
        return ""
    if resume_from != "latest":
        if not Path(resume_from).is_file():
            raise FileNotFoundError(f"resume_from: no checkpoint file at {resume_from}.")
        return resume_from
    folder = Path(ckpt_dir)
    epochs = sorted(folder.glob("checkpoint_epoch=*.pt"), key=_epoch_of, reverse=True)
    candidates = [p for p in [folder / FINAL_NAME] if p.is_file()] + epochs
    for path in candidates:
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a damaged file of any kind is skipped, and said so
            logger.warning(f"skipping damaged checkpoint {path}: {type(error).__name__}: {str(error).splitlines()[0]}")
            continue
        logger.info(f"resuming from {path}")
        return str(path)
    raise FileNotFoundError(f"resume_from='latest': no readable checkpoint in {folder} (looked at {[p.name for p in candidates]}).")
