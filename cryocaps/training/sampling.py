"""Training patches: where particles are, which patches to cut, and how to augment them.

A :class:`TrainingVolume` is a memory-mapped tomogram with its label map and
normalisation statistics; :class:`ParticleSet` lists particle centres (from
the label map's connected components or from a coordinate file).
:class:`PatchSampler` draws class-balanced batches of patches centred on
particles (with jitter) plus background patches -- some at random, some at
label-free places of high contrast (membranes, gold, carbon edges: the hard
negatives a segmentation most often mistakes for particles), some on the
network's own false positives (mined between epochs, :mod:`.mining`) -- and
augments them with transformations that keep the missing wedge where it is. No
patch overlaps an excluded box (a held-out validation region). All randomness
comes from the sampler's own numpy generator, whose state (with the mined
places) is saved in checkpoints so a resumed run draws the same patches.

Label maps may hold :data:`~cryocaps.classes.IGNORE_LABEL` (unknown, partial
annotations): such voxels are never "label-free", so no hard negative and no
mined place is centred there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from cryocaps.classes import IGNORE_LABEL, unsigned_labels
from cryocaps.errors import CryocapsError
from cryocaps.preprocess import apply_normalization

log = logging.getLogger(__name__)

# A box no training patch may overlap: (volume index, (z0, y0, x0), (z1, y1, x1)), voxels,
# lower corner inclusive, upper exclusive (e.g. a held-out validation slab).
ExcludedBox = tuple[int, tuple[int, int, int], tuple[int, int, int]]
_PLACEMENT_TRIES = 100  # draws before a patch clear of the excluded boxes is declared impossible


@dataclass
class TrainingVolume:
    """One tomogram and its label map, both (Z, Y, X), possibly memory maps.

    ``label_map`` values are class labels (0 = background); ``stats`` are the
    tomogram's :func:`cryocaps.preprocess.normalization_stats`.
    """

    name: str
    data: np.ndarray
    label_map: np.ndarray
    stats: dict
    voxel_size_angstrom: float

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape)  # type: ignore[return-value]


@dataclass
class ParticleSet:
    """Particle centres: ``volume`` (N,) index into the volumes, ``label`` (N,), ``zyx`` (N, 3)."""

    volume: np.ndarray
    label: np.ndarray
    zyx: np.ndarray

    def __len__(self) -> int:
        return len(self.label)

    def subset(self, mask: np.ndarray) -> ParticleSet:
        return ParticleSet(self.volume[mask], self.label[mask], self.zyx[mask])

    @classmethod
    def empty(cls) -> ParticleSet:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 3), np.int64))

    @classmethod
    def concat(cls, parts: list[ParticleSet]) -> ParticleSet:
        parts = [p for p in parts if len(p)] or [cls.empty()]
        return cls(
            np.concatenate([p.volume for p in parts]),
            np.concatenate([p.label for p in parts]),
            np.concatenate([p.zyx for p in parts]),
        )

    def counts(self) -> dict[int, int]:
        labels, counts = np.unique(self.label, return_counts=True)
        return {int(a): int(b) for a, b in zip(labels, counts, strict=True)}


def particles_from_label_map(
    label_map: np.ndarray, volume_index: int, labels: list[int]
) -> ParticleSet:
    """One particle per connected component of each label (centre of its bounding box)."""
    from scipy import ndimage

    array = np.asarray(label_map)
    parts = []
    for label in labels:
        components, n = ndimage.label(array == label)
        if n == 0:
            continue
        boxes = ndimage.find_objects(components)
        centres = np.array(
            [[(s.start + s.stop - 1) // 2 for s in box] for box in boxes], dtype=np.int64
        )
        parts.append(ParticleSet(np.full(n, volume_index), np.full(n, label), centres))
        del components
    return ParticleSet.concat(parts)


def split_particles(
    particles: ParticleSet, *, val_fraction: float, fold: tuple[int, int] | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (train, val) over ``particles``, stratified by class.

    With ``fold=(k, K)`` (k 1-based) each class is dealt into K folds and fold k
    is validation; otherwise ``val_fraction`` of each class (leaving at least
    one particle of every class for training) is validation.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7919]))
    val = np.zeros(len(particles), dtype=bool)
    for label in np.unique(particles.label):
        index = np.flatnonzero(particles.label == label)
        index = index[rng.permutation(len(index))]
        if fold is not None:
            k, n_folds = fold
            val[index[(k - 1) :: n_folds]] = True
        else:
            n_val = min(len(index) - 1, int(round(val_fraction * len(index))))
            val[index[: max(0, n_val)]] = True
    return ~val, val


@dataclass
class Augmentation:
    """Patch augmentation that respects the missing wedge (tilt axis along Y).

    The three 180° rotations (about Z, Y and X) map the wedge onto itself and
    keep the particles' handedness, so they are always on. ``mirror`` adds
    single-axis flips (also wedge-preserving, but they turn each particle into
    its mirror image). ``rot90`` adds 90° rotations about Z, which move the
    tilt axis from Y to X and so the wedge; off unless asked. Intensity:
    scale in [1 - s, 1 + s], offset in [-o, o] (normalised units) and added
    Gaussian noise with sigma up to ``noise``.
    """

    rotate180: bool = True
    mirror: bool = False
    rot90: bool = False
    intensity: bool = True
    scale: float = 0.1
    offset: float = 0.1
    noise: float = 0.1

    def __call__(self, image: np.ndarray, labels: np.ndarray, rng: np.random.Generator):
        flips = []
        if self.rotate180:
            # identity or a 180° rotation about Z, Y or X: an even number of axis flips
            flips = [(), (1, 2), (0, 2), (0, 1)][int(rng.integers(4))]
        if self.mirror and rng.random() < 0.5:
            axis = int(rng.integers(3))
            flips = tuple(sorted(set(flips) ^ {axis}))
        if flips:
            image = np.flip(image, flips)
            labels = np.flip(labels, flips)
        if self.rot90 and rng.random() < 0.5:
            image = np.rot90(image, 1, axes=(1, 2))
            labels = np.rot90(labels, 1, axes=(1, 2))
        image = np.ascontiguousarray(image)
        labels = np.ascontiguousarray(labels)
        if self.intensity:
            scale = 1 + rng.uniform(-self.scale, self.scale)
            offset = rng.uniform(-self.offset, self.offset)
            sigma = rng.uniform(0, self.noise)
            image = image * np.float32(scale) + np.float32(offset)
            if sigma > 0:
                image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(sigma)
        return image, labels


def extract_patch(volume: TrainingVolume, corner: tuple[int, int, int], size: int):
    """Normalised image (P, P, P) float32 and labels (P, P, P) int64 at ``corner`` (z, y, x)."""
    z, y, x = corner
    region = (slice(z, z + size), slice(y, y + size), slice(x, x + size))
    image = apply_normalization(volume.data[region], volume.stats)
    labels = np.asarray(volume.label_map[region]).astype(np.int64)
    return image, labels


HARD_NEGATIVE_BLOCK = 4  # voxels per block side when mapping local contrast
HARD_NEGATIVE_QUANTILE = 0.9  # blocks above this quantile of label-free contrast are candidates


def hard_background_centres(
    volume: TrainingVolume,
    block: int = HARD_NEGATIVE_BLOCK,
    quantile: float = HARD_NEGATIVE_QUANTILE,
) -> np.ndarray:
    """Centres (N, 3) z, y, x voxels of label-free places with the highest local contrast.

    Local contrast = mean squared normalised density over a (3·block)³
    neighbourhood, on a grid of ``block``-voxel blocks; a block is label-free
    when no voxel in it carries a class label. Returned: the blocks at or above
    the ``quantile`` of the label-free blocks' contrast (membranes, gold beads,
    ice and carbon edges in real data). Reads the volume once, slab by slab.
    """
    from scipy import ndimage

    nz, ny, nx = (n // block for n in volume.shape)
    if min(nz, ny, nx) == 0:
        return np.zeros((0, 3), np.int64)
    energy = np.empty((nz, ny, nx), np.float32)
    labelled = np.empty((nz, ny, nx), bool)
    for k in range(nz):
        region = (slice(k * block, (k + 1) * block), slice(0, ny * block), slice(0, nx * block))
        slab = apply_normalization(volume.data[region], volume.stats)
        energy[k] = (slab**2).reshape(block, ny, block, nx, block).mean(axis=(0, 2, 4))
        labels = np.asarray(volume.label_map[region])
        labelled[k] = (labels != 0).reshape(block, ny, block, nx, block).any(axis=(0, 2, 4))
    energy = ndimage.uniform_filter(energy, size=3, mode="nearest")
    free = ~labelled
    if not free.any():
        return np.zeros((0, 3), np.int64)
    threshold = np.quantile(energy[free], quantile)
    blocks = np.argwhere(free & (energy >= threshold))
    return blocks * block + block // 2


def hard_negative_places(
    volumes: list[TrainingVolume], indices: list[int]
) -> list[tuple[int, np.ndarray]]:
    """``(index, centres)`` of :func:`hard_background_centres` for each listed volume."""
    places = [(index, hard_background_centres(volumes[index])) for index in indices]
    n_places = sum(len(c) for _, c in places)
    log.debug("hard negatives: %d places in %d volumes", n_places, len(places))
    return places


def _known(volume: TrainingVolume, centres: np.ndarray) -> np.ndarray:
    """Which of ``centres`` (N, 3) z, y, x lie on a voxel that is not unknown."""
    if len(centres) == 0:
        return np.zeros(0, dtype=bool)
    labels = unsigned_labels(volume.label_map[tuple(np.asarray(centres, np.int64).T)])
    return labels != IGNORE_LABEL


def centred_corner(centre, shape, size: int, offset=(0, 0, 0)) -> tuple[int, int, int]:
    """Corner of a ``size``³ patch centred on ``centre`` + ``offset``, moved inside ``shape``."""
    return tuple(
        int(np.clip(int(c) + int(o) - size // 2, 0, s - size))
        for c, o, s in zip(centre, offset, shape, strict=True)
    )


def _overlaps(corner, size: int, lower, upper) -> bool:
    return all(c < u and c + size > lo for c, lo, u in zip(corner, lower, upper, strict=True))


def clear_of_boxes(corner, size: int, shape, boxes) -> tuple[int, int, int] | None:
    """``corner`` moved the least along one axis so that its ``size``³ patch overlaps none of
    ``boxes`` (``(lower, upper)`` pairs) and stays inside ``shape``; None when it cannot."""
    corner = [int(c) for c in corner]
    for _ in range(len(boxes) + 1):
        hit = next((b for b in boxes if _overlaps(corner, size, *b)), None)
        if hit is None:
            return tuple(corner)  # type: ignore[return-value]
        moves = [
            (abs(target - corner[axis]), axis, target)
            for axis in range(3)
            for target in (hit[0][axis] - size, hit[1][axis])
            if 0 <= target <= shape[axis] - size
        ]
        if not moves:
            return None
        _, axis, target = min(moves)
        corner[axis] = target
    return None


class PatchSampler:
    """Draw training batches: class-balanced particle patches plus background patches.

    Parameters
    ----------
    volumes : training volumes (patches are cut from these)
    particles : particle centres to sample around (``volume`` indexes ``volumes``)
    background_volumes : indices of volumes to cut background patches from
    patch_size : patch side in voxels
    background_fraction : probability that a patch is a background patch
    hard_negative_fraction : share of the background patches centred on hard
        negatives (:func:`hard_background_centres`); the others are placed at random
    hard_centres : those places as :func:`hard_negative_places` returns them, when
        already computed (else computed here, reading each background volume once)
    mined_negative_fraction : share of the background patches centred on the places
        :meth:`set_mined_places` gave (the network's false positives), while there are
        any; the rest are split by ``hard_negative_fraction``
    excluded_boxes : :data:`ExcludedBox` regions no patch may overlap
    jitter_voxels : particle patches are shifted by up to this many voxels per axis
    augmentation : applied to every patch (None: no augmentation)
    seed : seeds the sampler's own generator (give each process its own)
    """

    def __init__(
        self,
        volumes: list[TrainingVolume],
        particles: ParticleSet,
        background_volumes: list[int],
        patch_size: int,
        *,
        background_fraction: float,
        jitter_voxels: int,
        augmentation: Augmentation | None,
        seed: int | np.random.SeedSequence,
        hard_negative_fraction: float = 0.0,
        hard_centres: list[tuple[int, np.ndarray]] | None = None,
        mined_negative_fraction: float = 0.0,
        excluded_boxes: list[ExcludedBox] = (),
    ):
        self.volumes = volumes
        self.particles = particles
        self.patch_size = int(patch_size)
        self.background_fraction = float(background_fraction)
        self.jitter_voxels = int(jitter_voxels)
        self.augmentation = augmentation
        self.rng = np.random.default_rng(seed)
        self.class_labels = sorted(set(particles.label.tolist()))
        self._by_class = {
            label: np.flatnonzero(particles.label == label) for label in self.class_labels
        }
        self.background_volumes = list(background_volumes)
        sizes = np.array(
            [np.prod(volumes[i].shape) for i in self.background_volumes], dtype=np.float64
        )
        self._background_p = sizes / sizes.sum() if len(sizes) else None
        self.hard_negative_fraction = float(hard_negative_fraction)
        self._hard: list[tuple[int, np.ndarray]] = []
        if self.hard_negative_fraction > 0 and self._background_p is not None:
            if hard_centres is None:
                hard_centres = hard_negative_places(volumes, self.background_volumes)
            self._hard = [(index, centres) for index, centres in hard_centres if len(centres)]
        counts = np.array([len(c) for _, c in self._hard], dtype=np.float64)
        self._hard_p = counts / counts.sum() if len(counts) else None
        self.mined_negative_fraction = float(mined_negative_fraction)
        self.mined = np.zeros((0, 4), np.int64)  # (N, 4): volume index, z, y, x
        self._boxes: dict[int, list] = {}
        for index, lower, upper in excluded_boxes:
            self._boxes.setdefault(int(index), []).append((tuple(lower), tuple(upper)))

    # --- state for checkpoints -------------------------------------------------
    def state(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "mined": self.mined.tolist()}

    def set_state(self, state: dict) -> None:
        if "rng" not in state:  # checkpoints before mining: the generator's state alone
            state = {"rng": state, "mined": []}
        self.rng.bit_generator.state = state["rng"]
        self.set_mined_places(np.array(state["mined"], np.int64).reshape(-1, 4))

    def set_mined_places(self, places: np.ndarray) -> None:
        """Centres (N, 4) volume index, z, y, x for the mined share of the background patches."""
        self.mined = np.asarray(places, np.int64).reshape(-1, 4)

    def forget_unknown_places(self) -> None:
        """Drop the hard-negative and mined places whose voxel is now unknown (label maps
        changed during the run, :mod:`.unannotated`)."""
        self._hard = [
            (index, centres[_known(self.volumes[index], centres)]) for index, centres in self._hard
        ]
        self._hard = [(index, centres) for index, centres in self._hard if len(centres)]
        counts = np.array([len(c) for _, c in self._hard], dtype=np.float64)
        self._hard_p = counts / counts.sum() if len(counts) else None
        keep = np.ones(len(self.mined), dtype=bool)
        for index in np.unique(self.mined[:, 0]).tolist():
            rows = self.mined[:, 0] == index
            keep[rows] = _known(self.volumes[index], self.mined[rows, 1:])
        self.mined = self.mined[keep]

    # --- drawing ---------------------------------------------------------------
    def random_corner(self) -> tuple[int, tuple[int, int, int]]:
        """A uniformly random patch of a background volume (size-weighted)."""
        index = self.background_volumes[
            int(self.rng.choice(len(self.background_volumes), p=self._background_p))
        ]
        shape = self.volumes[index].shape
        corner = tuple(int(self.rng.integers(0, s - self.patch_size + 1)) for s in shape)
        return index, corner

    def _background_corner(self) -> tuple[int, tuple[int, int, int]]:
        mining = self.mined_negative_fraction > 0 and len(self.mined)
        if mining and self.rng.random() < self.mined_negative_fraction:
            index, *centre = (int(v) for v in self.mined[int(self.rng.integers(len(self.mined)))])
            offset = self.rng.integers(-HARD_NEGATIVE_BLOCK, HARD_NEGATIVE_BLOCK + 1, size=3)
            return index, centred_corner(centre, self.volumes[index].shape, self.patch_size, offset)
        if self._hard_p is not None and self.rng.random() < self.hard_negative_fraction:
            index, centres = self._hard[int(self.rng.choice(len(self._hard), p=self._hard_p))]
            centre = centres[int(self.rng.integers(len(centres)))]
            offset = self.rng.integers(-HARD_NEGATIVE_BLOCK, HARD_NEGATIVE_BLOCK + 1, size=3)
            return index, centred_corner(centre, self.volumes[index].shape, self.patch_size, offset)
        return self.random_corner()

    def _particle_corner(self) -> tuple[int, tuple[int, int, int]]:
        label = self.class_labels[int(self.rng.integers(len(self.class_labels)))]  # class-balanced
        members = self._by_class[label]
        particle = int(members[int(self.rng.integers(len(members)))])
        index = int(self.particles.volume[particle])
        offset = self.rng.integers(-self.jitter_voxels, self.jitter_voxels + 1, size=3)
        corner = centred_corner(
            self.particles.zyx[particle], self.volumes[index].shape, self.patch_size, offset
        )
        return index, corner

    def next_location(self) -> tuple[int, tuple[int, int, int]]:
        """(volume index, corner z, y, x) of the next patch, clear of the excluded boxes."""
        for _ in range(_PLACEMENT_TRIES):
            use_background = self._background_p is not None and (
                not self.class_labels or self.rng.random() < self.background_fraction
            )
            index, corner = self._background_corner() if use_background else self._particle_corner()
            corner = self.clear(index, corner)
            if corner is not None:
                return index, corner
        raise CryocapsError(
            f"no {self.patch_size}³ training patch fits beside the held-out region in "
            f"{_PLACEMENT_TRIES} tries; hold out less or use a smaller --patch-size"
        )

    def clear(self, index: int, corner) -> tuple[int, int, int] | None:
        """``corner`` moved clear of volume ``index``'s excluded boxes (None: impossible)."""
        boxes = self._boxes.get(int(index))
        if not boxes:
            return tuple(int(c) for c in corner)  # type: ignore[return-value]
        return clear_of_boxes(corner, self.patch_size, self.volumes[index].shape, boxes)

    def sample(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """A batch: images (B, 1, P, P, P) float32 and labels (B, P, P, P) int64."""
        size = self.patch_size
        images = np.empty((batch_size, 1, size, size, size), dtype=np.float32)
        labels = np.empty((batch_size, size, size, size), dtype=np.int64)
        for i in range(batch_size):
            index, corner = self.next_location()
            image, label = extract_patch(self.volumes[index], corner, size)
            if self.augmentation is not None:
                image, label = self.augmentation(image, label, self.rng)
            images[i, 0] = image
            labels[i] = label
        return images, labels


def validation_locations(
    volumes: list[TrainingVolume],
    particles: ParticleSet,
    background_volumes: list[int],
    patch_size: int,
    *,
    background_fraction: float,
    max_patches: int,
    seed: int,
) -> list[tuple[int, tuple[int, int, int]]]:
    """A fixed list of validation patch locations (volume index, corner).

    One patch centred on each validation particle (at most an equal share of
    ``max_patches`` per class), plus random background patches in the
    proportion ``background_fraction``.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 104729]))
    labels = sorted(set(particles.label.tolist()))
    use_background = bool(background_volumes) and background_fraction > 0
    particle_share = max_patches * (1 - background_fraction) if use_background else max_patches
    per_class = max(1, int(particle_share) // max(1, len(labels)))
    locations = []
    for label in labels:
        members = np.flatnonzero(particles.label == label)
        members = members[rng.permutation(len(members))[:per_class]]
        for particle in sorted(members.tolist()):
            index = int(particles.volume[particle])
            corner = centred_corner(particles.zyx[particle], volumes[index].shape, patch_size)
            locations.append((index, corner))
    if use_background:
        if background_fraction >= 1 or not locations:
            n_background = max_patches
        else:
            n_background = int(
                round(len(locations) * background_fraction / (1 - background_fraction))
            )
        sizes = np.array([np.prod(volumes[i].shape) for i in background_volumes], dtype=np.float64)
        for _ in range(n_background):
            index = background_volumes[
                int(rng.choice(len(background_volumes), p=sizes / sizes.sum()))
            ]
            corner = tuple(int(rng.integers(0, s - patch_size + 1)) for s in volumes[index].shape)
            locations.append((index, corner))
    return locations
