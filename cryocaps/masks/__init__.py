"""Label maps from particle coordinates: spheres (default), Gaussian soft targets, templates.

Label maps are (Z, Y, X) uint8, 0 = background, class labels from the class
table, :data:`IGNORE_LABEL` (255) = unknown (``make-masks --unannotated unknown`` or
``candidates``).
Gaussian soft targets are (C, Z, Y, X) float16 with C = number of labels
(channel 0 = background = 1 - the particle channels), like the probability maps
``segment`` writes.

- :mod:`~cryocaps.masks.draw`: the painter (nearest centre wins), spheres, Gaussians
- :mod:`~cryocaps.masks.templates`: density maps rotated by RELION angles, thresholded
- :mod:`~cryocaps.masks.candidates`: particle-like places nobody annotated
- :mod:`~cryocaps.masks.plan`: tomogram geometry, voxel sizes, labels, particles per tomogram
- :mod:`~cryocaps.masks.make`: :func:`make_masks`, the whole command as one call
"""

from cryocaps.classes import IGNORE_LABEL
from cryocaps.masks.draw import (
    GAUSSIAN_REACH_SIGMAS,
    GAUSSIAN_SIGMA_PER_RADIUS,
    draw_gaussians,
    draw_spheres,
    paint_particles,
    soft_targets,
)
from cryocaps.masks.make import (
    SHAPES,
    UNANNOTATED,
    UNANNOTATED_SHELL_RADII,
    draw_mask,
    make_masks,
    read_labelled_particles,
)
from cryocaps.masks.plan import (
    MaskPlan,
    assign_labels,
    check_voxel_sizes,
    plan_masks,
    tomogram_geometry,
)
from cryocaps.masks.templates import (
    DEFAULT_TEMPLATE_THRESHOLD,
    Template,
    draw_templates,
    load_template,
    relion_sampling_matrices,
)

__all__ = [
    "DEFAULT_TEMPLATE_THRESHOLD",
    "GAUSSIAN_REACH_SIGMAS",
    "GAUSSIAN_SIGMA_PER_RADIUS",
    "IGNORE_LABEL",
    "SHAPES",
    "UNANNOTATED",
    "UNANNOTATED_SHELL_RADII",
    "MaskPlan",
    "Template",
    "assign_labels",
    "check_voxel_sizes",
    "draw_gaussians",
    "draw_mask",
    "draw_spheres",
    "draw_templates",
    "load_template",
    "make_masks",
    "paint_particles",
    "plan_masks",
    "read_labelled_particles",
    "relion_sampling_matrices",
    "soft_targets",
    "tomogram_geometry",
]
