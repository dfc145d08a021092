"""Figures as PNG files: precision-recall curves, tomogram overlays of picks, learning curves,
simulation previews.

Each function is independent: it takes plain data (arrays, dicts), draws one
figure with matplotlib's non-interactive Agg backend and writes it atomically.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Colours that stay apart for colour-blind readers and on a grey tomogram.
OUTCOME_STYLE = {
    "tp": {"color": "#00e05a", "linestyle": "-", "label": "true positive"},
    "fp": {"color": "#ff2d55", "linestyle": "-", "label": "false positive"},
    "fn": {"color": "#ffd400", "linestyle": "--", "label": "missed (false negative)"},
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: str | os.PathLike, dpi: int) -> Path:
    from cryocaps.io.files import atomic_path

    path = Path(path)
    with atomic_path(path, overwrite=True) as tmp:
        figure.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight")
    return path


def plot_precision_recall(
    curves: Mapping[str, Mapping],
    path: str | os.PathLike,
    *,
    title: str = "Precision-recall over pick scores",
    dpi: int = 130,
) -> Path:
    """Step curves of precision against recall, one per class, AUPRC in the legend.

    Parameters
    ----------
    curves : {class name: {"precision": array, "recall": array, "auprc": float}}
        (as :func:`cryocaps.evaluation.pick_precision_recall` returns)
    path : PNG to write (replaced if it exists)
    """
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5.6, 4.8))
    styles = ("-", "--", "-.", ":")  # curves often coincide at precision 1: keep each visible
    for k, (name, curve) in enumerate(curves.items()):
        recall = np.asarray(curve["recall"], dtype=float)
        precision = np.asarray(curve["precision"], dtype=float)
        label = f"{name} (AUPRC {curve['auprc']:.3f})"
        if len(recall) == 0:
            axes.plot([], [], label=f"{name} (no picks or no particles)")
            continue
        # Start at recall 0 with the first precision, as average precision counts it.
        axes.step(
            np.r_[0.0, recall],
            np.r_[precision[0], precision],
            where="pre",
            linewidth=1.8,
            linestyle=styles[k % len(styles)],
            label=label,
        )
        axes.plot(recall[-1], precision[-1], "o", color=axes.lines[-1].get_color(), markersize=4)
    axes.set_xlim(0, 1.02)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("recall")
    axes.set_ylabel("precision")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower left", fontsize=9, framealpha=0.9)
    path = _save(figure, path, dpi)
    plt.close(figure)
    return path


@dataclass
class Circle:
    """One particle on an overlay: centre (x, y) and radius in pixels of the image."""

    x: float
    y: float
    radius: float
    outcome: str  # "tp", "fp" or "fn"
    label: str = ""


def plot_overlay(
    panels: Sequence[tuple[np.ndarray, Sequence[Circle], str]],
    path: str | os.PathLike,
    *,
    title: str = "",
    dpi: int = 110,
    label_circles: bool = True,
) -> Path:
    """Tomogram slices side by side with particles circled by outcome (like the paper's Figs. 6-7).

    Parameters
    ----------
    panels : [(image (Y, X), circles, panel title)], e.g. one per Z slice or slab
    path : PNG to write (replaced if it exists)
    title : figure title
    label_circles : write each circle's ``label`` (e.g. its class) beside it
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Circle as CirclePatch

    plt = _pyplot()
    n = len(panels)
    height, width = panels[0][0].shape
    panel_width = 6.0
    panel_height = panel_width * height / width
    figure, axes_list = plt.subplots(
        1, n, figsize=(panel_width * n, panel_height + 1.0), squeeze=False
    )
    for axes, (image, circles, panel_title) in zip(axes_list[0], panels, strict=True):
        low, high = np.percentile(image, [1, 99]) if image.size else (0, 1)
        axes.imshow(
            image, cmap="gray", vmin=low, vmax=high if high > low else low + 1, origin="lower"
        )
        for circle in circles:
            style = OUTCOME_STYLE[circle.outcome]
            axes.add_patch(
                CirclePatch(
                    (circle.x, circle.y),
                    circle.radius,
                    fill=False,
                    edgecolor=style["color"],
                    linestyle=style["linestyle"],
                    linewidth=1.6,
                )
            )
            if label_circles and circle.label:
                axes.text(
                    circle.x + circle.radius * 0.75,
                    circle.y + circle.radius * 0.75,
                    circle.label,
                    color=style["color"],
                    fontsize=8,
                    clip_on=True,
                )
        axes.set_title(panel_title, fontsize=10)
        axes.set_xlabel("x (voxels)")
        axes.set_ylabel("y (voxels)")
        axes.set_xlim(-0.5, image.shape[1] - 0.5)
        axes.set_ylim(-0.5, image.shape[0] - 0.5)
    handles = [
        Line2D([], [], color=s["color"], linestyle=s["linestyle"], linewidth=2, label=s["label"])
        for s in OUTCOME_STYLE.values()
    ]
    figure.legend(handles=handles, loc="lower center", ncol=3, frameon=False, fontsize=10)
    if title:
        figure.suptitle(title, fontsize=12)
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    path = _save(figure, path, dpi)
    plt.close(figure)
    return path


def learning_curve_figure(metrics):
    """The learning-curve figure: loss, validation Dice and, when recorded, the held-out
    regions' particle scores, per epoch.

    Parameters
    ----------
    metrics : a ``metrics.csv`` path or a DataFrame with columns ``epoch``,
        ``train_loss``, ``val_loss`` and ``dice_<class>`` (one per class),
        optionally ``mean_dice``, and ``val_macro_f1`` with
        ``val_background_share_<class>`` (NaN in epochs without a region validation).

    Returns
    -------
    A matplotlib Figure (Agg) whose lines are labelled "train loss", "val loss",
    each class name and "mean" (and in the third axes "macro F1" and each class
    name's background share); close it with ``matplotlib.pyplot.close``.
    """
    plt = _pyplot()
    import pandas as pd
    from matplotlib.ticker import MaxNLocator

    frame = metrics if isinstance(metrics, pd.DataFrame) else pd.read_csv(metrics)
    dice_columns = [c for c in frame.columns if c.startswith("dice_")]
    with_regions = "val_macro_f1" in frame and frame["val_macro_f1"].notna().any()
    n_axes = 3 if with_regions else 2
    figure, axes_row = plt.subplots(1, n_axes, figsize=(5 * n_axes, 4))
    loss_axes, dice_axes = axes_row[0], axes_row[1]
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
    dice_axes.set_title("Validation Dice (patches)")
    if dice_columns:
        dice_axes.legend(fontsize="small")
    if with_regions:
        _held_out_panel(axes_row[2], frame)
    for axes in axes_row:
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.tight_layout()
    return figure


def _held_out_panel(axes, frame) -> None:
    """Macro F1 of the held-out regions' picks (left scale) and each class's share of the
    annotated background (right scale, log), at the epochs that validated them."""
    rows = frame[frame["val_macro_f1"].notna()]
    axes.plot(rows["epoch"], rows["val_macro_f1"], "k-", marker="o", linewidth=2, label="macro F1")
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("epoch")
    axes.set_ylabel("validation macro F1 (picks)")
    axes.set_title("Held-out regions")
    share_axes = axes.twinx()
    for column in [c for c in frame.columns if c.startswith("val_background_share_")]:
        share_axes.plot(
            rows["epoch"],
            rows[column].clip(lower=1e-6),
            ":",
            marker=".",
            label=f"{column.removeprefix('val_background_share_')} (background share)",
        )
    share_axes.set_yscale("log")
    share_axes.set_ylabel("share of background voxels called the class")
    handles = axes.get_legend_handles_labels()
    more = share_axes.get_legend_handles_labels()
    axes.legend(handles[0] + more[0], handles[1] + more[1], fontsize="x-small")


def plot_learning_curve(metrics, png_path: str | os.PathLike) -> Path:
    """Plot training/validation loss and validation Dice per epoch (:func:`learning_curve_figure`).

    Parameters
    ----------
    metrics : a ``metrics.csv`` path or a DataFrame (see :func:`learning_curve_figure`).
    png_path : the PNG to write (atomically, replacing an older one).
    """
    from cryocaps.io.files import atomic_path

    figure = learning_curve_figure(metrics)
    with atomic_path(png_path, overwrite=True) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    _pyplot().close(figure)
    return Path(png_path)


def plot_simulation_preview(
    path: str | os.PathLike,
    tomogram: np.ndarray,
    labels: np.ndarray,
    title: str,
    overwrite: bool = False,
) -> Path:
    """Central XY and XZ slices of a simulated tomogram, beside the same slices of its labels.

    Parameters
    ----------
    tomogram : (Z, Y, X) float, shown between its 1st and 99th percentiles
    labels : (Z, Y, X) integer class labels, 0 = background
    path : PNG to write (refused if it exists, unless ``overwrite``)
    """
    from cryocaps.io.files import atomic_path

    plt = _pyplot()
    nz, ny, nx = tomogram.shape
    low, high = np.percentile(tomogram, [1, 99])
    top = max(9, int(labels.max()))
    label_colours = "tab10" if top <= 9 else "tab20"
    xy, xz = tomogram[nz // 2], tomogram[:, ny // 2]
    width = 12
    figure, axes = plt.subplots(
        2,
        2,
        figsize=(width, width * (ny + nz) / (2 * nx) + 0.6),
        height_ratios=[ny, nz],
        squeeze=False,
    )
    axes[0, 0].imshow(xy, cmap="gray", vmin=low, vmax=high)
    axes[0, 0].set_title(f"{title}: XY slice z={nz // 2}")
    axes[0, 1].imshow(
        labels[nz // 2], cmap=label_colours, vmin=0, vmax=top, interpolation="nearest"
    )
    axes[0, 1].set_title("labels, same slice")
    axes[1, 0].imshow(xz, cmap="gray", vmin=low, vmax=high)
    axes[1, 0].set_title(f"XZ slice y={ny // 2} (tilt axis Y: wedge along Z)")
    axes[1, 1].imshow(
        labels[:, ny // 2], cmap=label_colours, vmin=0, vmax=top, interpolation="nearest"
    )
    for axis in axes.ravel():
        axis.set_xticks([])
        axis.set_yticks([])
    figure.tight_layout()
    path = Path(path)
    with atomic_path(path, overwrite=overwrite) as tmp:
        figure.savefig(tmp, dpi=80, format="png")
    plt.close(figure)
    return path
