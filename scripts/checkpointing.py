"""Safe training checkpoints: atomic, rotating (also across resumes), complete enough to resume a run exactly
(including the best validation score so far), and a resume path that skips a damaged newest file instead of
failing or silently starting over."""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointSaver
from monai.transforms import Compose, Randomizable

from scripts.lock import release, remove_stale_temporaries
from scripts.utils import as_flag

logger = logging.getLogger(__name__)

EPOCH_PATTERN = "checkpoint_epoch={global_step}.pt"
FINAL_NAME = "checkpoint_final.pt"
EPOCH_FILE = re.compile(r"checkpoint_epoch=(\d+)\.pt")


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


class KeyMetricState:
    """The best-so-far of the validation ``CheckpointSaver`` s that save on the key metric (``model.pt``,
    ``meta_network.pt``), as a checkpointable object for the training checkpoint's ``save_dict``.

    Its state is each saver's ignite ``Checkpoint`` state (the saved ``(score, filename)`` list), by the file the
    saver writes, and the best metric and its epoch that ``evaluator`` logs. Loaded on resume, it makes the savers
    replace their file only on a better score than the best before the resume. An entry whose file is not in the
    saver's folder (a resume into another folder) is dropped, so that the resumed run writes one there.
    """

    def __init__(self, handlers: Sequence[Any] | None = (), evaluator: Engine | None = None) -> None:
        self.savers: dict[str, Checkpoint] = {}
        for index, handler in enumerate(handlers or ()):
            # MONAI keeps the key-metric tracking of a saver in this ignite Checkpoint (CheckpointSaver.load_state_dict)
            checkpoint = getattr(handler, "_key_metric_checkpoint", None)
            if isinstance(handler, CheckpointSaver) and checkpoint is not None:
                name = getattr(checkpoint.save_handler, "filename", None) or f"key_metric_{index}"
                self.savers[name] = checkpoint
            elif isinstance(handler, CheckpointSaver) and not hasattr(handler, "_key_metric_checkpoint"):
                logger.warning(
                    "this MONAI's CheckpointSaver keeps no _key_metric_checkpoint: the best score is not kept across "
                    "resumes, so a resumed run replaces model.pt at its first validation"
                )
        self.evaluator = evaluator

    def state_dict(self) -> dict[str, Any]:
        # plain floats, ints and strings, so that the checkpoint loads with weights_only=True
        state: dict[str, Any] = {}
        for name, checkpoint in self.savers.items():
            state[name] = {"_saved": [(float(score), str(file)) for score, file in checkpoint.state_dict()["_saved"]]}
        if self.evaluator is not None and hasattr(self.evaluator.state, "best_metric"):
            best = self.evaluator.state
            state["evaluator"] = {
                "best_metric": float(best.best_metric),
                "best_metric_epoch": int(best.best_metric_epoch),
            }
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        kept_any = False
        for name, checkpoint in self.savers.items():
            if name not in state:
                logger.warning(f"the checkpoint holds no best score for {name}: its first validation will save one")
                continue
            folder = Path(getattr(checkpoint.save_handler, "dirname", "."))
            on_disk = getattr(checkpoint.save_handler, "filename", None)
            kept = [(p, f) for p, f in state[name]["_saved"] if (folder / (on_disk or f)).is_file()]
            checkpoint.load_state_dict({"_saved": kept})
            for priority, _ in kept:
                logger.info(f"{folder / (on_disk or name)} keeps its best score {priority:.4f} from before the resume")
            kept_any = kept_any or bool(kept)
        if self.evaluator is not None and kept_any and "evaluator" in state:
            self.evaluator.state.best_metric = state["evaluator"]["best_metric"]
            self.evaluator.state.best_metric_epoch = state["evaluator"]["best_metric_epoch"]


