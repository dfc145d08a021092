"""Label maps from particle coordinates: spheres (default), Gaussian soft targets, templates.

Every shape is drawn the same way: each particle touches only a small box
around its centre, and where the shapes of two particles overlap each voxel
goes to the nearer centre (ties to the particle listed first). Nothing of the
size of the whole tomogram is allocated besides the output map itself.

Label maps are (Z, Y, X) uint8, 0 = background, class labels from the class
table. Gaussian soft targets are (C, Z, Y, X) float16 with C = number of
labels (channel 0 = background = 1 - the particle channels), like the
probability maps ``segment`` writes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cryocaps.classes import ClassTable, ParticleClass
from cryocaps.errors import CryocapsError
from cryocaps.io.volumes import TomogramInfo, label_counts, same_voxel_size

log = logging.getLogger(__name__)

SHAPES = ("sphere", "gaussian", "template")
GAUSSIAN_SIGMA_PER_RADIUS = 0.5  # sigma = radius / 2: the target is exp(-2) = 0.14 at the radius
GAUSSIAN_REACH_SIGMAS = 3.0  # soft targets are cut at 3 sigma (1.5 radii), where they are 0.011
DEFAULT_TEMPLATE_THRESHOLD = 0.2

# A box mask: (lower corner zyx in the volume, bool mask of the box).
BoxMask = tuple[np.ndarray, np.ndarray]


# --- drawing -----------------------------------------------------------------------
def _box(centre: np.ndarray, reach: float, shape) -> tuple[np.ndarray, np.ndarray]:
    """Lower (inclusive) and upper (exclusive) corners of the voxels within ``reach`` of ``centre``."""
    lower = np.maximum(np.ceil(centre - reach).astype(int), 0)
    upper = np.minimum(np.floor(centre + reach).astype(int) + 1, np.asarray(shape))
    return lower, upper


def _offsets(lower: np.ndarray, upper: np.ndarray, centre: np.ndarray) -> tuple[np.ndarray, ...]:
    """Open grid of voxel positions relative to ``centre`` over a box, (z, y, x)."""
    return tuple(
        (np.arange(lower[a], upper[a], dtype=np.float32) - np.float32(centre[a])).reshape(
            [-1 if b == a else 1 for b in range(3)]
        )
        for a in range(3)
    )


def _squared_distance(offsets) -> np.ndarray:
    dz, dy, dx = offsets
    return dz * dz + dy * dy + dx * dx


def _neighbours(centres: np.ndarray, reach: np.ndarray) -> list[np.ndarray]:
    """For each particle, the other particles whose boxes can overlap its box."""
    from scipy.spatial import cKDTree

    if len(centres) == 0:
        return []
    tree = cKDTree(centres)
    candidates = tree.query_ball_point(centres, reach + reach.max())
    return [
        np.array([j for j in found if j != i and np.linalg.norm(centres[i] - centres[j]) < reach[i] + reach[j]], int)
        for i, found in enumerate(candidates)
    ]


def paint_particles(
    shape: Sequence[int],
    centres_zyx: np.ndarray,
    labels: np.ndarray,
    reach_voxels: np.ndarray,
    inside: Callable[[int, tuple[np.ndarray, ...]], np.ndarray],
    values: Callable[[int, np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Draw particle shapes into a label map, each voxel to the nearest covering centre.

    Parameters
    ----------
    shape : (Z, Y, X) of the output
    centres_zyx : (N, 3) float, voxel positions (voxel centre = integer)
    labels : (N,) int, label of each particle (1..127)
    reach_voxels : (N,) float, no voxel farther than this from a centre is drawn for it
    inside : ``inside(i, offsets)`` -> bool mask of the box whose open-grid
        offsets from centre i are given ((z, y, x) arrays that broadcast)
    values : optional ``values(i, squared_distance)`` -> float value of each box voxel

    Returns
    -------
    label_map : (Z, Y, X) uint8
    value_map : (Z, Y, X) float16 (value of the owning particle) or None
    """
    shape = tuple(int(s) for s in shape)
    centres = np.asarray(centres_zyx, dtype=np.float64).reshape(-1, 3)
    reach = np.asarray(reach_voxels, dtype=np.float64).reshape(-1)
    label_map = np.zeros(shape, np.uint8)
    value_map = np.zeros(shape, np.float16) if values is not None else None
    neighbours = _neighbours(centres, reach)
    for i, centre in enumerate(centres):
        lower, upper = _box(centre, reach[i], shape)
        if np.any(upper <= lower):
            continue
        offsets = _offsets(lower, upper, centre)
        distance = _squared_distance(offsets)
        mask = inside(i, offsets) & (distance <= reach[i] ** 2)
        for j in neighbours[i]:
            # The part of box i that particle j can reach: there j wins if nearer.
            low_j, up_j = _box(centres[j], reach[j], shape)
            low = np.maximum(lower, low_j)
            up = np.minimum(upper, up_j)
            if np.any(up <= low):
                continue
            region = tuple(slice(low[a] - lower[a], up[a] - lower[a]) for a in range(3))
            offsets_j = _offsets(low, up, centres[j])
            distance_j = _squared_distance(offsets_j)
            covered_j = inside(j, offsets_j) & (distance_j <= reach[j] ** 2)
            nearer = distance_j < distance[region] if j > i else distance_j <= distance[region]
            mask[region] &= ~(covered_j & nearer)
        target = tuple(slice(lower[a], upper[a]) for a in range(3))
        label_map[target][mask] = labels[i]
        if value_map is not None:
            value_map[target][mask] = values(i, distance)[mask]
    return label_map, value_map


