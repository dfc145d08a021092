"""Validation on held-out regions: segmented, picked and scored as a user's run would be.

Each region (:mod:`cryocaps.training.holdout`) is segmented whole with the
sliding window ``cryocaps segment`` runs (its default window, overlap and
Gaussian blending, the whole tomogram's normalisation), picked with
``cluster-picks``' defaults (:func:`cryocaps.picking.pick_particles`) and scored
at particle level against the region's annotated particles with ``evaluate``'s
matcher and default tolerance (:func:`cryocaps.evaluation.match_picks`). The
picks are scored twice, as ``cluster-picks`` would score them: by the mean
class probability (beside ``segment --probabilities`` or ``--score`` maps) and
by their size in voxels (beside a label map alone); each gives its own per-class
best-F1 score thresholds (:func:`cryocaps.evaluation.best_score_thresholds`).

Background share of class c: of the voxels in the scored boxes that the
annotation labels background (0), the fraction the segmentation labels c.
Annotated particles of other classes are not counted in the denominator; a
class that runs away over the background shows as a large share, whatever the
patch Dice says.

Partial annotations (``make-masks --unannotated unknown``): a pick whose centre
lies on an unknown voxel (:data:`~cryocaps.classes.IGNORE_LABEL`) may be a
particle nobody annotated, so it is left out, neither true nor false, and
unknown voxels are no background. Precision then means: of the picks where
the annotation knows what is there (on or near an annotated particle, or on
background known to be empty), the share that are right. With unannotated
places painted background (``make-masks``' default), a right pick on an
unannotated particle counts as false: the precision is a lower bound.
Score thresholds set on a lower bound are too strict (on the benchmark family,
with 30% annotated, they halved the macro F1 of some draws by dropping the
particles nobody annotated), so where a region's annotation holds unknown voxels
no score threshold is set (:data:`PARTIAL_THRESHOLDS`): every pick is kept and
only the picking method is chosen. A fully annotated ``--val-tomograms``
tomogram beside partial training maps still gets thresholds.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cryocaps.classes import IGNORE_LABEL, unsigned_labels
from cryocaps.training.holdout import HeldOutRegion
from cryocaps.training.sampling import ParticleSet, TrainingVolume

log = logging.getLogger(__name__)

SCORE_KINDS = ("probability", "size_voxels")  # what a pick's score is, as cluster-picks gives it
# The picking methods each class is tried with; the first wins ties.
PICK_METHODS = ("components", "meanshift")
# Recorded with the thresholds (key "not_set") when a held-out annotation is partial.
PARTIAL_THRESHOLDS = (
    "not set: the held-out annotation is partial (unknown voxels), so its precision is a "
    "lower bound and a threshold set on it would drop the particles nobody annotated"
)


@dataclass
class RegionScores:
    """One region validation: metrics.csv entries, the thresholds it tunes, its duration.

    ``metrics`` has ``val_precision_<c>``, ``val_recall_<c>``, ``val_f1_<c>``,
    ``val_background_share_<c>`` per class, ``val_macro_f1``, ``val_background_share``
    (all classes together) and ``val_picks``; ``thresholds`` maps each of
    :data:`SCORE_KINDS` to records of :data:`cryocaps.io.thresholds.THRESHOLD_COLUMNS` and the
    picking ``method`` chosen for the class (of :data:`PICK_METHODS`)
    (``min_score`` None: keep every pick).
    """

    metrics: dict
    thresholds: dict
    seconds: float

    def metrics_for_json(self) -> dict:
        """``metrics`` with NaN (a class neither picked nor present) as None."""
        return {k: None if _is_nan(v) else v for k, v in self.metrics.items()}


def _is_nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


class _LabelScoreSink:
    """Keeps the argmax labels (uint8) and the highest foreground probability (float16),
    as segment's label and score maps hold them."""

    def __init__(self, shape):
        self.labels = np.zeros(shape, np.uint8)
        self.score = np.zeros(shape, np.float16)

    def aggregate(self, region, block: np.ndarray) -> None:
        self.labels[region] = block.argmax(axis=0)
        self.score[region] = block[1:].max(axis=0)

    def finalize(self):
        return self.labels, self.score


