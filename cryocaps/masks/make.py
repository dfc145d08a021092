"""make-masks as one library call: read particles, check them, draw and write a map per tomogram."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from cryocaps.classes import IGNORE_LABEL, ClassTable, sphere_volume_voxels
from cryocaps.errors import CryocapsError
from cryocaps.io.volumes import TomogramInfo, label_counts
from cryocaps.masks.candidates import CANDIDATE_RADII, candidate_places
from cryocaps.masks.draw import (
    GAUSSIAN_SIGMA_PER_RADIUS,
    draw_gaussians,
    draw_spheres,
    soft_targets,
)
from cryocaps.masks.plan import MaskPlan, assign_labels, check_voxel_sizes, plan_masks
from cryocaps.masks.templates import (
    DEFAULT_TEMPLATE_THRESHOLD,
    Template,
    draw_templates,
    load_template,
)

SHAPES = ("sphere", "gaussian", "template")
# What the voxels no annotated particle covers are (--unannotated): background (every
# particle is annotated); unknown (IGNORE_LABEL) except a shell around each annotated
# particle, out to this many class radii beyond its own radius, which is background; or
# unknown only at candidates, places that look like the annotated particles (.candidates).
UNANNOTATED = ("background", "unknown", "candidates")
UNANNOTATED_SHELL_RADII = 1.0
_SOFT_TARGET_SLAB_VOXELS = 2**22  # soft targets are written ~4 M voxels (8 MB of float16) at a time


def make_masks(
    particle_files: Sequence[Path],
    tomograms: Sequence[TomogramInfo],
    classes: ClassTable,
    out_dir: Path,
    *,
    single_class: bool = False,
    shape: str = "sphere",
    radius_scale: float = 1.0,
    coords_pixel_size_angstrom: float | None = None,
    template_threshold: float = DEFAULT_TEMPLATE_THRESHOLD,
    unannotated: str = "background",
    strict: bool = False,
    overwrite: bool = False,
    copick=None,
    progress: Callable | None = None,
    tomogram_files: dict[str, Path] | None = None,
) -> dict:
    """Draw a label map per tomogram into ``out_dir/<tomo>_labels.mrc``; table in ``classes.csv``.

    ``unannotated="unknown"`` (partial annotations) paints IGNORE_LABEL on every voxel
    farther than ``1 + UNANNOTATED_SHELL_RADII`` class radii from every annotated
    particle: only the shell around an annotated particle is known to be background.
    ``unannotated="candidates"`` paints it only around the places that look like the
    annotated particles (:mod:`cryocaps.masks.candidates`); it reads the voxels, from
    ``tomogram_files`` (tomogram name -> MRC file or OME-Zarr image).

    ``copick`` (a :class:`~cryocaps.io.copick_project.CopickSelection`) selects the
    picks of a copick ``config.json`` among ``particle_files``.

    Only the tomograms' headers are needed (``tomograms`` from
    :func:`cryocaps.io.particles.tomogram_infos`). Every check (classes,
    voxel sizes, units, existing outputs) runs before the first map is
    written. ``progress(n=1, info=...)`` is called after each tomogram.

    Returns a summary: per-class particles and voxels, per-tomogram counts,
    particles outside, tomograms named by the particles but not given.
    """
    from cryocaps.io.files import check_writable

    _check_options(shape, unannotated, radius_scale, tomograms)
    voxel_size = check_voxel_sizes(tomograms)
    out_dir = Path(out_dir)

    particles = read_labelled_particles(
        particle_files, tomograms, classes, single_class, coords_pixel_size_angstrom, copick
    )
    templates = {}
    if shape == "template":
        used = sorted(set(particles["class_name"]))
        templates = {
            name: load_template(classes.by_name(name), voxel_size, template_threshold)
            for name in used
        }
    plans, report = plan_masks(particles, tomograms, out_dir, strict=strict, overwrite=overwrite)
    if unannotated == "candidates":
        _check_files(plans, tomogram_files or {}, voxel_size)
    check_writable(out_dir / "classes.csv", overwrite)

    per_class = {c.name: {"label": c.label, "particles": 0, "voxels": 0} for c in classes}
    voxels_per_label = np.zeros(classes.n_labels, dtype=np.int64)
    unknown_voxels = 0
    per_tomogram = []
    outputs = []
    for plan in plans:
        started = time.perf_counter()
        voxels, unknown = _draw_and_write(
            plan,
            classes,
            shape,
            radius_scale,
            voxel_size,
            templates,
            unannotated,
            overwrite,
            (tomogram_files or {}).get(plan.info.name),
        )
        voxels_per_label += voxels
        unknown_voxels += unknown
        labels = plan.particles["label"].to_numpy(dtype=int)
        for c in classes:
            per_class[c.name]["particles"] += int((labels == c.label).sum())
            per_class[c.name]["voxels"] += int(voxels[c.label])
        per_tomogram.append(
            {
                "tomogram": plan.info.name,
                "output": str(plan.path),
                "particles": len(plan.particles),
                "outside": plan.n_outside,
                "unknown_voxels": unknown,
                "seconds": round(time.perf_counter() - started, 3),
            }
        )
        outputs.append(plan.path)
        if progress is not None:
            progress(1, info=plan.info.name)

    volumes = label_volumes_angstrom3(classes, shape, radius_scale, voxel_size, templates)
    # what picking expects of one particle, and of all of a class in a tomogram
    recorded = classes.with_label_volumes(volumes).with_label_fractions_from_counts(
        voxels_per_label, unknown_voxels
    )
    outputs.append(write_used_classes(recorded, out_dir / "classes.csv"))
    return {
        "voxel_size_angstrom": voxel_size,
        "shape": shape,
        "unannotated": unannotated,
        "classes": per_class,
        "tomograms": per_tomogram,
        "outputs": [str(p) for p in outputs],
        **report,
    }


def _check_options(shape: str, unannotated: str, radius_scale: float, tomograms) -> None:
    if shape not in SHAPES:
        raise CryocapsError(f"--shape {shape!r}: use one of {', '.join(SHAPES)}")
    if unannotated not in UNANNOTATED:
        raise CryocapsError(f"--unannotated {unannotated!r}: use one of {', '.join(UNANNOTATED)}")
    if unannotated != "background" and shape == "gaussian":
        raise CryocapsError(
            f"--unannotated {unannotated} needs a label map: use --shape sphere or template "
            "(soft targets have no unknown label)"
        )
    if not radius_scale > 0:
        raise CryocapsError(f"--radius-scale must be > 0, got {radius_scale}")
    if not tomograms:
        raise CryocapsError("--tomograms: no tomograms given")


def read_labelled_particles(
    particle_files: Sequence[Path],
    tomograms: Sequence[TomogramInfo],
    classes: ClassTable,
    single_class: bool,
    coords_pixel_size_angstrom: float | None,
    copick=None,
) -> pd.DataFrame:
    """All particles of ``particle_files`` in voxels of their tomograms, with a ``label`` column.

    A file without particles is an error (it is most likely the wrong file).
    """
    from cryocaps.io.particles import read_particles

    frames = []
    for path in particle_files:
        frame = read_particles(
            [path],
            tomograms=tomograms,
            classes=None if single_class else classes,
            coords_pixel_size_angstrom=coords_pixel_size_angstrom,
            copick=copick,
        )
        if frame.empty:
            raise CryocapsError(
                f"{path}: no particles in this file; check that it is the right coordinate file"
            )
        frames.append(frame)
    return assign_labels(pd.concat(frames, ignore_index=True), classes, single_class)


def draw_mask(
    plan: MaskPlan,
    classes: ClassTable,
    shape: str,
    radius_scale: float,
    voxel_size_angstrom: float,
    templates: dict[str, Template],
    unannotated: str = "background",
    volume: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The label map of one tomogram and, for ``shape="gaussian"``, its blob values.

    ``volume``: the tomogram's voxels (needed by ``unannotated="candidates"`` only).

    Returns
    -------
    label_map : (Z, Y, X) uint8, 0 = background, IGNORE_LABEL = unknown (only with
        ``unannotated="unknown"``: beyond the shells around the annotated particles; with
        ``"candidates"``: around the places that look like them)
    value_map : (Z, Y, X) float16 Gaussian value of the owning particle, or None
    """
    rows = plan.particles
    centres = rows[["z", "y", "x"]].to_numpy(dtype=float)
    radii_angstrom = np.array([classes.by_name(n).radius_angstrom for n in rows["class_name"]])
    radii = radii_angstrom * radius_scale / voxel_size_angstrom
    label_map, value_map = _draw_particles(plan, centres, radii, shape, templates)
    if unannotated == "unknown":
        known = draw_spheres(plan.info.shape, centres, 1, radii * (1 + UNANNOTATED_SHELL_RADII))
        label_map[(label_map == 0) & (known == 0)] = IGNORE_LABEL
    elif unannotated == "candidates":
        places, place_radii = candidate_places(volume, centres, radii)
        if len(places):
            marked = draw_spheres(plan.info.shape, places, 1, place_radii * CANDIDATE_RADII)
            label_map[(label_map == 0) & (marked != 0)] = IGNORE_LABEL
    return label_map, value_map


