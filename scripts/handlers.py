"""Ignite handlers specific to MCPM training."""

from __future__ import annotations

import torch
from ignite.engine import Engine, Events
from torch.utils.tensorboard import SummaryWriter

from scripts.trainer import WEIGHT_KEY


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