def segment_region(model, volume: TrainingVolume, region: HeldOutRegion, *, device, bf16, config):
    """Labels (uint8) and score (float16) maps of a region's context, (Z, Y, X) of the context.

    ``config`` is the model's config (``patch_size``), which sets segment's default window.
    """
    from cryocaps.inference import ProbabilityPredictor, resolve_window, sliding_window
    from cryocaps.preprocess import apply_normalization

    multiple = int(getattr(model, "size_multiple", 1))
    patches, overlaps = resolve_window(config, multiple)
    was_training = model.training
    try:
        # channels-last, as the networks keep their weights (a change would alter training)
        predictor = ProbabilityPredictor(model)
        return sliding_window(
            volume.data[region.context],
            predictor,
            patches,
            overlaps,
            size_multiple=multiple,
            device=device,
            bf16=bf16,
            transform=lambda block: apply_normalization(block, volume.stats),
            sink=_LabelScoreSink(region.context_shape),
        )
    finally:
        model.train(was_training)


def region_outcome(
    labels, score, volume: TrainingVolume, region: HeldOutRegion, particles: ParticleSet, classes
) -> dict:
    """Picks (both score kinds), truth and background counts of one segmented region.

    Positions are voxels of the region's context; picks and particles outside its
    box are left out (the margin is context only).
    """
    from cryocaps.evaluation import background_counts
    from cryocaps.picking import pick_particles, scored_by_size

    box = region.box_in_context
    annotation = unsigned_labels(volume.label_map[region.box])
    picks = {}
    for method in PICK_METHODS:  # picked once; scored by probability and by size
        table = pick_particles(
            labels,
            classes,
            volume.voxel_size_angstrom,
            scores=score,
            method=method,
            tomo_name=region.name,
        )
        table = table[_inside_table(table, box)]
        table = table[~_on_unknown(table, annotation, box)]
        by_probability, by_size = SCORE_KINDS
        picks[method, by_probability] = table
        picks[method, by_size] = scored_by_size(table, classes)
    mine = particles.subset(particles.volume == region.volume)
    offset = np.array([s.start for s in region.context])
    zyx = mine.zyx - offset
    truth = pd.DataFrame(
        {
            "tomo": region.name,
            "class_name": [classes.by_label(int(label)).name for label in mine.label],
            "x": zyx[:, 2].astype(float),
            "y": zyx[:, 1].astype(float),
            "z": zyx[:, 0].astype(float),
        }
    )
    truth = truth[_inside_table(truth, box)]
    return {
        "picks": picks,
        "truth": truth,
        "background_counts": background_counts(labels[box], annotation, classes.n_labels),
        "background_voxels": int(np.count_nonzero(annotation == 0)),
        "partial": bool(np.any(annotation == IGNORE_LABEL)),
        "voxel_size_angstrom": volume.voxel_size_angstrom,
        "width": region.context_shape[2],
    }


def _inside_table(table: pd.DataFrame, box) -> np.ndarray:
    inside = np.ones(len(table), dtype=bool)
    for column, extent in zip(("z", "y", "x"), box, strict=True):
        position = np.rint(table[column].to_numpy(dtype=float))
        inside &= (position >= extent.start) & (position < extent.stop)
    return inside


def _on_unknown(table: pd.DataFrame, annotation: np.ndarray, box) -> np.ndarray:
    """Which rows of ``table`` (positions inside ``box``) sit on an unknown annotation voxel."""
    if len(table) == 0:
        return np.zeros(0, dtype=bool)
    index = tuple(
        np.rint(table[column].to_numpy(dtype=float)).astype(np.int64) - extent.start
        for column, extent in zip(("z", "y", "x"), box, strict=True)
    )
    return annotation[index] == IGNORE_LABEL


