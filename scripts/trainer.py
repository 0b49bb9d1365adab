"""Ignite trainers that re-weight every voxel's loss using a clean meta set.

``MCPMTrainer``, Meta Corrupted Pixels Mining (Wang et al., MICCAI 2020, arXiv:2007.03538). Each iteration:
(1) the per-voxel loss map of the noisy batch; (2) weights from the meta mask network; (3) a virtual step of the
segmentation network on the weighted loss; (4) a meta step of the meta network on a clean meta batch at the
virtual parameters; (5) the real step with the updated weights.

``L2RWTrainer``, pixel-wise learning to reweight (Ren et al., ICML 2018, arXiv:1803.09050; per pixel as
Mirikharaji et al., MIL3ID 2019, arXiv:1906.03815): the weights are the meta-gradient itself, with no meta
network; a baseline for MCPM.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
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

from scripts.losses import soft_cross_entropy, weighted_soft_dice
from scripts.meta_gradient import (
    Batch,
    MetaGradient,
    adam_preconditioner,
    compute_meta_gradient,
    l2rw_weights,
    normalise_weights,
    virtual_step_parameters,
)
from scripts.meta_net import MetaMaskNet
from scripts.options import check_options

CORRUPTION_KEY = "corruption_mask"
WEIGHT_KEY = "weight"
EPOCH_STATS = (
    "meta_loss",
    "clean_loss",
    "weight_mean",
    "weight_std",
    "weight_extreme",
    "weight_corrupted",
    "weight_unchanged",
)
# weights this close to 0 or 1 count as extreme; an epoch where most weights are extreme is collapsing (on a real
# organ benchmark 60-67% extreme weights came with a failed run, long before 95%)
EXTREME_MARGIN = 0.05
COLLAPSE_FRACTION = 0.5
# a meta loss whose epoch mean is this much above its lowest post-warm-up epoch mean, over this many epochs in a
# row, is rising: the meta steps are not lowering it
META_LOSS_RISE = 0.1
META_LOSS_RISE_EPOCHS = 3


def label_minus_teacher_loss(
    loss_function: Callable, targets: torch.Tensor, logits: torch.Tensor, label: torch.Tensor
) -> torch.Tensor:
    """ℓ_i − CE(p̂_i) per voxel: the map the weights scale under the teacher correction, as a function of the logits
    (what ``compute_meta_gradient`` differentiates along the meta direction)."""
    return loss_function(logits, label) - soft_cross_entropy(logits, targets)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every value of every tensor is finite, on every rank (so that all take the same branch), with a
    single device synchronisation."""
    flag = torch.stack([t.detach().isfinite().all() for t in tensors]).all().float()
    if _world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


def _rank_mean(tensors: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
    """The mean over the ranks of each tensor (one all-reduce for all); the tensors as they are without DDP."""
    world = _world_size()
    if world == 1:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    return [chunk.view_as(t) for chunk, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)]


class MetaReweightTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` whose iteration re-weights the voxel losses using batches of a clean meta set.

    Subclasses say how the weights are found (``_reweight``). It takes every ``SupervisedTrainer`` argument
    (``loss_function`` must return the (B, *spatial) loss map, e.g. ``VoxelCrossEntropyLoss(reduction="none")``)
    plus:

    Args:
        meta_data_loader: loader of the clean meta set, cycled; restarted each epoch.
        warmup_epochs: epochs of plain, unweighted training before re-weighting starts.
        meta_interval: a meta step every ``meta_interval`` iterations.
        max_nonfinite_steps: an iteration whose loss, meta loss, weights or gradients are not finite is skipped
            with a warning (batch-norm statistics restored); this many in a row stop training.
        clean_loss_weight: λ; the real step's loss is the re-weighted noisy loss plus λ times the mean loss of a
            clean meta batch (the same batch as the iteration's meta step), from the first epoch on. 0 (the
            paper's MCPM) trains on the noisy cases only; 1 gives the clean batch as much say as the noisy one.
        dice_loss_weight: μ; the real step also minimises μ times the soft Dice loss of the noisy batch with every
            voxel's terms scaled by its weight (``weighted_soft_dice``; all weights 1 in warm-up, which is then
            plain training with DiceCE), and the clean term becomes λ (CE + μ Dice). The look-ahead of the meta step
            stays the weighted cross-entropy: the exact meta-gradient needs a loss that is a weighted sum over voxels,
            which Dice is not. 0 (the paper's): cross-entropy only.
        clean_loss_interval: the clean term joins the real step every ``clean_loss_interval`` iterations (warm-up
            included), weighted λ · ``clean_loss_interval`` so that its share of an epoch's updates stays λ. Equal to
            ``meta_interval``, it falls on the iterations with a meta step, which with MCPM's
            ``reuse_virtual_gradient`` have its gradient for free: every other iteration is then a plain one. 1 (the
            default): every iteration.

    The options are checked as ``check_training_config`` checks the config's ``mcpm`` section, with the one
    definition in ``scripts/options.py``.

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
        warmup_epochs: int = 0,
        meta_interval: int = 1,
        max_nonfinite_steps: int = 5,
        clean_loss_weight: float = 0.0,
        dice_loss_weight: float = 0.0,
        clean_loss_interval: int = 1,
        prepare_batch: Callable = default_prepare_batch,
        train_handlers: Sequence | None = None,
        **kwargs: Any,
    ) -> None:
        check_options(
            meta_interval=meta_interval,
            warmup_epochs=warmup_epochs,
            max_nonfinite_steps=max_nonfinite_steps,
            clean_loss_weight=clean_loss_weight,
            dice_loss_weight=dice_loss_weight,
            clean_loss_interval=clean_loss_interval,
        )
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
        self.meta_interval = meta_interval
        self.warmup_epochs = warmup_epochs
        if warmup_epochs >= max_epochs:
            self.logger.warning(
                f"warmup_epochs ({warmup_epochs}) is not below max_epochs ({max_epochs}): the re-weighting never "
                "starts, so this run is plain training on the noisy labels"
            )
        self.max_nonfinite_steps = max_nonfinite_steps
        self.clean_loss_weight = float(clean_loss_weight)
        self.dice_loss_weight = float(dice_loss_weight)
        self.clean_loss_interval = int(clean_loss_interval)
        self._consecutive_skips = 0
        self._meta_batches: Iterator | None = None
        # the meta batch of the current iteration, shared by its meta step and its clean loss term
        self._iteration_meta_batch: tuple[int, Batch] | None = None
        self._stat_sums: dict[str, list[float]] = {}
        # the real step's gradients when ``_reweight`` already has them (MCPM's reuse_virtual_gradient), per parameter
        self._reused_gradients: list[torch.Tensor] | None = None
        self.add_event_handler(Events.EPOCH_STARTED, self._start_epoch)

    def _reweight(
        self, batch: Batch, pred: torch.Tensor, loss_map: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """After warm-up: the weight map in [0, 1] (for logging), the re-weighted loss of the real step, and whether
        the meta step was finite."""
        raise NotImplementedError

    def run(self) -> None:  # type: ignore[override]
        """Train as ``SupervisedTrainer.run`` does, then close the meta loader's iterator however the run ends.

        The meta set is cycled, so its iterator is left part-way at the end; a ``ThreadDataLoader``'s buffer thread
        would then still be preparing a batch while the interpreter shuts down, which can abort the process
        ("terminate called without an active exception", seen on a torchrun rank). Closing it joins that thread.
        """
        try:
            super().run()
        finally:
            self._close_meta_batches()

    def _close_meta_batches(self) -> None:
        """Close the meta loader's iterator, if one is open (a generator's ``close`` runs its cleanup at once)."""
        if hasattr(self._meta_batches, "close"):
            self._meta_batches.close()
        self._meta_batches = None
        self._iteration_meta_batch = None

    def _start_epoch(self, engine: MetaReweightTrainer) -> None:
        sampler = getattr(self.meta_data_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.state.epoch)
        self._close_meta_batches()
        self._meta_batches = iter(self.meta_data_loader)
        self._stat_sums = {name: [0.0, 0] for name in EPOCH_STATS}
        self.state.metrics["skipped_steps"] = 0

    def _prepare(self, batchdata: Any) -> Batch:
        """``batchdata`` on the device as ``prepare_batch`` makes it: image and label, and the extra arguments of
        the network's forward when it returns them, as in ``SupervisedTrainer._iteration``."""
        return Batch(*self.prepare_batch(batchdata, self.state.device, self.non_blocking, **self.to_kwargs))

    def _meta_batch(self) -> Batch:
        """This iteration's batch of the meta set: drawn with :py:meth:`_next_meta_batch` on the first call of the
        iteration, the same batch on later calls (the meta step and the clean loss term use one batch)."""
        if self._iteration_meta_batch is None or self._iteration_meta_batch[0] != self.state.iteration:
            self._iteration_meta_batch = (self.state.iteration, self._next_meta_batch())
        return self._iteration_meta_batch[1]

    def _clean_loss(self) -> torch.Tensor:
        """The mean loss of this iteration's meta batch at the current parameters, for the real step (plus μ times its
        soft Dice loss with ``dice_loss_weight``)."""
        meta_batch = self._meta_batch()
        with self._autocast():
            pred = self.inferer(meta_batch.image, self.network, *meta_batch.args, **meta_batch.kwargs)
            loss = self.loss_function(pred, meta_batch.label).mean()
        if self.dice_loss_weight > 0:
            loss = loss + self.dice_loss_weight * weighted_soft_dice(pred, meta_batch.label)
        return loss

    def _next_meta_batch(self) -> Batch:
        """The next batch of the meta set, restarting the meta loader when it runs out."""
        try:
            batch = next(self._meta_batches)
        except StopIteration:
            self._meta_batches = iter(self.meta_data_loader)
            try:
                batch = next(self._meta_batches)
            except StopIteration:
                raise RuntimeError("the meta data loader is empty: MCPM needs at least one clean meta case.") from None
        return self._prepare(batch)

    def _autocast(self) -> contextlib.AbstractContextManager:
        """Autocast on the trainer's device when ``amp`` is on (bfloat16 by default on the CPU, float16 on CUDA,
        ``amp_kwargs["dtype"]`` where given), so that mixed precision works on the CPU too; MONAI's
        ``SupervisedTrainer`` autocasts on CUDA only."""
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.state.device).type, **self.amp_kwargs)

    def _amp_dtype(self) -> torch.dtype | None:
        """The dtype of this run's autocast forward passes, for the meta-gradient's JVP; None without ``amp``."""
        if not self.amp:
            return None
        device_type = torch.device(self.state.device).type
        return self.amp_kwargs.get("dtype", torch.get_autocast_dtype(device_type))

    def _grad_scaler(self) -> Any:
        """MONAI's gradient scaler where it scales (``amp`` on CUDA); None otherwise, as on the CPU, where MONAI's
        ``torch.cuda.amp.GradScaler`` is disabled and bfloat16 needs no scaling."""
        scaler = self.scaler if self.amp else None
        return scaler if scaler is not None and scaler.is_enabled() else None

    @property
    def unwrapped_network(self) -> nn.Module:
        """The segmentation network without a DDP/DataParallel wrapper, for functional passes."""
        return getattr(self.network, "module", self.network)

    def meta_step_due(self) -> bool:
        """Whether this iteration runs a meta step: after warm-up, every ``meta_interval`` iterations."""
        return self.state.epoch > self.warmup_epochs and (self.state.iteration - 1) % self.meta_interval == 0

    def clean_step_weight(self) -> float:
        """The weight of the clean term in this iteration's real step: λ · ``clean_loss_interval`` every
        ``clean_loss_interval`` iterations (in step with the meta steps when the intervals are equal), else 0."""
        if self.clean_loss_weight == 0 or (self.state.iteration - 1) % self.clean_loss_interval != 0:
            return 0.0
        return self.clean_loss_weight * self.clean_loss_interval

    def _skip_step(self, buffers_before: list[torch.Tensor]) -> None:
        """Undo what a non-finite iteration changed, count it, and stop after too many in a row."""
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buffer, before in zip(self.network.buffers(), buffers_before, strict=True):
                buffer.copy_(before)
        self._consecutive_skips += 1
        self.state.metrics["skipped_steps"] += 1
        message = (
            f"iteration {self.state.iteration} (epoch {self.state.epoch}): non-finite loss, meta loss, weights or "
            f"gradients; step skipped ({self._consecutive_skips} in a row)"
        )
        if self._consecutive_skips >= self.max_nonfinite_steps:
            raise RuntimeError(
                f"{message}. Training stopped after {self.max_nonfinite_steps} consecutive non-finite steps: check "
                "the data and the learning rates; the newest checkpoint holds the last good state."
            )
        self.logger.warning(message)

    def _record(self, name: str, value: float) -> None:
        total = self._stat_sums.setdefault(name, [0.0, 0])
        total[0] += value
        total[1] += 1
        self.state.metrics[name] = total[0] / total[1]

    def _record_weights(self, weights: torch.Tensor, corruption: torch.Tensor | None) -> None:
        """Add this iteration's weight statistics to the epoch means, with a single device synchronisation."""
        stats = {
            "weight_mean": weights.mean(),
            "weight_std": weights.std() if weights.numel() > 1 else torch.zeros((), device=weights.device),
            "weight_extreme": ((weights < EXTREME_MARGIN) | (weights > 1 - EXTREME_MARGIN)).float().mean(),
        }
        if corruption is not None:
            corrupted = corruption.to(weights.device).reshape(weights.shape).float()
            # NaN (not recorded) when a batch has no voxel of that kind
            stats["weight_corrupted"] = (weights * corrupted).sum() / corrupted.sum()
            stats["weight_unchanged"] = (weights * (1 - corrupted)).sum() / (1 - corrupted).sum()
        for name, value in zip(stats, torch.stack(list(stats.values())).float().tolist(), strict=True):
            if not math.isnan(value):
                self._record(name, value)

    def _iteration(self, engine: MetaReweightTrainer, batchdata: dict[str, torch.Tensor]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine._prepare(batchdata)
        corruption = batchdata.get(CORRUPTION_KEY) if isinstance(batchdata, dict) else None
        engine.state.output = {Keys.IMAGE: batch.image, Keys.LABEL: batch.label}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        # a skipped step must not leave non-finite batch-norm running statistics behind
        buffers_before = [b.detach().clone() for b in engine.network.buffers()]
        finite = True

        with engine._autocast():
            pred = engine.inferer(batch.image, engine.network, *batch.args, **batch.kwargs)
            loss_map = engine.loss_function(pred, batch.label)
        if loss_map.shape != pred.shape[:1] + pred.shape[2:]:
            raise ValueError(
                f"MCPM needs a per-voxel loss map of shape {tuple(pred.shape[:1] + pred.shape[2:])}, but the loss "
                f"function returned {tuple(loss_map.shape)}: use a loss with reduction='none'."
            )
        engine.state.output[Keys.PRED] = pred
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)

        engine._reused_gradients = None
        if engine.state.epoch <= engine.warmup_epochs:
            weights = torch.ones_like(loss_map)
            loss = loss_map.mean()
        else:
            weights, loss, finite = engine._reweight(batch, pred, loss_map)
        if engine.dice_loss_weight > 0:
            loss = loss + engine.dice_loss_weight * weighted_soft_dice(pred, batch.label, weights)
        clean_weight = engine.clean_step_weight()
        if clean_weight > 0 and engine._reused_gradients is None:
            clean_loss = engine._clean_loss()
            engine.state.output["clean_loss"] = clean_loss.detach()
            loss = loss + clean_weight * clean_loss
        engine.state.output.setdefault("meta_loss", torch.tensor(float("nan")))
        engine.state.output[Keys.LOSS] = loss
        engine.state.output[WEIGHT_KEY] = weights.unsqueeze(1)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)

        scaler = engine._grad_scaler()
        if engine._reused_gradients is None:
            # on every rank, even when non-finite, so that DDP's gradient all-reduce stays in step
            (scaler.scale(loss) if scaler is not None else loss).backward()
        else:
            # the gradients the meta step computed, in the scaler's units when there is one (it unscales them)
            scale = scaler.get_scale() if scaler is not None else 1.0
            trainable = [p for p in engine.network.parameters() if p.requires_grad]
            for param, grad in zip(trainable, engine._reused_gradients, strict=True):
                param.grad = grad * scale if scale != 1.0 else grad
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        # the scaler checks (scaled) gradients itself; without it, check them here
        gradients = [] if scaler is not None else [p.grad for p in engine.network.parameters() if p.grad is not None]
        # ``finite`` is already the same on every rank, so every rank reaches the same collectives
        if not (finite and _all_finite([loss, *gradients])):
            engine._skip_step(buffers_before)
            return engine.state.output
        if scaler is not None:
            scaler.step(engine.optimizer)
            scaler.update()
        else:
            engine.optimizer.step()
        engine._consecutive_skips = 0
        if "clean_loss" in engine.state.output:
            engine._record("clean_loss", engine.state.output["clean_loss"].item())
        engine._record_weights(weights, corruption)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class MCPMTrainer(MetaReweightTrainer):
    """``MetaReweightTrainer`` whose weights come from a meta-learned mask network (MCPM). Its own arguments:

    Args:
        meta_network: the meta mask network g(φ).
        meta_optimizer: the optimizer of g(φ).
        meta_gradient: ``"jvp"`` (default, exact and fast) or ``"second_order"`` (the autograd reference).
        virtual_lr: α, the step size of the virtual SGD step.
        virtual_step: ``"sgd"`` (the paper's θ̂ = θ − α ∇θ) or ``"adam"``: the virtual step scaled elementwise by the
            real Adam optimizer's 1 / (√v̂ + ε) (``adam_preconditioner``), so that it moves each parameter in the
            direction the real step will; α (``virtual_lr``) is then in the units of Adam's learning rate.
        weight_normalisation: ``"sum"``, ``"class_sum"``, ``"mean"`` or ``"none"`` (see ``normalise_weights``).
        meta_interval: a meta step every ``meta_interval`` iterations; the current weights apply on all.
        virtual_step_params: name prefixes of the parameters the virtual step moves (all when None, which is
            MCPM); a late-layers subset is cheaper but approximates the method (see ``virtual_step_parameters``).
        correction: ``"none"`` (the paper's: a low weight only discards a voxel's label) or ``"teacher"``: each
            voxel's target becomes w·label + (1 − w)·p̂, with p̂ the softmax of an exponential moving average of
            the segmentation network (a mean teacher, Tarvainen and Valpola 2017), as MPLC corrects MCPM's
            discarded voxels (Wang et al., MICCAI 2022). The real and the virtual step minimise
            (1/N) Σ_i [w_i ℓ_i + (1 − w_i) CE(p̂_i)], so it needs ``weight_normalisation`` ``"mean"``; the meta
            network still reads the label's loss map.
        teacher_decay: the teacher's EMA decay per iteration (``correction`` ``"teacher"``).
        reuse_virtual_gradient: on iterations with a meta step, the real step takes the gradients the meta step has
            already computed instead of a backward of its own: the virtual step's gradient of the re-weighted loss
            (weights of the meta network before its update; the next iteration's weights come from the updated one)
            plus, with ``clean_loss_weight`` λ, λ times the meta batch's gradient at the look-ahead θ̂ in place of
            the clean batch's at θ. One backward of the training batch and one forward and backward of the meta batch
            less, at the cost of those two approximations. Needs ``meta_gradient`` ``"jvp"``, every parameter in the
            virtual step, no Dice term, and a single process (not DDP).

    Under DDP (``network`` wrapped in ``DistributedDataParallel``, a process group initialised) each rank
    computes the meta-gradient on its own shard of the training and meta batches, the ranks average it, and
    DDP averages the real step's gradients; the meta network starts from rank 0's parameters.
    """

    def __init__(
        self,
        *args: Any,
        meta_network: MetaMaskNet,
        meta_optimizer: Optimizer,
        meta_gradient: str = "jvp",
        virtual_lr: float = 0.1,
        virtual_step: str = "sgd",
        weight_normalisation: str = "sum",
        virtual_step_params: Sequence[str] | None = None,
        correction: str = "none",
        teacher_decay: float = 0.99,
        reuse_virtual_gradient: bool = False,
        **kwargs: Any,
    ) -> None:
        check_options(
            meta_gradient=meta_gradient,
            virtual_lr=virtual_lr,
            virtual_step=virtual_step,
            weight_normalisation=weight_normalisation,
            virtual_step_params=virtual_step_params,
            correction=correction,
            teacher_decay=teacher_decay,
            reuse_virtual_gradient=reuse_virtual_gradient,
            dice_loss_weight=kwargs.get("dice_loss_weight", 0.0),
        )
        super().__init__(*args, **kwargs)
        if reuse_virtual_gradient and _world_size() > 1:
            raise ValueError(
                "reuse_virtual_gradient sets the real step's gradients without a backward, so DDP would not average "
                "them across ranks: set it false for multi-GPU training."
            )
        self.reuse_virtual_gradient = bool(reuse_virtual_gradient)
        if virtual_step == "adam" and not all("betas" in group for group in self.optimizer.param_groups):
            raise ValueError(
                f"virtual_step 'adam' scales the virtual step as the real Adam optimizer does, but the optimizer is "
                f"{type(self.optimizer).__name__}; use virtual_step 'sgd' with it."
            )
        self.meta_network = meta_network.to(self.state.device)
        self.meta_optimizer = meta_optimizer
        self.meta_gradient = meta_gradient
        self.virtual_lr = float(virtual_lr)
        self.virtual_step = virtual_step
        self.weight_normalisation = weight_normalisation
        self.virtual_step_params = None if virtual_step_params is None else list(virtual_step_params)
        virtual_step_parameters(self.unwrapped_network, self.virtual_step_params)  # fail early on a typo
        self.teacher_decay = float(teacher_decay)
        # the mean teacher of the correction, saved in the checkpoints (``train#checkpoint_saver``) for a resume
        self.teacher: nn.Module | None = None
        if correction == "teacher":
            self.teacher = copy.deepcopy(self.unwrapped_network).requires_grad_(False)
            self.add_event_handler(Events.ITERATION_COMPLETED, self._update_teacher)
        self._meta_loss_history: list[float] = []
        self.add_event_handler(Events.EPOCH_COMPLETED, self._warn_on_collapse)
        self.add_event_handler(Events.EPOCH_COMPLETED, self._warn_on_rising_meta_loss)
        if _world_size() > 1:
            for tensor in self.meta_network.state_dict().values():
                dist.broadcast(tensor, src=0)

    def _warn_on_collapse(self, engine: MCPMTrainer) -> None:
        extreme = self.state.metrics.get("weight_extreme", 0.0)
        if self.state.epoch > self.warmup_epochs and extreme > COLLAPSE_FRACTION:
            self.logger.warning(
                f"epoch {self.state.epoch}: the meta mask has collapsed: {extreme:.0%} of the voxel weights are below "
                f"{EXTREME_MARGIN} or above {1 - EXTREME_MARGIN} (mean {self.state.metrics['weight_mean']:.3f}); try a "
                "smaller mcpm#meta_learning_rate or more meta cases."
            )

    def _warn_on_rising_meta_loss(self, engine: MCPMTrainer) -> None:
        """Warn when the epoch mean of the meta loss has stayed well above its lowest value for several epochs:
        the meta steps are then not lowering the loss on the clean cases, which MCPM is built to do."""
        if self.state.epoch <= self.warmup_epochs or math.isnan(self.state.metrics.get("meta_loss", math.nan)):
            return
        self._meta_loss_history.append(self.state.metrics["meta_loss"])
        lowest = min(self._meta_loss_history)
        recent = self._meta_loss_history[-META_LOSS_RISE_EPOCHS:]
        if len(recent) == META_LOSS_RISE_EPOCHS and min(recent) > (1 + META_LOSS_RISE) * lowest:
            self.logger.warning(
                f"epoch {self.state.epoch}: the meta loss has stayed above {1 + META_LOSS_RISE:g}x its lowest epoch "
                f"mean ({lowest:.4f}) for {META_LOSS_RISE_EPOCHS} epochs (now {recent[-1]:.4f}): the meta steps are "
                "not lowering the loss on the clean cases; try mcpm#clean_loss_weight 1, a smaller "
                "mcpm#meta_learning_rate or more meta cases."
            )

    def _update_teacher(self, engine: MCPMTrainer) -> None:
        """One EMA step of the teacher towards the segmentation network (its buffers copied)."""
        assert self.teacher is not None
        with torch.no_grad():
            student = self.unwrapped_network
            for mean, param in zip(self.teacher.parameters(), student.parameters(), strict=True):
                mean.lerp_(param, 1.0 - self.teacher_decay)
            for mean, buffer in zip(self.teacher.buffers(), student.buffers(), strict=True):
                mean.copy_(buffer)
                if _world_size() > 1:  # each rank's running statistics are its own shard's; rank 0's are saved
                    dist.broadcast(mean, src=0)

    def _teacher_targets(self, batch: Batch) -> torch.Tensor:
        """p̂, the teacher's class probabilities on the training batch (eval mode, no gradient)."""
        assert self.teacher is not None
        self.teacher.eval()
        with torch.no_grad(), self._autocast():
            logits = self.inferer(batch.image, self.teacher, *batch.args, **batch.kwargs)
        return torch.softmax(logits.float(), dim=1)

    def _reweight(
        self, batch: Batch, pred: torch.Tensor, loss_map: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        self.meta_network.train()
        meta_input = self.meta_network.build_input(loss_map, pred, batch.label, batch.image)
        # what the weights scale: the label's loss map, or with the teacher correction the label's loss minus the
        # teacher's, the mean teacher loss then joining the objective unscaled
        weighted_map, base_loss, map_function = loss_map, None, None
        if self.teacher is not None:
            targets = self._teacher_targets(batch)
            teacher_map = soft_cross_entropy(pred, targets)
            weighted_map, base_loss = loss_map - teacher_map, teacher_map.mean()
            map_function = functools.partial(label_minus_teacher_loss, self.loss_function, targets)
        finite = True
        if self.meta_step_due():
            if self.reuse_virtual_gradient:  # the weights the virtual step uses, before the meta network's update
                with torch.no_grad():
                    weights_before = self.meta_network(meta_input)
            result = compute_meta_gradient(
                mode=self.meta_gradient,
                network=self.unwrapped_network,
                loss_function=self.loss_function,
                batch=batch,
                loss_map=weighted_map,
                meta_network=self.meta_network,
                meta_input=meta_input,
                meta_batch=self._meta_batch(),
                virtual_lr=self.virtual_lr,
                normalisation=self.weight_normalisation,
                autocast=self._autocast,
                virtual_step_params=self.virtual_step_params,
                preconditioner=self._preconditioner(),
                base_loss=base_loss,
                loss_map_function=map_function,
                jvp_dtype=self._amp_dtype(),
            )
            # reduced first, so that every rank takes the same decision
            meta_loss, grads = result.meta_loss, _rank_mean(result.grads)
            finite = _all_finite([meta_loss, *grads])
            if finite:
                self.meta_optimizer.zero_grad(set_to_none=True)
                meta_params = [p for p in self.meta_network.parameters() if p.requires_grad]
                for p, g in zip(meta_params, grads, strict=True):
                    p.grad = g
                self.meta_optimizer.step()
                self._record("meta_loss", meta_loss.item())
            self.state.output["meta_loss"] = meta_loss
            if self.reuse_virtual_gradient:
                return self._reuse(result, weights_before, batch, weighted_map, base_loss, finite)
        with torch.no_grad():
            weights = self.meta_network(meta_input)
        loss = (normalise_weights(weights, self.weight_normalisation, batch.label) * weighted_map).sum()
        return weights, loss if base_loss is None else loss + base_loss, finite

    def _reuse(
        self,
        result: MetaGradient,
        weights: torch.Tensor,
        batch: Batch,
        weighted_map: torch.Tensor,
        base_loss: torch.Tensor | None,
        finite: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """The real step of ``reuse_virtual_gradient``: the meta step's gradients as the real step's (set for
        ``_iteration``), and the loss they are the gradient of (for the logs), with ``weights``, those they were
        taken with."""
        gradients = list(result.virtual_step_grads)
        loss, clean_weight = 0.0, self.clean_step_weight()
        if clean_weight > 0:
            gradients = [g + clean_weight * v for g, v in zip(gradients, result.meta_batch_grads, strict=True)]
            loss = clean_weight * result.meta_loss
            self.state.output["clean_loss"] = result.meta_loss
        self._reused_gradients = gradients
        with torch.no_grad():
            weighted = (normalise_weights(weights, self.weight_normalisation, batch.label) * weighted_map).sum()
        total = weighted + loss + (0.0 if base_loss is None else base_loss.detach())
        return weights, total, finite

    def _preconditioner(self) -> dict[str, torch.Tensor] | None:
        """The elementwise scaling of the virtual step: None (SGD), or the real Adam optimizer's 1 / (√v̂ + ε)."""
        if self.virtual_step != "adam":
            return None
        params = virtual_step_parameters(self.unwrapped_network, self.virtual_step_params)
        return adam_preconditioner(self.optimizer, params)


class L2RWTrainer(MetaReweightTrainer):
    """``MetaReweightTrainer`` whose weights are the meta-gradient itself, with no meta network: pixel-wise
    learning to reweight (Ren et al. 2018; Mirikharaji et al. 2019), the baseline that MCPM replaces.

    For loss coefficients ε at 0, w_i ∝ max(0, −∂L_meta(θ − α Σ_j ε_j ∇θ ℓ_j)/∂ε_i) = α max(0, s_i), with
    s_i = ⟨∇θ L_meta(θ), ∇θ ℓ_i(θ)⟩: one meta forward and backward at θ and one JVP of the loss map
    (``l2rw_weights``). The coefficients are w / Σw; the logged weight map is w / max(w). Iterations between
    meta steps (``meta_interval`` > 1) train with uniform weights.
    """

    def _reweight(
        self, batch: Batch, pred: torch.Tensor, loss_map: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        if not self.meta_step_due():
            return torch.ones_like(loss_map), loss_map.mean(), True
        network, meta_batch = self.unwrapped_network, self._meta_batch()
        meta_loss, raw = l2rw_weights(
            network, self.loss_function, batch, meta_batch, self._autocast, jvp_dtype=self._amp_dtype()
        )
        finite = _all_finite([meta_loss, raw])
        self._record("meta_loss", meta_loss.item())
        self.state.output["meta_loss"] = meta_loss
        return raw / raw.max().clamp_min(1e-12), (normalise_weights(raw, "sum") * loss_map).sum(), finite
