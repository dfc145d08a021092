"""One simulated tomogram with its ground truth: the sample, its tilt series, the reconstruction."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cryocaps.simulate.imaging import noisy_tilt_series, reconstruct, tilt_angles
from cryocaps.simulate.parameters import SimulationParameters
from cryocaps.simulate.placement import (
    make_distractors,
    place_particles,
    random_orientations,
    render_distractors,
    render_particles,
    slab_bounds,
)
from cryocaps.structures import ParticleTemplate

log = logging.getLogger(__name__)

__all__ = ["SimulatedTomogram", "simulate_tomogram"]


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


def simulate_tomogram(
    templates: Sequence[ParticleTemplate],
    params: SimulationParameters,
    rng: np.random.Generator,
    name: str = "tomo_01",
) -> SimulatedTomogram:
    """Simulate one tomogram: place and render the sample, record its tilt series, reconstruct.

    The steps are described in :mod:`cryocaps.simulate.placement` and
    :mod:`cryocaps.simulate.imaging`; ``rng`` decides everything random, in this order:
    distractors, positions, orientations, noise.
    """
    timings = {}
    started = time.perf_counter()
    slab = slab_bounds(params)
    distractors = make_distractors(rng, params, slab)
    centres, classes, n_missing = place_particles(rng, params, templates, slab, distractors)
    angles = random_orientations(rng, len(centres))
    if n_missing:
        log.warning(
            "%s: %d particles did not fit "
            "(lower --crowding or --n-particles, or use a larger --shape); placed %d",
            name,
            n_missing,
            len(centres),
        )
    particles_volume, labels = render_particles(params, templates, centres, classes, angles)
    timings["render"] = time.perf_counter() - started

    tilts = tilt_angles(params.tilt_range_deg, params.tilt_step_deg)
    step = time.perf_counter()
    # the distractors' volume is rendered in the call so that only the call holds it
    signal, noise_sigma, signal_variance = noisy_tilt_series(
        particles_volume,
        render_distractors(params.shape, distractors, params.voxel_size_angstrom, slab)
        if distractors.present
        else None,
        tilts,
        params,
        rng,
    )
    timings["tilt_series"] = time.perf_counter() - step

    step = time.perf_counter()
    tomogram = reconstruct(signal, tilts, params.shape[0])
    timings["reconstruction"] = time.perf_counter() - step

    particles = _particle_table(name, [templates[k].name for k in classes], centres, angles)
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


def _particle_table(
    name: str, class_names: list[str], centres: np.ndarray, angles: np.ndarray
) -> pd.DataFrame:
    """Canonical particle table: centres (N, 3) zyx voxels, angles (N, 3) rot, tilt, psi degrees."""
    return pd.DataFrame(
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
