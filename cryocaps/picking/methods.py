"""The three picking methods: one class's mask (and weights) -> picks.

Each method takes a (Z, Y, X) bool ``mask`` of one class, the class radius in
voxels, an optional (Z, Y, X) ``weights`` map (class probability or score) and
the class's :class:`SizeLimits`, and returns :class:`Picks` (positions in voxels
of the mask).

``components`` (default)
    connected components of each class. Components larger than the class's upper size
    limit, or big enough to hold two particles and longer than two and a half radii, are
    split: centres at maxima of the distance transform at least 0.8 radius apart, each
    voxel to the centre whose ball it lies deepest inside (the power diagram; for touching
    spheres the border is the neck between them), so touching particles give one pick
    each; pieces closer than one radius (a particle broken up by a noisy segmentation) are
    merged; a centre deeper inside than a particle's label could be (:data:`MAX_DEPTH_RADII`)
    lies in a blob, and its piece is dropped. Pick = centroid of the voxels. The work is
    bounded however wrong the map is: statistics of all components at once, slab by slab;
    at most :data:`MAX_SPLITS` compact components split per class, with boxes of at most an
    eighth of the map's voxels (or 2^23 voxels in smaller maps), each voxel given to one of
    its nearest centres.
    On synthetic noisy segmentations (touching particles, ragged and fragmented
    blobs, false blobs, class mix-ups) it scored the best macro F1 of the three
    and is the fastest.
``meanshift``
    flat-kernel mean shift on the class's voxel coordinates (bandwidth = class
    radius, seeds on a grid of bins, voxels subsampled on a regular grid so the
    cost does not grow with the number of foreground voxels squared).
    Pick = mode of the cluster (as DeepFinder does).
``peaks``
    non-maximum suppression (max-pooling) of the class probability map, or of
    the smoothed class mask when there are no probabilities, with a minimum
    distance between picks taken from the class radius.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

# Largest number of voxel coordinates mean shift clusters per class; more are subsampled on a grid.
MEANSHIFT_MAX_POINTS = 200_000
STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class SizeLimits:
    """What one class's picks are judged against, in voxels; all of it from the class's label
    volume V (what one particle covered in the training label maps), none from the map itself.
    """

    label_volume: float  # V
    min_size: float  # smaller picks are dropped
    max_size: float  # larger components are split into particle-sized pieces; larger pieces dropped

    @property
    def label_radius(self) -> float:
        """Radius of the sphere of volume V, voxels: how deep inside a particle's label one gets."""
        return (3.0 * self.label_volume / (4.0 * math.pi)) ** (1.0 / 3.0)


@dataclass
class Picks:
    """Picks of one class: ``centres`` (n, 3) z, y, x in voxels, ``sizes`` (n,) voxels of the class
    assigned to each, ``scores`` (n,) mean weight over those voxels (NaN without weights).

    ``split_skipped`` counts components that could hold several particles but were judged whole
    because the class's split budget (:data:`MAX_SPLITS`) was spent.
    """

    centres: np.ndarray
    sizes: np.ndarray
    scores: np.ndarray
    split_skipped: int = 0

    @classmethod
    def empty(cls) -> Picks:
        return cls(np.zeros((0, 3)), np.zeros(0), np.zeros(0))

    def __len__(self) -> int:
        return len(self.sizes)


# --- components -------------------------------------------------------------

# At most this many components of one class are split in one map, looking at no more voxels (of
# their bounding boxes) than an eighth of the map or 2^23 (a second or two of distance
# transforms), whichever is more; the smallest go first, since touching particles make small
# clusters. A map of tens of thousands of multi-particle blobs is a failed segmentation:
# splitting them all would take many minutes, and their pieces would be false picks.
MAX_SPLITS = 2000
# A particle's label is nowhere deeper than its radius: a split centre deeper than this many
# label radii (plus a voxel) lies in a blob thicker than any particle, and its piece is dropped.
# Clusters of touching particles are split however large (a crowded class can fill a sixth of a
# tomogram with one connected component: benchmarks/RESULTS.md, "A randomized family of sets").
MAX_DEPTH_RADII = 1.5
# A piece takes the voxels within its centre's depth plus this many label radii (plus a voxel):
# a segmented particle is rarely a full ball around its deepest point.
BALL_SLACK_RADII = 0.5
SPLIT_BOX_FRACTION = 0.125
MIN_SPLIT_BOX_VOXELS = 1 << 23
# A cluster of touching particles is compact: four spheres in a diagonal row fill a tenth of
# their bounding box, any other cluster of up to four more. Sparser components (blobs winding
# through the volume) are judged whole, which keeps the boxes looked at near the class's voxels.
MAX_BOX_PER_VOXEL = 10.0
# Voxels per slab when statistics are gathered over a whole map (bounds the temporary arrays).
SLAB_VOXELS = 1 << 22


