"""Label maps and probability maps -> particle coordinates (one pick per particle).

:mod:`~cryocaps.picking.pick` picks label maps and files; :mod:`~cryocaps.picking.methods`
holds the three methods (components, meanshift, peaks).
"""

from cryocaps.picking.methods import MEANSHIFT_MAX_POINTS, Pick, sphere_volume_voxels
from cryocaps.picking.pick import (
    DEFAULT_METHOD,
    DEFAULT_MIN_SIZE_FRACTION,
    DEFAULT_RELATIVE_MIN_SIZE,
    METHODS,
    find_label_maps,
    pick_files,
    pick_particles,
    summary_by_class,
)

__all__ = [
    "DEFAULT_METHOD",
    "DEFAULT_MIN_SIZE_FRACTION",
    "DEFAULT_RELATIVE_MIN_SIZE",
    "MEANSHIFT_MAX_POINTS",
    "METHODS",
    "Pick",
    "find_label_maps",
    "pick_files",
    "pick_particles",
    "sphere_volume_voxels",
    "summary_by_class",
]
