"""Planning make-masks: tomogram geometry, voxel sizes, labels, particles matched to tomograms.

Everything here is checked before the first label map is drawn.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cryocaps.classes import ClassTable
from cryocaps.errors import CryocapsError
from cryocaps.io.volumes import TomogramInfo, same_voxel_size

log = logging.getLogger(__name__)


@dataclass
class MaskPlan:
    """What make-masks will draw for one tomogram."""

    info: TomogramInfo
    particles: pd.DataFrame  # rows inside the volume, with a ``label`` column
    n_outside: int
    path: Path


def tomogram_geometry(
    paths: Sequence[Path], voxel_size_angstrom: float | None = None
) -> list[TomogramInfo]:
    """Tomogram geometry from MRC headers, OME-Zarr metadata (files, folders, copick projects) or
    RELION 5 tomograms.star files.

    ``voxel_size_angstrom`` replaces the MRC headers' voxel size (for headers
    that say 0); without it this is :func:`cryocaps.io.particles.tomogram_infos`.
    """
    from dataclasses import replace

    from cryocaps.io.layout import expand_volume_paths
    from cryocaps.io.particles import tomogram_infos
    from cryocaps.io.volumes import read_info

    if voxel_size_angstrom is None:
        return tomogram_infos(paths)
    if not voxel_size_angstrom > 0:
        raise CryocapsError(f"--voxel-size-angstrom must be > 0, got {voxel_size_angstrom}")
    infos = []
    for path in paths:
        if Path(path).suffix.lower() == ".star" and Path(path).is_file():
            infos.extend(
                replace(i, voxel_size_angstrom=voxel_size_angstrom) for i in tomogram_infos([path])
            )
        else:  # MRC files, .zarr images (their level at that voxel size), folders, copick projects
            files = expand_volume_paths([path], "--tomograms")
            infos.extend(read_info(f, voxel_size_angstrom) for f in files)
    if not infos:
        raise CryocapsError("--tomograms: no .mrc/.rec/.map files found")
    return infos


def check_voxel_sizes(tomograms: Sequence[TomogramInfo]) -> float:
    """The common voxel size of a run's tomograms; refuse a mix."""
    sizes = {info.name: info.voxel_size_angstrom for info in tomograms}
    reference = next(iter(sizes.values()))
    if not all(same_voxel_size(v, reference) for v in sizes.values()):
        listed = ", ".join(f"{name} {size:g} Å" for name, size in sizes.items())
        raise CryocapsError(
            f"--tomograms: voxel sizes differ ({listed}); bring them to one voxel size with "
            "cryocaps preprocess --voxel-size-angstrom"
        )
    return reference


def assign_labels(particles: pd.DataFrame, classes: ClassTable, single_class: bool) -> pd.DataFrame:
    """Add a ``label`` column (class label of every particle); unknown class names are an error."""
    particles = particles.copy()
    if single_class:
        only = classes.classes[0]
        found = sorted(particles["class_name"].astype(str).unique())
        if len(found) > 1:
            log.info(
                "--radius-angstrom: classes %s all drawn as one class %r",
                ", ".join(found),
                only.name,
            )
        particles["class_name"] = only.name
        particles["label"] = only.label
        return particles
    names = {
        value: classes.name_of(value) for value in particles["class_name"].astype(str).unique()
    }
    particles["class_name"] = particles["class_name"].astype(str).map(names)
    particles["label"] = particles["class_name"].map({c.name: c.label for c in classes})
    return particles


def plan_masks(
    particles: pd.DataFrame,
    tomograms: Sequence[TomogramInfo],
    out_dir: Path,
    *,
    strict: bool = False,
    overwrite: bool = False,
) -> tuple[list[MaskPlan], dict]:
    """Match particles to tomograms and check everything before drawing.

    Returns the plans (one per tomogram) and a report of what did not match.
    """
    from cryocaps.io.files import check_writable

    given = {info.name for info in tomograms}
    named = set(particles["tomo"].astype(str))
    unknown = sorted(named - given)
    if unknown and not named & given:
        raise CryocapsError(
            f"no particle belongs to the tomograms given: particles name {', '.join(unknown[:5])}, "
            f"tomograms are {', '.join(sorted(given)[:5])}; check --tomograms"
        )
    if unknown:
        counts = particles["tomo"].astype(str).value_counts()
        log.warning(
            "%d particles name tomograms not given with --tomograms, skipped: %s",
            int(sum(counts[n] for n in unknown)),
            ", ".join(unknown),
        )
    plans = []
    total_outside = 0
    for info in tomograms:
        rows = particles[particles["tomo"].astype(str) == info.name]
        positions = rows[["z", "y", "x"]].to_numpy(dtype=float)
        size = np.array(info.shape, dtype=float)
        outside = ((positions < -0.5) | (positions > size - 0.5)).any(axis=1)
        if len(rows) and outside.all():
            farthest = positions.max(axis=0)[::-1]
            raise CryocapsError(
                f"all {len(rows)} particles of {info.name} lie outside it (size x,y,z "
                f"{'x'.join(map(str, info.shape[::-1]))} voxels, particles up to "
                f"{', '.join(f'{v:.0f}' for v in farthest)}): coordinates in other units? "
                "give their pixel size with --coords-pixel-size-angstrom"
            )
        if not len(rows):
            log.warning("%s: no particles; its label map is all background", info.name)
        if outside.any():
            total_outside += int(outside.sum())
            message = (
                f"{info.name}: {int(outside.sum())} of {len(rows)} particles lie outside the volume"
            )
            if strict:
                raise CryocapsError(message + " (--strict)")
            log.warning("%s; skipped", message)
        path = out_dir / f"{info.name}_labels.mrc"
        check_writable(path, overwrite)
        plans.append(MaskPlan(info, rows[~outside], int(outside.sum()), path))
    total = sum(len(plan.particles) for plan in plans) + total_outside
    if total_outside > total / 2:
        raise CryocapsError(
            f"{total_outside} of {total} particles lie outside their tomograms: "
            "coordinates in other "
            "units? give their pixel size with --coords-pixel-size-angstrom"
        )
    return plans, {"unknown_tomograms": unknown, "particles_outside": total_outside}
