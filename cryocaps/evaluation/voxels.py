"""Voxel-level scores: Dice/F1 per class between label maps, and voxel AUPRC.

Given predicted class probabilities, the area under the voxel precision-recall
curve is reported next to its chance level (the positive fraction), as in the
paper. Predicted and true maps pair by tomogram name and must share their voxel
size (:func:`cryocaps.io.volumes.check_same_voxel_size`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

import numpy as np

from cryocaps.classes import ClassTable, unsigned_labels
from cryocaps.errors import CryocapsError
from cryocaps.evaluation.particles import _few, fbeta_score

log = logging.getLogger(__name__)


class VoxelScores:
    """Accumulates voxel-level counts (and probability histograms) over label-map pairs.

    Dice/F1 per class between predicted and true label maps and, when probabilities
    are added, the voxel precision-recall curve over ``n_bins`` probability bins
    (exact for float16 maps at 2048 bins, up to ties inside a bin).
    """

    def __init__(self, classes: ClassTable, n_bins: int = 2048):
        self.classes = classes
        self.n_bins = n_bins
        self.counts = {c.name: np.zeros(3, dtype=np.int64) for c in classes}  # tp, fp, fn
        self.total = 0
        self.histograms: dict[str, np.ndarray] | None = (
            None  # name -> (2, n_bins): positives, negatives
        )
        self.without_probabilities = 0

    def add(
        self,
        label_pred: np.ndarray,
        label_true: np.ndarray,
        probabilities: np.ndarray | None = None,
    ) -> None:
        """Add one tomogram: (Z, Y, X) label maps, optional (C, Z, Y, X) probabilities
        (channel = label)."""
        if label_pred.shape != label_true.shape:
            raise CryocapsError(
                f"label maps differ in shape: predicted {label_pred.shape}, true {label_true.shape}"
            )
        pred, true = unsigned_labels(label_pred), unsigned_labels(label_true)
        if probabilities is not None:
            if probabilities.ndim != 4 or tuple(probabilities.shape[1:]) != pred.shape:
                raise CryocapsError(
                    f"probability map shape {probabilities.shape} does not fit labels {pred.shape}"
                )
            if probabilities.shape[0] < self.classes.n_labels:
                raise CryocapsError(
                    f"probability map has {probabilities.shape[0]} channels; "
                    f"need {self.classes.n_labels}"
                )
            if self.histograms is None:
                self.histograms = {
                    c.name: np.zeros((2, self.n_bins), dtype=np.int64) for c in self.classes
                }
        else:
            self.without_probabilities += 1
        self.total += pred.size
        for particle_class in self.classes:
            in_pred = pred == particle_class.label
            in_true = true == particle_class.label
            tp = int(np.count_nonzero(in_pred & in_true))
            self.counts[particle_class.name] += [
                tp,
                int(np.count_nonzero(in_pred)) - tp,
                int(np.count_nonzero(in_true)) - tp,
            ]
            if probabilities is not None:
                self.histograms[particle_class.name] += _histograms(
                    probabilities[particle_class.label], in_true, self.n_bins
                )

    def result(self) -> dict:
        """{"classes": {name: {dice, precision, recall, tp_voxels, fp_voxels, fn_voxels,
        positive_fraction[, auprc, auprc_baseline]}}, "macro": {dice[, auprc, auprc_baseline]}}.

        AUPRC is reported only when every tomogram came with probabilities; its chance
        level (a random score) is the positive fraction, as in the paper.
        """
        with_auprc = self.histograms is not None and self.without_probabilities == 0
        classes = {}
        for name, (tp, fp, fn) in self.counts.items():
            entry = {
                "dice": fbeta_score(tp, fp, fn, 1.0),
                "precision": tp / (tp + fp) if tp + fp else 0.0,
                "recall": tp / (tp + fn) if tp + fn else 0.0,
                "tp_voxels": int(tp),
                "fp_voxels": int(fp),
                "fn_voxels": int(fn),
                "positive_fraction": (tp + fn) / self.total if self.total else 0.0,
            }
            if with_auprc:
                entry["auprc"] = _histogram_auprc(*self.histograms[name])
                entry["auprc_baseline"] = entry["positive_fraction"]
            classes[name] = entry
        macro = {"dice": float(np.mean([e["dice"] for e in classes.values()]))}
        if with_auprc:
            macro["auprc"] = float(np.mean([e["auprc"] for e in classes.values()]))
            macro["auprc_baseline"] = float(
                np.mean([e["auprc_baseline"] for e in classes.values()])
            )
        return {"classes": classes, "macro": macro}


def background_counts(predicted: np.ndarray, truth: np.ndarray, n_labels: int) -> np.ndarray:
    """Voxels of each predicted label where the truth is background (0), (n_labels,).

    Divided by the number of background voxels, a class's entry is its share of the
    background: how far the class runs away over places with no particle. Truth voxels of
    other values (particles, the ignore label of partial annotations) are not background.
    """
    on_background = np.asarray(predicted)[np.asarray(truth) == 0]
    return np.bincount(on_background.ravel(), minlength=n_labels)[:n_labels]


def voxel_metrics(
    label_pred: np.ndarray,
    label_true: np.ndarray,
    classes: ClassTable,
    probabilities: np.ndarray | None = None,
) -> dict:
    """Voxel-level Dice/F1 per class, and voxel AUPRC with its chance level given probabilities.

    Parameters
    ----------
    label_pred, label_true : (Z, Y, X) label maps (0 = background)
    probabilities : optional (C, Z, Y, X), channel = label

    Returns the dict of :meth:`VoxelScores.result`.
    """
    scores = VoxelScores(classes)
    scores.add(label_pred, label_true, probabilities)
    return scores.result()


def _histograms(probability: np.ndarray, positive: np.ndarray, n_bins: int) -> np.ndarray:
    counts = np.zeros((2, n_bins), dtype=np.int64)
    for z in range(0, probability.shape[0], 16):  # slabs: memory stays small for big maps
        values = np.asarray(probability[z : z + 16], dtype=np.float32)
        bins = np.clip((values * n_bins).astype(np.int64), 0, n_bins - 1)
        truth = positive[z : z + 16]
        counts[0] += np.bincount(bins[truth], minlength=n_bins)
        counts[1] += np.bincount(bins[~truth], minlength=n_bins)
    return counts


def _histogram_auprc(positives: np.ndarray, negatives: np.ndarray) -> float:
    n_positive = int(positives.sum())
    if n_positive == 0:
        return 0.0
    # Highest bin first: each bin is one threshold.
    tp = np.cumsum(positives[::-1])
    fp = np.cumsum(negatives[::-1])
    precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
    recall = tp / n_positive
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def label_map_files(
    labels_pred: Sequence[str | os.PathLike], labels_true: Sequence[str | os.PathLike]
) -> tuple[list[Path], list[Path]]:
    """Predicted and true label maps from files and folders (``--labels-pred``/``--labels-true``).

    Probability and score maps (``<tomo>_probs.mrc``, ``<tomo>_score.mrc``) among the
    predicted files are left out: they are read beside their label maps.
    """
    from cryocaps.io.layout import expand_volume_paths, tomogram_name

    predicted = [
        path
        for path in expand_volume_paths(labels_pred, "--labels-pred")
        if not tomogram_name(path).endswith(("_probs", "_score"))
    ]
    return predicted, expand_volume_paths(labels_true, "--labels-true")


def evaluate_label_files(
    predicted: Sequence[str | os.PathLike],
    true: Sequence[str | os.PathLike],
    classes: ClassTable,
    *,
    use_probabilities: bool = True,
    progress: Callable[[str], None] | None = None,
    ignored_labels: Collection[int] = (),
) -> tuple[dict, list[str]]:
    """Voxel scores of predicted label maps against true ones, paired by tomogram name.

    ``<tomo>_labels.mrc`` pairs with ``<tomo>.mrc`` or ``<tomo>_labels.mrc``;
    ``<tomo>_probs.mrc`` beside a predicted map adds voxel AUPRC. A label in either
    map that is neither in ``classes`` nor in ``ignored_labels`` (classes left out on
    purpose) is refused: the maps were made with another class table. Returns
    (:meth:`VoxelScores.result`, tomogram names scored).
    """
    from cryocaps.io.layout import index_by_tomogram
    from cryocaps.io.volumes import read_tomogram

    predicted_maps = index_by_tomogram(predicted, "--labels-pred")
    true_maps = index_by_tomogram(true, "--labels-true")
    common = sorted(set(predicted_maps) & set(true_maps))
    if not common:
        raise CryocapsError(
            "--labels-pred and --labels-true share no tomogram: predicted "
            f"{_few(predicted_maps)}, true {_few(true_maps)}"
        )
    for name in sorted(set(predicted_maps) ^ set(true_maps)):
        log.warning(
            "tomogram %s has no %s label map; skipped",
            name,
            "true" if name in predicted_maps else "predicted",
        )
    scores = VoxelScores(classes)
    for name in common:
        pred = read_tomogram(predicted_maps[name])
        true_map = read_tomogram(true_maps[name])
        try:
            for volume, flag in ((pred, "--labels-pred"), (true_map, "--labels-true")):
                _check_labels(volume.data, classes, ignored_labels, f"{flag} {volume.path}")
            _score_pair(
                scores, pred, true_map, predicted_maps[name], true_maps[name], use_probabilities
            )
        finally:  # memory maps: one pair open at a time
            pred.close()
            true_map.close()
        if progress is not None:
            progress(name)
    return scores.result(), common


def _check_labels(
    label_map: np.ndarray, classes: ClassTable, ignored: Collection[int], where: str
) -> None:
    """Refuse labels that neither ``classes`` nor ``ignored`` list."""
    labels = unsigned_labels(label_map)
    present = (
        np.nonzero(np.bincount(labels.ravel()))[0]
        if labels.dtype == np.uint8
        else np.unique(labels)
    )
    known = {0, *(c.label for c in classes), *ignored}
    unknown = [int(v) if float(v).is_integer() else float(v) for v in present if v not in known]
    if unknown:
        raise CryocapsError(
            f"{where}: label(s) {', '.join(map(str, unknown))} are not in the class table "
            f"{classes.source} (labels there: {', '.join(str(c.label) for c in classes)})"
        )


def _score_pair(scores, pred, true_map, pred_path, true_path, use_probabilities: bool) -> None:
    """Add one tomogram's predicted and true label maps (and probabilities) to ``scores``."""
    from cryocaps.io.layout import companion_path
    from cryocaps.io.volumes import check_same_voxel_size, read_probabilities

    check_same_voxel_size(
        f"--labels-pred {pred_path}",
        pred.voxel_size_angstrom,
        str(true_path),
        true_map.voxel_size_angstrom,
    )
    probabilities = None
    probs_path = companion_path(pred_path, "probs") if use_probabilities else None
    if probs_path is not None:
        probabilities = read_probabilities(probs_path, pred.voxel_size_angstrom)
    try:
        scores.add(pred.data, true_map.data, probabilities)
    except CryocapsError as error:
        raise CryocapsError(f"{pred_path}: {error}") from None
