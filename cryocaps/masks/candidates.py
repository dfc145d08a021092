"""Particle-like places nobody annotated (``make-masks --unannotated candidates``).

In a partly annotated tomogram most particles are not annotated. Painting them
background teaches the network that particles are background; painting every
unannotated voxel unknown (``--unannotated unknown``) leaves it no background
to learn from. Between the two: a band-pass blob detector, thresholded on the
annotated particles' own responses, marks the places that look like them, and
only those become unknown (label 255, which training skips); the rest stays
background.

For each class radius r (voxels): the tomogram, normalised, is filtered with a
difference of Gaussians (σ = r/2 minus σ = 2r); the annotated particles of the
classes of that radius give the polarity (the sign of their median response)
and the threshold (the :data:`CANDIDATE_QUANTILE` quantile of their
responses); local maxima (within r) at or above it, and not on an annotated
particle, are candidates, painted unknown out to :data:`CANDIDATE_RADII` class
radii on voxels the annotation calls background. A faint or hollow class may
respond too weakly to be found: its unannotated particles then stay background,
as with ``--unannotated background``.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

# Of the annotated particles' responses, the quantile a candidate must reach. Lower finds more
# unannotated particles and marks more noise unknown. On a simulated tomogram at SNR 0.35 (the
# benchmark family's draw 0, 30% annotated): 0.1 gave ~2,900 candidates (for 368 unannotated
# particles), 0.3 ~640 (a peak within 0.6 radii of 95-98% of the unannotated small particles),
# 0.5 ~500 (71-89%); at 0.3, painted at CANDIDATE_RADII, 22-30% of each tomogram is unknown.
CANDIDATE_QUANTILE = 0.3
CANDIDATE_RADII = 1.25  # painted unknown out to this many class radii around a candidate
MIN_ANNOTATED = 3  # annotated particles of a radius needed to set its threshold


def candidate_places(
    volume: np.ndarray,
    annotated_zyx: np.ndarray,
    annotated_radii: np.ndarray,
    quantile: float = CANDIDATE_QUANTILE,
) -> tuple[np.ndarray, np.ndarray]:
    """Centres (N, 3) z, y, x voxels and radii (N,) voxels of places that look like the
    annotated particles and are none of them (see module).

    Parameters
    ----------
    volume : (Z, Y, X) tomogram
    annotated_zyx : (M, 3) annotated particle centres, voxels
    annotated_radii : (M,) their class radii, voxels (particles of one radius are detected
        together, with that radius's filter)
    """
    from scipy import ndimage
    from scipy.spatial import cKDTree

    annotated_zyx = np.asarray(annotated_zyx, float).reshape(-1, 3)
    annotated_radii = np.asarray(annotated_radii, float).reshape(-1)
    empty = np.zeros((0, 3), np.int64), np.zeros(0)
    if len(annotated_zyx) == 0:
        return empty
    image = np.asarray(volume, np.float32)
    spread = float(image.std())
    if not spread > 0:
        return empty
    image = (image - float(image.mean())) / spread
    tree = cKDTree(annotated_zyx)
    inside = np.clip(np.round(annotated_zyx).astype(int), 0, np.array(image.shape) - 1)
    centres, radii = [empty[0]], [empty[1]]
    rounded = np.round(annotated_radii, 2)  # one filter per class radius
    for radius in np.unique(rounded):
        chosen = rounded == radius
        if chosen.sum() < MIN_ANNOTATED or radius < 1:
            continue
        response = ndimage.gaussian_filter(image, radius / 2) - ndimage.gaussian_filter(
            image, 2 * radius
        )
        at_particles = response[tuple(inside[chosen].T)]
        if np.median(at_particles) < 0:  # particles darker than their surroundings
            response, at_particles = -response, -at_particles
        threshold = float(np.quantile(at_particles, quantile))
        size = 2 * int(np.ceil(radius)) + 1
        peaks = np.argwhere(
            (response >= threshold) & (response == ndimage.maximum_filter(response, size=size))
        )
        del response
        if len(peaks):
            distance, nearest = tree.query(peaks)
            # a peak on (or within its radius of) an annotated particle is that particle
            peaks = peaks[distance > np.maximum(radius, annotated_radii[nearest])]
        centres.append(peaks.astype(np.int64))
        radii.append(np.full(len(peaks), radius))
        log.debug(
            "radius %.2f voxels: threshold %.3f, %d candidates", radius, threshold, len(peaks)
        )
    return np.concatenate(centres), np.concatenate(radii)
