"""Validation: held-out regions segmented, picked and scored; patches for loss and Dice.

:class:`Validator` runs both at the end of an epoch. Every epoch: the model's
loss and per-label Dice on fixed patches of the held-out regions (cheap; the
loss drives ``--lr-schedule plateau``). Every ``--val-every`` epochs (auto: as
often as keeps it near :data:`~cryocaps.training.config.VAL_TIME_SHARE` of the
run), at the last epoch, and at any epoch that becomes the best by Dice or
loss: the whole regions, as :mod:`cryocaps.training.regions` describes.
:func:`selection_score` turns an epoch's row into the score the best model is
chosen by.
"""

from __future__ import annotations

import math
import time

import numpy as np

from cryocaps.classes import IGNORE_LABEL
from cryocaps.training.config import VAL_TIME_SHARE
from cryocaps.training.holdout import context_view, in_context
from cryocaps.training.ranks import Ranks
from cryocaps.training.regions import RegionScores, validate_regions
from cryocaps.training.sampling import TrainingVolume, extract_patch, validation_locations


def selection_score(select_by: str, row: dict) -> list[float] | None:
    """Higher is better, compared in order; None when this epoch's row cannot say.

    ``f1``: validation macro F1 on the held-out regions, then less background taken
    by the classes, then a lower loss (None in epochs without a region validation);
    ``dice``: mean patch Dice; ``loss``: minus the patch loss. NaN never wins.
    """
    if select_by == "f1":
        if not math.isfinite(row.get("val_macro_f1", math.nan)):
            return None
        values = [row["val_macro_f1"], -row["val_background_share"], -row["val_loss"]]
    else:
        values = [row["mean_dice"] if select_by == "dice" else -row["val_loss"]]
    return [v if math.isfinite(v) else -math.inf for v in values]


def mean_dice(class_dice: list[float]) -> float:
    """Mean over the classes that had voxels (NaN when none had)."""
    if all(map(math.isnan, class_dice)):
        return float("nan")
    return float(np.nanmean(class_dice))


def region_interval(region_seconds: float, train_seconds: float) -> float:
    """Epochs between region validations that keep them near ``VAL_TIME_SHARE`` of the time.

    With ``v`` seconds per region validation and ``e`` per epoch of training, one every
    ``k`` epochs takes ``v / (k e + v)`` of the time: ``k = v (1 - share) / (share e)``.
    """
    if train_seconds <= 0:
        return 1.0
    return max(1.0, region_seconds * (1 - VAL_TIME_SHARE) / (VAL_TIME_SHARE * train_seconds))


class Validator:
    """The validation of a run: fixed patches every epoch, whole regions when due.

    Parameters
    ----------
    data : the run's :class:`~cryocaps.training.data.TrainingData`
    config : its :class:`~cryocaps.training.config.TrainConfig`
    """

    def __init__(self, data, config, class_weights, device: str, bf16: bool, ranks: Ranks):
        self.data, self.config, self.class_weights = data, config, class_weights
        self.device, self.bf16, self.ranks = device, bf16, ranks
        self.regions = data.holdout.regions
        self.views = [context_view(data.volumes[r.volume], r) for r in self.regions]
        self.locations = validation_locations(
            self.views,
            in_context(data.val_particles, self.regions),
            list(range(len(self.views))),
            config.patch_size,
            background_fraction=config.background_fraction,
            max_patches=config.max_val_patches,
            seed=config.seed,
        )
        # classes without score thresholds where the held-out annotation holds unknown voxels
        # (None: every class; --unannotated auto names the ones it found partly annotated)
        self.partial_classes: set[str] | None = None
        self.patch_seconds = 0.0  # the last patch validation's duration
        self.region_seconds = 0.0  # the last region validation's (0: none yet)

    @property
    def region_voxels(self) -> int:
        return sum(math.prod(region.context_shape) for region in self.regions)

    def seconds_needed(self, step_seconds: float) -> float:
        """What the next validation may take: the last ones timed, else an estimate from a
        training step (a forward is ~1/3 of a step; a region costs its voxels' worth of
        patches, twice for the window overlap)."""
        config = self.config
        patches = (
            self.patch_seconds
            or math.ceil(len(self.locations) / self.ranks.world_size / config.batch_size)
            * step_seconds
            / 3
        )
        step_voxels = config.batch_size * config.patch_size**3
        regions = self.region_seconds or (
            2 * self.region_voxels / self.ranks.world_size / step_voxels * step_seconds / 3
        )
        return patches + regions

    def summary(self, state) -> dict:
        """What was held out, and what validating it cost (measured over ``state.rows``)."""
        rows = state.rows
        total = sum(r["seconds"] for r in rows)
        return {
            "held_out": self.data.holdout.description,
            "regions": len(self.regions),
            "region_voxels": self.region_voxels,
            "region_validations": sum(math.isfinite(r["val_macro_f1"]) for r in rows),
            "val_every": self.config.val_every or "auto",
            "auto_interval_epochs": state.region_interval,
            "last_region_seconds": self.region_seconds,
            "time_share": sum(r["val_seconds"] for r in rows) / total if total else None,
        }

    def patches(self, model, autocast) -> tuple[float, list[float]]:
        """Loss and per-label Dice on the fixed patches (:func:`validate`)."""
        started = time.time()
        result = validate(
            model,
            self.locations,
            self.views,
            self.config.patch_size,
            self.config.batch_size,
            self.class_weights,
            self.device,
            autocast,
            self.ranks,
            self.data.classes.n_labels,
        )
        self.patch_seconds = time.time() - started
        return result

    def whole_regions(self, model) -> RegionScores:
        """Segment, pick and score the held-out regions."""
        scores = validate_regions(
            model,
            self.data.volumes,
            self.regions,
            self.data.val_particles,
            self.data.classes,
            device=self.device,
            bf16=self.bf16,
            ranks=self.ranks,
            config={"patch_size": self.config.patch_size},
            partial_classes=self.partial_classes,
        )
        self.region_seconds = self.ranks.mean(scores.seconds)
        return scores


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
    context. Dice is NaN for a label absent from both prediction and truth;
    unknown voxels (:data:`~cryocaps.classes.IGNORE_LABEL`) count in neither.
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
                known = labels != IGNORE_LABEL  # unknown voxels (partial annotations): no score
                for label in range(n_labels):
                    p, t = (predicted == label) & known, labels == label
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
