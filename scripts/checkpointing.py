"""Safe training checkpoints: atomic, rotating, complete enough to resume a run exactly, and a resume path
that skips a damaged newest file instead of failing or silently starting over."""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
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
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def _numpy_state_from_tensors(state: Mapping[str, Any]) -> tuple:
    """The ``RandomState.set_state()`` tuple of :py:func:`_numpy_state_to_tensors`'s dict."""
    return (state["name"], state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"], state["cached"])


class RNGState:
    """The random number generators a training run draws from, as a checkpointable object.

    Covers torch (CPU and CUDA), NumPy's and Python's global generators, and the private generators of the
    random MONAI transforms in ``transforms`` (crops, flips; one ``Compose`` per data loader, since loaders that
    prefetch in threads must not share transform instances), so that a resumed run draws the same data order
    and augmentation as an uninterrupted one.
    """

    def __init__(self, transforms: Sequence[Compose] = ()) -> None:
        flat = [t for compose in transforms for t in compose.flatten().transforms]
        self.transforms = [t for t in flat if isinstance(t, Randomizable)]

    def state_dict(self) -> dict[str, Any]:
        python_version, python_state, python_gauss = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": _numpy_state_to_tensors(np.random.get_state()),
            "python": {
                "version": python_version,
                "state": torch.tensor(python_state, dtype=torch.int64),
                "gauss": python_gauss,
            },
            "transforms": [_numpy_state_to_tensors(t.R.get_state()) for t in self.transforms],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if len(state["transforms"]) != len(self.transforms):
            raise ValueError(
                f"the checkpoint holds the states of {len(state['transforms'])} random transforms, this run has "
                f"{len(self.transforms)}: resume with the preprocessing the checkpoint was made with."
            )
        torch.set_rng_state(state["torch"])
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)
        np.random.set_state(_numpy_state_from_tensors(state["numpy"]))
        python = state["python"]
        random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
        for transform, transform_state in zip(self.transforms, state["transforms"], strict=True):
            transform.R.set_state(_numpy_state_from_tensors(transform_state))


class TrainingCheckpointer:
    """Save ``save_dict`` atomically (a temporary file, then a rename) every ``save_interval`` epochs as
    ``checkpoint_epoch=N.pt``, keeping the newest ``n_saved``, and as ``checkpoint_final.pt`` at the end.

    A run killed at any moment leaves only complete checkpoints under these names. Entries that are None
    (such as the AMP gradient scaler of a run without AMP, or the meta network and its optimizer, which the
    baselines set to null) are left out; ``save_dict`` is what a ``CheckpointLoader`` should load into.
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
                engine.add_event_handler(event, lambda _, c=checkpoint: self._log_saved(c))

    def _log_saved(self, checkpoint: Checkpoint) -> None:
        """Log the path of the file ``checkpoint`` has just written."""
        logger.info(f"saved checkpoint {Path(self.save_dir) / checkpoint.last_checkpoint}")


def _saved_epoch(checkpoint: Mapping[str, Any]) -> int | None:
    """The epoch a checkpoint was written at, from the trainer state ignite stores (None without one)."""
    trainer = checkpoint.get("trainer")
    if not isinstance(trainer, Mapping) or not trainer.get("epoch_length"):
        return None
    return int(trainer["iteration"]) // int(trainer["epoch_length"])


def _check_epochs_left(path: Path, checkpoint: Mapping[str, Any], max_epochs: int | None) -> None:
    epoch = _saved_epoch(checkpoint)
    if max_epochs is not None and epoch is not None and epoch >= max_epochs:
        # ignite would silently start the whole schedule again from epoch 1
        raise ValueError(
            f"{path} was saved at epoch {epoch}, and epochs is {max_epochs}: nothing is left to train; raise --epochs "
            "to train longer."
        )


def resolve_resume_path(resume_from: str, ckpt_dir: str, max_epochs: int | None = None) -> str:
    """The checkpoint to resume from: ``""`` for none, a file path as given, or ``"latest"`` for the most
    recently written readable checkpoint in ``ckpt_dir``, skipping (with a warning) any that is damaged.

    Raises when the chosen checkpoint already reached ``max_epochs``.
    """
    if not resume_from:
        return ""
    if resume_from != "latest":
        path = Path(resume_from)
        if not path.is_file():
            raise FileNotFoundError(f"resume_from: no checkpoint file at {resume_from}.")
        _check_epochs_left(path, torch.load(path, map_location="cpu", weights_only=True), max_epochs)
        return resume_from
    folder = Path(ckpt_dir)
    candidates = sorted(
        list(folder.glob("checkpoint_epoch=*.pt")) + [p for p in [folder / FINAL_NAME] if p.is_file()],
        key=lambda p: p.stat().st_mtime_ns,
        reverse=True,
    )
    for path in candidates:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a damaged file of any kind is skipped, and said so
            logger.warning(f"skipping damaged checkpoint {path}: {type(error).__name__}: {str(error).splitlines()[0]}")
            continue
        _check_epochs_left(path, checkpoint, max_epochs)
        logger.info(f"resuming from {path}")
        return str(path)
    names = [p.name for p in candidates]
    raise FileNotFoundError(f"resume_from='latest': no readable checkpoint in {folder} (looked at {names}).")
