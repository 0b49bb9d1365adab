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
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.func import functional_call, jvp

WEIGHT_NORMALISATIONS = ("sum", "mean", "none")
META_GRADIENT_MODES = ("jvp", "second_order")


def normalise_weights(weights: torch.Tensor, normalisation: str, eps: float = 1e-8) -> torch.Tensor:
    """Turn a weight map into the coefficients w̄ of the weighted loss Σ_i w̄_i ℓ_i.

    ``sum``: w̄ = w / Σw, a weighted mean whose scale the meta network cannot change (as Ren et al. 2018).
    ``mean``: w̄ = w / N, the mean of w·ℓ; lowering all weights also lowers the effective learning rate.
    ``none``: w̄ = w, the plain weighted sum.
    """
    if normalisation == "sum":
        return weights / (weights.sum() + eps)
    if normalisation == "mean":
        return weights / weights.numel()
    if normalisation == "none":
        return weights
    raise ValueError(f"weight normalisation must be one of {WEIGHT_NORMALISATIONS}, got {normalisation!r}.")


def virtual_step_parameters(module: nn.Module, prefixes: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """The parameters the virtual step moves: all that require gradients, or only those whose names start with
    one of ``prefixes`` (e.g. ``["model.2"]``, the last decoder stage of MONAI's ``UNet``).

    Restricting the virtual step to late layers (as FaMUS does) makes the meta-gradient cheaper but no longer
    that of MCPM: it is the exact meta-gradient of a virtual step that moves only those layers.
    """
    params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    if prefixes is None:
        return params
    unmatched = [prefix for prefix in prefixes if not any(name.startswith(prefix) for name in params)]
    if unmatched or not prefixes:
        top_level = sorted({".".join(name.split(".")[:2]) for name in params})
        raise ValueError(f"virtual_step_params {list(prefixes)} must each match a parameter name; unmatched {unmatched}, names start with {top_level}.")
    return {name: p for name, p in params.items() if name.startswith(tuple(prefixes))}


def buffer_copies(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the buffers, so functional passes leave the real batch-norm running statistics alone."""
    return {name: b.clone() for name, b in module.named_buffers()}


class MetaGradient(NamedTuple):
    """The meta loss at the virtual parameters and its gradient for each meta-network parameter."""

    meta_loss: torch.Tensor
    grads: tuple[torch.Tensor, ...]


def compute_meta_gradient(
    mode: str,
    network: nn.Module,
    loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    label: torch.Tensor,
    loss_map: torch.Tensor,
    meta_network: nn.Module,
    meta_input: torch.Tensor,
    meta_image: torch.Tensor,
    meta_label: torch.Tensor,
    virtual_lr: float,
    normalisation: str = "sum",
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    virtual_step_params: Sequence[str] | None = None,
) -> MetaGradient:
    """Compute ∇φ L_meta(θ̂(φ)) for the meta network's parameters φ.

    Args:
        mode: ``"jvp"`` or ``"second_order"``.
        network: the segmentation network (unwrapped from DDP); its forward must be the one that made
            ``loss_map`` from ``image`` (train mode, no dropout), so that the JVP is of the same function.
        loss_function: maps (logits, label) to the (B, *spatial) loss map.
        image, label: the training batch.
        loss_map: ℓ(θ) of the training batch, still attached to the network's graph; that graph is
            retained for the real training step.
        meta_network: g(φ), mapping ``meta_input`` to weights in (0, 1).
        meta_input: the detached input of the meta network.
        meta_image, meta_label: a batch of the clean meta set.
        virtual_lr: α, the size of the virtual SGD step.
        normalisation: how weights become loss coefficients (see ``normalise_weights``).
        autocast: a factory of the autocast context for forward passes (a no-op by default).
        virtual_step_params: name prefixes of the parameters the virtual step moves; all when None.
    """
    if mode not in META_GRADIENT_MODES:
        raise ValueError(f"meta-gradient mode must be one of {META_GRADIENT_MODES}, got {mode!r}.")
    params = virtual_step_parameters(network, virtual_step_params)
    meta_params = [p for p in meta_network.parameters() if p.requires_grad]
    weights = normalise_weights(meta_network(meta_input), normalisation)

    if mode == "second_order":
        grads = torch.autograd.grad((weights * loss_map).sum(), list(params.values()), create_graph=True, retain_graph=True)
        virtual = {name: p - virtual_lr * g for (name, p), g in zip(params.items(), grads)}
        meta_loss = meta_loss_with(network, loss_function, virtual, meta_image, meta_label, autocast)
        return MetaGradient(meta_loss.detach(), torch.autograd.grad(meta_loss, meta_params))

    grads = torch.autograd.grad((weights.detach() * loss_map).sum(), list(params.values()), retain_graph=True)
    virtual = {name: (p.detach() - virtual_lr * g).requires_grad_() for (name, p), g in zip(params.items(), grads)}
    meta_loss = meta_loss_with(network, loss_function, virtual, meta_image, meta_label, autocast)
    direction = torch.autograd.grad(meta_loss, list(virtual.values()))
    sensitivity = loss_map_jvp(network, loss_function, image, label, params, direction, autocast)
    surrogate = -virtual_lr * (weights * sensitivity.to(weights.dtype)).sum()
    return MetaGradient(meta_loss.detach(), torch.autograd.grad(surrogate, meta_params))


def meta_loss_with(
    network: nn.Module,
    loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    params: dict[str, torch.Tensor],
    meta_image: torch.Tensor,
    meta_label: torch.Tensor,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """The mean loss of the meta batch with ``params`` in place of the network's (the others as they are)."""
    with autocast():
        logits = functional_call(network, (params, buffer_copies(network)), (meta_image,))
        return loss_function(logits, meta_label).mean()


def loss_map_jvp(
    network: nn.Module,
    loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    label: torch.Tensor,
    params: dict[str, torch.Tensor],
    direction: Sequence[torch.Tensor],
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """s_i = ⟨direction, ∇θ ℓ_i(θ)⟩ for every voxel i: one forward-mode JVP of the loss map along ``direction``
    (over ``params``; the other parameters enter as constants), detached."""
    constants = {name: p.detach() for name, p in network.named_parameters() if name not in params}
    primals = {name: p.detach() for name, p in params.items()}
    tangents = {name: d.to(p.dtype) for (name, p), d in zip(params.items(), direction)}

    def loss_map_at(theta: dict[str, torch.Tensor]) -> torch.Tensor:
        with autocast():
            return loss_function(functional_call(network, (theta, constants, buffer_copies(network)), (image,)), label)

    return jvp(loss_map_at, (primals,), (tangents,))[1].detach()


def l2rw_weights(
    network: nn.Module,
    loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    label: torch.Tensor,
    meta_image: torch.Tensor,
    meta_label: torch.Tensor,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-wise learning-to-reweight weights max(0, s_i), s_i = ⟨∇θ L_meta(θ), ∇θ ℓ_i(θ)⟩, and L_meta(θ).

    A voxel gets weight when a step on its loss would lower the loss on the clean meta batch (Ren et al. 2018:
    the negative gradient of the meta loss after a virtual step with loss coefficients ε, at ε = 0).
    """
    params = {name: p.detach().requires_grad_() for name, p in virtual_step_parameters(network).items()}
    meta_loss = meta_loss_with(network, loss_function, params, meta_image, meta_label, autocast)
    direction = torch.autograd.grad(meta_loss, list(params.values()))
    return meta_loss.detach(), loss_map_jvp(network, loss_function, image, label, params, direction, autocast).clamp_min(0)