def _pick_components(mask: np.ndarray, radius: float, weights, limits: SizeLimits) -> Picks:
    labelled, count = ndimage.label(mask)
    if count == 0:
        return Picks.empty()
    sizes = _sizes(labelled, count)
    # Specks far below the size limit are dropped now (fragments near it may still merge).
    looked_at = sizes >= 0.25 * limits.min_size
    looked_at[0] = False
    # Components big enough to hold two particles get the lowest numbers, smallest first, so
    # that find_objects boxes only those and the split budget goes to the likeliest clusters.
    volume = limits.label_volume
    may_split = looked_at & (sizes >= 0.6 * volume)
    first = np.flatnonzero(may_split)
    first = first[np.argsort(sizes[first], kind="stable")]
    rest = np.flatnonzero(looked_at & ~may_split)
    old_ids = np.concatenate([[0], first, rest])
    new_ids = np.zeros(count + 1, dtype=np.int32)
    new_ids[old_ids] = np.arange(len(old_ids), dtype=np.int32)
    _relabel_in_place(labelled, new_ids)
    count, sizes = len(old_ids) - 1, sizes[old_ids].astype(float)
    centres, scores = _component_stats(labelled, count, sizes, weights)

    # Components that may hold several particles are split, one loop turn each.
    pieces, was_split, skipped = [], np.zeros(count + 1, dtype=bool), 0
    boxes = ndimage.find_objects(labelled, max_label=len(first)) if len(first) else []
    budget = {
        "splits": MAX_SPLITS,
        "voxels": max(SPLIT_BOX_FRACTION * labelled.size, MIN_SPLIT_BOX_VOXELS),
    }
    for index, box in enumerate(boxes, start=1):
        extent = max(s.stop - s.start for s in box)
        box_voxels = math.prod(s.stop - s.start for s in box)
        if (sizes[index] <= 1.2 * volume and extent <= 2.4 * radius) or (
            box_voxels > MAX_BOX_PER_VOXEL * sizes[index]
        ):
            continue
        if budget["splits"] < 1 or budget["voxels"] < box_voxels:
            skipped += 1
            continue
        budget["splits"] -= 1
        budget["voxels"] -= box_voxels
        crop_weights = weights[box] if weights is not None else None
        split = _split_touching(
            labelled[box] == index,
            radius,
            crop_weights,
            max_depth=MAX_DEPTH_RADII * limits.label_radius + 1,
            slack=BALL_SLACK_RADII * limits.label_radius + 1,
        )
        if split is None:
            continue
        was_split[index] = True
        split.centres += [s.start for s in box]
        pieces.append(split)
    whole = np.flatnonzero(~was_split[1:]) + 1
    picks = Picks(
        np.concatenate([centres[whole], *(p.centres for p in pieces)]),
        np.concatenate([sizes[whole], *(p.sizes for p in pieces)]),
        np.concatenate([scores[whole], *(p.scores for p in pieces)]),
    )
    merged = _merge_fragments(picks, radius)
    merged.split_skipped = skipped
    return merged


