"""Synthetic tomograms with ground truth, made the way real ones are.

One tomogram (arrays are (z, y, x), one voxel size throughout):

1. **Placement** (:mod:`.placement`): particles of each class at uniformly random
   orientations and non-overlapping positions inside the sample slab, optional
   gold beads and a membrane; rendered into a density volume (protein = 1, ice 0)
   and a label map. Orientations are RELION ZYZ Euler angles (rot, tilt, psi):
   a particle is its class density rotated by ``relion_euler_to_matrix(rot, tilt, psi)``.
2. **Imaging** (:mod:`.imaging`): tilt series (tilt axis Y), CTF with the defocus
   gradient of a tilted specimen, white noise at the requested SNR, weighted
   back-projection; the tomogram is standardised (mean 0, std 1), protein dark.
3. **Data set** (:mod:`.dataset`): tomograms, label maps, particle files
   (CSV, RELION 5, STOPGAP), classes.csv and the class densities on disk.

What decides a data set is :class:`SimulationParameters` (:mod:`.parameters`,
light enough for the CLI to read its defaults from). The names below are
imported on first use, so ``import cryocaps.simulate.parameters`` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryocaps.simulate.dataset import (
        class_table,
        load_templates,
        simulate_dataset,
        tomogram_names,
    )
    from cryocaps.simulate.imaging import (
        apply_ctf,
        ctf_2d,
        project_tilt_series,
        tilt_angles,
        weighted_backprojection,
    )
    from cryocaps.simulate.parameters import SimulationParameters, check_parameters
    from cryocaps.simulate.placement import random_orientations, rotate_density
    from cryocaps.simulate.tomogram import SimulatedTomogram, simulate_tomogram

_MODULE_OF = {
    "SimulationParameters": "parameters",
    "check_parameters": "parameters",
    "random_orientations": "placement",
    "rotate_density": "placement",
    "apply_ctf": "imaging",
    "ctf_2d": "imaging",
    "project_tilt_series": "imaging",
    "tilt_angles": "imaging",
    "weighted_backprojection": "imaging",
    "SimulatedTomogram": "tomogram",
    "simulate_tomogram": "tomogram",
    "class_table": "dataset",
    "load_templates": "dataset",
    "simulate_dataset": "dataset",
    "tomogram_names": "dataset",
}

__all__ = [
    "SimulatedTomogram",
    "SimulationParameters",
    "apply_ctf",
    "check_parameters",
    "class_table",
    "ctf_2d",
    "load_templates",
    "project_tilt_series",
    "random_orientations",
    "rotate_density",
    "simulate_dataset",
    "simulate_tomogram",
    "tilt_angles",
    "tomogram_names",
    "weighted_backprojection",
]


def __getattr__(name: str):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
