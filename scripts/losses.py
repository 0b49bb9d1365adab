"""Voxel-wise segmentation losses: MCPM re-weights the per-voxel loss map, so the map must be available."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

REDUCTIONS = ("none", "mean", "sum")


def _index_label(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """``label`` as (B, *spatial) long class indices matching ``logits`` (B, C, *spatial); a ValueError otherwise."""
    if label.dim() == logits.dim():
        if label.shape[1] != 1:
            raise ValueError(f"label must have one channel of class indices, got shape {tuple(label.shape)}.")
        label = label[:, 0]
    if label.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"label shape {tuple(label.shape)} does not match the prediction {tuple(logits.shape)} (B, C, *spatial)."
        )
    return label.long()


def voxel_cross_entropy(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every voxel.

    Args:
        logits: (B, C, *spatial) network output.
        label: (B, 1, *spatial) or (B, *spatial) class indices (any numeric dtype).

    Returns:
        (B, *spatial) loss map.
    """
    return F.cross_entropy(logits, _index_label(logits, label), reduction="none")


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every voxel against a soft target (class probabilities, e.g. a teacher network's softmax).

    Args:
        logits: (B, C, *spatial) network output.
        target: (B, C, *spatial) probabilities summing to 1 over C, treated as constants.

    Returns:
        (B, *spatial) loss map, ``-Σ_c target_c log softmax(logits)_c``.
    """
    if target.shape != logits.shape:
        raise ValueError(f"soft target shape {tuple(target.shape)} does not match the prediction {tuple(logits.shape)}.")
    # at least float32, as cross-entropy is under autocast, whatever the logits' precision
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return -(target.detach().to(dtype) * F.log_softmax(logits.to(dtype), dim=1)).sum(dim=1)


def weighted_soft_dice(
    logits: torch.Tensor, label: torch.Tensor, weights: torch.Tensor | None = None, smooth: float = 1e-5
) -> torch.Tensor:
    """The soft Dice loss of MONAI's ``DiceLoss(to_onehot_y=True, softmax=True)`` (every class, background included,
    per case, then the mean) with every voxel's terms scaled by its weight:
    1 − (2 Σ_i w_i p_ic y_ic + s) / (Σ_i w_i (p_ic + y_ic) + s). With weights of 1 it is ``DiceLoss`` exactly, and it
    is unchanged when all weights are scaled alike (but for the smoothing ``s``), so a voxel's weight says only how
    much it counts against the others.

    Args:
        logits: (B, C, *spatial) network output.
        label: (B, 1, *spatial) or (B, *spatial) class indices.
        weights: (B, *spatial) or (B, 1, *spatial) voxel weights, treated as constants; None: all 1.
    """
    index = _index_label(logits, label)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    probabilities = torch.softmax(logits.to(dtype), dim=1)
    one_hot = F.one_hot(index, logits.shape[1]).movedim(-1, 1).to(dtype)
    w = torch.ones_like(index, dtype=dtype) if weights is None else weights.detach().to(dtype).reshape(index.shape)
    w = w.unsqueeze(1)
    axes = tuple(range(2, logits.dim()))
    intersection = (w * probabilities * one_hot).sum(axes)
    total = (w * (probabilities + one_hot)).sum(axes)
    return (1 - (2 * intersection + smooth) / (total + smooth)).mean()


def _reduce(loss_map: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss_map.mean()
    if reduction == "sum":
        return loss_map.sum()
    return loss_map


def _check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
    return reduction


class VoxelCrossEntropyLoss(nn.Module):
    """Cross-entropy from logits against index labels with a channel dim, as MONAI's engines pass them.

    ``reduction="none"`` returns the (B, *spatial) loss map that the MCPM trainer re-weights; ``"mean"`` is
    the plain training loss of the baseline.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = _check_reduction(reduction)

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return _reduce(voxel_cross_entropy(logits, label), self.reduction)


class GeneralisedCrossEntropyLoss(nn.Module):
    """Generalised cross-entropy (Zhang and Sabuncu, NeurIPS 2018, arXiv:1805.07836) of every voxel:
    ``(1 - p_y^q) / q`` with ``p_y`` the softmax probability of the labelled class.

    A noise-robust loss that needs no clean set: ``q -> 0`` is the cross-entropy, ``q = 1`` the mean absolute error,
    which gives a voxel whose label the network contradicts (a likely corrupted one) a bounded gradient. PyMIC ships
    it for noisy-label segmentation with ``q = 0.7``, the paper's value, the default here.
    """

    def __init__(self, q: float = 0.7, reduction: str = "mean") -> None:
        super().__init__()
        if not 0 < q <= 1:
            raise ValueError(f"q must be in (0, 1], got {q!r}.")
        self.q = q
        self.reduction = _check_reduction(reduction)

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        log_p = torch.log_softmax(logits.float(), dim=1).gather(1, _index_label(logits, label).unsqueeze(1))[:, 0]
        return _reduce((1 - torch.exp(self.q * log_p)) / self.q, self.reduction)


class SmallLossTruncatedLoss(nn.Module):
    """Mean cross-entropy over the voxels of a batch, leaving out the ``drop_fraction`` with the highest loss.

    Small-loss truncation: voxels whose labels are wrong tend to have high loss, so plain training that ignores
    the highest-loss ones is a simple baseline for noisy labels that needs no clean meta set.

    With ``per_class`` (the default) the fraction is dropped within each labelled class: the foreground of a
    segmentation is often a few percent of the voxels and has the highest losses early on, so a global cut of
    10% would drop nearly all of it and the network would learn background only (0.11 mean Dice against 0.74
    for plain training in the benchmark's noise-free quick setting).
    """

    def __init__(self, drop_fraction: float = 0.1, per_class: bool = True) -> None:
        super().__init__()
        if not 0 <= drop_fraction < 1:
            raise ValueError(f"drop_fraction must be in [0, 1), got {drop_fraction!r}.")
        self.drop_fraction = drop_fraction
        self.per_class = per_class

    def _smallest(self, losses: torch.Tensor) -> torch.Tensor:
        keep = max(1, losses.numel() - int(self.drop_fraction * losses.numel()))
        return torch.topk(losses, keep, largest=False, sorted=False).values

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        loss_map = voxel_cross_entropy(logits, label).flatten()
        if not self.per_class:
            return self._smallest(loss_map).mean()
        classes = label.flatten().long()
        kept = [self._smallest(loss_map[classes == c]) for c in torch.unique(classes)]
        return torch.cat(kept).mean()