def draw_spheres(
    shape: Sequence[int],
    centres_zyx: np.ndarray,
    labels: np.ndarray,
    radii_voxels: np.ndarray | float,
) -> np.ndarray:
    """Solid spheres: voxels within ``radius`` of a centre get its label; overlaps go to the nearer centre.

    Parameters
    ----------
    shape : (Z, Y, X)
    centres_zyx : (N, 3) float voxel positions, 0-based, voxel centre = integer
    labels : (N,) int labels 1..127 (or one int for all)
    radii_voxels : (N,) float radii in voxels (or one float for all)

    Returns
    -------
    (Z, Y, X) uint8 label map, 0 = background
    """
    centres = np.asarray(centres_zyx, dtype=np.float64).reshape(-1, 3)
    labels = np.broadcast_to(np.asarray(labels, dtype=int), (len(centres),))
    radii = np.broadcast_to(np.asarray(radii_voxels, dtype=np.float64), (len(centres),))
    label_map, _ = paint_particles(shape, centres, labels, radii, _everywhere)
    return label_map


def _everywhere(i: int, offsets) -> np.ndarray:
    return np.ones(np.broadcast_shapes(*(o.shape for o in offsets)), bool)


def draw_gaussians(
    shape: Sequence[int],
    centres_zyx: np.ndarray,
    labels: np.ndarray,
    sigmas_voxels: np.ndarray | float,
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs exp(-d²/2σ²) cut at 3σ; each voxel to the nearer centre.

    Returns
    -------
    label_map : (Z, Y, X) uint8, the owning particle's label where the blob is drawn
    value_map : (Z, Y, X) float16, the owning blob's value (0 elsewhere)
    """
    centres = np.asarray(centres_zyx, dtype=np.float64).reshape(-1, 3)
    labels = np.broadcast_to(np.asarray(labels, dtype=int), (len(centres),))
    sigmas = np.broadcast_to(np.asarray(sigmas_voxels, dtype=np.float64), (len(centres),))

    def values(i: int, squared_distance: np.ndarray) -> np.ndarray:
        return np.exp(-squared_distance / np.float32(2 * sigmas[i] ** 2))

    return paint_particles(shape, centres, labels, GAUSSIAN_REACH_SIGMAS * sigmas, _everywhere, values)


def soft_targets(label_map: np.ndarray, value_map: np.ndarray, channel: int) -> np.ndarray:
    """One channel of the (C, Z, Y, X) soft targets (float16): background = 1 - particle value."""
    if channel == 0:
        return np.float16(1.0) - value_map
    return np.where(label_map == channel, value_map, np.float16(0))


# --- templates ---------------------------------------------------------------------
def relion_sampling_matrices(angles_deg: np.ndarray) -> np.ndarray:
    """(N, 3, 3) matrices taking tomogram offsets (x, y, z) to template offsets (x, y, z).

    RELION's angles (rot, tilt, psi) are intrinsic ZYZ; the particle's
    orientation O = Rotation.from_euler("ZYZ", angles).inv() takes template
    coordinates to tomogram coordinates (see :mod:`cryocaps.io.formats.angles`),
    so a tomogram offset samples the template at O⁻¹ · offset.
    """
    from cryocaps.io.formats.angles import relion_orientation

    return relion_orientation(np.asarray(angles_deg, dtype=float).reshape(-1, 3)).inv().as_matrix()


@dataclass
class Template:
    """A class's density map at the tomogram's voxel size, thresholded.

    density : (Z, Y, X) float32
    threshold : density value above which a voxel is inside the particle
    centre_zyx : the particle's centre in voxels of ``density``; default
        (Z//2, Y//2, X//2), RELION's box centre
    reach_voxels : distance from the centre to the farthest inside voxel (+1)
    """

    density: np.ndarray
    threshold: float
    centre_zyx: np.ndarray | None = None
    reach_voxels: float = field(init=False)

    def __post_init__(self) -> None:
        if self.centre_zyx is None:
            self.centre_zyx = np.array(self.density.shape) // 2
        self.centre_zyx = np.asarray(self.centre_zyx, dtype=float)
        inside = np.argwhere(self.density > self.threshold)
        if len(inside) == 0:
            raise CryocapsError("template is empty at this threshold; lower --template-threshold")
        self.reach_voxels = float(np.sqrt(((inside - self.centre_zyx) ** 2).sum(axis=1).max())) + 1.0


def load_template(
    particle_class: ParticleClass, voxel_size_angstrom: float, threshold_fraction: float = DEFAULT_TEMPLATE_THRESHOLD
) -> Template:
    """Read a class's template map, bring it to ``voxel_size_angstrom`` (Fourier), threshold at a fraction of its maximum."""
    from cryocaps.io.volumes import read_tomogram
    from cryocaps.preprocess import fourier_rescale

    if particle_class.template is None:
        raise CryocapsError(
            f"class {particle_class.name!r} has no template; add a template column (MRC path) to "
            "classes.csv or use --shape sphere"
        )
    if not 0 < threshold_fraction < 1:
        raise CryocapsError(f"--template-threshold must be between 0 and 1, got {threshold_fraction}")
    tomogram = read_tomogram(particle_class.template)
    density = tomogram.data.astype(np.float32)
    centre = np.array(density.shape) // 2
    # any difference is resampled away (a template is rescaled, never refused)
    if not np.isclose(tomogram.voxel_size_angstrom, voxel_size_angstrom, rtol=1e-4):
        # Fourier rescaling keeps voxel 0 in place, so the box centre moves to centre * ratio.
        density = fourier_rescale(density, tomogram.voxel_size_angstrom, voxel_size_angstrom)
        centre = centre * tomogram.voxel_size_angstrom / voxel_size_angstrom
    peak = float(density.max())
    if not peak > 0:
        raise CryocapsError(
            f"{particle_class.template}: template has no positive density (particles should be bright); "
            "invert it first"
        )
    return Template(density, threshold_fraction * peak, centre)


def draw_templates(
    shape: Sequence[int],
    centres_zyx: np.ndarray,
    labels: np.ndarray,
    templates: Sequence[Template],
    angles_deg: np.ndarray,
) -> np.ndarray:
    """Thresholded templates rotated by RELION ZYZ angles; overlaps go to the nearer centre.

    Parameters
    ----------
    templates : one :class:`Template` per particle (the same object may repeat)
    angles_deg : (N, 3) RELION rot, tilt, psi in degrees

    Returns (Z, Y, X) uint8 label map.
    """
    from scipy.ndimage import map_coordinates

    centres = np.asarray(centres_zyx, dtype=np.float64).reshape(-1, 3)
    labels = np.broadcast_to(np.asarray(labels, dtype=int), (len(centres),))
    matrices = relion_sampling_matrices(angles_deg)
    if len(matrices) != len(centres):
        matrices = np.broadcast_to(matrices, (len(centres), 3, 3))
    reach = np.array([t.reach_voxels for t in templates], dtype=np.float64)

    def inside(i: int, offsets) -> np.ndarray:
        dz, dy, dx = np.broadcast_arrays(*offsets)
        xyz = np.stack([dx.ravel(), dy.ravel(), dz.ravel()])
        sampled_xyz = matrices[i] @ xyz
        template = templates[i]
        coordinates = sampled_xyz[::-1] + template.centre_zyx[:, None]
        density = map_coordinates(template.density, coordinates, order=1, mode="constant", cval=0.0)
        return (density > template.threshold).reshape(dz.shape)

    label_map, _ = paint_particles(shape, centres, labels, reach, inside)
    return label_map


# --- whole run ---------------------------------------------------------------------
@dataclass
class MaskPlan:
    """What make-masks will draw for one tomogram."""

    info: TomogramInfo
    particles: pd.DataFrame  # rows inside the volume, with a ``label`` column
    n_outside: int
    path: Path


def tomogram_geometry(paths: Sequence[Path], voxel_size_angstrom: float | None = None) -> list[TomogramInfo]:
    """Tomogram geometry from MRC headers (files or folders) or RELION 5 tomograms.star files.

    ``voxel_size_angstrom`` replaces the MRC headers' voxel size (for headers
    that say 0); without it this is :func:`cryocaps.io.particles.tomogram_infos`.
    """
    from dataclasses import replace

    from cryocaps.io.particles import tomogram_infos
    from cryocaps.io.volumes import MRC_SUFFIXES, read_info

    if voxel_size_angstrom is None:
        return tomogram_infos(paths)
    if not voxel_size_angstrom > 0:
        raise CryocapsError(f"--voxel-size-angstrom must be > 0, got {voxel_size_angstrom}")
    infos = []
    for path in map(Path, paths):
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in MRC_SUFFIXES)
            infos.extend(read_info(f, voxel_size_angstrom) for f in files)
        elif path.suffix.lower() == ".star":
            infos.extend(replace(i, voxel_size_angstrom=voxel_size_angstrom) for i in tomogram_infos([path]))
        elif path.exists():
            infos.append(read_info(path, voxel_size_angstrom))
        else:
            raise CryocapsError(f"--tomograms {path}: no such file or folder")
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
            log.info("--radius-angstrom: classes %s all drawn as one class %r", ", ".join(found), only.name)
        particles["class_name"] = only.name
        particles["label"] = only.label
        return particles
    names = {value: classes.name_of(value) for value in particles["class_name"].astype(str).unique()}
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
            message = f"{info.name}: {int(outside.sum())} of {len(rows)} particles lie outside the volume"
            if strict:
                raise CryocapsError(message + " (--strict)")
            log.warning("%s; skipped", message)
        path = out_dir / f"{info.name}_labels.mrc"
        check_writable(path, overwrite)
        plans.append(MaskPlan(info, rows[~outside], int(outside.sum()), path))
    total = sum(len(plan.particles) for plan in plans) + total_outside
    if total_outside > total / 2:
        raise CryocapsError(
            f"{total_outside} of {total} particles lie outside their tomograms: coordinates in other "
            "units? give their pixel size with --coords-pixel-size-angstrom"
        )
    return plans, {"unknown_tomograms": unknown, "particles_outside": total_outside}


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
    strict: bool = False,
    overwrite: bool = False,
    progress: Callable | None = None,
) -> dict:
    """Draw one label map per tomogram into ``out_dir/<tomo>_labels.mrc``; write ``out_dir/classes.csv``.

    Only the tomograms' headers are needed (``tomograms`` from
    :func:`cryocaps.io.particles.tomogram_infos`). Every check (classes,
    voxel sizes, units, existing outputs) runs before the first map is
    written. ``progress(n=1, info=...)`` is called after each tomogram.

    Returns a summary: per-class particles and voxels, per-tomogram counts,
    particles outside, tomograms named by the particles but not given.
    """
    from cryocaps.classes import write_classes
    from cryocaps.io.files import check_writable
    from cryocaps.io.particles import read_particles
    from cryocaps.io.volumes import MrcVolumeWriter, write_volume

    if shape not in SHAPES:
        raise CryocapsError(f"--shape {shape!r}: use one of {', '.join(SHAPES)}")
    if not radius_scale > 0:
        raise CryocapsError(f"--radius-scale must be > 0, got {radius_scale}")
    if not tomograms:
        raise CryocapsError("--tomograms: no tomograms given")
    voxel_size = check_voxel_sizes(tomograms)
    out_dir = Path(out_dir)

    frames = []
    for path in particle_files:
        frame = read_particles(
            [path],
            tomograms=tomograms,
            classes=None if single_class else classes,
            coords_pixel_size_angstrom=coords_pixel_size_angstrom,
        )
        if frame.empty:
            raise CryocapsError(f"{path}: no particles in this file; check that it is the right coordinate file")
        frames.append(frame)
    particles = assign_labels(pd.concat(frames, ignore_index=True), classes, single_class)
    templates = {}
    if shape == "template":
        used = sorted(set(particles["class_name"]))
        templates = {name: load_template(classes.by_name(name), voxel_size, template_threshold) for name in used}
    plans, report = plan_masks(particles, tomograms, out_dir, strict=strict, overwrite=overwrite)
    check_writable(out_dir / "classes.csv", overwrite)

    per_class = {c.name: {"label": c.label, "particles": 0, "voxels": 0} for c in classes}
    per_tomogram = []
    outputs = []
    for plan in plans:
        started = time.perf_counter()
        rows = plan.particles
        centres = rows[["z", "y", "x"]].to_numpy(dtype=float)
        labels = rows["label"].to_numpy(dtype=int)
        radii = np.array([classes.by_name(n).radius_angstrom for n in rows["class_name"]]) * radius_scale / voxel_size
        if shape == "sphere":
            label_map = draw_spheres(plan.info.shape, centres, labels, radii)
        elif shape == "gaussian":
            label_map, value_map = draw_gaussians(
                plan.info.shape, centres, labels, GAUSSIAN_SIGMA_PER_RADIUS * radii
            )
        else:
            angles = rows.reindex(columns=["rot", "tilt", "psi"]).fillna(0.0).to_numpy(dtype=float)
            label_map = draw_templates(
                plan.info.shape, centres, labels, [templates[n] for n in rows["class_name"]], angles
            )
        geometry = {"origin_angstrom": plan.info.origin_angstrom, "overwrite": overwrite}
        if shape == "gaussian":
            n_labels = classes.n_labels
            with MrcVolumeWriter(
                plan.path, (n_labels, *plan.info.shape), voxel_size, dtype="float16", **geometry
            ) as writer:
                step = max(1, 2**22 // label_map[0].size)
                for channel in range(n_labels):
                    for start in range(0, label_map.shape[0], step):
                        part = slice(start, start + step)
                        writer.data[channel, part] = soft_targets(label_map[part], value_map[part], channel)
            del value_map
        else:
            write_volume(plan.path, label_map, voxel_size, dtype="uint8", **geometry)
        counts = label_counts(label_map, classes.n_labels)
        for c in classes:
            per_class[c.name]["particles"] += int((labels == c.label).sum())
            per_class[c.name]["voxels"] += int(counts[c.label])
        per_tomogram.append(
            {
                "tomogram": plan.info.name,
                "output": str(plan.path),
                "particles": len(rows),
                "outside": plan.n_outside,
                "seconds": round(time.perf_counter() - started, 3),
            }
        )
        outputs.append(plan.path)
        del label_map
        if progress is not None:
            progress(1, info=plan.info.name)

    used_table = ClassTable(
        [
            ParticleClass(c.label, c.name, c.radius_angstrom, c.template.resolve() if c.template else None)
            for c in classes
        ],
        classes.source,
    )
    outputs.append(write_classes(used_table, out_dir / "classes.csv", overwrite=True))
    return {
        "voxel_size_angstrom": voxel_size,
        "shape": shape,
        "classes": per_class,
        "tomograms": per_tomogram,
        "outputs": [str(p) for p in outputs],
        **report,
    }
