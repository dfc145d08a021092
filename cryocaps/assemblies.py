"""Assemblies of point-like subunits: rings, stacked rings, helical filament segments, shells.

Each subunit is a sphere of a few Å to a couple of voxels: what an assembly looks
like in a tomogram is the arrangement, not the subunit. Positions are x, y, z in Å
from the assembly's centre; the ring axis (and the filament axis) is local z.
:func:`cryocaps.structures.shapes_template` renders them at any voxel size; the
named ones (``ASSEMBLY_SHAPES``) can be asked for by name as built-in classes
(``simulate --classes-from ring,shell``; :func:`named_templates`), but are not among
the default classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cryocaps.errors import CryocapsError
from cryocaps.structures import (
    BUILTIN_SHAPES,
    ParticleTemplate,
    builtin_template,
    builtin_templates,
    shapes_template,
)

__all__ = [
    "ASSEMBLY_SHAPES",
    "Subunit",
    "filament_segment",
    "hollow_shell",
    "named_templates",
    "stacked_rings",
    "subunit_ring",
]


@dataclass(frozen=True)
class Subunit:
    """A sphere: one point-like subunit of an assembly."""

    centre: tuple[float, float, float]  # x, y, z in Å from the assembly's centre
    radius_angstrom: float

    def distance(self, points: np.ndarray) -> np.ndarray:
        """Signed distance (Å) of (..., 3) x, y, z points from the surface, negative inside."""
        return np.linalg.norm(points - np.array(self.centre), axis=-1) - self.radius_angstrom

    @property
    def reach(self) -> float:
        """Farthest distance from the origin the subunit reaches, Å."""
        return float(np.linalg.norm(self.centre)) + self.radius_angstrom


def _subunit(centre, radius_angstrom: float) -> Subunit:
    return Subunit(tuple(float(c) for c in centre), float(radius_angstrom))


def subunit_ring(
    n_subunits: int,
    ring_radius_angstrom: float,
    subunit_radius_angstrom: float,
    *,
    z_angstrom: float = 0.0,
    phase_deg: float = 0.0,
) -> list[Subunit]:
    """``n_subunits`` spheres evenly spaced on a circle in the plane ``z = z_angstrom``."""
    angles = np.deg2rad(phase_deg) + 2 * np.pi * np.arange(n_subunits) / n_subunits
    return [
        _subunit((ring_radius_angstrom * np.cos(a), ring_radius_angstrom * np.sin(a), z_angstrom),
                 subunit_radius_angstrom)
        for a in angles
    ]  # fmt: skip


def stacked_rings(
    n_rings: int,
    n_subunits: int,
    ring_radius_angstrom: float,
    subunit_radius_angstrom: float,
    ring_spacing_angstrom: float,
) -> list[Subunit]:
    """A barrel: ``n_rings`` rings stacked along z, each turned half a subunit from the last."""
    shapes = []
    for k in range(n_rings):
        z = (k - (n_rings - 1) / 2) * ring_spacing_angstrom
        phase = 180.0 / n_subunits * (k % 2)
        shapes += subunit_ring(
            n_subunits, ring_radius_angstrom, subunit_radius_angstrom, z_angstrom=z,
            phase_deg=phase,
        )  # fmt: skip
    return shapes


def filament_segment(
    n_subunits: int,
    helix_radius_angstrom: float,
    rise_angstrom: float,
    twist_deg: float,
    subunit_radius_angstrom: float,
) -> list[Subunit]:
    """A helical filament segment along z: subunit k at angle k x twist, height k x rise."""
    heights = (np.arange(n_subunits) - (n_subunits - 1) / 2) * rise_angstrom
    angles = np.deg2rad(twist_deg) * np.arange(n_subunits)
    return [
        _subunit((helix_radius_angstrom * np.cos(a), helix_radius_angstrom * np.sin(a), z),
                 subunit_radius_angstrom)
        for a, z in zip(angles, heights, strict=True)
    ]  # fmt: skip


def hollow_shell(
    n_subunits: int, shell_radius_angstrom: float, subunit_radius_angstrom: float
) -> list[Subunit]:
    """``n_subunits`` spheres spread evenly over a sphere's surface (a Fibonacci lattice)."""
    k = np.arange(n_subunits) + 0.5
    z = 1 - 2 * k / n_subunits
    rho = np.sqrt(1 - z**2)
    phi = np.pi * (3 - np.sqrt(5)) * k  # the golden angle: no two rows line up
    points = shell_radius_angstrom * np.stack([rho * np.cos(phi), rho * np.sin(phi), z], axis=1)
    return [_subunit(p, subunit_radius_angstrom) for p in points]


# Named assemblies for ``--classes-from`` (not in the default set of classes): sizes
# like the barrel's (~60 Å radius), subunits of ~12 Å (about a voxel at 10 Å).
ASSEMBLY_SHAPES: dict[str, list] = {
    "ring": subunit_ring(12, 55.0, 12.0),
    "stacked-rings": stacked_rings(3, 10, 48.0, 12.0, 26.0),
    "filament": filament_segment(14, 20.0, 14.0, 166.0, 12.0),
    "shell": hollow_shell(40, 52.0, 12.0),
}


def named_templates(
    voxel_size_angstrom: float, names: Sequence[str] | None = None
) -> list[ParticleTemplate]:
    """Built-in classes and named assemblies in the order of ``names`` (default: the four
    default built-in classes), at ``voxel_size_angstrom``."""
    if not names:
        return builtin_templates(voxel_size_angstrom)
    unknown = [n for n in names if n not in BUILTIN_SHAPES and n not in ASSEMBLY_SHAPES]
    if unknown:
        raise CryocapsError(
            f"--classes-from: unknown built-in class(es) {', '.join(unknown)}; "
            f"built-in: {', '.join([*BUILTIN_SHAPES, *ASSEMBLY_SHAPES])} (or give --structures DIR)"
        )
    return [
        builtin_template(n, voxel_size_angstrom)
        if n in BUILTIN_SHAPES
        else shapes_template(n, ASSEMBLY_SHAPES[n], voxel_size_angstrom)
        for n in names
    ]
