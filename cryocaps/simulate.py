"""Synthetic tomograms with ground truth, made the way real ones are.

One tomogram (arrays are (z, y, x), one voxel size ``v`` Å throughout):

1. **Placement.** Particles of each class get uniformly random orientations
   (uniform on SO(3)) and positions inside the sample slab, with no two
   particles' envelope spheres overlapping. Optional distractors: gold beads on
   the slab surfaces and a lipid-bilayer sheet crossing the slab.
2. **Sample.** Each class density (protein = 1) is rotated and added to a
   volume of ice (0). Orientations are RELION ZYZ Euler angles
   (rot, tilt, psi) in degrees: a particle is its class density rotated by
   ``A = relion_euler_to_matrix(rot, tilt, psi)``, i.e. the class density's
   point ``p`` (x, y, z) lies at ``A @ p`` from the particle centre.
3. **Tilt series.** Line integrals through the volume for every tilt angle,
   tilt axis along Y; tilt θ sees the point (x, z) (from the centre) at
   detector position ``u = x cos θ + z sin θ``. Computed by shearing in
   Fourier space (exact sub-voxel shifts) and summing: no loop over voxels.
4. **CTF** per tilt image (voltage, Cs, amplitude contrast, defocus), with
   the defocus gradient of a tilted specimen across the tilt axis; with
   underfocus the protein comes out dark, as in real data.
5. **Noise**: white Gaussian noise added to each tilt image. The SNR is the
   variance of the CTF-modulated projections of the particles alone (all tilt
   images, whole detector) divided by the variance of the added noise.
6. **Reconstruction** by weighted back-projection (ramp filter with a soft
   cut-off at 0.35 cycles/pixel) along the rays of step 3. The missing
   wedge, its streaks and the CTF fringes all come from the physics.

The tomogram is finally standardised (zero mean, unit standard deviation).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cryocaps.classes import ClassTable, ParticleClass
from cryocaps.errors import CryocapsError
from cryocaps.io.class_table import write_classes
from cryocaps.structures import (
    ParticleTemplate,
    builtin_templates,
    load_structure_templates,
    relion_euler_to_matrix,
)

log = logging.getLogger(__name__)

__all__ = [
    "SimulationParameters",
    "SimulatedTomogram",
    "check_parameters",
    "load_templates",
    "project_tilt_series",
    "random_orientations",
    "relion_euler_to_matrix",
    "simulate_dataset",
    "simulate_tomogram",
    "tilt_angles",
    "weighted_backprojection",
]

GOLD_RADIUS_ANGSTROM = 50.0  # 10 nm fiducials
GOLD_DENSITY = 6.0  # relative to protein (capped: real gold is denser still)
GOLD_PER_SQUARE_MICRON = 15.0  # typical fiducial density; at least one bead per tomogram
MEMBRANE_LEAFLET_OFFSET_ANGSTROM = 20.0  # head groups +-20 Å from the mid-plane
MEMBRANE_LEAFLET_SIGMA_ANGSTROM = 5.0
MEMBRANE_DENSITY = 0.5  # head groups: excess density over ice about half that of protein
RAMP_CUTOFF = 0.35  # cycles/pixel where the reconstruction filter starts to fall off
RAMP_FALLOFF = 0.05
_TAPER = 8  # samples of cosine taper at the ends of padded shear axes


@dataclass
class SimulationParameters:
    """Everything that decides a simulated data set (recorded in run.json)."""

    n_tomograms: int = 2
    shape: tuple[int, int, int] = (64, 128, 128)  # z, y, x voxels
    voxel_size_angstrom: float = 10.0
    snr: float = 0.4
    tilt_range_deg: float = 60.0
    tilt_step_deg: float = 3.0
    defocus_um: float = 3.0  # underfocus, positive
    voltage_kv: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.07
    n_particles: int | None = None  # per tomogram; None: from crowding
    crowding: float = 0.1  # fraction of the slab volume filled by envelope spheres
    slab_thickness_angstrom: float | None = None  # None: 80% of the box height
    label_shape: str = "sphere"  # or "template"
    distractors: bool = True
    seed: int = 0

    @property
    def slab_voxels(self) -> float:
        if self.slab_thickness_angstrom is None:
            return 0.8 * self.shape[0]
        return self.slab_thickness_angstrom / self.voxel_size_angstrom


@dataclass
class SimulatedTomogram:
    """One simulated tomogram and its ground truth.

    Attributes
    ----------
    name : tomogram name (``tomo_01`` …)
    tomogram : (Z, Y, X) float32, standardised, protein dark
    labels : (Z, Y, X) uint8, 0 = background, k = class label k
    particles : canonical particle table (tomo, class_name, x, y, z, score, rot, tilt, psi)
    details : numbers worth recording (noise level, counts, distractors)
    """

    name: str
    tomogram: np.ndarray
    labels: np.ndarray
    particles: pd.DataFrame
    details: dict = field(default_factory=dict)


# --- checks and inputs ----------------------------------------------------------


def check_parameters(params: SimulationParameters) -> None:
    """Refuse values that cannot make a tomogram (one-line :class:`CryocapsError`)."""
    if params.n_tomograms < 1:
        raise CryocapsError(f"--n-tomograms must be >= 1, got {params.n_tomograms}")
    if len(params.shape) != 3 or min(params.shape) < 8:
        raise CryocapsError(
            f"--shape must be three sizes Z,Y,X of at least 8 voxels, got {params.shape}"
        )
    if not params.voxel_size_angstrom > 0:
        raise CryocapsError(f"--voxel-size-angstrom must be > 0, got {params.voxel_size_angstrom}")
    if not (params.snr > 0 and math.isfinite(params.snr)):
        raise CryocapsError(f"--snr must be > 0, got {params.snr}")
    if not 0 < params.tilt_range_deg <= 90:
        raise CryocapsError(f"--tilt-range-deg must be in (0, 90], got {params.tilt_range_deg}")
    if not 0 < params.tilt_step_deg <= params.tilt_range_deg:
        raise CryocapsError(
            f"--tilt-step-deg must be in (0, --tilt-range-deg={params.tilt_range_deg:g}], got {params.tilt_step_deg}"
        )
    if not params.defocus_um > 0:
        raise CryocapsError(f"--defocus-um must be > 0 (underfocus), got {params.defocus_um}")
    if not params.voltage_kv > 0 or params.cs_mm < 0 or not 0 <= params.amplitude_contrast < 1:
        raise CryocapsError(
            "--voltage-kv must be > 0, --cs-mm >= 0 and --amplitude-contrast in [0, 1)"
        )
    if params.n_particles is not None and params.n_particles < 0:
        raise CryocapsError(f"--n-particles must be >= 0, got {params.n_particles}")
    if not 0 <= params.crowding <= 0.4:
        raise CryocapsError(
            f"--crowding must be in [0, 0.4] (fraction of the slab volume), got {params.crowding}"
        )
    if params.label_shape not in ("sphere", "template"):
        raise CryocapsError(f"--label-shape must be sphere or template, got {params.label_shape!r}")
    if not 2 <= params.slab_voxels <= params.shape[0]:
        raise CryocapsError(
            f"--slab-thickness-angstrom {params.slab_voxels * params.voxel_size_angstrom:g} must be between "
            f"2 voxels and the box height ({params.shape[0] * params.voxel_size_angstrom:g} Å)"
        )


def check_box(params: SimulationParameters, templates: Sequence[ParticleTemplate]) -> None:
    """Refuse a box (or slab) too small for the largest particle."""
    largest = max(templates, key=lambda t: t.radius_voxels)
    diameter = 2 * math.ceil(largest.radius_voxels) + 1
    room = min(params.slab_voxels, params.shape[1], params.shape[2])
    if diameter > room:
        raise CryocapsError(
            f"--shape {','.join(map(str, params.shape))}: class {largest.name!r} is {diameter} voxels across "
            f"(radius {largest.radius_angstrom:.0f} Å at {params.voxel_size_angstrom:g} Å/voxel) but the "
            f"sample slab is {params.slab_voxels:.0f} x {params.shape[1]} x {params.shape[2]} voxels; "
            "use a larger --shape or --voxel-size-angstrom"
        )


def load_templates(
    voxel_size_angstrom: float,
    structures: str | os.PathLike | None = None,
    names: Sequence[str] | None = None,
    prefer: str = "maps",
) -> list[ParticleTemplate]:
    """Built-in classes, or the maps/models in ``structures`` (optionally only ``names``)."""
    if structures is None:
        return builtin_templates(voxel_size_angstrom, names)
    return load_structure_templates(structures, voxel_size_angstrom, names=names, prefer=prefer)


def class_table(templates: Sequence[ParticleTemplate], with_templates: bool = False) -> ClassTable:
    """Labels 1..K in template order, radii measured from the densities.

    With ``with_templates`` each class names its density map ``templates/<name>.mrc``
    (relative to classes.csv), for ``make-masks --shape template``.
    """
    return ClassTable(
        [
            ParticleClass(
                k + 1,
                t.name,
                round(t.radius_angstrom, 1),
                Path("templates", f"{t.name}.mrc") if with_templates else None,
            )
            for k, t in enumerate(templates)
        ],
        "simulated classes",
    )


# --- geometry ------------------------------------------------------------------


def random_orientations(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` orientations uniform on SO(3) as RELION (rot, tilt, psi) in degrees, shape (n, 3).

    Uniform on SO(3) means rot and psi uniform and cos(tilt) uniform.
    """
    rot = rng.uniform(-180.0, 180.0, n)
    tilt = np.rad2deg(np.arccos(rng.uniform(-1.0, 1.0, n)))
    psi = rng.uniform(-180.0, 180.0, n)
    return np.stack([rot, tilt, psi], axis=1)