def _draw_particles(
    plan: MaskPlan,
    centres: np.ndarray,
    radii: np.ndarray,
    shape: str,
    templates: dict[str, Template],
) -> tuple[np.ndarray, np.ndarray | None]:
    """The particles' shapes (:func:`draw_mask` without unknown voxels); ``centres`` (N, 3)
    z, y, x and ``radii`` (N,) in voxels, one per row of ``plan.particles``."""
    rows = plan.particles
    labels = rows["label"].to_numpy(dtype=int)
    if shape == "sphere":
        return draw_spheres(plan.info.shape, centres, labels, radii), None
    if shape == "gaussian":
        return draw_gaussians(plan.info.shape, centres, labels, GAUSSIAN_SIGMA_PER_RADIUS * radii)
    angles = rows.reindex(columns=["rot", "tilt", "psi"]).fillna(0.0).to_numpy(dtype=float)
    particle_templates = [templates[n] for n in rows["class_name"]]
    return draw_templates(plan.info.shape, centres, labels, particle_templates, angles), None


def _draw_and_write(
    plan: MaskPlan,
    classes: ClassTable,
    shape: str,
    radius_scale: float,
    voxel_size_angstrom: float,
    templates: dict[str, Template],
    unannotated: str,
    overwrite: bool,
    tomogram_file: Path | None = None,
) -> tuple[np.ndarray, int]:
    """Draw and write one tomogram's map; returns its voxel count per label, (n_labels,), and
    its number of unknown voxels. ``tomogram_file``: its voxels, read with
    ``unannotated="candidates"`` only."""
    from cryocaps.io.volumes import read_tomogram, write_volume

    volume = None
    if unannotated == "candidates":
        # checked (shape, a finite sample) before the first map; a non-finite voxel the sample
        # missed is read as 0 rather than stopping with maps half written
        volume = read_tomogram(
            tomogram_file, voxel_size_angstrom=voxel_size_angstrom, check_finite=False
        ).data
        volume = np.nan_to_num(np.asarray(volume, np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    label_map, value_map = draw_mask(
        plan, classes, shape, radius_scale, voxel_size_angstrom, templates, unannotated, volume
    )
    del volume
    if value_map is not None:
        write_soft_targets(
            plan, label_map, value_map, classes.n_labels, voxel_size_angstrom, overwrite
        )
        del value_map  # counting below needs only the label map
    else:
        # 8-bit (mode 0) also with IGNORE_LABEL, which a uint8 writer would widen to 16 bits
        write_volume(
            plan.path,
            label_map.view(np.int8),
            voxel_size_angstrom,
            dtype="int8",
            origin_angstrom=plan.info.origin_angstrom,
            overwrite=overwrite,
        )
    unknown = int(np.count_nonzero(label_map == IGNORE_LABEL))
    return label_counts(label_map, classes.n_labels), unknown


def write_soft_targets(
    plan: MaskPlan,
    label_map: np.ndarray,
    value_map: np.ndarray,
    n_labels: int,
    voxel_size_angstrom: float,
    overwrite: bool,
) -> None:
    """Write (n_labels, Z, Y, X) float16 soft targets slab by slab (never the whole 4D array)."""
    from cryocaps.io.volumes import MrcVolumeWriter

    with MrcVolumeWriter(
        plan.path,
        (n_labels, *plan.info.shape),
        voxel_size_angstrom,
        dtype="float16",
        origin_angstrom=plan.info.origin_angstrom,
        overwrite=overwrite,
    ) as writer:
        step = max(1, _SOFT_TARGET_SLAB_VOXELS // label_map[0].size)
        for channel in range(n_labels):
            for start in range(0, label_map.shape[0], step):
                part = slice(start, start + step)
                writer.data[channel, part] = soft_targets(label_map[part], value_map[part], channel)


def label_volumes_angstrom3(
    classes: ClassTable,
    shape: str,
    radius_scale: float,
    voxel_size_angstrom: float,
    templates: dict[str, Template],
) -> dict[str, float]:
    """Volume one whole particle of each class covers in the maps drawn (Å³), for picking.

    A sphere of the scaled radius; for Gaussian targets the ball where the target exceeds
    one half (where a network trained on them calls the class); a template's voxels above
    its threshold (classes without a loaded template are left out).
    """
    if shape == "template":
        return {name: t.inside_voxels * voxel_size_angstrom**3 for name, t in templates.items()}
    factor = radius_scale
    if shape == "gaussian":
        factor *= GAUSSIAN_SIGMA_PER_RADIUS * math.sqrt(2.0 * math.log(2.0))
    # a sphere of radius r in Å has sphere_volume_voxels(r) Å³
    return {c.name: sphere_volume_voxels(c.radius_angstrom * factor) for c in classes}


def write_used_classes(classes: ClassTable, path: Path) -> Path:
    """Write the class table used (template paths made absolute, so it works from any folder)."""
    from cryocaps.io.class_table import write_classes

    used_table = ClassTable(
        [replace(c, template=c.template.resolve() if c.template else None) for c in classes],
        classes.source,
    )
    return write_classes(used_table, path, overwrite=True)


def _check_files(plans: Sequence[MaskPlan], files: dict[str, Path], voxel_size: float) -> None:
    """--unannotated candidates reads the voxels: every tomogram drawn needs its file, of its
    shape and finite (on a sample), checked before the first map is written."""
    from cryocaps.io.volumes import read_tomogram

    missing = [plan.info.name for plan in plans if plan.info.name not in files]
    if missing:
        raise CryocapsError(
            f"--unannotated candidates reads the tomograms' voxels: no MRC or OME-Zarr file for "
            f"{', '.join(missing[:4])} (give --tomograms as files or folders, or a "
            "tomograms.star whose rlnTomoReconstructedTomogram files exist)"
        )
    for plan in plans:
        path = files[plan.info.name]
        tomogram = read_tomogram(path, mmap=True, voxel_size_angstrom=voxel_size)
        try:
            if tuple(tomogram.data.shape) != tuple(plan.info.shape):
                raise CryocapsError(
                    f"{path}: shape {tuple(tomogram.data.shape)} (z, y, x), but the tomogram "
                    f"{plan.info.name} is {tuple(plan.info.shape)}: give the tomograms themselves"
                )
        finally:
            tomogram.close()
