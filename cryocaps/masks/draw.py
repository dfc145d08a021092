"""Drawing particle shapes into label maps: the painter, spheres and Gaussian blobs.

Every shape is drawn the same way (:func:`paint_particles`): each particle
touches only a small box around its centre, and where the shapes of two
particles overlap each voxel goes to the nearer centre (ties to the particle
listed first). Nothing of the size of the whole tomogram is allocated besides
the output map itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

GAUSSIAN_SIGMA_PER_RADIUS = 0.5  # sigma = radius / 2: the target is exp(-2) = 0.14 at the radius
GAUSSIAN_REACH_SIGMAS = 3.0  # soft targets are cut at 3 sigma (1.5 radii), where they are 0.011


def _box(centre: np.ndarray, reach: float, shape) -> tuple[np.ndarray, np.ndarray]:
    """Lower (inclusive) and upper (exclusive) corners of the voxels within ``reach`` of
    ``centre``."""
    lower = np.maximum(np.ceil(centre - reach).astype(int), 0)
    upper = np.minimum(np.floor(centre + reach).astype(int) + 1, np.asarray(shape))
    return lower, upper


def _offsets(lower: np.ndarray, upper: np.ndarray, centre: np.ndarray) -> tuple[np.ndarray, ...]:
    """Open grid of voxel positions relative to ``centre`` over a box, (z, y, x)."""
    return tuple(
        (np.arange(lower[a], upper[a], dtype=np.float32) - np.float32(centre[a])).reshape(
            [-1 if b == a else 1 for b in range(3)]
        )
        for a in range(3)
    )


def _squared_distance(offsets) -> np.ndarray:
    dz, dy, dx = offsets
    return dz * dz + dy * dy + dx * dx


def _neighbours(centres: np.ndarray, reach: np.ndarray) -> list[np.ndarray]:
    """For each particle, the other particles whose boxes can overlap its box."""
    from scipy.spatial import cKDTree

    if len(centres) == 0:
        return []
    tree = cKDTree(centres)
    candidates = tree.query_ball_point(centres, reach + reach.max())
    return [
        np.array(
            [
                j
                for j in found
                if j != i and np.linalg.norm(centres[i] - centres[j]) < reach[i] + reach[j]
            ],
            int,
        )
        for i, found in enumerate(candidates)
    ]


def paint_particles(
    shape: Sequence[int],
    centres_zyx: np.ndarray,
    labels: np.ndarray,
    reach_voxels: np.ndarray,
    inside: Callable[[int, tuple[np.ndarray, ...]], np.ndarray],
    values: Callable[[int, np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Draw particle shapes into a label map, each voxel to the nearest covering centre.

    Parameters
    ----------
    shape : (Z, Y, X) of the output
    centres_zyx : (N, 3) float, voxel positions (voxel centre = integer)
    labels : (N,) int, label of each particle (1..127)
    reach_voxels : (N,) float, no voxel farther than this from a centre is drawn for it
    inside : ``inside(i, offsets)`` -> bool mask of the box whose open-grid
        offsets from centre i are given ((z, y, x) arrays that broadcast)
    values : optional ``values(i, squared_distance)`` -> float value of each box voxel

    Returns
    -------
    label_map : (Z, Y, X) uint8
    value_map : (Z, Y, X) float16 (value of the owning particle) or None
    """
    shape = tuple(int(s) for s in shape)
    centres = np.asarray(centres_zyx, dtype=np.float64).reshape(-1, 3)
    reach = np.asarray(reach_voxels, dtype=np.float64).reshape(-1)
    label_map = np.zeros(shape, np.uint8)
    value_map = np.zeros(shape, np.float16) if values is not None else None
    neighbours = _neighbours(centres, reach)
    for i, centre in enumerate(centres):
        lower, upper = _box(centre, reach[i], shape)
        if np.any(upper <= lower):
            continue
        offsets = _offsets(lower, upper, centre)
        distance = _squared_distance(offsets)
        mask = inside(i, offsets) & (distance <= reach[i] ** 2)
        for j in neighbours[i]:
            # The part of box i that particle j can reach: there j wins if nearer.
            low_j, up_j = _box(centres[j], reach[j], shape)
            low = np.maximum(lower, low_j)
            up = np.minimum(upper, up_j)
            if np.any(up <= low):
                continue
            region = tuple(slice(low[a] - lower[a], up[a] - lower[a]) for a in range(3))
            offsets_j = _offsets(low, up, centres[j])
            distance_j = _squared_distance(offsets_j)
            covered_j = inside(j, offsets_j) & (distance_j <= reach[j] ** 2)
            nearer = distance_j < distance[region] if j > i else distance_j <= distance[region]
            mask[region] &= ~(covered_j & nearer)
        target = tuple(slice(lower[a], upper[a]) for a in range(3))
        label_map[target][mask] = labels[i]
        if value_map is not None:
            value_map[target][mask] = values(i, distance)[mask]
    return label_map, value_map


def draw_spheres(
    shape: Sequence[int],
    centres_zyx: np.ndarray,
    labels: np.ndarray,
    radii_voxels: np.ndarray | float,
) -> np.ndarray:
    """Solid spheres: voxels within ``radius`` of a centre get its label; overlaps go to the
    nearer centre.

    Parameters
    ----------
    shape : (Z, Y, X)
    centres_zyx : (N, 3) float voxel positions, 0-based, voxel centre = integer
    labels : (N,) int labels 1..127 (or one int for all)
    radii_voxels : (N,) float radii in voxels (or one float for all)

    Returns
    -------
    (Z, Y, X) uint8 label map, 0 = background
    """
    centres = np.asarray(centres_zyx, dtype=np.float64).reshape(-1, 3)
    labels = np.broadcast_to(np.asarray(labels, dtype=int), (len(centres),))
    radii = np.broadcast_to(np.asarray(radii_voxels, dtype=np.float64), (len(centres),))
    label_map, _ = paint_particles(shape, centres, labels, radii, _everywhere)
    return label_map


def _everywhere(i: int, offsets) -> np.ndarray:
    return np.ones(np.broadcast_shapes(*(o.shape for o in offsets)), bool)


def draw_gaussians(
    shape: Sequence[int],
    centres_zyx: np.ndarray,
    labels: np.ndarray,
    sigmas_voxels: np.ndarray | float,
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs exp(-d²/2σ²) cut at 3σ; each voxel to the nearer centre.

    Returns
    -------
    label_map : (Z, Y, X) uint8, the owning particle's label where the blob is drawn
    value_map : (Z, Y, X) float16, the owning blob's value (0 elsewhere)
    """
    centres = np.asarray(centres_zyx, dtype=np.float64).reshape(-1, 3)
    labels = np.broadcast_to(np.asarray(labels, dtype=int), (len(centres),))
    sigmas = np.broadcast_to(np.asarray(sigmas_voxels, dtype=np.float64), (len(centres),))

    def values(i: int, squared_distance: np.ndarray) -> np.ndarray:
        return np.exp(-squared_distance / np.float32(2 * sigmas[i] ** 2))

    return paint_particles(
        shape, centres, labels, GAUSSIAN_REACH_SIGMAS * sigmas, _everywhere, values
    )


def soft_targets(label_map: np.ndarray, value_map: np.ndarray, channel: int) -> np.ndarray:
    """One channel of the (C, Z, Y, X) soft targets (float16): background = 1 - particle value."""
    if channel == 0:
        return np.float16(1.0) - value_map
    return np.where(label_map == channel, value_map, np.float16(0))
