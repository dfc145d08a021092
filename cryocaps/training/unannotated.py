"""Particles nobody annotated, found by the network mid-run and made unknown, not background.

Users annotate some of the particles and want the rest found. ``make-masks``
paints every place it has no coordinates for background, so in a partly
annotated tomogram most particles are taught as background: recall falls and
the held-out region counts the network's right picks on them as false, so its score thresholds
come out too strict (benchmarks/RESULTS.md, the family at 30% annotated). ``train`` cannot be
told which maps are complete, but it can look: once :data:`LOOK_AT` of the run and
:data:`MIN_LOOK_STEPS` steps are done (and no later than :data:`LAST_LOOK_AT`), the network
(the weights validation judges) segments each training tomogram whole with the sliding window
``segment`` uses, and ``cluster-picks``' default picking (each class with the method the best
held-out validation so far chose, as ``cluster-picks`` does) finds its particles. A pick whose
centre the label map calls background is a particle nobody annotated or a false positive. Per
class, the annotated share is estimated as annotated / (annotated + such picks), the annotated
particles counted as the class's label voxels over one particle's label volume. On the
benchmark family the trained networks' picks on their own training tomograms told the two cases
apart: fully annotated (U-Net and 3D-UCaps, draws 0-4), 0-21 such picks per class (tens to ~400
annotated particles each); 30% annotated (U-Net, draws 0-1), 68-408 per class, 90-100% of them
on real particles (on the hardest draw a third to a half on a particle of another class of the
same size, which is why they become unknown, not that class); 3D-UCaps at 30% on draw 2, 79%
(the faint class 63%). Their scores do not tell the false ones apart: the faint class's noise
picks scored 0.47-0.56 (10th-90th percentile of the pick's mean confidence), its real ones
0.51-0.58, the annotated ones 0.48-0.59. Their sizes do better, so a background pick smaller
than :data:`SMALL_PLACE` of the median size of its class's picks on the taught particles is not
counted.

A class whose share is below :data:`PARTIAL_SHARE` is partly annotated. For
such a class a
sphere of :data:`UNKNOWN_RADII` class radii around each of its picks becomes
unknown (:data:`~cryocaps.classes.IGNORE_LABEL`) where the map said
background. Nothing is written to the user's label maps: the maps in memory
change, for the rest of the run. From then on no patch teaches those places
as background, no hard negative or mined place sits there, and the held-out
region, which lies in the training tomograms, sees unknown voxels in its
annotation, so validation neither counts picks there as false nor sets score
thresholds (:mod:`.regions`). A fully annotated ``--val-tomograms`` tomogram
is not looked at: it keeps its thresholds. The best model so far was judged
against the old annotation, so the choice of the best epoch starts again.
The places are kept in checkpoints, so a resumed run paints them again.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np

from cryocaps.classes import IGNORE_LABEL, unsigned_labels
from cryocaps.training.holdout import HeldOutRegion
from cryocaps.training.hooks import Hook, RunClock

log = logging.getLogger(__name__)

LOOK_AT = 0.4  # of the run (its time budget, else its epochs) done when the network looks
# ... and not before this many optimiser steps: a network that has taken fewer picks its own
# mistakes. The demo's tiny complete set (100 steps in all) looked after 50, still weak (mean
# patch Dice 0.28), took 33 false picks for unannotated barrels and fell from macro F1 >= 0.3
# to 0.15; on the benchmark family the 12-minute runs looked after 300-400 (3D-UCaps) and
# 900-1800 (U-Net) steps.
MIN_LOOK_STEPS = 200
# No look past this share of the run: too little would be left to learn from the change. A run
# without MIN_LOOK_STEPS by then, or whose first epoch end past LOOK_AT comes later (epochs
# long against the run), trains on the maps as given and says so. The family's 12-minute runs
# looked at 41-58% of theirs.
LAST_LOOK_AT = 0.8
# Estimated annotated share under which a class counts as partly annotated. No test of the
# network's competence goes with it: on partial maps every held-out score is deflated by the
# training itself (the network is taught the unannotated particles as background), so a
# recall bar either let an untrained network through or stopped a trained one (the family's
# draw 0 at 30%: mean held-out recall 0.52 in one run, 0.495 in the next, 0.28 after one epoch).
# A network that has had 40% of its run picks few places off complete annotations (0-31 per
# class on the family's draws 0-1, against ~100-400 annotated), far from 0.7.
PARTIAL_SHARE = 0.7
# A background pick smaller than this share of the median size of its class's picks on the taught
# particles is not taken for a particle. At the look on the family's draw 2 at 30% annotated
# (3D-UCaps and U-Net), the picks on noise were the smaller ones: at 0.8 a third to nine
# tenths of them (most classes about half) were smaller, of those on unannotated particles of
# their class 0-12%. In the runs that then used it (same draw, checked against the full lists)
# it dropped 64% and 75% of the noise picks and 17-19% of those on unannotated particles.
SMALL_PLACE = 0.8
UNKNOWN_RADII = 1.25  # unknown out to this many class radii around a place (as candidates)


def training_volume_indices(data) -> list[int]:
    """Indices of the volumes training patches come from (not whole --val-tomograms)."""
    return sorted({int(index) for index, _ in data.holdout.view_sources})


def look_for_unannotated(
    model, data, indices, *, device, bf16, ranks, patch_size, methods=None
) -> dict:
    """Segment and pick volumes ``indices`` (the training volumes) whole; their picks on
    background and the annotated particles per class. ``methods``: the picking method per class
    name (:func:`chosen_methods`; None: ``cluster-picks``' default for every class).

    Returns ``{"places": (N, 5) int array of volume index, z, y, x, label,
    "annotated": {label: estimated annotated particles}, "taught": {label: [found, total]},
    "taught_size": {label: median voxels or None}, "small": {label: picks dropped}}`` over all
    ranks; the annotated particles are the training maps' label voxels (``data.voxel_counts``)
    over one particle's label volume; ``taught`` counts the training particles (those patches
    are cut around, not the held-out ones) that a pick of their class matches (``evaluate``'s
    matcher and tolerance). A background pick smaller than :data:`SMALL_PLACE` of its class's
    ``taught_size`` (the median size of the picks on its taught particles) is not a place; no
    pick is when the network found none of them.
    """
    found = [
        _look_at_volume(model, data, index, device, bf16, patch_size, methods)
        for index in ranks.share(indices)
    ]
    found = [one for rank_found in ranks.gather(found) for one in rank_found]
    classes = data.classes
    taught = sum((one["taught"] for one in found), np.zeros((len(classes) + 1, 2), np.int64))
    places = np.concatenate([one["places"] for one in found] or [np.zeros((0, 6), np.int64)])
    taught_size, small = {}, {}
    for label in (c.label for c in classes):
        sizes = [size for one in found for size in one["taught_sizes"].get(label, [])]
        taught_size[label] = float(np.median(sizes)) if sizes else None
        mine = places[:, 4] == label
        big = places[:, 5] >= SMALL_PLACE * (taught_size[label] or np.inf)
        small[label] = int(np.count_nonzero(mine & ~big))
        places = places[~mine | big]
    size = {c.label: c.label_volume_voxels(_voxel_size(data)) for c in classes}
    annotated = {label: float(data.voxel_counts[label] / size[label]) for label in size}
    return {
        "places": places[:, :5],
        "annotated": annotated,
        "taught": {c.label: taught[c.label].tolist() for c in classes},
        "taught_size": taught_size,
        "small": small,
    }


def _look_at_volume(model, data, index, device, bf16, patch_size, methods) -> dict:
    """One volume's picks on background (volume index, z, y, x, label, size), its taught
    particles found per label and the sizes of the picks that found them."""
    from cryocaps.picking import DEFAULT_METHOD, pick_particles
    from cryocaps.training.regions import segment_region

    classes, volume = data.classes, data.volumes[index]
    whole = tuple(slice(0, n) for n in volume.shape)
    region = HeldOutRegion(volume=index, name=volume.name, box=whole, context=whole)
    labels, score = segment_region(
        model, volume, region, device=device, bf16=bf16, config={"patch_size": patch_size}
    )
    table = pick_particles(
        labels,
        classes,
        volume.voxel_size_angstrom,
        scores=score,
        tomo_name=volume.name,
        method=methods or DEFAULT_METHOD,
    )
    annotation = unsigned_labels(volume.label_map)
    zyx = np.rint(table[["z", "y", "x"]].to_numpy(float)).astype(np.int64).reshape(-1, 3)
    zyx = np.clip(zyx, 0, np.array(volume.shape) - 1)
    on_background = annotation[tuple(zyx.T)] == 0
    picked = np.array([classes.by_name(name).label for name in table["class_name"]], np.int64)
    sizes = table["size_voxels"].to_numpy(np.int64)
    places = np.column_stack([np.full(len(table), index), zyx, picked, sizes])[on_background]
    taught, found_by = _taught_found(table, data, index)
    taught_sizes = {}
    for label, size in zip(picked[found_by], sizes[found_by], strict=True):
        taught_sizes.setdefault(int(label), []).append(int(size))
    return {
        "places": places.astype(np.int64).reshape(-1, 6),
        "taught": taught,
        "taught_sizes": taught_sizes,
    }


def _taught_found(table, data, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Per label (rows), the training particles of volume ``index`` a pick of their class
    matches and all of them (columns); and which picks (rows of ``table``) match one."""
    import pandas as pd

    from cryocaps.evaluation import match_picks

    classes, volume = data.classes, data.volumes[index]
    zyx, labels = data.holdout.training_particles_in(index)
    counts = np.zeros((len(classes) + 1, 2), np.int64)
    np.add.at(counts[:, 1], labels, 1)
    if not len(zyx) or not len(table):
        return counts, np.zeros(len(table), bool)
    truth = pd.DataFrame(
        {"tomo": volume.name, "z": zyx[:, 0], "y": zyx[:, 1], "x": zyx[:, 2]}
        | {"class_name": [classes.by_label(int(label)).name for label in labels]}
    )
    matching = match_picks(table, truth, classes, volume.voxel_size_angstrom)
    found = (matching.truth["status"] == "tp").to_numpy()
    np.add.at(counts[:, 0], labels, found.astype(np.int64))
    return counts, (matching.picks["status"] == "tp").to_numpy()


