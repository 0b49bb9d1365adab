"""Ignite handlers of the bundle's training runs: the MCPM weight-map images and the switch of the ``finetune``
baseline from the noisy training set to the clean meta set."""

from __future__ import annotations

import logging

import torch
from ignite.engine import Engine, Events
from monai.data import ThreadDataLoader
from torch.utils.data import Dataset
from torch.utils.tensorboard import SummaryWriter

from scripts.sampling import GroupBatchSampler
from scripts.trainer import WEIGHT_KEY
from scripts.utils import check_number

__all__ = ["FinetuneHandler", "WeightMapImageHandler"]

logger = logging.getLogger(__name__)


def _unit_range(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else torch.zeros_like(x)


class WeightMapImageHandler:
    """Write the middle slice of image | label | MCPM weight map of the epoch's last batch to TensorBoard.

    Lets a user see where the meta mask network puts low weights (typically along corrupted boundaries).
    """

    def __init__(self, log_dir: str, interval: int = 1, tag: str = "image_label_weight") -> None:
        self.log_dir = log_dir
        self.interval = interval
        self.tag = tag
        self._writer: SummaryWriter | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self.close)

    def close(self, engine: Engine | None = None) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        if isinstance(output, list):  # decollated, one dict per case
            sample = output[0]
        else:
            sample = {k: v[0] for k, v in output.items() if torch.is_tensor(v) and v.dim() > 1}
        if WEIGHT_KEY not in sample:
            return
        depth = sample["image"].shape[-1] // 2
        panels = [
            _unit_range(sample["image"][0, ..., depth]),
            _unit_range(sample["label"][0, ..., depth]),
            sample[WEIGHT_KEY][0, ..., depth].float().clamp(0, 1),
        ]
        if self._writer is None:
            self._writer = SummaryWriter(log_dir=self.log_dir)
        self._writer.add_image(self.tag, torch.cat(panels, dim=1).detach().cpu().unsqueeze(0), engine.state.epoch)
        self._writer.flush()


class FinetuneHandler:
    """Train on ``dataset`` (the clean meta set) from the epoch after ``fraction`` of ``max_epochs`` on: the
    ``finetune`` baseline, plain training on the noisy cases for the first 3/4 of the updates, then on the clean
    cases for the rest.

    The meta-set epochs keep the training set's number of batches (the meta cases are cycled in a fresh random order,
    ``batch_size`` per batch), so the run has plain training's updates. The switch happens at the start of every
    epoch after it, so a run resumed in the meta-set phase continues on the meta set.
    """

    def __init__(self, dataset: Dataset, batch_size: int, fraction: float = 0.75) -> None:
        check_number("fraction", fraction, 0.0, 1.0)
        self.dataset = dataset
        self.batch_size = batch_size
        self.fraction = fraction
        self._loader: ThreadDataLoader | None = None

    def switch_epoch(self, max_epochs: int) -> int:
        """The last epoch on the training set: ``round(fraction * max_epochs)``."""
        return round(self.fraction * max_epochs)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.state.epoch <= self.switch_epoch(engine.state.max_epochs) or self._loader is not None:
            return
        sampler = GroupBatchSampler([len(self.dataset)], [self.batch_size], num_batches=engine.state.epoch_length)
        self._loader = ThreadDataLoader(self.dataset, batch_sampler=sampler, num_workers=0)
        logger.info(
            f"epoch {engine.state.epoch}: fine-tuning on the {len(self.dataset)} clean meta cases "
            f"({engine.state.epoch_length} batches of {self.batch_size} per epoch)"
        )
        engine.set_data(self._loader)
