"""Segmentation losses shared by the networks.

Conventions: ``logits`` (B, K, D, H, W); ``labels`` (B, D, H, W) int64 with
values in [0, K); ``class_weights`` (K,) or None.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice_loss(logits: torch.Tensor, labels: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - mean over classes of the soft Dice between softmax(logits) and one-hot labels.

    Classes absent from both prediction and target in the batch score Dice 1 (via ``eps``).
    """
    probs = torch.softmax(logits.float(), dim=1)
    one_hot = F.one_hot(labels, num_classes=logits.shape[1]).movedim(-1, 1).to(probs.dtype)
    dims = (0, 2, 3, 4)
    intersection = (probs * one_hot).sum(dims)
    total = probs.sum(dims) + one_hot.sum(dims)
    dice = (2 * intersection + eps) / (total + eps)
    return 1 - dice.mean()


def cross_entropy_loss(
    logits: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor | None = None
) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, weight=class_weights)


def dice_ce_loss(
    logits: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Soft Dice + (weighted) cross-entropy, equal weights."""
    dice = soft_dice_loss(logits, labels)
    ce = cross_entropy_loss(logits, labels, class_weights)
    return dice + ce, {"dice": float(dice.detach()), "ce": float(ce.detach())}


def class_weights_from_frequencies(voxel_counts, max_weight: float = 50.0) -> torch.Tensor:
    """Inverse-frequency class weights, normalised to mean 1 and capped.

    ``voxel_counts`` (K,) voxels of each label in the training data. Classes
    with no voxels get weight 0 … avoided by the cap; weights are
    ``median(freq) / freq`` (median-frequency balancing).
    """
    counts = torch.as_tensor(voxel_counts, dtype=torch.float64).clamp_min(1.0)
    freq = counts / counts.sum()
    weights = freq.median() / freq
    weights = weights.clamp(max=max_weight)
    weights = weights / weights.mean()
    return weights.float()
