"""Segmentation losses shared by the networks.

Conventions: ``logits`` (B, K, D, H, W); ``labels`` (B, D, H, W) int64 with
values in [0, K) or :data:`~cryocaps.classes.IGNORE_LABEL` (unknown voxels of a partly
annotated label map: every loss here skips them, so they get no gradient);
``class_weights`` (K,) or None.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cryocaps.classes import IGNORE_LABEL


def annotated_one_hot(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(B, *S) labels -> (B, K, *S) float one-hot; all zeros where the label is IGNORE_LABEL."""
    annotated = labels != IGNORE_LABEL
    one_hot = F.one_hot(torch.where(annotated, labels, 0), num_classes=n_classes)
    return one_hot.movedim(-1, 1).float() * annotated.unsqueeze(1)


def soft_dice_loss(logits: torch.Tensor, labels: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - mean over classes of the soft Dice between softmax(logits) and one-hot labels.

    Classes absent from both prediction and target in the batch score Dice 1 (via ``eps``).
    Voxels labelled IGNORE_LABEL count in neither.
    """
    probs = torch.softmax(logits.float(), dim=1)
    probs = probs * (labels != IGNORE_LABEL).unsqueeze(1)
    one_hot = annotated_one_hot(labels, logits.shape[1])
    dims = (0, 2, 3, 4)
    intersection = (probs * one_hot).sum(dims)
    total = probs.sum(dims) + one_hot.sum(dims)
    dice = (2 * intersection + eps) / (total + eps)
    return 1 - dice.mean()


def cross_entropy_loss(
    logits: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """(Weighted) cross-entropy averaged over the annotated voxels (0 when there are none)."""
    if not bool((labels != IGNORE_LABEL).any()):
        return logits.float().sum() * 0.0  # (PyTorch's mean over no voxels is NaN)
    return F.cross_entropy(logits.float(), labels, weight=class_weights, ignore_index=IGNORE_LABEL)


def dice_ce_loss(
    logits: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Soft Dice + (weighted) cross-entropy, equal weights."""
    dice = soft_dice_loss(logits, labels)
    ce = cross_entropy_loss(logits, labels, class_weights)
    return dice + ce, {"dice": float(dice.detach()), "ce": float(ce.detach())}


def class_weights_from_frequencies(
    voxel_counts, max_weight: float = 50.0, power: float = 1.0
) -> torch.Tensor:
    """Inverse-frequency class weights, normalised to mean 1 and capped.

    ``voxel_counts`` (K,) voxels of each label in the training data. Weights are
    ``(median(freq) / freq) ** power`` (median-frequency balancing at ``power`` 1; 0.5 is
    its square root, which keeps more of the classes' priors: background, most of a
    tomogram, is not weighted down as far), capped at ``max_weight ** power`` (labels
    without voxels get the cap), then normalised to mean 1.
    """
    counts = torch.as_tensor(voxel_counts, dtype=torch.float64).clamp_min(1.0)
    freq = counts / counts.sum()
    weights = (freq.median() / freq).clamp(max=max_weight) ** power
    weights = weights / weights.mean()
    return weights.float()


def margin_loss(
    lengths: torch.Tensor,
    targets: torch.Tensor,
    class_weights: torch.Tensor | None = None,
    m_plus: float = 0.9,
    m_minus: float = 0.1,
    down_weight: float = 0.5,
    voxel_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Capsule margin loss (Sabour et al. 2017), per voxel, averaged over voxels.

    ``L = sum_k w_k [T_k max(0, m+ - |v_k|)² + λ (1 - T_k) max(0, |v_k| - m-)²] / sum_k w_k``
    with m+ 0.9, m- 0.1, λ 0.5, and all ``w_k`` = 1 without class weights (then
    the sum over classes is not divided by K, as in Sabour et al.).

    Parameters
    ----------
    lengths : (B, K, *S) capsule lengths in [0, 1)
    targets : (B, K, *S) class membership in [0, 1] (one-hot, or the fraction of
        each class in a down-sampled block)
    class_weights : (K,) or None
    voxel_weights : (B, *S) or None: weight of each voxel in the average (the annotated
        fraction of its block in partly annotated maps; 0 = skipped)
    """
    lengths = lengths.float()
    targets = targets.to(lengths.dtype)
    present = targets * F.relu(m_plus - lengths) ** 2
    absent = down_weight * (1 - targets) * F.relu(lengths - m_minus) ** 2
    per_class = present + absent
    if class_weights is None:
        per_voxel = per_class.sum(dim=1)
    else:
        shape = (1, -1) + (1,) * (lengths.dim() - 2)
        weights = class_weights.to(lengths).view(shape)
        per_voxel = (weights * per_class).sum(dim=1) / weights.sum()
    if voxel_weights is None:
        return per_voxel.mean()
    voxel_weights = voxel_weights.to(per_voxel.dtype)
    return (voxel_weights * per_voxel).sum() / voxel_weights.sum().clamp_min(1e-12)


def block_class_fractions(labels: torch.Tensor, n_classes: int, factor: int) -> torch.Tensor:
    """(B, D, H, W) labels -> (B, K, D/f, H/f, W/f): fraction of each class in every f³ block.

    The soft targets of the margin loss on a capsule grid ``factor`` times coarser
    than the labels. IGNORE_LABEL voxels belong to no class, so a block's fractions add
    up to its annotated fraction.
    """
    one_hot = annotated_one_hot(labels, n_classes)
    if factor == 1:
        return one_hot
    return F.avg_pool3d(one_hot, kernel_size=factor, stride=factor)


def reconstruction_target(images: torch.Tensor) -> torch.Tensor:
    """Input patches min-max scaled to [0, 1] per patch: the reconstruction target."""
    flat = images.float().flatten(1)
    low = flat.min(dim=1).values.view(-1, *([1] * (images.dim() - 1)))
    high = flat.max(dim=1).values.view(-1, *([1] * (images.dim() - 1)))
    return (images.float() - low) / (high - low).clamp_min(1e-6)


def weighted_reconstruction_loss(
    reconstruction_logits: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Class-weighted binary cross-entropy between the reconstruction and the input.

    The reconstruction branch predicts the input patch scaled to [0, 1]
    (``reconstruction_target``); each voxel's cross-entropy is weighted by the
    class weight of its label, so the rare particle voxels dominate as the
    foreground mask does in 3D-UCaps' masked reconstruction loss. Without
    ``class_weights`` they come from the batch's voxel frequencies
    (``class_weights_from_frequencies``). IGNORE_LABEL voxels have weight 0.

    Parameters
    ----------
    reconstruction_logits : (B, 1, D, H, W) pre-sigmoid reconstruction
    images : (B, 1, D, H, W) input patches
    labels : (B, D, H, W) int64 labels in [0, K) or IGNORE_LABEL
    class_weights : (K,) or None
    """
    annotated = labels != IGNORE_LABEL
    safe_labels = torch.where(annotated, labels, 0)
    if class_weights is None:
        n_classes = int(safe_labels.max()) + 1
        class_weights = class_weights_from_frequencies(
            torch.bincount(labels[annotated], minlength=n_classes)
        )
    weights = class_weights.to(reconstruction_logits.device, torch.float32)[safe_labels]
    weights = (weights * annotated).unsqueeze(1)
    target = reconstruction_target(images)
    bce = F.binary_cross_entropy_with_logits(
        reconstruction_logits.float(), target, reduction="none"
    )
    return (weights * bce).sum() / weights.sum().clamp_min(1e-12)


# Weights of the 3D-UCaps training loss, from the 3D-UCaps reference training
# setup: the segmentation loss (Dice + cross-entropy) at weight 1, the margin
# loss on the class capsules and the reconstruction loss at 0.1 each.
MARGIN_LOSS_WEIGHT = 0.1
RECONSTRUCTION_LOSS_WEIGHT = 0.1


def ucaps_loss(
    logits: torch.Tensor,
    lengths: torch.Tensor,
    reconstruction_logits: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    class_weights: torch.Tensor | None = None,
    margin_weight: float = MARGIN_LOSS_WEIGHT,
    reconstruction_weight: float = RECONSTRUCTION_LOSS_WEIGHT,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The 3D-UCaps training loss.

    ``dice + ce + margin_weight · margin + reconstruction_weight · reconstruction``:
    soft Dice + (weighted) cross-entropy on the segmentation logits (B, K, D, H, W);
    margin loss on the class-capsule lengths (B, K, D/f, H/f, W/f) against the
    fraction of each class in every f³ block; class-weighted cross-entropy of
    the input reconstruction (B, 1, D, H, W).
    """
    factor = labels.shape[-1] // lengths.shape[-1]
    targets = block_class_fractions(labels, logits.shape[1], factor)
    annotated = targets.sum(dim=1)  # (B, d, h, w): 1 unless the block holds unknown voxels
    targets = targets / annotated.unsqueeze(1).clamp_min(1e-6)
    segmentation, parts = dice_ce_loss(logits, labels, class_weights)
    margin = margin_loss(lengths, targets, class_weights, voxel_weights=annotated)
    reconstruction = weighted_reconstruction_loss(
        reconstruction_logits, images, labels, class_weights
    )
    loss = segmentation + margin_weight * margin + reconstruction_weight * reconstruction
    parts = {
        **parts,
        "margin": float(margin.detach()),
        "reconstruction": float(reconstruction.detach()),
    }
    return loss, parts
