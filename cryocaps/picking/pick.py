"""Label maps and probability maps -> particle coordinates, per map and per file.

Three ways to turn a segmentation into one pick per particle, chosen with
``method`` (see :mod:`cryocaps.picking.methods`): ``components`` (default),
``meanshift`` and ``peaks``.

Every pick gets a size (voxels of its class assigned to it) and a score: the
mean class probability over those voxels, else the mean of the per-voxel
score map, else the size. Picks smaller than ``min_size_fraction`` of the
class's label volume (what one particle covered in the training label maps, as
classes.csv records it; else the sphere of the class radius), or than
``relative_min_size`` of the class's typical pick in the same map, or scoring below
``min_score``, are dropped.

The typical pick is the 90th percentile of the sizes of the class's picks that pass
the first limit. A network segments the particles it finds whole, so their sizes
cluster, while background fragments and speckle are smaller by a large factor; a
limit relative to what this network made of this class in this map follows hollow,
elongated and small particles and masks bigger or smaller than the nominal sphere,
where a fixed fraction of the sphere cannot (measured in benchmarks/RESULTS.md,
"Picking at defaults").
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cryocaps.classes import ClassTable, ParticleClass
from cryocaps.errors import CryocapsError
from cryocaps.io.layout import base_tomogram_name, companion_path, tomogram_name
from cryocaps.io.particles import CANONICAL_COLUMNS
from cryocaps.io.volumes import TomogramInfo, read_probabilities, read_tomogram
from cryocaps.picking.methods import PICKERS, Pick

log = logging.getLogger(__name__)

METHODS = tuple(PICKERS)
DEFAULT_METHOD = "components"
DEFAULT_MIN_SIZE_FRACTION = 0.2
DEFAULT_RELATIVE_MIN_SIZE = 0.5
TYPICAL_SIZE_PERCENTILE = 90


def pick_particles(
    label_map: np.ndarray,
    classes: ClassTable,
    voxel_size_angstrom: float,
    probabilities: np.ndarray | None = None,
    *,
    scores: np.ndarray | None = None,
    method: str = DEFAULT_METHOD,
    min_size_fraction: float = DEFAULT_MIN_SIZE_FRACTION,
    relative_min_size: float = DEFAULT_RELATIVE_MIN_SIZE,
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
    method : "components", "meanshift" or "peaks"
    min_size_fraction : drop picks with fewer voxels than this fraction of the
        class's label volume (``ParticleClass.label_volume_voxels``: as recorded by
        make-masks or simulate, else the sphere 4/3 π r³)
    relative_min_size : drop picks with fewer voxels than this fraction of the class's
        typical pick in this map (0 keeps them); see the module docstring
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
        min_size_fraction,
        relative_min_size,
    )
    rows = []
    for particle_class in classes:
        class_min_score = (
            min_score.get(particle_class.name) if isinstance(min_score, Mapping) else min_score
        )
        radius = particle_class.radius_voxels(voxel_size_angstrom)
        weights = _weight_map(particle_class, probabilities, scores)
        mask = label_map == particle_class.label
        # the size one particle had in the training labels (a template's envelope may be a
        # tenth of the sphere), else the sphere of the class radius
        min_size = min_size_fraction * particle_class.label_volume_voxels(voxel_size_angstrom)
        picks = PICKERS[method](mask, radius, weights, min_size) if mask.any() else []
        rows += _kept_rows(
            picks,
            particle_class.name,
            tomo_name,
            max(min_size, relative_min_size * typical_size(picks, min_size)),
            class_min_score,
            with_weights=weights is not None,
        )
        if progress is not None:
            progress(particle_class.name)
    table = pd.DataFrame(rows, columns=[*CANONICAL_COLUMNS, "size_voxels"])
    table = table.astype({"x": float, "y": float, "z": float, "score": float, "size_voxels": float})
    order = {name: i for i, name in enumerate(classes.names)}
    table = table.sort_values(
        ["class_name", "score"], key=lambda s: s.map(order) if s.name == "class_name" else -s
    )
    return table.reset_index(drop=True)


def _checked_inputs(
    label_map,
    probabilities,
    scores,
    classes,
    method,
    voxel_size_angstrom,
    min_size_fraction,
    relative_min_size,
) -> np.ndarray:
    """Refuse unusable inputs; returns the label map as unsigned labels."""
    if method not in METHODS:
        raise CryocapsError(f"--method {method!r}: use one of {', '.join(METHODS)}")
    if label_map.ndim != 3:
        raise CryocapsError(f"label map must be 3D (Z, Y, X), got shape {label_map.shape}")
    if not voxel_size_angstrom > 0:
        raise CryocapsError(f"voxel size must be > 0 Å, got {voxel_size_angstrom}")
    if min_size_fraction < 0:
        raise CryocapsError(f"--min-size-fraction must be >= 0, got {min_size_fraction}")
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


def typical_size(picks: list[Pick], min_size: float) -> float:
    """The 90th percentile of the sizes (voxels) of the picks of at least ``min_size``; 0 if none.

    A high percentile rather than the median: fragments may outnumber the particles.
    """
    sizes = [pick.size for pick in picks if pick.size >= min_size]
    return float(np.percentile(sizes, TYPICAL_SIZE_PERCENTILE)) if sizes else 0.0


def _kept_rows(
    picks: list[Pick],
    class_name: str,
    tomo_name: str,
    min_size: float,
    min_score: float | None,
    *,
    with_weights: bool,
) -> list[dict]:
    """Table rows of the picks that pass the size and score limits (score = size without
    weights)."""
    rows = []
    for pick in picks:
        if pick.size < min_size:
            continue
        score = pick.score if with_weights else pick.size
        if min_score is not None and score < min_score:
            continue
        rows.append(
            {
                "tomo": tomo_name,
                "class_name": class_name,
                "x": pick.x,
                "y": pick.y,
                "z": pick.z,
                "score": float(score),
                "size_voxels": float(pick.size),
            }
        )
    return rows


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
    method: str = DEFAULT_METHOD,
    min_size_fraction: float = DEFAULT_MIN_SIZE_FRACTION,
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
        _check_labels(label_tomogram.data, classes, path, ignored_labels)
        try:
            table = pick_particles(
                label_tomogram.data,
                classes,
                label_tomogram.voxel_size_angstrom,
                probabilities,
                scores=scores,
                method=method,
                min_size_fraction=min_size_fraction,
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
) -> None:
    """Refuse labels the class table does not know (those in ``ignored`` are skipped)."""
    counts = np.bincount(
        np.asarray(label_map).view(np.uint8).ravel()
        if label_map.dtype.itemsize == 1
        else np.asarray(label_map, dtype=np.int64).ravel().clip(0)
    )
    known = {0, *(c.label for c in classes), *ignored}
    unknown = [int(label) for label in np.nonzero(counts)[0] if label not in known]
    if unknown:
        raise CryocapsError(
            f"{path}: label(s) {', '.join(map(str, unknown))} are not in the class table "
            f"{classes.source} (labels there: {', '.join(str(c.label) for c in classes)}); "
            "give the classes.csv the map was made with (--classes)"
        )


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