class TrainingCheckpointer:
    """Save ``save_dict`` atomically (a temporary file, then a rename) every ``save_interval`` epochs as
    ``checkpoint_epoch=N.pt``, keeping the newest ``n_saved``, and as ``checkpoint_final.pt`` at the end.

    A run killed at any moment leaves only complete checkpoints under these names. Entries that are None
    (such as the AMP gradient scaler of a run without AMP, or the meta network and its optimizer, which the
    baselines set to null) are left out; ``save_dict`` is what a ``CheckpointLoader`` should load into.
    When the run resumes from ``resume_path`` in ``save_dir``, the rotation goes on with the newest ``n_saved``
    epoch checkpoints there up to the resumed epoch, so that no more than ``n_saved`` remain. A fresh run with
    ``overwrite`` (a start-over, which ``scripts.outputs.check_training_outputs`` allowed) deletes the earlier
    run's checkpoints in ``save_dir`` when training starts: after the data are loaded and checked. Then too, the
    partial files that runs killed while writing left in ``save_dir`` are removed. When the training completes,
    the lock of ``save_dir`` that ``scripts.lock.hold_training_folder`` took is released.
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: dict,
        n_saved: int = 2,
        save_interval: int = 1,
        resume_path: str = "",
        overwrite: bool | str = False,
    ) -> None:
        if n_saved < 1 or save_interval < 1:
            raise ValueError(f"n_saved and save_interval must be >= 1, got {n_saved} and {save_interval}.")
        self.save_dir = save_dir
        self.save_dict = {name: obj for name, obj in save_dict.items() if obj is not None}
        self.n_saved = n_saved
        self.save_interval = save_interval
        self.resume_path = str(resume_path or "")
        self.overwrite = as_flag("overwrite", overwrite)

    def _checkpoint(self, pattern: str, n_saved: int) -> Checkpoint:
        return Checkpoint(
            to_save=self.save_dict,
            save_handler=DiskSaver(self.save_dir, atomic=True, require_empty=False),
            filename_pattern=pattern,
            n_saved=n_saved,
            global_step_transform=lambda engine, _: engine.state.epoch,
        )

    def attach(self, engine: Engine) -> None:
        epochs = self._checkpoint(EPOCH_PATTERN, self.n_saved)
        engine.add_event_handler(Events.STARTED, lambda e: self._continue_rotation(epochs, e.state.epoch))
        if idist.get_rank() == 0:  # after the run's checks, in the folder its lock holds
            engine.add_event_handler(Events.STARTED, lambda _: remove_stale_temporaries(self.save_dir))
        if self.overwrite and not self.resume_path and idist.get_rank() == 0:
            engine.add_event_handler(Events.STARTED, lambda _: self._delete_earlier_run())
        for event, checkpoint in (
            (Events.EPOCH_COMPLETED(every=self.save_interval), epochs),
            (Events.COMPLETED, self._checkpoint(FINAL_NAME, 1)),
        ):
            engine.add_event_handler(event, checkpoint)
            if idist.get_rank() == 0:  # the rank that writes
                engine.add_event_handler(event, lambda _, c=checkpoint: self._log_saved(c))
        # after the final checkpoint: a training run in-process (MONAI Label) gives its folder back when it ends
        engine.add_event_handler(Events.COMPLETED, lambda _: release(self.save_dir))

    def _continue_rotation(self, checkpoint: Checkpoint, epoch: int) -> None:
        """Let ``checkpoint`` rotate the epoch checkpoints written before a resume at ``epoch``: those in
        ``save_dir`` if the resumed file is there, up to ``epoch``, the newest ``n_saved`` of them."""
        folder = Path(self.save_dir)
        if epoch < 1 or not self.resume_path or Path(self.resume_path).resolve().parent != folder.resolve():
            return
        numbered = [(int(m.group(1)), p.name) for p in run_files(folder) if (m := EPOCH_FILE.fullmatch(p.name))]
        earlier = sorted(item for item in numbered if item[0] <= epoch)[-self.n_saved :]
        checkpoint.load_state_dict({"_saved": earlier})
        if earlier:
            logger.info(f"checkpoint rotation continues with {', '.join(name for _, name in earlier)} in {folder}")

    def _delete_earlier_run(self) -> None:
        """Delete the checkpoints an earlier run left in ``save_dir``, so that none lingers beside this run's."""
        for path in run_files(self.save_dir):
            path.unlink(missing_ok=True)
            logger.info(f"overwrite: deleted the earlier run's checkpoint {path}")

    def _log_saved(self, checkpoint: Checkpoint) -> None:
        """Log the path of the file ``checkpoint`` has just written."""
        logger.info(f"saved checkpoint {checkpoint.last_checkpoint}")


def run_files(ckpt_dir: str | Path) -> list[Path]:
    """The training checkpoints in ``ckpt_dir``: ``checkpoint_epoch=N.pt`` and ``checkpoint_final.pt``."""
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and (EPOCH_FILE.fullmatch(p.name) or p.name == FINAL_NAME))


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