def chosen_methods(thresholds: dict | None) -> dict[str, str] | None:
    """Per class name, the picking method the best held-out validation so far chose (its
    records for probability scores, as the look picks); None before any."""
    records = (thresholds or {}).get("probability") or []
    methods = {r["class_name"]: r["method"] for r in records if r.get("method")}
    return methods or None


def _voxel_size(data) -> float:
    return data.volumes[0].voxel_size_angstrom


def partly_annotated(found: dict, classes, recalls: dict) -> dict:
    """Per class name: annotated particles, unannotated picks (the places), background picks
    too small to count (:data:`SMALL_PLACE`) and the median size they were judged by, the
    recall of the training particles and the held-out recall at the last region validation
    (both reported, not used: see :data:`PARTIAL_SHARE`), estimated share, and whether the
    class is partly annotated (share below :data:`PARTIAL_SHARE`)."""
    places, found_taught = found["places"], found["taught"]
    report = {}
    for particle_class in classes:
        annotated = found["annotated"][particle_class.label]
        new = int(np.count_nonzero(places[:, 4] == particle_class.label))
        share = annotated / (annotated + new) if annotated + new > 0 else 1.0
        recall = recalls.get(particle_class.name)
        hits, total = found_taught.get(particle_class.label, (0, 0))
        report[particle_class.name] = {
            "annotated_particles": round(annotated, 1),
            "unannotated_picks": new,
            "small_picks": found["small"][particle_class.label],
            "taught_pick_size": found["taught_size"][particle_class.label],
            "training_recall": round(hits / total, 3) if total else None,
            "annotated_share": round(share, 3),
            "held_out_recall": None if recall is None else round(recall, 3),
            "partial": bool(share < PARTIAL_SHARE),
        }
    return report


