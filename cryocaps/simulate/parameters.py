"""What decides a simulated data set, and the checks that refuse impossible values.

Imports nothing heavy: the CLI reads its defaults from :class:`SimulationParameters`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryocaps.errors import CryocapsError
from cryocaps.runtime import physical_memory_bytes

if TYPE_CHECKING:
    from cryocaps.structures import ParticleTemplate

__all__ = ["SimulationParameters", "check_box", "check_memory", "check_parameters", "parse_shape"]

# The simulator holds several float32 copies of a tomogram at once (the volume, its
# back-projection, the label map, noise): peak memory measured 437 MB at 64x128x128 and
# 660 MB at 64x256x256, ~70 bytes per added voxel. A box needing more than this floor per
# voxel cannot fit in the machine's memory, so it is refused before anything is computed.
BYTES_PER_VOXEL_FLOOR = 16
MIN_SIDE = 8


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
    blur_angstrom: float = 0.0  # Gaussian blur of the tilt images (std dev), Å; 0 = none
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


def parse_shape(text: str, flag: str = "--shape") -> tuple[int, int, int]:
    """``"Z,Y,X"`` (or ``ZxYxX``) -> three sizes of at least :data:`MIN_SIDE` voxels."""
    example = f"expected three integers Z,Y,X of at least {MIN_SIDE}, e.g. 64,128,128"
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise CryocapsError(f"{flag} {text!r}: {example}") from None
    if len(values) != 3 or min(values) < MIN_SIDE:
        raise CryocapsError(f"{flag} {text!r}: {example}")
    return values  # type: ignore[return-value]


def check_memory(shape: Sequence[int], flag: str = "--shape") -> None:
    """Refuse a tomogram too large to simulate in this machine's memory."""
    memory = physical_memory_bytes()
    needed = math.prod(shape) * BYTES_PER_VOXEL_FLOOR
    if memory is not None and needed > memory:
        raise CryocapsError(
            f"{flag} {','.join(map(str, shape))}: simulating {math.prod(shape):.3g} voxels needs "
            f"more than {needed / 2**30:.3g} GiB of memory ({BYTES_PER_VOXEL_FLOOR} bytes a voxel "
            f"at least); this machine has {memory / 2**30:.3g} GiB. Use a smaller {flag}"
        )


def check_parameters(params: SimulationParameters) -> None:
    """Refuse values that cannot make a tomogram (one-line :class:`CryocapsError`)."""
    numbers = {
        "--voxel-size-angstrom": params.voxel_size_angstrom,
        "--snr": params.snr,
        "--tilt-range-deg": params.tilt_range_deg,
        "--tilt-step-deg": params.tilt_step_deg,
        "--defocus-um": params.defocus_um,
        "--voltage-kv": params.voltage_kv,
        "--cs-mm": params.cs_mm,
        "--amplitude-contrast": params.amplitude_contrast,
        "--crowding": params.crowding,
        "--slab-thickness-angstrom": params.slab_thickness_angstrom,
    }
    for flag, value in numbers.items():
        if value is not None and not math.isfinite(value):
            raise CryocapsError(f"{flag} {value}: not a finite number")
    if params.n_tomograms < 1:
        raise CryocapsError(f"--n-tomograms must be >= 1, got {params.n_tomograms}")
    if len(params.shape) != 3 or min(params.shape) < MIN_SIDE:
        raise CryocapsError(
            f"--shape must be three sizes Z,Y,X of at least {MIN_SIDE} voxels, got {params.shape}"
        )
    check_memory(params.shape)
    if not params.voxel_size_angstrom > 0:
        raise CryocapsError(f"--voxel-size-angstrom must be > 0, got {params.voxel_size_angstrom}")
    if not (params.snr > 0 and math.isfinite(params.snr)):
        raise CryocapsError(f"--snr must be > 0, got {params.snr}")
    if not 0 < params.tilt_range_deg <= 90:
        raise CryocapsError(f"--tilt-range-deg must be in (0, 90], got {params.tilt_range_deg}")
    if not 0 < params.tilt_step_deg <= params.tilt_range_deg:
        raise CryocapsError(
            f"--tilt-step-deg must be in (0, --tilt-range-deg={params.tilt_range_deg:g}], "
            f"got {params.tilt_step_deg}"
        )
    if not params.defocus_um > 0:
        raise CryocapsError(f"--defocus-um must be > 0 (underfocus), got {params.defocus_um}")
    if not params.voltage_kv > 0 or params.cs_mm < 0 or not 0 <= params.amplitude_contrast < 1:
        raise CryocapsError(
            "--voltage-kv must be > 0, --cs-mm >= 0 and --amplitude-contrast in [0, 1)"
        )
    if not (params.blur_angstrom >= 0 and math.isfinite(params.blur_angstrom)):
        raise CryocapsError(f"--blur-angstrom must be >= 0, got {params.blur_angstrom}")
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
            f"--slab-thickness-angstrom {params.slab_voxels * params.voxel_size_angstrom:g} "
            "must be between "
            f"2 voxels and the box height ({params.shape[0] * params.voxel_size_angstrom:g} Å)"
        )


def check_box(params: SimulationParameters, templates: Sequence[ParticleTemplate]) -> None:
    """Refuse a box (or slab) too small for the largest particle."""
    largest = max(templates, key=lambda t: t.radius_voxels)
    diameter = 2 * math.ceil(largest.radius_voxels) + 1
    room = min(params.slab_voxels, params.shape[1], params.shape[2])
    if diameter > room:
        raise CryocapsError(
            f"--shape {','.join(map(str, params.shape))}: class {largest.name!r} is "
            f"{diameter} voxels across (radius {largest.radius_angstrom:.0f} Å at "
            f"{params.voxel_size_angstrom:g} Å/voxel) but the sample slab is "
            f"{params.slab_voxels:.0f} x {params.shape[1]} x {params.shape[2]} voxels; "
            "use a larger --shape or --voxel-size-angstrom"
        )
    if params.n_particles is not None:
        # more envelope volume than the slab holds can never be placed (the placement would
        # try every particle in vain, and keep a table of them all)
        mean_volume = sum(4 / 3 * math.pi * t.radius_voxels**3 for t in templates) / len(templates)
        fits = int(params.slab_voxels * params.shape[1] * params.shape[2] / mean_volume)
        if params.n_particles > fits:
            raise CryocapsError(
                f"--n-particles {params.n_particles}: the sample slab "
                f"({params.slab_voxels:.0f} x {params.shape[1]} x {params.shape[2]} voxels) holds "
                f"the envelopes of at most {fits} particles of these classes; use a smaller "
                "--n-particles or a larger --shape"
            )
