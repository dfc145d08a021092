"""The sample: where particles go, how they are turned, and the densities they make.

Particles of each class get uniformly random orientations (uniform on SO(3))
and positions inside the sample slab, with no two particles' envelope spheres
overlapping (crowding sets how many). Optional distractors: gold beads on the
slab surfaces and a lipid-bilayer sheet crossing the slab. Each class density
(protein = 1) is rotated and added to a volume of ice (0); the label map marks
each particle with its class label. Arrays are (z, y, x) in voxels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cryocaps.simulate.parameters import SimulationParameters
from cryocaps.structures import ParticleTemplate, relion_euler_to_matrix

__all__ = [
    "Distractors",
    "make_distractors",
    "place_particles",
    "random_orientations",
    "render_distractors",
    "render_particles",
    "rotate_density",
    "slab_bounds",
]

GOLD_RADIUS_ANGSTROM = 50.0  # 10 nm fiducials
GOLD_DENSITY = 6.0  # relative to protein (capped: real gold is denser still)
GOLD_PER_SQUARE_MICRON = 15.0  # typical fiducial density; at least one bead per tomogram
MEMBRANE_LEAFLET_OFFSET_ANGSTROM = 20.0  # head groups +-20 Å from the mid-plane
MEMBRANE_LEAFLET_SIGMA_ANGSTROM = 5.0
MEMBRANE_DENSITY = 0.5  # head groups: excess density over ice about half that of protein


def slab_bounds(params: SimulationParameters) -> tuple[float, float]:
    """First and last z (voxel centres) of the sample slab, centred in the box."""
    slab_centre = (params.shape[0] - 1) / 2
    return (
        slab_centre - params.slab_voxels / 2 + 0.5,
        slab_centre + params.slab_voxels / 2 - 0.5,
    )


def random_orientations(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` orientations uniform on SO(3) as RELION (rot, tilt, psi) in degrees, shape (n, 3).

    Uniform on SO(3) means rot and psi uniform and cos(tilt) uniform.
    """
    rot = rng.uniform(-180.0, 180.0, n)
    tilt = np.rad2deg(np.arccos(rng.uniform(-1.0, 1.0, n)))
    psi = rng.uniform(-180.0, 180.0, n)
    return np.stack([rot, tilt, psi], axis=1)


@dataclass
class Distractors:
    """Gold beads and an optional membrane sheet: background that is not a particle."""

    bead_centres: np.ndarray  # (N, 3) zyx voxels
    bead_radius: float  # voxels
    membrane: (
        tuple[np.ndarray, float] | None
    )  # unit normal (zyx), offset (voxels from the box centre)
    membrane_half_width: float  # voxels: particles keep this far from the mid-plane

    @property
    def present(self) -> bool:
        return len(self.bead_centres) > 0 or self.membrane is not None


def make_distractors(
    rng: np.random.Generator, params: SimulationParameters, slab: tuple[float, float]
) -> Distractors:
    """Beads on both slab surfaces (about 15 per µm², at least one) and, in half the cases, a
    membrane."""
    voxel = params.voxel_size_angstrom
    nz, ny, nx = params.shape
    if not params.distractors:
        return Distractors(np.zeros((0, 3)), 0.0, None, 0.0)
    area_um2 = ny * nx * (voxel * 1e-4) ** 2
    n_beads = max(1, int(rng.poisson(GOLD_PER_SQUARE_MICRON * area_um2)))
    bead_radius = GOLD_RADIUS_ANGSTROM / voxel
    surfaces = rng.choice(np.array(slab), n_beads)
    margin = bead_radius + 1
    beads = np.stack(
        [
            surfaces,
            rng.uniform(margin, ny - 1 - margin, n_beads),
            rng.uniform(margin, nx - 1 - margin, n_beads),
        ],
        axis=1,
    )
    membrane = None
    if rng.random() < 0.5:
        # A sheet crossing the slab, nearly parallel to the beam (seen edge-on in XY).
        phi = rng.uniform(0, np.pi)
        normal = np.array([rng.uniform(-0.3, 0.3), np.sin(phi), np.cos(phi)])
        normal /= np.linalg.norm(normal)
        offset = rng.uniform(-0.3, 0.3) * min(ny, nx)
        membrane = (normal, float(offset))
    half_width = (MEMBRANE_LEAFLET_OFFSET_ANGSTROM + 2 * MEMBRANE_LEAFLET_SIGMA_ANGSTROM) / voxel
    return Distractors(beads, bead_radius, membrane, half_width)