def held_out_recalls(rows: list[dict], classes) -> dict:
    """Each class's recall at the last region validation (none yet: empty)."""
    for row in reversed(rows):
        if math.isfinite(row.get("val_macro_f1", math.nan)):
            recalls = {c.name: row.get(f"val_recall_{c.name}", math.nan) for c in classes}
            return {name: r for name, r in recalls.items() if math.isfinite(r)}
    return {}


def paint_unknown(data, places: np.ndarray) -> int:
    """Make a sphere of :data:`UNKNOWN_RADII` class radii around each place (volume index, z, y,
    x, label) unknown where its volume's label map says background; returns the voxels changed.

    The label maps in memory are replaced by changed copies; the training views and the
    held-out regions see them (the views are re-cut from the new maps).
    """
    classes, changed = data.classes, 0
    voxel_size = _voxel_size(data)
    for index in np.unique(places[:, 0]).tolist():
        volume = data.volumes[index]
        label_map = np.array(unsigned_labels(volume.label_map))  # a writable copy
        before = int(np.count_nonzero(label_map == IGNORE_LABEL))
        for _, z, y, x, label in places[places[:, 0] == index]:
            radius = UNKNOWN_RADII * classes.by_label(int(label)).radius_voxels(voxel_size)
            _paint_sphere(label_map, (z, y, x), radius)
        changed += int(np.count_nonzero(label_map == IGNORE_LABEL)) - before
        volume.label_map = label_map
        for view, (source, offset) in zip(
            data.holdout.train_views, data.holdout.view_sources, strict=True
        ):
            if source == index:
                box = tuple(slice(o, o + n) for o, n in zip(offset, view.shape, strict=True))
                view.label_map = label_map[box]
    return changed


