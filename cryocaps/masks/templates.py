"""Template masks: a class's density map, rotated by each particle's RELION angles, thresholded."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from cryocaps.classes import ParticleClass
from cryocaps.errors import CryocapsError
from cryocaps.masks.draw import paint_particles

DEFAULT_TEMPLATE_THRESHOLD = 0.2


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
    inside_voxels : how many voxels are inside (the particle's label volume, unrotated)
    """

    density: np.ndarray
    threshold: float
    centre_zyx: np.ndarray | None = None
    reach_voxels: float = field(init=False)
    inside_voxels: int = field(init=False)

    def __post_init__(self) -> None:
        if self.centre_zyx is None:
            self.centre_zyx = np.array(self.density.shape) // 2
        self.centre_zyx = np.asarray(self.centre_zyx, dtype=float)
        inside = np.argwhere(self.density > self.threshold)
        if len(inside) == 0:
            raise CryocapsError("template is empty at this threshold; lower --template-threshold")
        self.inside_voxels = len(inside)
        self.reach_voxels = (
            float(np.sqrt(((inside - self.centre_zyx) ** 2).sum(axis=1).max())) + 1.0
        )


def load_template(
    particle_class: ParticleClass,
    voxel_size_angstrom: float,
    threshold_fraction: float = DEFAULT_TEMPLATE_THRESHOLD,
) -> Template:
    """Read a class's template map, bring it to ``voxel_size_angstrom`` (Fourier), threshold at
    a fraction of its maximum."""
    from cryocaps.io.volumes import read_tomogram
    from cryocaps.preprocess import fourier_rescale

    if particle_class.template is None:
        raise CryocapsError(
            f"class {particle_class.name!r} has no template; add a template column (MRC path) to "
            "classes.csv or use --shape sphere"
        )
    if not 0 < threshold_fraction < 1:
        raise CryocapsError(
            f"--template-threshold must be between 0 and 1, got {threshold_fraction}"
        )
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
            f"{particle_class.template}: template has no positive density "
            "(particles should be bright); "
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
