"""Validation: the model's loss and per-label Dice on fixed patches; the score picking the best."""

from __future__ import annotations

import math

import numpy as np

from cryocaps.training.ranks import Ranks
from cryocaps.training.sampling import TrainingVolume, extract_patch


def selection_score(select_by: str, val_loss: float, mean_dice: float) -> float:
    """Higher is better: mean Dice ("dice") or minus the loss ("loss"); NaN never wins."""
    value = mean_dice if select_by == "dice" else -val_loss
    return value if math.isfinite(value) else -math.inf


def mean_dice(class_dice: list[float]) -> float:
    """Mean over the classes that had voxels (NaN when none had)."""
    if all(map(math.isnan, class_dice)):
        return float("nan")
    return float(np.nanmean(class_dice))


def validate(
    model,
    locations: list[tuple[int, tuple[int, int, int]]],
    volumes: list[TrainingVolume],
    patch_size: int,
    batch_size: int,
    class_weights,
    device: str,
    autocast,
    ranks: Ranks,
    n_labels: int,
) -> tuple[float, list[float]]:
    """Mean validation loss and per-label hard Dice (n_labels,) over the validation patches.

    Each rank runs its share of ``locations`` (volume index, corner z, y, x);
    the sums are added over the ranks, so every rank returns the same values.
    The loss is the model's own (``compute_loss``); the Dice uses the logits
    of the forward pass that loss ran (caught with a forward hook), so each
    patch goes through the network once. ``autocast()`` returns the precision
    context. Dice is NaN for a label absent from both prediction and truth.
    """
    import torch

    loss_sum = torch.zeros(1, dtype=torch.float64)
    n_patches = torch.zeros(1, dtype=torch.float64)
    intersection = torch.zeros(n_labels, dtype=torch.float64)
    total = torch.zeros(n_labels, dtype=torch.float64)
    mine = ranks.share(locations)
    captured: dict = {}
    hook = model.register_forward_hook(
        lambda module, args, output: captured.__setitem__("output", output)
    )
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(mine), batch_size):
                batch = [
                    extract_patch(volumes[i], corner, patch_size)
                    for i, corner in mine[start : start + batch_size]
                ]
                images = torch.from_numpy(np.stack([b[0] for b in batch])[:, None]).to(device)
                labels = torch.from_numpy(np.stack([b[1] for b in batch])).to(device)
                captured.clear()
                with autocast():
                    loss, _ = model.compute_loss(images, labels, class_weights)
                    logits = _logits_from(captured.get("output"), images.shape, n_labels)
                    if logits is None:  # the loss ran no forward we can read: run one
                        logits = model(images)
                loss_sum += float(loss) * len(batch)
                n_patches += len(batch)
                predicted = logits.argmax(1)
                for label in range(n_labels):
                    p, t = predicted == label, labels == label
                    intersection[label] += float((p & t).sum())
                    total[label] += float(p.sum() + t.sum())
    finally:
        hook.remove()
        model.train()
    ranks.sum_(loss_sum, n_patches, intersection, total)
    val_loss = float(loss_sum / n_patches.clamp_min(1))
    dice = torch.where(
        total > 0, 2 * intersection / total.clamp_min(1), torch.full_like(total, float("nan"))
    )
    return val_loss, dice.tolist()


def _logits_from(output, image_shape, n_labels: int):
    """(B, K, D, H, W) logits from a caught forward output (a tensor, or a tuple led by them)."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    expected = (image_shape[0], n_labels, *image_shape[2:])
    if output is None or not hasattr(output, "shape") or tuple(output.shape) != expected:
        return None
    return output