def tilt_angles(tilt_range_deg: float, tilt_step_deg: float) -> np.ndarray:
    """Tilt angles from -range to +range in steps (0 included), degrees."""
    n = int(math.floor(tilt_range_deg / tilt_step_deg + 1e-6))
    return np.arange(-n, n + 1) * float(tilt_step_deg)


@dataclass
class _Distractors:
    bead_centres: np.ndarray  # (N, 3) zyx voxels
    bead_radius: float  # voxels
    membrane: (
        tuple[np.ndarray, float] | None
    )  # unit normal (zyx), offset (voxels from the box centre)
    membrane_half_width: float  # voxels: particles keep this far from the mid-plane


def _make_distractors(rng, params: SimulationParameters, slab: tuple[float, float]) -> _Distractors:
    voxel = params.voxel_size_angstrom
    nz, ny, nx = params.shape
    if not params.distractors:
        return _Distractors(np.zeros((0, 3)), 0.0, None, 0.0)
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
    return _Distractors(beads, bead_radius, membrane, half_width)


def _particle_counts(
    params: SimulationParameters, templates: Sequence[ParticleTemplate]
) -> list[int]:
    n_classes = len(templates)
    if params.n_particles is not None:
        total = params.n_particles
    else:
        slab_volume = params.slab_voxels * params.shape[1] * params.shape[2]
        mean_volume = np.mean([4 / 3 * np.pi * t.radius_voxels**3 for t in templates])
        total = max(n_classes, int(round(params.crowding * slab_volume / mean_volume)))
    return [total // n_classes + (1 if k < total % n_classes else 0) for k in range(n_classes)]


def _place(
    rng,
    params: SimulationParameters,
    templates: Sequence[ParticleTemplate],
    slab: tuple[float, float],
    distractors: _Distractors,
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


# --- rendering -----------------------------------------------------------------


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
    """Add (or, for labels, paint ``value`` where ``block``) a cube at ``corner``, clipped to ``target``."""
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


def _render(
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


def _render_distractors(
    shape, distractors: _Distractors, voxel: float, slab: tuple[float, float]
) -> np.ndarray:
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
        offset_angstrom = MEMBRANE_LEAFLET_OFFSET_ANGSTROM / voxel
        sigma = MEMBRANE_LEAFLET_SIGMA_ANGSTROM / voxel
        for z in range(int(math.ceil(slab[0])), int(math.floor(slab[1])) + 1):
            height = (z - centre[0]) * normal[0] + y * normal[1] + x * normal[2] - offset
            sheet = np.exp(-((height - offset_angstrom) ** 2) / (2 * sigma**2))
            sheet += np.exp(-((height + offset_angstrom) ** 2) / (2 * sigma**2))
            volume[z] += (MEMBRANE_DENSITY * sheet).astype(np.float32)
    return volume


# --- imaging: tilt series, CTF, noise, reconstruction ---------------------------


def _fft_size(n: int) -> int:
    """Smallest size >= n with prime factors 2, 3, 5 only (fast FFTs)."""
    size = max(int(n), 2)
    while True:
        m = size
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return size
        size += 1


def _tilt_groups(tilts_deg: np.ndarray):
    """Split tilts into near-0 (shear along X, |θ| <= 45°) and near-90 (shear along Z) groups.

    For each group: (indices, stretch, shear) with detector u = stretch^-1 * sheared coordinate.
    """
    theta = np.deg2rad(np.asarray(tilts_deg, dtype=np.float64))
    low = np.abs(theta) <= np.pi / 4 + 1e-9
    groups = []
    if low.any():
        t = theta[low]
        groups.append(("x", np.flatnonzero(low), 1 / np.cos(t), np.tan(t)))
    if (~low).any():
        t = theta[~low]
        groups.append(("z", np.flatnonzero(~low), 1 / np.sin(t), 1 / np.tan(t)))
    return groups


def _interpolate_last(data, positions, valid):
    """Linear interpolation of ``data`` (T, R, L) along L at ``positions`` (T, M); 0 where not valid."""
    import torch

    length = data.shape[-1]
    base = torch.clamp(torch.floor(positions), 0, length - 2)
    weight = (positions - base).clamp(0, 1)[:, None, :]
    index = base.long()[:, None, :].expand(-1, data.shape[1], -1)
    left = torch.gather(data, 2, index)
    right = torch.gather(data, 2, index + 1)
    return (left + weight * (right - left)) * valid[:, None, :]


class _Shear:
    """Geometry shared by the projector and back-projector of one tilt group.

    The volume is seen as (S, Y, H): S summed along the beam, H sheared. Tilt t
    sees S(s) = sum_n V_n(s - n_rel * shear_t) at s = centre + stretch_t * u_rel,
    times |stretch_t| (path length per voxel).
    """

    def __init__(
        self, n_sum: int, n_shear: int, n_detector: int, stretch: np.ndarray, shear: np.ndarray
    ):
        import torch

        self.n_sum, self.n_shear, self.n_detector = n_sum, n_shear, n_detector
        reach = n_shear + n_sum * float(np.abs(shear).max())
        self.length = _fft_size(int(math.ceil(reach)) + 2 * _TAPER + 4)
        self.offset = (self.length - n_shear) // 2
        self.centre = self.offset + (n_shear - 1) / 2
        self.support = reach / 2 + 1  # |s - centre| beyond this is empty
        self.stretch = torch.from_numpy(stretch).double()
        frequency = torch.arange(self.length // 2 + 1, dtype=torch.float64)
        n_rel = torch.arange(n_sum, dtype=torch.float64) - (n_sum - 1) / 2
        turns = (
            frequency[:, None, None] * n_rel[None, :, None] * torch.from_numpy(shear)[None, None, :]
        )
        self.phase = torch.polar(torch.ones_like(turns), -2 * math.pi * turns / self.length).to(
            torch.complex64
        )
        self.u_rel = torch.arange(n_detector, dtype=torch.float64) - (n_detector - 1) / 2

    def rows_per_chunk(self, budget_bytes: int = 96 * 2**20) -> int:
        per_row = 8 * (self.length // 2 + 1) * (2 * self.n_sum + 2 * len(self.stretch))
        return max(1, budget_bytes // per_row)

    def project(self, volume) -> object:
        """(S, Y, H) float32 tensor -> (T, Y, U) line integrals."""
        import torch
        import torch.nn.functional as F

        s_rel = self.stretch[:, None] * self.u_rel[None, :]
        positions = (self.centre + s_rel).float()
        valid = (s_rel.abs() <= self.support).float()
        scale = self.stretch.abs().float()[:, None, None]
        out = torch.empty(len(self.stretch), volume.shape[1], self.n_detector)
        step = self.rows_per_chunk()
        for y0 in range(0, volume.shape[1], step):
            block = F.pad(
                volume[:, y0 : y0 + step], (self.offset, self.length - self.n_shear - self.offset)
            )
            # bmm is ~50x faster on contiguous operands than on permuted views
            spectrum = torch.fft.rfft(block, dim=-1).permute(2, 1, 0).contiguous()  # (K, y, S)
            summed = torch.bmm(spectrum, self.phase).permute(2, 1, 0)  # (T, y, K)
            sheared = torch.fft.irfft(summed, n=self.length, dim=-1)
            out[:, y0 : y0 + step] = _interpolate_last(sheared, positions, valid) * scale
        return out

    def backproject(self, projections) -> object:
        """(T, Y, U) filtered projections -> (S, Y, H) back-projection (adjoint geometry)."""
        import torch

        s_rel = torch.arange(self.length, dtype=torch.float64) - self.centre
        u = s_rel[None, :] / self.stretch[:, None] + (self.n_detector - 1) / 2
        valid = ((u >= 0) & (u <= self.n_detector - 1)).float()
        valid *= _taper(self.length)[None, :]
        positions = u.float()
        phase = self.phase.conj().permute(0, 2, 1).contiguous()  # (K, T, S)
        out = torch.empty(self.n_sum, projections.shape[1], self.n_shear)
        step = self.rows_per_chunk()
        for y0 in range(0, projections.shape[1], step):
            spread = _interpolate_last(projections[:, y0 : y0 + step], positions, valid)
            spectrum = torch.fft.rfft(spread, dim=-1).permute(2, 1, 0).contiguous()  # (K, y, T)
            summed = torch.bmm(spectrum, phase).permute(2, 1, 0)  # (S, y, K)
            full = torch.fft.irfft(summed, n=self.length, dim=-1)
            out[:, y0 : y0 + step] = full[..., self.offset : self.offset + self.n_shear]
        return out


def _taper(length: int):
    import torch

    weight = torch.ones(length)
    ramp = 0.5 - 0.5 * torch.cos(torch.linspace(0, math.pi, _TAPER + 2)[1:-1])
    weight[:_TAPER] = ramp
    weight[-_TAPER:] = ramp.flip(0)
    return weight


def project_tilt_series(volume: np.ndarray, tilts_deg: Sequence[float]) -> np.ndarray:
    """Line integrals of a (Z, Y, X) volume for each tilt about the Y axis.

    Returns
    -------
    (T, Y, X) float32: projection t at detector column u (from the centre)
    integrates the points with x cos θ + z sin θ = u, in voxel units.
    """
    import torch

    data = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
    nz, ny, nx = data.shape
    out = torch.empty(len(tilts_deg), ny, nx)
    for axis, index, stretch, shear in _tilt_groups(np.asarray(tilts_deg)):
        if axis == "x":
            out[index] = _Shear(nz, nx, nx, stretch, shear).project(data)
        else:
            out[index] = _Shear(nx, nz, nx, stretch, shear).project(
                data.permute(2, 1, 0).contiguous()
            )
    return out.numpy()


def weighted_backprojection(
    projections: np.ndarray, tilts_deg: Sequence[float], n_z: int
) -> np.ndarray:
    """Weighted back-projection of a (T, Y, X) tilt series (tilt axis Y) into (n_z, Y, X).

    Each image is ramp-filtered across the tilt axis (with a soft cut-off at
    ``RAMP_CUTOFF`` cycles/pixel) and smeared back along its rays.
    """
    import torch

    data = torch.from_numpy(np.ascontiguousarray(projections, dtype=np.float32))
    n_tilts, ny, nx = data.shape
    padded = _fft_size(2 * nx)
    frequency = torch.fft.rfftfreq(padded)
    weight = frequency.abs().clamp(min=0.25 / padded)
    weight *= torch.exp(-((frequency - RAMP_CUTOFF).clamp(min=0) ** 2) / (2 * RAMP_FALLOFF**2))
    filtered = torch.fft.irfft(torch.fft.rfft(data, n=padded, dim=-1) * weight, n=padded, dim=-1)[
        ..., :nx
    ]
    filtered = filtered.contiguous()
    volume = torch.zeros(n_z, ny, nx)
    for axis, index, stretch, shear in _tilt_groups(np.asarray(tilts_deg)):
        subset = filtered[torch.from_numpy(index)]
        if axis == "x":
            volume += _Shear(n_z, nx, nx, stretch, shear).backproject(subset)
        else:
            volume += _Shear(nx, n_z, nx, stretch, shear).backproject(subset).permute(2, 1, 0)
    return volume.numpy()


def electron_wavelength_angstrom(voltage_kv: float) -> float:
    """Relativistic electron wavelength in Å."""
    volts = voltage_kv * 1e3
    return 12.2643 / math.sqrt(volts * (1 + 0.978466e-6 * volts))


def ctf_2d(
    shape: tuple[int, int],
    voxel_size_angstrom: float,
    params: SimulationParameters,
    defocus_angstrom: float | None = None,
) -> np.ndarray:
    """CTF on the rfft2 grid of a (Y, X) image; negative at low frequency (dark protein).

    CTF(k) = -(sqrt(1 - A^2) sin chi + A cos chi),
    chi = pi lambda df k^2 - pi/2 Cs lambda^3 k^4, df > 0 underfocus
    (``defocus_angstrom``, default ``params.defocus_um``).
    """
    wavelength = electron_wavelength_angstrom(params.voltage_kv)
    ky = np.fft.fftfreq(shape[0], d=voxel_size_angstrom)[:, None]
    kx = np.fft.rfftfreq(shape[1], d=voxel_size_angstrom)[None, :]
    k2 = kx**2 + ky**2
    defocus = params.defocus_um * 1e4 if defocus_angstrom is None else defocus_angstrom
    cs = params.cs_mm * 1e7
    chi = np.pi * wavelength * defocus * k2 - 0.5 * np.pi * cs * wavelength**3 * k2**2
    amplitude = params.amplitude_contrast
    return (-(np.sqrt(1 - amplitude**2) * np.sin(chi) + amplitude * np.cos(chi))).astype(np.float32)


def apply_ctf(images: np.ndarray, tilts_deg: Sequence[float], params: SimulationParameters) -> np.ndarray:
    """The CTF of each tilt image of a (T, Y, X) stack, defocus varying across the tilt axis.

    A specimen tilted by θ is nearer to focus on one side of the tilt axis:
    column u (Å from the axis) has defocus ``df + u tan θ`` (but no farther from
    ``df`` than the deepest point of the box, so that it stays finite near 90°). Each image is
    filtered at a few defocus values (phase steps of at most 0.25 rad at
    Nyquist) and the columns blended linearly between them.
    """
    voxel = params.voxel_size_angstrom
    n_tilts, ny, nx = images.shape
    nyquist = 0.5 / voxel
    step = 0.25 / (np.pi * electron_wavelength_angstrom(params.voltage_kv) * nyquist**2)
    u_angstrom = (np.arange(nx) - (nx - 1) / 2) * voxel
    columns = np.arange(nx)
    out = np.empty_like(images, dtype=np.float32)
    for t, tilt in enumerate(tilts_deg):
        spectrum = np.fft.rfft2(images[t])
        # bounded by the deepest point of the box at this tilt (finite near 90°)
        theta = np.deg2rad(tilt)
        reach = (abs(np.sin(theta)) * nx + abs(np.cos(theta)) * params.shape[0]) * voxel / 2
        offset = np.clip(u_angstrom * np.tan(np.deg2rad(tilt)), -reach, reach)
        defocus = params.defocus_um * 1e4 + offset
        low, high = float(defocus.min()), float(defocus.max())
        n_levels = int(np.ceil((high - low) / step)) + 1 if high - low > 1e-3 else 1
        levels = np.linspace(low, high, n_levels)
        filtered = np.stack(
            [np.fft.irfft2(spectrum * ctf_2d((ny, nx), voxel, params, d), s=(ny, nx)) for d in levels]
        )
        if n_levels == 1:
            out[t] = filtered[0]
            continue
        position = (defocus - low) / (high - low) * (n_levels - 1)
        base = np.clip(np.floor(position).astype(int), 0, n_levels - 2)
        weight = (position - base)[None, :]
        out[t] = (1 - weight) * filtered[base, :, columns].T + weight * filtered[base + 1, :, columns].T
    return out


# --- one tomogram --------------------------------------------------------------


def simulate_tomogram(
    templates: Sequence[ParticleTemplate],
    params: SimulationParameters,
    rng: np.random.Generator,
    name: str = "tomo_01",
) -> SimulatedTomogram:
    """Simulate one tomogram (see the module docstring for the steps)."""
    timings = {}
    started = time.perf_counter()
    nz = params.shape[0]
    slab_centre = (nz - 1) / 2
    slab = (slab_centre - params.slab_voxels / 2 + 0.5, slab_centre + params.slab_voxels / 2 - 0.5)
    distractors = _make_distractors(rng, params, slab)
    centres, classes, n_missing = _place(rng, params, templates, slab, distractors)
    angles = random_orientations(rng, len(centres))
    if n_missing:
        log.warning(
            "%s: %d particles did not fit (lower --crowding or --n-particles, or use a larger --shape); placed %d",
            name,
            n_missing,
            len(centres),
        )
    particles_volume, labels = _render(params, templates, centres, classes, angles)
    has_clutter = len(distractors.bead_centres) > 0 or distractors.membrane is not None
    clutter = (
        _render_distractors(params.shape, distractors, params.voxel_size_angstrom, slab) if has_clutter else None
    )
    timings["render"] = time.perf_counter() - started

    tilts = tilt_angles(params.tilt_range_deg, params.tilt_step_deg)
    step = time.perf_counter()
    signal = apply_ctf(project_tilt_series(particles_volume, tilts), tilts, params)
    signal_variance = float(signal.var())
    if clutter is not None:
        signal += apply_ctf(project_tilt_series(clutter, tilts), tilts, params)
        del clutter
    if not signal_variance > 0:  # no particles: scale the noise to the clutter, or to 1
        signal_variance = float(signal.var()) or 1.0
    noise_sigma = math.sqrt(signal_variance / params.snr)
    signal += rng.standard_normal(signal.shape, dtype=np.float32) * np.float32(noise_sigma)
    timings["tilt_series"] = time.perf_counter() - step

    step = time.perf_counter()
    tomogram = weighted_backprojection(signal, tilts, nz)
    tomogram -= tomogram.mean()
    tomogram /= tomogram.std() or 1.0
    timings["reconstruction"] = time.perf_counter() - step

    class_names = [templates[k].name for k in classes]
    particles = pd.DataFrame(
        {
            "tomo": name,
            "class_name": pd.Series(class_names, dtype=str),
            "x": centres[:, 2],
            "y": centres[:, 1],
            "z": centres[:, 0],
            "score": 1.0,
            "rot": np.round(angles[:, 0], 3),
            "tilt": np.round(angles[:, 1], 3),
            "psi": np.round(angles[:, 2], 3),
        }
    )
    details = {
        "n_particles": len(particles),
        "n_not_placed": n_missing,
        "per_class": {t.name: int((classes == k).sum()) for k, t in enumerate(templates)},
        "n_tilts": len(tilts),
        "noise_sigma": noise_sigma,
        "signal_variance": signal_variance,
        "gold_beads": len(distractors.bead_centres),
        "membrane": distractors.membrane is not None,
        "timings_seconds": timings,
    }
    return SimulatedTomogram(name, tomogram.astype(np.float32), labels, particles, details)


# --- a data set on disk ------------------------------------------------------------


def tomogram_names(n: int) -> list[str]:
    width = max(2, len(str(n)))
    return [f"tomo_{i + 1:0{width}d}" for i in range(n)]


PARTICLE_FILES = {  # file name -> format of cryocaps.io.particles
    "particles.csv": "csv",
    "particles.star": "relion5",
    "particles_stopgap.star": "stopgap",
}


def output_paths(
    out_dir: Path, n_tomograms: int, preview: bool = False, class_names: Sequence[str] = ()
) -> list[Path]:
    names = tomogram_names(n_tomograms)
    paths = [out_dir / name for name in PARTICLE_FILES] + [out_dir / "tomograms.star", out_dir / "classes.csv"]
    paths += [out_dir / "templates" / f"{name}.mrc" for name in class_names]
    paths += [out_dir / "tomograms" / f"{n}.mrc" for n in names]
    paths += [out_dir / "labels" / f"{n}.mrc" for n in names]
    if preview:
        paths += [out_dir / f"preview_{n}.png" for n in names]
    return paths


def simulate_dataset(
    out_dir: str | os.PathLike,
    templates: Sequence[ParticleTemplate],
    params: SimulationParameters,
    *,
    overwrite: bool = False,
    preview: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Simulate ``params.n_tomograms`` tomograms and write them with their ground truth.

    Writes ``tomograms/<name>.mrc``, ``labels/<name>.mrc``, ``particles.csv``,
    ``particles.star`` (RELION 5) with ``tomograms.star``, ``particles_stopgap.star``,
    ``templates/<class>.mrc`` (each class's density), ``classes.csv`` (and ``preview_<name>.png`` with ``preview``) into
    ``out_dir``; returns a summary (paths, counts, timings) for run.json.
    """
    from cryocaps.io.particles import write_particles, write_tomograms_star
    from cryocaps.io.volumes import TomogramInfo, write_volume

    out_dir = Path(out_dir)
    check_parameters(params)
    check_box(params, templates)
    planned = output_paths(out_dir, params.n_tomograms, preview, [t.name for t in templates])
    existing = [p for p in planned if p.exists()]
    if existing and not overwrite:
        raise CryocapsError(f"{existing[0]} exists; pass --overwrite to replace it")
    stale = sorted(
        (set((out_dir / "tomograms").glob("*.mrc")) | set((out_dir / "labels").glob("*.mrc"))) - set(planned)
    )
    if stale:
        log.warning("%s holds %d MRC file(s) this run does not write, e.g. %s", out_dir, len(stale), stale[0])
    table = class_table(templates, with_templates=True)
    seeds = np.random.SeedSequence(params.seed).spawn(params.n_tomograms)
    outputs, tables, details = [], [], {}
    for name, seed in zip(tomogram_names(params.n_tomograms), seeds, strict=True):
        started = time.perf_counter()
        result = simulate_tomogram(templates, params, np.random.default_rng(seed), name)
        outputs.append(
            write_volume(
                out_dir / "tomograms" / f"{name}.mrc",
                result.tomogram,
                params.voxel_size_angstrom,
                overwrite=overwrite,
            )
        )
        outputs.append(
            write_volume(
                out_dir / "labels" / f"{name}.mrc",
                result.labels,
                params.voxel_size_angstrom,
                dtype="uint8",
                overwrite=overwrite,
            )
        )
        if preview:
            outputs.append(
                write_preview(
                    out_dir / f"preview_{name}.png", result.tomogram, result.labels, name, overwrite
                )
            )
        tables.append(result.particles)
        result.details["seconds"] = time.perf_counter() - started
        details[name] = result.details
        log.info(
            "%s: %d particles in %.1f s",
            name,
            result.details["n_particles"],
            result.details["seconds"],
        )
        if progress is not None:
            progress(f"{name}: {result.details['n_particles']} particles")
    particles = pd.concat(tables, ignore_index=True)
    infos = [TomogramInfo(name, params.shape, params.voxel_size_angstrom) for name in details]
    for file_name, format in PARTICLE_FILES.items():
        outputs.append(
            write_particles(
                particles, out_dir / file_name, format=format, tomograms=infos, classes=table, overwrite=overwrite
            )
        )
    outputs.append(
        write_tomograms_star(
            out_dir / "tomograms.star",
            infos,
            tomogram_paths=[f"tomograms/{info.name}.mrc" for info in infos],
            voltage_kv=params.voltage_kv,
            cs_mm=params.cs_mm,
            amplitude_contrast=params.amplitude_contrast,
            overwrite=overwrite,
        )
    )
    for template in templates:
        outputs.append(
            write_volume(
                out_dir / "templates" / f"{template.name}.mrc",
                template.density,
                params.voxel_size_angstrom,
                overwrite=overwrite,
            )
        )
    outputs.append(write_classes(table, out_dir / "classes.csv", overwrite=True))
    return {
        "outputs": [str(p) for p in outputs],
        "classes": table.to_records(),
        "class_sources": {t.name: t.source for t in templates},
        "tomograms": details,
        "n_particles": len(particles),
        "parameters": asdict(params) | {"slab_thickness_voxels": params.slab_voxels},
        "conventions": {
            "snr": "variance of the CTF-modulated projections of the particles alone (all tilt "
            "images, whole detector) / variance of the added white noise",
            "angles": "RELION ZYZ rot, tilt, psi in degrees: a particle is its class density "
            "rotated by A = Euler_angles2matrix(rot, tilt, psi), particle(x) = density(A.T x)",
            "tilt_axis": "Y; tilt θ sees (x, z) from the centre at detector u = x cos θ + z sin θ",
            "contrast": "protein dark (CTF with underfocus); tomograms standardised to mean 0, std 1",
        },
    }


def write_preview(
    path: Path, tomogram: np.ndarray, labels: np.ndarray, title: str, overwrite: bool = False
) -> Path:
    """PNG of the central XY and XZ slices of a tomogram, and the XY labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cryocaps.io.files import atomic_path

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
    axes[0, 1].imshow(labels[nz // 2], cmap=label_colours, vmin=0, vmax=top, interpolation="nearest")
    axes[0, 1].set_title("labels, same slice")
    axes[1, 0].imshow(xz, cmap="gray", vmin=low, vmax=high)
    axes[1, 0].set_title(f"XZ slice y={ny // 2} (tilt axis Y: wedge along Z)")
    axes[1, 1].imshow(labels[:, ny // 2], cmap=label_colours, vmin=0, vmax=top, interpolation="nearest")
    for axis in axes.ravel():
        axis.set_xticks([])
        axis.set_yticks([])
    figure.tight_layout()
    with atomic_path(path, overwrite=overwrite) as tmp:
        figure.savefig(tmp, dpi=80, format="png")
    plt.close(figure)
    return path