HELD_OUT = "held-out"  # the name all regions are scored under, laid side by side along X
REGION_GAP_VOXELS = 1000  # between regions so laid out: far beyond any matching tolerance


def score_outcomes(
    outcomes: list[dict], classes, partial_classes: set[str] | None = None
) -> tuple[dict, dict]:
    """Metrics and thresholds (see :class:`RegionScores`) from every region's outcome.

    Where a region's annotation holds unknown voxels, no score threshold is set for the
    classes in ``partial_classes`` (None: for every class).

    The regions are scored together as one tomogram: each is shifted along X past
    the previous one by its width and :data:`REGION_GAP_VOXELS`, so no pick can
    match a particle of another region, and the picks of a region without
    validation particles count as false positives.
    """
    from cryocaps.evaluation import best_score_thresholds, match_picks, summarize

    shift = 0.0
    truth_parts, pick_parts = [], {key: [] for key in outcomes[0]["picks"]}
    for outcome in outcomes:
        truth_parts.append(_laid_out(outcome["truth"], shift))
        for key, parts in pick_parts.items():
            parts.append(_laid_out(outcome["picks"][key], shift))
        shift += outcome["width"] + REGION_GAP_VOXELS
    truth = pd.concat(truth_parts, ignore_index=True)
    voxel_size = outcomes[0]["voxel_size_angstrom"]  # one voxel size: load_volumes checks it
    summaries, tables = {}, {}
    for key, parts in pick_parts.items():  # key: (method, score kind)
        matching = match_picks(pd.concat(parts, ignore_index=True), truth, classes, voxel_size)
        summaries[key] = summarize(matching)
        tables[key] = best_score_thresholds(matching).set_index("class_name", drop=False)
    unthresholded = set()
    if any(o.get("partial") for o in outcomes):
        unthresholded = {c.name for c in classes} if partial_classes is None else partial_classes
    thresholds, chosen = _choose_methods(tables, classes, unthresholded)
    if unthresholded:
        thresholds = _keep_every_pick(thresholds, summaries, partial_classes)
    background = np.sum([o["background_counts"] for o in outcomes], axis=0)
    n_background = max(1, sum(o["background_voxels"] for o in outcomes))
    metrics, f1s = {}, []
    for particle_class in classes:
        summary = summaries[chosen[particle_class.name], SCORE_KINDS[0]]
        entry = summary["classes"][particle_class.name]
        for key in ("precision", "recall", "f1"):
            value = entry[key]
            metrics[f"val_{key}_{particle_class.name}"] = np.nan if value is None else value
        if entry["f1"] is not None:
            f1s.append(entry["f1"])
        share = background[particle_class.label] / n_background
        metrics[f"val_background_share_{particle_class.name}"] = float(share)
    metrics["val_macro_f1"] = float(np.mean(f1s)) if f1s else 0.0
    metrics["val_background_share"] = float(background[1:].sum() / n_background)
    metrics["val_picks"] = sum(
        int((o["picks"][chosen[c.name], SCORE_KINDS[0]]["class_name"] == c.name).sum())
        for o in outcomes
        for c in classes
    )
    return metrics, thresholds