def _paint_sphere(label_map: np.ndarray, centre, radius: float) -> None:
    reach = int(np.ceil(radius))
    lower = [max(0, int(c) - reach) for c in centre]
    upper = [min(n, int(c) + reach + 1) for c, n in zip(centre, label_map.shape, strict=True)]
    axes = np.ogrid[tuple(slice(lo, up) for lo, up in zip(lower, upper, strict=True))]
    inside = sum((a - c) ** 2 for a, c in zip(axes, centre, strict=True)) <= radius**2
    block = label_map[tuple(slice(lo, up) for lo, up in zip(lower, upper, strict=True))]
    block[inside & (block == 0)] = IGNORE_LABEL


class LabelUnannotated(Hook):
    """``train --unannotated auto``: at :data:`LOOK_AT` of the run, make the particles nobody
    annotated unknown in the partly annotated classes (see module). Its outcome is
    ``state.unannotated`` (saved in checkpoints; run.json's ``unannotated``)."""

    def __init__(self, max_minutes: float | None):
        self.clock = RunClock(max_minutes)

    def on_train_begin(self, trainer) -> None:
        self.clock.restart()
        outcome = trainer.state.unannotated
        if outcome and outcome.get("places"):  # a resumed run: the maps are read afresh
            self._apply(trainer, np.array(outcome["places"], np.int64).reshape(-1, 5))
            self._adopt_partial(trainer, outcome["classes"])

    def progress(self, trainer) -> float:
        return self.clock.share(trainer.state.epoch / trainer.config.epochs)

    def on_epoch_end(self, trainer, row: dict, improved: bool) -> None:
        state = trainer.state
        progress = trainer.ranks.mean(self.progress(trainer))
        if state.unannotated is not None or progress < LOOK_AT:
            return
        if state.total_steps < MIN_LOOK_STEPS or progress > LAST_LOOK_AT:
            if progress >= LAST_LOOK_AT:
                state.unannotated = too_late(state, progress)
                log.info("%s", state.unannotated["skipped"])
            return
        started = time.perf_counter()
        found = look_for_unannotated(
            trainer.judged_model,
            trainer.data,
            training_volume_indices(trainer.data),
            device=trainer.device,
            bf16=trainer.bf16,
            ranks=trainer.ranks,
            patch_size=trainer.config.patch_size,
            methods=chosen_methods(state.best_thresholds),
        )
        recalls = held_out_recalls(state.rows, trainer.data.classes)
        report = partly_annotated(found, trainer.data.classes, recalls)
        partial = [trainer.data.classes.by_name(n).label for n, r in report.items() if r["partial"]]
        places = found["places"][np.isin(found["places"][:, 4], partial)]
        changed = self._apply(trainer, places) if len(places) else 0
        if len(places):
            self._adopt_partial(trainer, report)
        state.unannotated = {
            "epoch": state.epoch,
            "classes": report,
            "places": places.tolist(),
            "unknown_voxels": changed,
            "seconds": round(time.perf_counter() - started, 1),
        }
        if partial:
            # the best so far was judged against the old annotation
            state.best_score, state.bad_epochs = None, 0
        shares = ", ".join(
            f"{name} {r['annotated_share']:.2f} ({r['unannotated_picks']} picks, "
            f"{r['small_picks']} too small; training recall {r['training_recall']})"
            for name, r in report.items()
        )
        verdict = f"{len(places)} places made unknown" if partial else "every class complete"
        log.info("annotated share estimated after epoch %d: %s; %s", state.epoch, shares, verdict)

    @staticmethod
    def _adopt_partial(trainer, report: dict) -> None:
        """Only the partly annotated classes lose their score thresholds - unless the user's
        maps held unknown voxels already (then every class is partial, as before). The class
        weights are measured again, each partly annotated class's count divided by its
        estimated share (:func:`~cryocaps.training.data.class_weights`)."""
        if not trainer.data.unknown_voxels:
            partial = {name for name, r in report.items() if r["partial"]}
            trainer.validator.partial_classes = partial
        if trainer.class_weights is not None:
            from cryocaps.training.data import class_weights

            classes = trainer.data.classes
            shares = {
                classes.by_name(name).label: r["annotated_share"]
                for name, r in report.items()
                if r["partial"]
            }
            weights = class_weights(trainer.data, trainer.config, shares=shares)
            trainer.class_weights = weights.to(trainer.class_weights.device)
            trainer.validator.class_weights = trainer.class_weights
            log.info("class weights with the estimated shares: %s", _rounded(weights))

    @staticmethod
    def _apply(trainer, places: np.ndarray) -> int:
        from cryocaps.training.holdout import context_view

        changed = paint_unknown(trainer.data, places)
        trainer.sampler.forget_unknown_places()
        validator = trainer.validator  # its patches are cut from views of the old maps
        validator.views = [
            context_view(trainer.data.volumes[r.volume], r) for r in validator.regions
        ]
        return changed


