"""Learning curves of a training run (PNG), like Fig. 5 of Hajarolasvadi et al. 2022."""

from __future__ import annotations

import os
from pathlib import Path


def plot_learning_curve(metrics, png_path: str | os.PathLike) -> Path:
    """Plot training/validation loss and validation Dice per epoch.

    Parameters
    ----------
    metrics : a ``metrics.csv`` path or a DataFrame with columns ``epoch``,
        ``train_loss``, ``val_loss`` and ``dice_<class>`` (one per class),
        optionally ``mean_dice``.
    png_path : the PNG to write (atomically, replacing an older one).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from cryocaps.io.files import atomic_path

    frame = metrics if isinstance(metrics, pd.DataFrame) else pd.read_csv(metrics)
    dice_columns = [c for c in frame.columns if c.startswith("dice_")]
    figure, (loss_axes, dice_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for column, style in (("train_loss", "-"), ("val_loss", "--")):
        if column in frame:
            loss_axes.plot(
                frame["epoch"], frame[column], style, marker=".", label=column.replace("_", " ")
            )
    loss_axes.set_xlabel("epoch")
    loss_axes.set_ylabel("loss")
    loss_axes.set_title("Loss")
    loss_axes.legend()
    for column in dice_columns:
        dice_axes.plot(
            frame["epoch"], frame[column], marker=".", label=column.removeprefix("dice_")
        )
    if "mean_dice" in frame:
        dice_axes.plot(frame["epoch"], frame["mean_dice"], "k-", linewidth=2, label="mean")
    dice_axes.set_xlabel("epoch")
    dice_axes.set_ylabel("validation Dice")
    dice_axes.set_ylim(0, 1)
    dice_axes.set_title("Validation Dice")
    if dice_columns:
        dice_axes.legend(fontsize="small")
    figure.tight_layout()
    with atomic_path(png_path, overwrite=True) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)
    return Path(png_path)
