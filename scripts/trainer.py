"""An Ignite trainer for Meta Corrupted Pixels Mining (MCPM, Wang et al., MICCAI 2020).

Each iteration: (1) the per-voxel loss map of the noisy batch; (2) weights from the meta mask network;
(3) a virtual step of the segmentation network on the weighted loss; (4) a meta step of the meta network on
a clean meta batch at the virtual parameters; (5) the real step with the updated weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents, default_prepare_batch
from monai.utils import CommonKeys as Keys
from torch import nn
from torch.optim import Optimizer

from scripts.meta_gradient import (
    META_GRADIENT_MODES,
    WEIGHT_NORMALISATIONS,
    compute_meta_gradient,
    normalise_weights,
    virtual_step_parameters,
)
from scripts.meta_net import MetaMaskNet

CORRUPTION_KEY = "corruption_mask"
WEIGHT_KEY = "weight"
EPOCH_STATS = ("meta_loss", "weight_mean", "weight_std", "weight_corrupted", "weight_unchanged")


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank_mean(tensors: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
    """The mean over the ranks of each tensor (one all-reduce for all); the tensors as they are without DDP."""
    world = _world_size()
    if world == 1:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    return [chunk.view_as(t) for chunk, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


class MCPMTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` whose iteration re-weights the voxel losses with a meta-learned mask.

    It takes every ``SupervisedTrainer`` argument (``loss_function`` must return the (B, *spatial) loss
    map, e.g. ``VoxelCrossEntropyLoss(reduction="none")``) plus:

    Args:
        meta_data_loader: loader of the clean meta set, cycled; restarted each epoch.
        meta_network: the meta mask network g(φ).
        meta_optimizer: the optimizer of g(φ).
        meta_gradient: ``"jvp"`` (default, exact and fast) or ``"second_order"`` (the autograd reference).
        virtual_lr: α, the step size of the virtual SGD step.
        weight_normalisation: ``"sum"``, ``"mean"`` or ``"none"`` (see ``normalise_weights``).
        meta_interval: a meta step every ``meta_interval`` iterations; the current weights apply on all.
        warmup_epochs: epochs of plain, unweighted training before the meta mask is used.
        virtual_step_params: name prefixes of the parameters the virtual step moves (all when None, which is
            MCPM); a late-layers subset is cheaper but approximates the method (see ``virtual_step_parameters``).

    Under DDP (``network`` wrapped in ``DistributedDataParallel``, a process group initialised) each rank
    computes the meta-gradient on its own shard of the training and meta batches, the ranks average it, and
    DDP averages the real step's gradients; the meta network starts from rank 0's parameters.

    ``engine.state.output`` holds image, label, pred and loss as in ``SupervisedTrainer``, plus the meta
    loss (NaN on iterations without a meta step) and the weight map. Per-epoch means of the meta loss and
    weight statistics (on corrupted and unchanged voxels where the batch has a ``corruption_mask``) are
    kept in ``engine.state.metrics`` so MONAI's stats and TensorBoard handlers log them.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: nn.Module,
        optimizer: Optimizer,
        loss_function: Callable,
        meta_data_loader: Iterable,
        meta_network: MetaMaskNet,
        meta_optimizer: Optimizer,
        meta_gradient: str = "jvp",
        virtual_lr: float = 0.1,
        weight_normalisation: str = "sum",
        meta_interval: int = 1,
        warmup_epochs: int = 0,
        virtual_step_params: Sequence[str] | None = None,
        prepare_batch: Callable = default_prepare_batch,
        train_handlers: Sequence | None = None,
        **kwargs: Any,
    ) -> None:
        if meta_gradient not in META_GRADIENT_MODES:
            raise ValueError(f"meta_gradient must be one of {META_GRADIENT_MODES}, got {meta_gradient!r}.")
        if weight_normalisation not in WEIGHT_NORMALISATIONS:
            raise ValueError(
                f"weight_normalisation must be one of {WEIGHT_NORMALISATIONS}, got {weight_normalisation!r}."
            )
        if not isinstance(meta_interval, int) or meta_interval < 1:
            raise ValueError(f"meta_interval must be an integer >= 1, got {meta_interval!r}.")
        if not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be an integer >= 0, got {warmup_epochs!r}.")
        if not virtual_lr > 0:
            raise ValueError(f"virtual_lr must be > 0, got {virtual_lr!r}.")
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function,
            prepare_batch=prepare_batch,
            train_handlers=train_handlers,
            **kwargs,
        )
        self.meta_data_loader = meta_data_loader
        self.meta_network = meta_network.to(self.state.device)
        self.meta_optimizer = meta_optimizer
        self.meta_gradient = meta_gradient
        self.virtual_lr = float(virtual_lr)
        self.weight_normalisation = weight_normalisation
        self.meta_interval = meta_interval
        self.warmup_epochs = warmup_epochs
        self.virtual_step_params = None if virtual_step_params is None else list(virtual_step_params)
        virtual_step_parameters(self.unwrapped_network, self.virtual_step_params)  # fail early on a typo
        self._meta_batches: Iterator | None = None
        self._stat_sums: dict[str, list[float]] = {}
        self.add_event_handler(Events.EPOCH_STARTED, self._start_epoch)
        if _world_size() > 1:
            for tensor in self.meta_network.state_dict().values():
                dist.broadcast(tensor, src=0)

    def _start_epoch(self, engine: MCPMTrainer) -> None:
        sampler = getattr(self.meta_data_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.state.epoch)
        self._meta_batches = iter(self.meta_data_loader)
        self._stat_sums = {name: [0.0, 0] for name in EPOCH_STATS}

    def _next_meta_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            batch = next(self._meta_batches)
        except StopIteration:
            self._meta_batches = iter(self.meta_data_loader)
            try:
                batch = next(self._meta_batches)
            except StopIteration:
                raise RuntimeError("the meta data loader is empty: MCPM needs at least one clean meta case.") from None
        image, label = self.prepare_batch(batch, self.state.device, self.non_blocking, **self.to_kwargs)[:2]
        return image, label

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", **self.amp_kwargs) if self.amp else contextlib.nullcontext()

    @property
    def unwrapped_network(self) -> nn.Module:
        """The segmentation network without a DDP/DataParallel wrapper, for functional passes."""
        return getattr(self.network, "module", self.network)

    def meta_step_due(self) -> bool:
        """Whether this iteration runs a meta step: after warm-up, every ``meta_interval`` iterations."""
        return self.state.epoch > self.warmup_epochs and (self.state.iteration - 1) % self.meta_interval == 0

    def _record(self, name: str, value: float) -> None:
        total = self._stat_sums.setdefault(name, [0.0, 0])
        total[0] += value
        total[1] += 1
        self.state.metrics[name] = total[0] / total[1]

    def _record_weights(self, weights: torch.Tensor, corruption: torch.Tensor | None) -> None:
        self._record("weight_mean", weights.mean().item())
        self._record("weight_std", weights.std().item() if weights.numel() > 1 else 0.0)
        if corruption is None:
            return
        corrupted = corruption.to(weights.device).reshape(weights.shape).bool()
        if corrupted.any():
            self._record("weight_corrupted", weights[corrupted].mean().item())
        if (~corrupted).any():
            self._record("weight_unchanged", weights[~corrupted].mean().item())

    def _iteration(self, engine: MCPMTrainer, batchdata: dict[str, torch.Tensor]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        inputs, targets = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)[:2]
        corruption = batchdata.get(CORRUPTION_KEY) if isinstance(batchdata, dict) else None
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        engine.network.train()
        engine.meta_network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)

        with engine._autocast():
            pred = engine.inferer(inputs, engine.network)
            loss_map = engine.loss_function(pred, targets)
        if loss_map.shape != pred.shape[:1] + pred.shape[2:]:
            raise ValueError(
                f"MCPM needs a per-voxel loss map of shape {tuple(pred.shape[:1] + pred.shape[2:])}, but the loss "
                f"function returned {tuple(loss_map.shape)}: use a loss with reduction='none'."
            )
        engine.state.output[Keys.PRED] = pred
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)

        if engine.state.epoch <= engine.warmup_epochs:
            weights = torch.ones_like(loss_map)
            loss = loss_map.mean()
        else:
            meta_input = engine.meta_network.build_input(loss_map, pred, targets, inputs)
            if engine.meta_step_due():
                meta_image, meta_label = engine._next_meta_batch()
                meta_loss, grads = compute_meta_gradient(
                    engine.meta_gradient,
                    engine.unwrapped_network,
                    engine.loss_function,
                    inputs,
                    targets,
                    loss_map,
                    engine.meta_network,
                    meta_input,
                    meta_image,
                    meta_label,
                    engine.virtual_lr,
                    engine.weight_normalisation,
                    engine._autocast,
                    engine.virtual_step_params,
                )
                engine.meta_optimizer.zero_grad(set_to_none=True)
                for p, g in zip((p for p in engine.meta_network.parameters() if p.requires_grad), _rank_mean(grads)):
                    p.grad = g
                engine.meta_optimizer.step()
                engine._record("meta_loss", meta_loss.item())
                engine.state.output["meta_loss"] = meta_loss
            with torch.no_grad():
                weights = engine.meta_network(meta_input)
            loss = (normalise_weights(weights, engine.weight_normalisation) * loss_map).sum()
        engine.state.output.setdefault("meta_loss", torch.tensor(float("nan")))
        engine.state.output[Keys.LOSS] = loss
        engine.state.output[WEIGHT_KEY] = weights.unsqueeze(1)
        engine._record_weights(weights, corruption)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)

        if engine.amp and engine.scaler is not None:
            engine.scaler.scale(loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            loss.backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