def _rounded(weights) -> str:
    return ", ".join(f"{w:.3g}" for w in weights.tolist())


def too_late(state, progress: float) -> dict:
    """The outcome of a run that reached :data:`LAST_LOOK_AT` without looking: nothing changed,
    and why (too few steps, or its first chance came after that)."""
    if state.total_steps < MIN_LOOK_STEPS:
        why = (
            f"{state.total_steps} steps by {LAST_LOOK_AT:.0%} of the run, fewer than the "
            f"{MIN_LOOK_STEPS} a network needs before its picks can be trusted"
        )
    else:
        why = (
            f"its first epoch end past {LOOK_AT:.0%} of the run came at {progress:.0%}, "
            f"later than {LAST_LOOK_AT:.0%} (too little run left to learn from the change)"
        )
    return {
        "epoch": state.epoch,
        "classes": {},
        "places": [],
        "unknown_voxels": 0,
        "skipped": f"--unannotated auto did not look: {why}; the label maps were used as given",
    }


def unannotated_summary(outcome: dict | None) -> dict | None:
    """``state.unannotated`` for run.json: the places counted, not listed."""
    if outcome is None:
        return None
    summary = {k: v for k, v in outcome.items() if k != "places"}
    return summary | {"places": len(outcome.get("places", []))}