def _particle_counts(
    params: SimulationParameters, templates: Sequence[ParticleTemplate]
) -> list[int]:
    """Particles per class: ``n_particles``, or as many as fill ``crowding`` of the slab, split
    evenly."""
    n_classes = len(templates)
    if params.n_particles is not None:
        total = params.n_particles
    else:
        slab_volume = params.slab_voxels * params.shape[1] * params.shape[2]
        mean_volume = np.mean([4 / 3 * np.pi * t.radius_voxels**3 for t in templates])
        total = max(n_classes, int(round(params.crowding * slab_volume / mean_volume)))
    return [total // n_classes + (1 if k < total % n_classes else 0) for k in range(n_classes)]


def place_particles(
    rng: np.random.Generator,
    params: SimulationParameters,
    templates: Sequence[ParticleTemplate],
    slab: tuple[float, float],
    distractors: Distractors,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Non-overlapping centres (N, 3) zyx and class indices (N,); also the number not placed."""
    counts = _particle_counts(params, templates)
    order = np.concatenate([np.full(c, k) for k, c in enumerate(counts)]).astype(int)
    radii = np.array([t.radius_voxels for t in templates])
    # Largest first: they are the hardest to fit.
    order = order[np.argsort(-radii[order], kind="stable")]
    nz, ny, nx = params.shape
    centre = (np.array(params.shape) - 1) / 2
    placed = np.zeros((len(order), 3))
    placed_radii = np.zeros(len(order))
    classes = np.zeros(len(order), dtype=int)
    n_placed = 0
    gap = 0.5  # voxels between envelopes
    for k in order:
        radius = radii[k]
        low = np.array([slab[0] + radius, radius, radius])
        high = np.array([slab[1] - radius, ny - 1 - radius, nx - 1 - radius])
        for _attempt in range(30):
            candidates = rng.uniform(low, np.maximum(high, low), (64, 3))
            ok = np.ones(len(candidates), bool)
            if n_placed:
                distance = np.linalg.norm(candidates[:, None, :] - placed[None, :n_placed], axis=2)
                ok &= (distance >= radius + placed_radii[None, :n_placed] + gap).all(axis=1)
            if len(distractors.bead_centres):
                distance = np.linalg.norm(
                    candidates[:, None, :] - distractors.bead_centres[None], axis=2
                )
                ok &= (distance >= radius + distractors.bead_radius + gap).all(axis=1)
            if distractors.membrane is not None:
                normal, offset = distractors.membrane
                ok &= (
                    np.abs((candidates - centre) @ normal - offset)
                    >= radius + distractors.membrane_half_width
                )
            if ok.any():
                placed[n_placed] = candidates[np.argmax(ok)]
                placed_radii[n_placed] = radius
                classes[n_placed] = k
                n_placed += 1
                break
    return np.round(placed[:n_placed], 3), classes[:n_placed], len(order) - n_placed


def rotate_density(density: np.ndarray, angles: np.ndarray, shifts_zyx: np.ndarray) -> np.ndarray:
    """Copies of a centred cube rotated to RELION ``angles`` and shifted by sub-voxel amounts.

    Parameters
    ----------
    density : (B, B, B) cube, centre at (B - 1) / 2
    angles : (N, 3) rot, tilt, psi in degrees
    shifts_zyx : (N, 3) shift of each copy's centre, voxels (|shift| <= 0.5)

    Returns
    -------
    (N, B, B, B) float32: ``out[n](r) = density(A_n.T @ (r - shift_n))`` (linear interpolation)
    """
    import torch
    import torch.nn.functional as F

    size = density.shape[0]
    half = (size - 1) / 2
    transposed = relion_euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2]).transpose(0, 2, 1)
    shifts_xyz = np.asarray(shifts_zyx, dtype=np.float64)[:, ::-1]
    # affine_grid works in coordinates normalised by ``half``: g = A.T r - A.T shift / half
    affine = np.concatenate([transposed, -(transposed @ shifts_xyz[:, :, None]) / half], axis=2)
    grid = F.affine_grid(
        torch.from_numpy(affine).float(), [len(angles), 1, size, size, size], align_corners=True
    )
    source = (
        torch.from_numpy(np.ascontiguousarray(density))
        .float()[None, None]
        .expand(len(angles), 1, -1, -1, -1)
    )
    out = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[:, 0].numpy()


def _add_block(
    target: np.ndarray, block: np.ndarray, corner: np.ndarray, mode: str = "add", value=None
) -> None:
    """Add (or, for labels, paint ``value`` where ``block``) a cube at ``corner``, clipped to
    ``target``."""
    low = np.maximum(corner, 0)
    high = np.minimum(corner + np.array(block.shape), target.shape)
    if (high <= low).any():
        return
    source = block[
        tuple(slice(lo - c, hi - c) for lo, hi, c in zip(low, high, corner, strict=True))
    ]
    view = target[tuple(slice(lo, hi) for lo, hi in zip(low, high, strict=True))]
    if mode == "add":
        view += source
    else:
        view[source] = value


def render_particles(
    params: SimulationParameters,
    templates: Sequence[ParticleTemplate],
    centres: np.ndarray,
    classes: np.ndarray,
    angles: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Particle density volume (protein = 1) and the label map."""
    volume = np.zeros(params.shape, dtype=np.float32)
    labels = np.zeros(params.shape, dtype=np.uint8)
    for k, template in enumerate(templates):
        members = np.flatnonzero(classes == k)
        half = (template.density.shape[0] - 1) // 2
        # rotate in batches of at most ~8 M voxels (the sampling grid is 3 floats per voxel)
        batch = int(np.clip(8_000_000 // template.density.size, 1, 64))
        for start in range(0, len(members), batch):
            chosen = members[start : start + batch]
            whole = np.round(centres[chosen]).astype(int)
            rotated = rotate_density(template.density, angles[chosen], centres[chosen] - whole)
            for copy, corner in zip(rotated, whole - half, strict=True):
                _add_block(volume, copy, corner)
                if params.label_shape == "template":
                    _add_block(
                        labels, copy >= template.envelope_level, corner, mode="paint", value=k + 1
                    )
    if params.label_shape == "sphere":
        from cryocaps.masks import draw_spheres

        radii = np.array([templates[k].radius_voxels for k in classes])
        labels = draw_spheres(params.shape, centres, classes + 1, radii)
    return volume, labels


def render_distractors(
    shape: tuple[int, int, int], distractors: Distractors, voxel: float, slab: tuple[float, float]
) -> np.ndarray:
    """Density of the distractors, (Z, Y, X) float32: gold ``GOLD_DENSITY``, head groups
    ``MEMBRANE_DENSITY``."""
    volume = np.zeros(shape, dtype=np.float32)
    radius = distractors.bead_radius
    if len(distractors.bead_centres):
        half = int(math.ceil(radius)) + 2
        axis = np.arange(-half, half + 1, dtype=np.float32)
        for centre in distractors.bead_centres:
            whole = np.round(centre).astype(int)
            dz, dy, dx = (axis - (c - w) for c, w in zip(centre, whole, strict=True))
            distance = np.sqrt(
                dz[:, None, None] ** 2 + dy[None, :, None] ** 2 + dx[None, None, :] ** 2
            )
            bead = GOLD_DENSITY * 0.5 * (1 - np.tanh((distance - radius) / 0.5))
            _add_block(volume, bead.astype(np.float32), whole - half)
    if distractors.membrane is not None:
        normal, offset = distractors.membrane
        centre = (np.array(shape) - 1) / 2
        y = np.arange(shape[1])[:, None] - centre[1]
        x = np.arange(shape[2])[None, :] - centre[2]
        leaflet_offset = MEMBRANE_LEAFLET_OFFSET_ANGSTROM / voxel
        sigma = MEMBRANE_LEAFLET_SIGMA_ANGSTROM / voxel
        for z in range(int(math.ceil(slab[0])), int(math.floor(slab[1])) + 1):
            height = (z - centre[0]) * normal[0] + y * normal[1] + x * normal[2] - offset
            sheet = np.exp(-((height - leaflet_offset) ** 2) / (2 * sigma**2))
            sheet += np.exp(-((height + leaflet_offset) ** 2) / (2 * sigma**2))
            volume[z] += (MEMBRANE_DENSITY * sheet).astype(np.float32)
    return volume
