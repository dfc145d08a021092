"""Label maps and probability maps -> particle coordinates (one pick per particle).

:mod:`~cryocaps.picking.pick` picks label maps and files; :mod:`~cryocaps.picking.methods`
holds the three methods (components, meanshift, peaks).
"""

from cryocaps.classes import sphere_volume_voxels
from cryocaps.picking.methods import MAX_SPLITS, MEANSHIFT_MAX_POINTS, Picks, SizeLimits
from cryocaps.picking.pick import (
    DEFAULT_MAX_SIZE_FACTOR,
    DEFAULT_METHOD,
    DEFAULT_MIN_SIZE_FRACTION,
    DEFAULT_RELATIVE_MIN_SIZE,
    METHODS,
    find_label_maps,
    pick_files,
    pick_particles,
    scored_by_size,
    size_limits,
    summary_by_class,
)

__all__ = [
    "DEFAULT_MAX_SIZE_FACTOR",
    "DEFAULT_METHOD",
    "DEFAULT_MIN_SIZE_FRACTION",
    "DEFAULT_RELATIVE_MIN_SIZE",
    "MAX_SPLITS",
    "MEANSHIFT_MAX_POINTS",
    "METHODS",
    "Picks",
    "SizeLimits",
    "find_label_maps",
    "pick_files",
    "pick_particles",
    "scored_by_size",
    "size_limits",
    "sphere_volume_voxels",
    "summary_by_class",
]