def _sizes(labelled: np.ndarray, count: int) -> np.ndarray:
    """Voxels of each label 0..count, slab by slab (bincount makes a 64-bit copy of its input)."""
    sizes = np.zeros(count + 1, dtype=np.int64)
    step = max(1, SLAB_VOXELS // max(1, labelled[0].size))
    for start in range(0, labelled.shape[0], step):
        sizes += np.bincount(labelled[start : start + step].ravel(), minlength=count + 1)
    return sizes


def _relabel_in_place(labelled: np.ndarray, new_ids: np.ndarray) -> None:
    """``labelled[...] = new_ids[labelled]``, slab by slab (no second whole-map array)."""
    step = max(1, SLAB_VOXELS // max(1, labelled[0].size))
    for start in range(0, labelled.shape[0], step):
        part = labelled[start : start + step]
        part[...] = new_ids[part]


def _component_stats(labelled: np.ndarray, count: int, sizes: np.ndarray, weights):
    """Centroid (count + 1, 3) and mean weight (count + 1,) of every component, slab by slab."""
    sums = np.zeros((4, count + 1))
    step = max(1, SLAB_VOXELS // max(1, labelled[0].size))
    for start in range(0, labelled.shape[0], step):
        ids = labelled[start : start + step].ravel()
        inside = np.flatnonzero(ids)
        ids = ids[inside]
        z, y, x = np.unravel_index(inside, labelled[start : start + step].shape)
        for axis, coordinate in enumerate((z + start, y, x)):
            sums[axis] += np.bincount(ids, weights=coordinate, minlength=count + 1)
        if weights is not None:
            values = np.asarray(weights[start : start + step]).ravel()[inside]
            sums[3] += np.bincount(ids, weights=values.astype(np.float64), minlength=count + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        centres = (sums[:3] / sizes).T
        scores = sums[3] / sizes if weights is not None else np.full(count + 1, np.nan)
    return centres, scores


def _merge_fragments(picks: Picks, radius: float) -> Picks:
    """Merge picks closer than one radius: pieces of one particle broken up by a noisy segmentation.

    Two whole particles cannot be that close (they would overlap by more than half), so
    only fragments merge; the merged pick is their size-weighted centroid.
    """
    if len(picks) < 2:
        return picks
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    pairs = cKDTree(picks.centres).query_pairs(radius, output_type="ndarray")
    if len(pairs) == 0:
        return picks
    n = len(picks)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    n_groups, group = connected_components(graph, directed=False)
    total = np.bincount(group, weights=picks.sizes, minlength=n_groups)
    weighted = [picks.sizes * picks.centres[:, a] for a in range(3)]
    centres = np.stack([np.bincount(group, w, minlength=n_groups) for w in weighted], axis=1)
    scores = np.bincount(group, weights=picks.sizes * picks.scores, minlength=n_groups)
    return Picks(centres / total[:, None], total, scores / total)


def _split_touching(
    component: np.ndarray,
    radius: float,
    weights,
    max_depth: float = math.inf,
    slack: float = math.inf,
) -> Picks | None:
    """Pieces of one component, one per particle centre it holds (None: it holds one or none).

    Centres are maxima of the distance transform at least 0.8 radius apart, deep enough inside
    that ridges of irregular shapes do not count. Each voxel goes to the centre whose ball (radius
    = that centre's depth) it lies deepest inside (the power diagram of the balls): for touching or
    overlapping spheres the borders are the planes through their contact circles, the necks a
    watershed on the distance finds; voxels farther than ``slack`` outside every ball go to no
    piece. A centre deeper than ``max_depth`` lies in something thicker than any particle (a
    blob of background called this class): its piece is dropped, so a blob is not cut into
    particle-sized false picks, while particles touching it still count.
    """
    padded = np.pad(component, 1)
    distance = ndimage.distance_transform_edt(padded)
    window = 2 * max(1, int(round(0.5 * radius))) + 1
    deep_enough = max(1.0, 0.5 * min(distance.max(), max_depth))
    peaks = (distance == ndimage.maximum_filter(distance, size=window)) & (distance >= deep_enough)
    markers, n_markers = ndimage.label(peaks, structure=STRUCTURE_26)
    if n_markers <= 1:
        return None
    # Marker statistics from the peak voxels only (few), not from sweeps over the whole box.
    peak_voxels = np.argwhere(peaks)
    peak_ids = markers[peaks] - 1
    members = np.bincount(peak_ids, minlength=n_markers)[:, None]
    seeds = (
        np.stack(
            [np.bincount(peak_ids, peak_voxels[:, a], minlength=n_markers) for a in range(3)], 1
        )
        / members
    )
    depth = np.zeros(n_markers)
    np.maximum.at(depth, peak_ids, distance[peaks])
    kept = _suppress_close(seeds, depth, 0.8 * radius)
    if len(kept) <= 1:
        return None
    seeds, depth = seeds[kept], depth[kept]
    voxels = np.argwhere(padded)
    owner = _power_cells(voxels.astype(float), seeds, depth)
    # voxels far outside every centre's ball belong to no particle found: the rest of a blob a
    # particle touches, not part of that particle's piece
    reach = ((voxels - seeds[owner]) ** 2).sum(axis=1) <= (depth[owner] + slack) ** 2
    voxels, owner = voxels[reach], owner[reach]
    sizes = np.bincount(owner, minlength=len(seeds)).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        centres = (
            np.stack([np.bincount(owner, voxels[:, a], minlength=len(seeds)) for a in range(3)], 1)
            / sizes[:, None]
        )
        if weights is None:
            scores = np.full(len(seeds), np.nan)
        else:
            values = np.asarray(weights, dtype=np.float64)[tuple((voxels - 1).T)]
            scores = np.bincount(owner, values, minlength=len(seeds)) / sizes
    kept = (sizes > 0) & (depth <= max_depth)
    return Picks(centres[kept] - 1.0, sizes[kept], scores[kept])


# Above this many seeds, each point looks only at its POWER_NEIGHBOURS nearest seeds (the
# seeds of touching particles are of similar depth, so the nearest seeds hold the best).
POWER_ALL_SEEDS = 48
POWER_NEIGHBOURS = 12


def _power_cells(points: np.ndarray, seeds: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Index of the seed minimising |point - seed|² - depth² for every point (chunked)."""
    if len(seeds) > POWER_ALL_SEEDS:
        tree, owner = cKDTree(seeds), np.empty(len(points), dtype=np.intp)
        for start in range(0, len(points), 1 << 17):
            chunk = points[start : start + (1 << 17)]
            _, near = tree.query(chunk, k=POWER_NEIGHBOURS)
            power = ((chunk[:, None, :] - seeds[near]) ** 2).sum(axis=2) - depth[near] ** 2
            owner[start : start + len(chunk)] = near[np.arange(len(chunk)), power.argmin(axis=1)]
        return owner
    # |p - s|² - d² = |p|² - 2 p·s + |s|² - d², and |p|² is the same for every seed
    offset = (seeds**2).sum(axis=1) - depth**2
    owner = np.empty(len(points), dtype=np.intp)
    step = max(1, (1 << 21) // len(seeds))
    for start in range(0, len(points), step):
        power = points[start : start + step] @ (-2.0 * seeds.T) + offset
        owner[start : start + step] = power.argmin(axis=1)
    return owner


def _suppress_close(centres: np.ndarray, strength: np.ndarray, min_separation: float) -> np.ndarray:
    """Indices of points kept by greedy non-maximum suppression (strongest first)."""
    order = np.argsort(-strength, kind="stable")
    tree = cKDTree(centres)
    suppressed = np.zeros(len(centres), dtype=bool)
    kept = []
    for i in order:
        if suppressed[i]:
            continue
        kept.append(i)
        suppressed[tree.query_ball_point(centres[i], min_separation)] = True
    return np.array(sorted(kept), dtype=int)


# --- mean shift -------------------------------------------------------------


def _pick_meanshift(mask: np.ndarray, radius: float, weights, limits: SizeLimits) -> Picks:
    box = _bounding_box(mask)
    mask = mask[box]
    offset = np.array([s.start for s in box], dtype=float)
    count = int(np.count_nonzero(mask))
    # Subsample on a regular grid: ~3 samples per radius find a sphere's mode as well as
    # every voxel does, and the number of points (hence the cost) stays bounded.
    step = max(1, int(radius // 3))
    if count / step**3 > MEANSHIFT_MAX_POINTS:
        step = int(math.ceil((count / MEANSHIFT_MAX_POINTS) ** (1 / 3)))
    sub = mask[::step, ::step, ::step]
    points = np.argwhere(sub).astype(float) * step
    if len(points) == 0:
        return Picks.empty()
    centres, strength = _mean_shift(points, bandwidth=max(radius, 1.0))
    assignment = cKDTree(centres).query(points)[1]
    crop_weights = weights[box] if weights is not None else None
    sizes, scores = _cluster_stats(assignment, len(centres), points.astype(np.intp), crop_weights)
    return Picks(centres + offset, sizes * step**3, scores)


def _cluster_stats(assignment: np.ndarray, n_clusters: int, voxels: np.ndarray, weights):
    """Per cluster: number of voxels and mean weight at them (NaN without weights)."""
    sizes = np.bincount(assignment, minlength=n_clusters).astype(float)
    if weights is None:
        return sizes, np.full(n_clusters, np.nan)
    values = np.asarray(weights[tuple(voxels.T)], dtype=np.float64)
    sums = np.bincount(assignment, weights=values, minlength=n_clusters)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sizes, sums / sizes


def _mean_shift(
    points: np.ndarray, bandwidth: float, max_iterations: int = 100
) -> tuple[np.ndarray, np.ndarray]:
    """Flat-kernel mean shift seeded on a grid of bins; returns (modes, points within bandwidth)."""
    tree = cKDTree(points)
    seeds = (
        np.unique(np.round(points / bandwidth).astype(np.int64), axis=0).astype(float) * bandwidth
    )
    counts = np.zeros(len(seeds))
    active = np.ones(len(seeds), dtype=bool)
    for _ in range(max_iterations):
        # All moving seeds at once: a sparse (seeds x points) neighbourhood matrix gives the means.
        moving = np.nonzero(active)[0]
        neighbours = cKDTree(seeds[moving]).sparse_distance_matrix(
            tree, bandwidth, output_type="coo_matrix"
        )
        neighbours.data[:] = 1.0
        neighbours = neighbours.tocsr()
        counts[moving] = np.asarray(neighbours.sum(axis=1)).ravel()
        inside = counts[moving] > 0
        means = np.asarray(neighbours[inside] @ points) / counts[moving][inside, None]
        shift = np.abs(means - seeds[moving[inside]]).max(axis=1)
        seeds[moving[inside]] = means
        active[moving[~inside]] = False
        active[moving[inside][shift < 1e-3 * bandwidth]] = False
        if not active.any():
            break
    alive = counts > 0
    seeds, counts = seeds[alive], counts[alive]
    kept = _suppress_close(seeds, counts, bandwidth)
    return seeds[kept], counts[kept]


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    box = ndimage.find_objects(mask.astype(np.uint8))
    return box[0] if box and box[0] is not None else tuple(slice(0, 0) for _ in mask.shape)


# --- peaks ------------------------------------------------------------------


def _pick_peaks(mask: np.ndarray, radius: float, weights, limits: SizeLimits) -> Picks:
    margin = int(math.ceil(radius)) + 2
    box = tuple(
        slice(max(0, s.start - margin), min(n, s.stop + margin))
        for s, n in zip(_bounding_box(mask), mask.shape, strict=True)
    )
    mask = mask[box]
    offset = np.array([s.start for s in box], dtype=float)
    crop_weights = np.asarray(weights[box], dtype=np.float32) if weights is not None else None
    sigma = max(0.5, radius / 3.0)
    if crop_weights is not None:
        field = ndimage.gaussian_filter(
            np.where(mask, crop_weights, 0.0).astype(np.float32), sigma, truncate=2.5
        )
    else:
        field = ndimage.gaussian_filter(mask.astype(np.float32), sigma, truncate=2.5)
    min_distance = max(1, int(round(0.8 * radius)))
    peaks = (field == ndimage.maximum_filter(field, size=2 * min_distance + 1)) & mask
    peaks &= field > 0.25 * field[mask].max()
    labelled, count = ndimage.label(peaks, structure=STRUCTURE_26)  # plateaus -> one peak
    if count == 0:
        return Picks.empty()
    # Peak statistics from the peak voxels only (few), not from whole-volume label sweeps.
    peak_voxels = np.argwhere(peaks)
    peak_ids = labelled[peaks] - 1
    members = np.bincount(peak_ids, minlength=count)
    centres = np.stack(
        [np.bincount(peak_ids, weights=peak_voxels[:, a], minlength=count) for a in range(3)], 1
    )
    centres /= members[:, None]
    heights = np.full(count, -np.inf)
    np.maximum.at(heights, peak_ids, field[peaks])
    centres = centres[_suppress_close(centres, heights, min_distance)]
    # Each class voxel belongs to its nearest peak (within 1.5 radii): sizes and scores,
    # counted on a grid of ~3 voxels per radius as for mean shift.
    step = max(1, int(radius // 3))
    voxels = np.argwhere(mask[::step, ::step, ::step]) * step
    distance, nearest = cKDTree(centres).query(voxels, distance_upper_bound=1.5 * radius + 1)
    inside = np.isfinite(distance)
    sizes, scores = _cluster_stats(nearest[inside], len(centres), voxels[inside], crop_weights)
    return Picks(centres + offset, sizes * step**3, scores)


PICKERS = {"components": _pick_components, "meanshift": _pick_meanshift, "peaks": _pick_peaks}
