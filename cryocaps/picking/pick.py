"""Label maps and probability maps -> particle coordinates, per map and per file.

Three ways to turn a segmentation into one pick per particle, chosen with
``method`` (see :mod:`cryocaps.picking.methods`): ``components`` (default),
``meanshift`` and ``peaks``.

Every pick gets a size (voxels of its class assigned to it) and a score: the
mean class probability over those voxels, else the mean of the per-voxel
score map, else the size. The size limits are multiples of the class's label
volume V (what one particle covered in the training label maps, as classes.csv
records it; else the sphere of the class radius); the one limit taken from the map
itself is bounded by them:

- picks smaller than ``min_size_fraction`` V (0.2) are dropped;
- components larger than ``max_size_factor`` V (3) are split into particle-sized
  pieces, and pieces (or picks) still larger are dropped, as are pieces around a centre
  deeper inside than any particle's label (a blob of background called this class);
  clusters of touching particles are split however large (in a crowded tomogram one
  class's particles can form one component through the whole volume);
- picks smaller than ``relative_min_size`` (0.5) of the class's typical pick in
  the same map are dropped, where the typical pick is the 90th percentile of the
  sizes of the picks within the two limits above, and this limit never exceeds
  :data:`RELATIVE_CAP` V (0.75);
- picks scoring below ``min_score`` are dropped.

A network segments the particles it finds whole, so their sizes cluster, while
background fragments and speckle are smaller by a large factor; the relative limit
follows hollow, elongated and small particles and masks bigger or smaller than the
nominal sphere, where a fixed fraction cannot. Until 2026-12-07 its reference was
taken from all picks, so a class that ran away over the background (a network that
called a quarter of a tomogram "barrel") had its typical pick set by background blobs,
and its real particles were dropped as fragments while the blobs were kept. Bounded
from above and capped, blobs can neither set the reference nor raise the limit above
the particles (measured in benchmarks/RESULTS.md, "Size rules that a runaway class
cannot swamp").
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cryocaps.classes import (
    ClassTable,
    ParticleClass,
    oversegmentation_message,
    oversegmented_classes,
)
from cryocaps.errors import CryocapsError
from cryocaps.io.layout import base_tomogram_name, companion_path, tomogram_name
from cryocaps.io.particles import CANONICAL_COLUMNS
from cryocaps.io.volumes import TomogramInfo, read_probabilities, read_tomogram
from cryocaps.picking.methods import MAX_SPLITS, PICKERS, SLAB_VOXELS, Picks, SizeLimits

log = logging.getLogger(__name__)

METHODS = tuple(PICKERS)
DEFAULT_METHOD = "components"
DEFAULT_MIN_SIZE_FRACTION = 0.2
DEFAULT_MAX_SIZE_FACTOR = 3.0
DEFAULT_RELATIVE_MIN_SIZE = 0.5
# The relative limit never exceeds this many label volumes, however large the class's picks in
# the map are: particle-sized picks survive blobs of particle size too (benchmarks/RESULTS.md,
# "Size rules that a runaway class cannot swamp").
RELATIVE_CAP = 0.75
TYPICAL_SIZE_PERCENTILE = 90


def pick_particles(
    label_map: np.ndarray,
    classes: ClassTable,
    voxel_size_angstrom: float,
    probabilities: np.ndarray | None = None,
    *,
    scores: np.ndarray | None = None,
    method: str | Mapping[str, str] = DEFAULT_METHOD,
    min_size_fraction: float = DEFAULT_MIN_SIZE_FRACTION,
    max_size_factor: float = DEFAULT_MAX_SIZE_FACTOR,
    relative_min_size: float = DEFAULT_RELATIVE_MIN_SIZE,
    relative_cap: float = RELATIVE_CAP,
    min_score: float | Mapping[str, float] | None = None,
    tomo_name: str = "",
    progress: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """Find one pick per particle in a label map.

    Parameters
    ----------
    label_map : (Z, Y, X) integer array, 0 = background, else a class label
    classes : class table; only its classes are picked (other labels are ignored)
    voxel_size_angstrom : voxel size of the map, Å (turns class radii into voxels)
    probabilities : optional (C, Z, Y, X) class probabilities, channel = label
        (channel 0 = background); gives the pick scores and, for ``peaks``, the map
        whose maxima are the picks
    scores : optional (Z, Y, X) per-voxel confidence, used for scores when there
        are no probabilities
    method : "components", "meanshift" or "peaks"; a mapping gives one per class name
        (classes missing from it get :data:`DEFAULT_METHOD`), as training chooses them on
        its held-out region
    min_size_fraction : drop picks with fewer voxels than this fraction of the
        class's label volume V (``ParticleClass.label_volume_voxels``: as recorded by
        make-masks or simulate, else the sphere 4/3 π r³)
    max_size_factor : split components of more than this many V into particle-sized
        pieces, and drop pieces (and picks) still larger; see the module docstring
    relative_min_size : drop picks with fewer voxels than this fraction of the class's
        typical pick in this map, taken from its picks within the two limits above
        (0 keeps them); see the module docstring
    relative_cap : the relative limit never exceeds this many V, however large the
        class's picks in this map are
    min_score : drop picks scoring below this (None keeps all); a mapping gives
        one threshold per class name (classes missing from it keep all), as
        ``evaluate`` tunes them on a validation tomogram
    tomo_name : value of the ``tomo`` column
    progress : called with a class name as each class is done

    Returns
    -------
    Particle table with the canonical columns (``tomo, class_name, x, y, z,
    score``, voxels) plus ``size_voxels``, sorted by class then descending score.
    """
    label_map = _checked_inputs(
        label_map,
        probabilities,
        scores,
        classes,
        method,
        voxel_size_angstrom,
        (min_size_fraction, max_size_factor, relative_min_size),
    )
    tables = []
    for particle_class in classes:
        class_min_score = (
            min_score.get(particle_class.name) if isinstance(min_score, Mapping) else min_score
        )
        limits = size_limits(
            particle_class, voxel_size_angstrom, min_size_fraction, max_size_factor
        )
        weights = _weight_map(particle_class, probabilities, scores)
        mask = label_map == particle_class.label
        class_method = (
            method.get(particle_class.name, DEFAULT_METHOD)
            if isinstance(method, Mapping)
            else method
        )
        picks = (
            PICKERS[class_method](
                mask, particle_class.radius_voxels(voxel_size_angstrom), weights, limits
            )
            if mask.any()
            else Picks.empty()
        )
        del mask
        if picks.split_skipped:
            log.warning(
                "%s class %s: %d more components could hold several particles; judged whole "
                "(at most %d per class are split, with boxes of an eighth of a large map's voxels)",
                tomo_name or "map",
                particle_class.name,
                picks.split_skipped,
                MAX_SPLITS,
            )
        relative = min(
            relative_min_size * typical_size(picks, limits), relative_cap * limits.label_volume
        )
        floor = max(limits.min_size, relative)
        keep = (picks.sizes >= floor) & (picks.sizes <= limits.max_size)
        if weights is None:
            picks.scores = picks.sizes.astype(float)
        if class_min_score is not None:
            keep &= picks.scores >= class_min_score
        tables.append(_table(picks, keep, particle_class.name, tomo_name))
        if progress is not None:
            progress(particle_class.name)
    return ordered_picks(pd.concat(tables, ignore_index=True), classes)


def ordered_picks(table: pd.DataFrame, classes: ClassTable) -> pd.DataFrame:
    """``table`` in :func:`pick_particles`' order: by class (the table's order), then by
    descending score."""
    order = {name: i for i, name in enumerate(classes.names)}
    table = table.sort_values(
        ["class_name", "score"], key=lambda s: s.map(order) if s.name == "class_name" else -s
    )
    return table.reset_index(drop=True)


def scored_by_size(table: pd.DataFrame, classes: ClassTable) -> pd.DataFrame:
    """The picks of ``table`` scored as :func:`pick_particles` scores them without a score or
    probability map: by their size in voxels. Without ``min_score`` the weights change no
    pick, only its score, so one picking serves both kinds of score."""
    return ordered_picks(table.assign(score=table["size_voxels"].astype(float)), classes)


def size_limits(
    particle_class: ParticleClass,
    voxel_size_angstrom: float,
    min_size_fraction: float = DEFAULT_MIN_SIZE_FRACTION,
    max_size_factor: float = DEFAULT_MAX_SIZE_FACTOR,
) -> SizeLimits:
    """The size limits of one class, all multiples of its label volume V (voxels)."""
    # the size one particle had in the training labels (a template's envelope may be a tenth
    # of the sphere), else the sphere of the class radius
    volume = particle_class.label_volume_voxels(voxel_size_angstrom)
    return SizeLimits(
        label_volume=volume,
        min_size=min_size_fraction * volume,
        max_size=max_size_factor * volume,
    )


def _table(picks: Picks, keep: np.ndarray, class_name: str, tomo_name: str) -> pd.DataFrame:
    centres = picks.centres[keep]
    return pd.DataFrame(
        {
            "tomo": tomo_name,
            "class_name": class_name,
            "x": centres[:, 2].astype(float),
            "y": centres[:, 1].astype(float),
            "z": centres[:, 0].astype(float),
            "score": picks.scores[keep].astype(float),
            "size_voxels": picks.sizes[keep].astype(float),
        },
        columns=[*CANONICAL_COLUMNS, "size_voxels"],
    )


def _checked_inputs(
    label_map, probabilities, scores, classes, method, voxel_size_angstrom, size_options
) -> np.ndarray:
    """Refuse unusable inputs; returns the label map as unsigned labels."""
    min_size_fraction, max_size_factor, relative_min_size = size_options
    for name in method.values() if isinstance(method, Mapping) else [method]:
        if name not in METHODS:
            raise CryocapsError(f"--method {name!r}: use one of {', '.join(METHODS)}")
    if label_map.ndim != 3:
        raise CryocapsError(f"label map must be 3D (Z, Y, X), got shape {label_map.shape}")
    if not voxel_size_angstrom > 0:
        raise CryocapsError(f"voxel size must be > 0 Å, got {voxel_size_angstrom}")
    if not 1 <= max_size_factor < math.inf:
        raise CryocapsError(f"--max-size-factor must be >= 1 and finite, got {max_size_factor}")
    if not 0 <= min_size_fraction < max_size_factor:
        raise CryocapsError(
            f"--min-size-fraction must be >= 0 and below --max-size-factor {max_size_factor:g}, "
            f"got {min_size_fraction}"
        )
    if not 0 <= relative_min_size < 1:
        raise CryocapsError(f"--relative-min-size must be in [0, 1), got {relative_min_size}")
    label_map = _as_labels(label_map)
    if probabilities is not None:
        _check_probabilities(probabilities, label_map.shape, classes)
    if scores is not None and scores.shape != label_map.shape:
        raise CryocapsError(
            f"score map shape {scores.shape} differs from label map shape {label_map.shape}"
        )
    return label_map


def typical_size(picks: Picks, limits: SizeLimits) -> float:
    """The 90th percentile of the sizes (voxels) of the picks within the class's size limits
    (from ``min_size`` to ``max_size``); 0 if none.

    A high percentile rather than the median: fragments may outnumber the particles. Picks
    larger than the upper limit do not count: blobs of a class that runs away over the
    background must not set the size its particles are judged by.
    """
    sizes = picks.sizes[(picks.sizes >= limits.min_size) & (picks.sizes <= limits.max_size)]
    return float(np.percentile(sizes, TYPICAL_SIZE_PERCENTILE)) if len(sizes) else 0.0


def _as_labels(label_map: np.ndarray) -> np.ndarray:
    # Label maps are stored as signed 8-bit MRC and read back as int8: view as unsigned.
    array = np.asarray(label_map)
    if array.dtype == np.int8:
        return array.view(np.uint8)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise CryocapsError("label map holds non-integer values; expected class labels 0..127")
        return array.astype(np.int16)
    return array


def _check_probabilities(probabilities: np.ndarray, shape: tuple, classes: ClassTable) -> None:
    if probabilities.ndim != 4 or tuple(probabilities.shape[1:]) != tuple(shape):
        raise CryocapsError(
            f"probability map shape {tuple(probabilities.shape)} does not fit label map "
            f"{tuple(shape)}; "
            "expected (C, Z, Y, X)"
        )
    if probabilities.shape[0] < classes.n_labels:
        raise CryocapsError(
            f"probability map has {probabilities.shape[0]} channels but the class table needs "
            f"{classes.n_labels} (background + labels up to {classes.n_labels - 1})"
        )


def _weight_map(particle_class: ParticleClass, probabilities, scores):
    if probabilities is not None:
        return probabilities[particle_class.label]
    return scores


# --- files ------------------------------------------------------------------


def find_label_maps(maps: Sequence[str | os.PathLike]) -> list[Path]:
    """Label map files: files as given; from a folder its ``*_labels`` maps (else every MRC file
    in it)."""
    from cryocaps.io.layout import expand_volume_paths

    paths: list[Path] = []
    for path in map(Path, maps):
        found = expand_volume_paths([path], "MAPS")
        if path.is_dir():
            labels = [p for p in found if tomogram_name(p).endswith("_labels")]
            others = [p for p in found if not tomogram_name(p).endswith(("_probs", "_score"))]
            found = labels or others
        paths.extend(found)
    if not paths:
        raise CryocapsError(f"no label maps found in {', '.join(map(str, maps))}")
    return paths


def pick_files(
    label_paths: Sequence[str | os.PathLike],
    classes: ClassTable,
    *,
    method: str | Mapping[str, str] = DEFAULT_METHOD,
    min_size_fraction: float = DEFAULT_MIN_SIZE_FRACTION,
    max_size_factor: float = DEFAULT_MAX_SIZE_FACTOR,
    relative_min_size: float = DEFAULT_RELATIVE_MIN_SIZE,
    min_score: float | Mapping[str, float] | None = None,
    use_probabilities: bool = True,
    voxel_size_angstrom: float | None = None,
    progress: Callable[[str], None] | None = None,
    ignored_labels: Collection[int] = (),
) -> tuple[pd.DataFrame, list[TomogramInfo], list[Path]]:
    """Pick every label map file (``<tomo>_labels.mrc``), with its ``_probs``/``_score`` companions.

    A label in a map that is neither in ``classes`` nor in ``ignored_labels`` (classes
    left out on purpose, e.g. by ``--copick-objects``) means the wrong class table: a
    CryocapsError. Returns the particle table (``tomo`` = tomogram name without the
    ``_labels`` suffix), the tomograms' geometry (for writers that need sizes) and the
    files read.
    """
    tables, infos, inputs = [], [], []
    for path in map(Path, label_paths):
        name = tomogram_name(path)
        if name.endswith(("_probs", "_score")):
            raise CryocapsError(
                f"{path}: give the label map (<tomo>_labels.mrc), not a probability/score map"
            )
        label_tomogram = read_tomogram(path, voxel_size_angstrom=voxel_size_angstrom)
        if label_tomogram.data.dtype.kind == "f":
            log.warning("%s: floating-point label map; expected uint8 labels", path)
        tomo = base_tomogram_name(name)
        voxel = label_tomogram.voxel_size_angstrom
        inputs.append(path)
        probabilities = scores = None
        if use_probabilities:
            probabilities, scores, companions = _read_companions(path, voxel)
            inputs += companions
        counts = _check_labels(label_tomogram.data, classes, path, ignored_labels)
        for found in oversegmented_classes(classes, counts):
            log.warning(oversegmentation_message(str(path), found))
        try:
            table = pick_particles(
                label_tomogram.data,
                classes,
                label_tomogram.voxel_size_angstrom,
                probabilities,
                scores=scores,
                method=method,
                min_size_fraction=min_size_fraction,
                max_size_factor=max_size_factor,
                relative_min_size=relative_min_size,
                min_score=min_score,
                tomo_name=tomo,
            )
        except CryocapsError as error:
            raise CryocapsError(f"{path}: {error}") from None
        tables.append(table)
        infos.append(
            TomogramInfo(
                tomo,
                label_tomogram.shape,
                label_tomogram.voxel_size_angstrom,
                label_tomogram.origin_angstrom,
            )
        )
        if progress is not None:
            progress(tomo)
    names = [info.name for info in infos]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise CryocapsError(
            f"several label maps for tomogram(s) {', '.join(duplicates)}; give each tomogram once"
        )
    return pd.concat(tables, ignore_index=True), infos, inputs


def _read_companions(label_path: Path, voxel_size_angstrom: float):
    """(C, Z, Y, X) probabilities or else (Z, Y, X) scores beside a label map (None if absent),
    files read."""
    probs_path = companion_path(label_path, "probs")
    score_path = companion_path(label_path, "score")
    if probs_path is not None:
        return read_probabilities(probs_path, voxel_size_angstrom), None, [probs_path]
    if score_path is not None:
        scores = read_tomogram(
            score_path, mmap=True, check_finite=False, voxel_size_angstrom=voxel_size_angstrom
        ).data
        return None, scores, [score_path]
    return None, None, []


def _check_labels(
    label_map: np.ndarray, classes: ClassTable, path: Path, ignored: Collection[int]
) -> np.ndarray:
    """Refuse labels the class table does not know (those in ``ignored`` are skipped);
    returns the voxels per label."""
    counts = _voxels_per_label(np.asarray(label_map))
    known = {0, *(c.label for c in classes), *ignored}
    unknown = [int(label) for label in np.nonzero(counts)[0] if label not in known]
    if unknown:
        raise CryocapsError(
            f"{path}: label(s) {', '.join(map(str, unknown))} are not in the class table "
            f"{classes.source} (labels there: {', '.join(str(c.label) for c in classes)}); "
            "give the classes.csv the map was made with (--classes)"
        )
    return counts


def _voxels_per_label(label_map: np.ndarray) -> np.ndarray:
    """np.bincount of the labels, slab by slab (bincount makes a 64-bit copy of its input)."""
    counts = np.zeros(1, dtype=np.int64)
    step = max(1, SLAB_VOXELS // max(1, label_map[0].size))
    for start in range(0, label_map.shape[0], step):
        slab = label_map[start : start + step]
        slab = slab.view(np.uint8) if slab.dtype.itemsize == 1 else slab.astype(np.int64).clip(0)
        part = np.bincount(slab.ravel())
        counts = np.pad(counts, (0, max(0, len(part) - len(counts))))
        counts[: len(part)] += part
    return counts


def summary_by_class(picks: pd.DataFrame, classes: ClassTable) -> pd.DataFrame:
    """Picks per class: count, tomograms, median score and size."""
    rows = []
    for name in classes.names:
        subset = picks[picks["class_name"] == name]
        rows.append(
            {
                "class_name": name,
                "picks": len(subset),
                "tomograms": subset["tomo"].nunique(),
                "median_score": float(subset["score"].median()) if len(subset) else float("nan"),
                "median_size_voxels": float(subset["size_voxels"].median())
                if "size_voxels" in subset and len(subset)
                else float("nan"),
            }
        )
    return pd.DataFrame(rows)