def _choose_methods(
    tables: dict, classes, unthresholded: set[str] = frozenset()
) -> tuple[dict, dict]:
    """Per score kind, each class's threshold record from the picking method whose best-F1
    threshold scored highest (the first of :data:`PICK_METHODS` on ties, a method without
    picks scoring 0), with a ``method`` field; and each class's method for the first kind
    (what the metrics report).

    A class in ``unthresholded`` will be picked without a score threshold, so its method is
    chosen by the F1 of every pick (``f1_keep_all``): a method whose picks only a threshold
    made good (components fragmenting a faint ring, the fragments dropped by size) must not
    win there. On the benchmark family (draw 0, 30% annotated, ``--unannotated auto``) that
    mismatch chose components for the faint rings by size, 0.045 held-out F1 without the
    threshold it was chosen with, and the test rings scored 0.01 (mean shift 0.57)."""
    thresholds, chosen = {}, {}
    for kind in SCORE_KINDS:
        records = []
        for particle_class in classes:
            best = None
            for method in PICK_METHODS:
                table = tables[method, kind]
                if particle_class.name not in table.index:
                    continue
                row = table.loc[[particle_class.name]].to_dict(orient="records")[0]
                f1 = row.get("f1_keep_all" if particle_class.name in unthresholded else "f1")
                f1 = 0.0 if f1 is None or _is_nan(float(f1)) else float(f1)  # no picks: 0
                if best is None or f1 > best[0]:
                    best = (f1, method, row)
            if best is None:
                continue
            _, method, row = best
            records.append(
                {k: None if _is_nan(v) else v for k, v in row.items()} | {"method": method}
            )
            if kind == SCORE_KINDS[0]:
                chosen[particle_class.name] = method
        thresholds[kind] = records
    for particle_class in classes:
        chosen.setdefault(particle_class.name, PICK_METHODS[0])
    return thresholds, chosen


def _keep_every_pick(thresholds: dict, summaries: dict, only: set[str] | None = None) -> dict:
    """``thresholds`` with no score threshold for the classes in ``only`` (None: all), each
    such record's precision, recall and F1 those of every pick of its method, and the reason,
    :data:`PARTIAL_THRESHOLDS` (naming the classes when not all), under ``not_set``. The
    threshold the held-out F1 would have set is kept as ``withheld_min_score`` (with its
    ``withheld_f1``) in the model's records: not applied, there for a user who knows better
    and for benchmarks that compare the two."""
    kept = {}
    for kind in SCORE_KINDS:
        kept[kind] = []
        for row in thresholds.get(kind, []):
            if only is not None and row["class_name"] not in only:
                kept[kind].append(row)
                continue
            entry = summaries[row["method"], kind]["classes"].get(row["class_name"], {})
            every = {k: entry.get(k) for k in ("precision", "recall")}
            withheld = {"withheld_min_score": row["min_score"], "withheld_f1": row["f1"]}
            kept[kind].append(
                row | every | withheld | {"min_score": None, "f1": row["f1_keep_all"]}
            )
    reason = PARTIAL_THRESHOLDS
    if only is not None:
        reason = f"{reason} (for {', '.join(sorted(only))}; the others keep theirs)"
    log.info("held-out annotation is partial: score thresholds %s", reason)
    return kept | {"not_set": reason}


def _laid_out(table: pd.DataFrame, shift: float) -> pd.DataFrame:
    return table.assign(tomo=HELD_OUT, x=table["x"].astype(float) + shift)


def validate_regions(
    model,
    volumes,
    regions,
    particles: ParticleSet,
    classes,
    *,
    device,
    bf16,
    ranks,
    config,
    partial_classes: set[str] | None = None,
) -> RegionScores:
    """Segment, pick and score every held-out region (each rank its share; all get the result).

    ``particles`` are the validation particles (indexing ``volumes``); ``config``
    the model's config (its ``patch_size`` sets the window, as in segment);
    ``partial_classes`` as for :func:`score_outcomes`.
    """
    started = time.perf_counter()
    outcomes = []
    for region in ranks.share(regions):
        volume = volumes[region.volume]
        labels, score = segment_region(
            model, volume, region, device=device, bf16=bf16, config=config
        )
        outcomes.append(region_outcome(labels, score, volume, region, particles, classes))
    outcomes = [o for rank_outcomes in ranks.gather(outcomes) for o in rank_outcomes]
    metrics, thresholds = score_outcomes(outcomes, classes, partial_classes)
    return RegionScores(metrics, thresholds, time.perf_counter() - started)
