"""The meta-gradient of MCPM: how the meta mask network's parameters should change so that one virtual
training step on the re-weighted noisy loss lowers the loss on the clean meta batch.

With θ the segmentation parameters, ℓ_i(θ) the loss of voxel i, w̄_i(φ) the normalised weights and α the
virtual step size, the virtual step is θ̂(φ) = θ − α ∇θ Σ_i w̄_i ℓ_i and the meta loss L_meta(θ̂(φ)).

- ``second_order`` differentiates L_meta through the virtual step with autograd (double backward).
- ``jvp`` uses the chain rule ∇φ L_meta = −α ∇φ Σ_i w̄_i(φ) s_i with s_i = ⟨v, ∇θ ℓ_i(θ)⟩ and
  v = ∇θ L_meta(θ̂): one ordinary backward for v and one forward-mode Jacobian-vector product for the
  whole map s. Both are exact; ``jvp`` needs no second-order autograd and is several times faster.

All virtual, meta and JVP passes run on copies of the buffers, so batch-norm running statistics of the
real model change only in the real training step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.func import functional_call, jvp

from scripts.options import META_GRADIENT_MODES, WEIGHT_NORMALISATIONS

LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Autocast = Callable[[], contextlib.AbstractContextManager]


class Batch(NamedTuple):
    """A batch as MONAI's ``prepare_batch`` returns it: the network input, the label and, when it returns four
    values, the extra positional and keyword arguments of the network's forward (``Batch(*prepare_batch(...))``)."""

    image: torch.Tensor
    label: torch.Tensor
    args: tuple = ()
    kwargs: Mapping[str, Any] = MappingProxyType({})  # read-only, as the default is shared by every batch

    def forward(self, network: nn.Module, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The network's output on this batch with ``params`` (parameters and buffers by name) in place of its own."""
        return functional_call(network, dict(params), (self.image, *self.args), dict(self.kwargs))


def normalise_weights(
    weights: torch.Tensor, normalisation: str, label: torch.Tensor | None = None, eps: float = 1e-8
) -> torch.Tensor:
    """Turn a weight map into the coefficients w̄ of the weighted loss Σ_i w̄_i ℓ_i.

    ``sum``: w̄ = w / Σw, a weighted mean whose scale the meta network cannot change (as Ren et al. 2018).
    ``class_sum``: the same within each labelled class, every class keeping its share of the voxels:
    w̄_i = (n_c / N) w_i / Σ_{j in c} w_j for voxel i labelled c, so that low weights on one class (a thin
    structure, most of whose voxels lie near a boundary) do not hand its share of the loss to the others; needs
    ``label`` (class indices, the shape of ``weights`` with or without a channel dim).
    ``mean``: w̄ = w / N, the mean of w·ℓ; lowering all weights also lowers the effective learning rate.
    ``none``: w̄ = w, the plain weighted sum.
    """
    if normalisation == "sum":
        return weights / (weights.sum() + eps)
    if normalisation == "class_sum":
        if label is None:
            raise ValueError("weight normalisation 'class_sum' needs the label.")
        classes = label.detach().reshape(-1).long()
        flat = weights.reshape(-1)
        sums = torch.zeros(int(classes.max()) + 1, dtype=flat.dtype, device=flat.device).scatter_add(0, classes, flat)
        shares = torch.bincount(classes, minlength=sums.numel()).to(flat.dtype) / flat.numel()
        # index_select, not ``[classes]``: the backward of indexing accumulates with parallel atomic adds on a
        # multi-threaded CPU (from 32768 voxels on), in an order that changes from run to run; that of index_select
        # adds in voxel order, so that the meta-gradient is the same at any thread count
        return (flat * (shares / (sums + eps)).index_select(0, classes)).view_as(weights)
    if normalisation == "mean":
        return weights / weights.numel()
    if normalisation == "none":
        return weights
    raise ValueError(f"weight normalisation must be one of {WEIGHT_NORMALISATIONS}, got {normalisation!r}.")


def virtual_step_parameters(module: nn.Module, prefixes: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """The parameters the virtual step moves: all that require gradients, or only those whose names start with
    one of ``prefixes`` (e.g. ``["model.2"]``, the last decoder stage of MONAI's ``UNet``).

    Restricting the virtual step to late layers (as FaMUS does, Xu et al., CVPR 2021, arXiv:2104.15092) makes the
    meta-gradient cheaper but no longer that of MCPM: it is the exact meta-gradient of a virtual step that moves
    only those layers.
    """
    params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    if prefixes is None:
        return params
    unmatched = [prefix for prefix in prefixes if not any(name.startswith(prefix) for name in params)]
    if unmatched or not prefixes:
        top_level = sorted({".".join(name.split(".")[:2]) for name in params})
        raise ValueError(
            f"virtual_step_params {list(prefixes)} must each match a parameter name; unmatched {unmatched}, "
            f"names start with {top_level}."
        )
    return {name: p for name, p in params.items() if name.startswith(tuple(prefixes))}


def buffer_copies(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the buffers, so functional passes leave the real batch-norm running statistics alone."""
    return {name: b.clone() for name, b in module.named_buffers()}


class MetaGradient(NamedTuple):
    """The meta loss at the virtual parameters and its gradient for each meta-network parameter; in the ``jvp`` mode
    also the two gradients of the segmentation parameters it computed on the way, detached, which a real step can
    reuse: ``virtual_step_grads``, ∇θ of the re-weighted training loss at θ (with the weights before the meta
    update), and ``meta_batch_grads``, ∇ of the meta batch's mean loss at θ̂ (before any preconditioning)."""

    meta_loss: torch.Tensor
    grads: tuple[torch.Tensor, ...]
    virtual_step_grads: tuple[torch.Tensor, ...] | None = None
    meta_batch_grads: tuple[torch.Tensor, ...] | None = None


def compute_meta_gradient(
    *,
    mode: str,
    network: nn.Module,
    loss_function: LossFunction,
    batch: Batch,
    loss_map: torch.Tensor,
    meta_network: nn.Module,
    meta_input: torch.Tensor,
    meta_batch: Batch,
    virtual_lr: float,
    normalisation: str = "sum",
    autocast: Autocast = contextlib.nullcontext,
    virtual_step_params: Sequence[str] | None = None,
    preconditioner: Mapping[str, torch.Tensor] | None = None,
    base_loss: torch.Tensor | None = None,
    loss_map_function: LossFunction | None = None,
    jvp_dtype: torch.dtype | None = None,
) -> MetaGradient:
    """Compute ∇φ L_meta(θ̂(φ)) for the meta network's parameters φ. The arguments are keyword-only, as several
    share a type (the training and the meta batch above all).

    Args:
        mode: ``"jvp"`` or ``"second_order"``.
        network: the segmentation network (unwrapped from DDP); its forward must be the one that made
            ``loss_map`` from ``batch`` (train mode, no dropout), so that the JVP is of the same function.
        loss_function: maps (logits, label) to the (B, *spatial) loss map.
        batch: the training batch.
        loss_map: ℓ(θ) of the training batch, still attached to the network's graph; that graph is
            retained for the real training step.
        meta_network: g(φ), mapping ``meta_input`` to weights in (0, 1).
        meta_input: the detached input of the meta network.
        meta_batch: a batch of the clean meta set.
        virtual_lr: α, the size of the virtual SGD step.
        normalisation: how weights become loss coefficients (see ``normalise_weights``).
        autocast: a factory of the autocast context for forward passes (a no-op by default).
        virtual_step_params: name prefixes of the parameters the virtual step moves; all when None.
        preconditioner: per parameter name, a tensor P that scales the virtual step elementwise,
            θ̂ = θ − α P ⊙ ∇θ Σ_i w̄_i ℓ_i (``adam_preconditioner``: the real Adam step's scaling); plain SGD when None.
            In the ``jvp`` mode the direction of the JVP becomes P ⊙ v, the exact meta-gradient of that step.
        base_loss: a term of the virtual step's objective that the weights do not scale, Σ_i w̄_i ℓ_i + base
            (attached to the network's graph; ``MCPMTrainer``'s teacher correction: the mean loss against the
            teacher, with ℓ the label's loss minus the teacher's). None: Σ_i w̄_i ℓ_i alone, the paper's.
        loss_map_function: what maps (logits, label) to ``loss_map`` for the JVP, when ``loss_map`` is not
            ``loss_function``'s (the teacher correction's difference map); the meta loss stays ``loss_function``'s.
        jvp_dtype: the dtype of a mixed-precision run's forward passes (``torch.bfloat16``, say), in which the
            JVP's forward then runs (see ``loss_map_jvp``); None: float32, with ``autocast`` as given.
    """
    if mode not in META_GRADIENT_MODES:
        raise ValueError(f"meta-gradient mode must be one of {META_GRADIENT_MODES}, got {mode!r}.")
    params = virtual_step_parameters(network, virtual_step_params)
    meta_params = [p for p in meta_network.parameters() if p.requires_grad]
    weights = normalise_weights(meta_network(meta_input), normalisation, batch.label)
    scale = {name: (preconditioner or {}).get(name) for name in params}

    def step(name: str, grad: torch.Tensor) -> torch.Tensor:
        return grad if scale[name] is None else scale[name] * grad

    base = 0.0 if base_loss is None else base_loss
    if mode == "second_order":
        weighted = (weights * loss_map).sum() + base
        grads = torch.autograd.grad(weighted, list(params.values()), create_graph=True, retain_graph=True)
        virtual = {name: p - virtual_lr * step(name, g) for (name, p), g in zip(params.items(), grads, strict=True)}
        meta_loss = meta_loss_with(network, loss_function, virtual, meta_batch, autocast)
        return MetaGradient(meta_loss.detach(), torch.autograd.grad(meta_loss, meta_params))

    grads = torch.autograd.grad((weights.detach() * loss_map).sum() + base, list(params.values()), retain_graph=True)
    # θ̂ = θ − α P ⊙ g for every tensor in one multi-tensor op (a few kernel launches on CUDA instead of one per tensor)
    steps = [step(name, g) for name, g in zip(params, grads, strict=True)]
    moved = torch._foreach_add([p.detach() for p in params.values()], steps, alpha=-virtual_lr)
    virtual = {name: v.requires_grad_() for name, v in zip(params, moved, strict=True)}
    meta_loss = meta_loss_with(network, loss_function, virtual, meta_batch, autocast)
    meta_batch_grads = torch.autograd.grad(meta_loss, list(virtual.values()))
    direction = [step(name, v) for name, v in zip(params, meta_batch_grads, strict=True)]
    map_function = loss_map_function or loss_function
    sensitivity = loss_map_jvp(network, map_function, batch, params, direction, autocast, dtype=jvp_dtype)
    surrogate = -virtual_lr * (weights * sensitivity.to(weights.dtype)).sum()
    meta_grads = torch.autograd.grad(surrogate, meta_params)
    return MetaGradient(meta_loss.detach(), meta_grads, tuple(grads), tuple(meta_batch_grads))


def adam_preconditioner(optimizer: torch.optim.Optimizer, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """1 / (√v̂ + ε) of every parameter in ``params`` that ``optimizer`` (an ``Adam`` or ``AdamW``) has stepped: the
    scaling of Adam's update by its bias-corrected second-moment estimate v̂, so that a virtual step with it moves
    each parameter as the next real step will (with the current gradient in place of the first moment). Parameters
    without optimizer state yet are left out, and their virtual step stays plain SGD."""
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    scales = {}
    for name, param in params.items():
        state = optimizer.state.get(param, {})
        if "exp_avg_sq" not in state or id(param) not in groups:
            continue
        beta2, eps = groups[id(param)]["betas"][1], groups[id(param)]["eps"]
        correction = 1 - beta2 ** float(state["step"])
        scales[name] = 1.0 / ((state["exp_avg_sq"] / correction).sqrt() + eps)
    return scales


def meta_loss_with(
    network: nn.Module,
    loss_function: LossFunction,
    params: dict[str, torch.Tensor],
    meta_batch: Batch,
    autocast: Autocast = contextlib.nullcontext,
) -> torch.Tensor:
    """The mean loss of the meta batch with ``params`` in place of the network's (the others as they are)."""
    with autocast():
        logits = meta_batch.forward(network, {**params, **buffer_copies(network)})
        return loss_function(logits, meta_batch.label).mean()


def loss_map_jvp(
    network: nn.Module,
    loss_function: LossFunction,
    batch: Batch,
    params: dict[str, torch.Tensor],
    direction: Sequence[torch.Tensor],
    autocast: Autocast = contextlib.nullcontext,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """s_i = ⟨direction, ∇θ ℓ_i(θ)⟩ for every voxel i of ``batch``: one forward-mode JVP of the loss map along
    ``direction`` (over ``params``; the other parameters enter as constants), detached.

    With ``dtype`` (a mixed-precision run's, e.g. ``torch.bfloat16``) the forward runs wholly in it: parameters,
    tangents, floating-point buffers and the image are cast, ``autocast`` is not entered, and the loss is taken in
    float32 from the logits. Forward-mode AD inside ``torch.autocast`` meets a cast primal with an uncast tangent
    in the first convolution and fails (torch 2.13), so the cast is made here once, for the whole pass.
    """
    cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype) if t.is_floating_point() else t)
    constants = {name: cast(p.detach()) for name, p in network.named_parameters() if name not in params}
    primals = {name: cast(p.detach()) for name, p in params.items()}
    tangents = {name: cast(d.to(p.dtype)) for (name, p), d in zip(params.items(), direction, strict=True)}
    if dtype is not None:
        batch = batch._replace(image=cast(batch.image))
        autocast = contextlib.nullcontext

    def loss_map_at(theta: dict[str, torch.Tensor]) -> torch.Tensor:
        with autocast():
            buffers = {name: cast(b) for name, b in buffer_copies(network).items()}
            logits = batch.forward(network, {**theta, **constants, **buffers})
            return loss_function(logits if dtype is None else logits.float(), batch.label)

    sensitivity = jvp(loss_map_at, (primals,), (tangents,))[1].detach()
    return sensitivity if dtype is None else sensitivity.float()


def l2rw_weights(
    network: nn.Module,
    loss_function: LossFunction,
    batch: Batch,
    meta_batch: Batch,
    autocast: Autocast = contextlib.nullcontext,
    jvp_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-wise learning-to-reweight weights max(0, s_i), s_i = ⟨∇θ L_meta(θ), ∇θ ℓ_i(θ)⟩, and L_meta(θ).

    A voxel gets weight when a step on its loss would lower the loss on the clean meta batch (Ren et al. 2018:
    the negative gradient of the meta loss after a virtual step with loss coefficients ε, at ε = 0).
    """
    params = {name: p.detach().requires_grad_() for name, p in virtual_step_parameters(network).items()}
    meta_loss = meta_loss_with(network, loss_function, params, meta_batch, autocast)
    direction = torch.autograd.grad(meta_loss, list(params.values()))
    sensitivity = loss_map_jvp(network, loss_function, batch, params, direction, autocast, dtype=jvp_dtype)
    return meta_loss.detach(), sensitivity.clamp_min(0)
