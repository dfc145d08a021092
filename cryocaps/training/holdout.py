"""Held-out regions: which part of the annotated volume validation sees and training never does.

By default each training tomogram keeps a slab for validation: the last
``val_fraction`` of its longer in-plane axis (Y when Y and X are equal), full
Z and full extent along the other axis. With ``fold=(k, K)`` the slab is the
k-th of K equal slabs along that axis instead; with ``--val-tomograms`` those
whole tomograms are held out. Between a slab and the training part lies a
margin of half a patch: training patches are cut only from *training views*
(numpy views of the volumes that end ``margin`` voxels before the slab), and
every patch is clipped inside its view, so no training patch, whatever its
jitter or augmentation, ever covers a held-out voxel, and the particles near the
slab's face are not half seen in training. Validation segments the slab together
with that margin (context, as a whole-tomogram segmentation would have) and
scores the slab.

Particles whose centres lie in a region's box are validation particles; those in
a training view are training particles (in view coordinates); the rest (in the
margin, or in a piece too thin for a patch) are used by neither.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from cryocaps.errors import CryocapsError
from cryocaps.training.sampling import ParticleSet, TrainingVolume

log = logging.getLogger(__name__)

Box = tuple[slice, slice, slice]  # (z, y, x) voxels of a volume


@dataclass(frozen=True)
class HeldOutRegion:
    """A part of ``volumes[volume]`` that validation segments (``context``) and scores (``box``).

    ``box`` and ``context`` are (z, y, x) slices in the volume's voxels;
    ``context`` holds ``box``. ``name`` names the region in logs and in the
    validation's particle tables.
    """

    volume: int
    name: str
    box: Box
    context: Box

    @property
    def context_shape(self) -> tuple[int, int, int]:
        return tuple(s.stop - s.start for s in self.context)  # type: ignore[return-value]

    @property
    def box_in_context(self) -> Box:
        """``box`` in the voxels of the context crop."""
        return tuple(
            slice(b.start - c.start, b.stop - c.start)
            for b, c in zip(self.box, self.context, strict=True)
        )  # type: ignore[return-value]


@dataclass
class Holdout:
    """The split of the annotated volume: validation regions, training views, particles.

    ``train_views[i]`` is a view of ``volumes[view_sources[i][0]]`` starting at voxel
    ``view_sources[i][1]`` (z, y, x); ``train_particles`` index ``train_views`` in their
    coordinates; ``val_particles`` index the full volumes.
    """

    regions: list[HeldOutRegion]
    train_views: list[TrainingVolume]
    view_sources: list[tuple[int, tuple[int, int, int]]]
    train_particles: ParticleSet
    val_particles: ParticleSet
    description: str

    def training_particles_in(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The training particles of volume ``index`` in its own voxels: (N, 3) centres and
        their labels (``train_particles`` index the views; this undoes the views' offsets)."""
        centres, labels = [np.zeros((0, 3), np.int64)], [np.zeros(0, np.int64)]
        particles = self.train_particles
        for view_index, (source, offset) in enumerate(self.view_sources):
            if source == index:
                mine = particles.volume == view_index
                centres.append(particles.zyx[mine] + np.asarray(offset))
                labels.append(particles.label[mine])
        return np.concatenate(centres), np.concatenate(labels)


def slab_axis(shape) -> int:
    """The axis a slab is held out along: the longer of Y (1) and X (2), Y when equal."""
    return 1 if shape[1] >= shape[2] else 2


def hold_out(
    volumes: list[TrainingVolume],
    particles: ParticleSet,
    *,
    patch_size: int,
    val_fraction: float,
    fold: tuple[int, int] | None,
    val_volumes: list[int],
    max_voxels: int,
) -> Holdout:
    """Split ``volumes`` into held-out regions and training views (see the module docstring).

    ``val_volumes`` (indices) are held out whole; when empty, volumes keep a slab.
    The regions' contexts together hold at most about ``max_voxels`` voxels: when
    the slabs of all volumes would hold more, only as many volumes as fit keep one
    (spread over the list; the others train whole); a region still larger is
    cropped, centred, along its in-plane axes that are not the slab's (the rest of
    that slab is used by nothing).
    """
    margin = math.ceil(patch_size / 2)
    regions, views, sources = [], [], []
    if val_volumes:
        for index, volume in enumerate(volumes):
            whole = tuple(slice(0, n) for n in volume.shape)
            if index in val_volumes:
                regions.append(HeldOutRegion(index, volume.name, whole, whole))
            else:
                views.append(volume)
                sources.append((index, (0, 0, 0)))
        description = f"whole tomograms {', '.join(volumes[i].name for i in val_volumes)}"
    else:
        slabs = [_slab(i, v, patch_size, margin, val_fraction, fold) for i, v in enumerate(volumes)]
        chosen = _fitting(slabs, max_voxels)
        for index, volume in enumerate(volumes):
            region, parts = slabs[index]
            if index not in chosen:
                parts = [(0, volume.shape[slab_axis(volume.shape)])]
            else:
                regions.append(region)
            for start, stop in parts:
                views.append(_view(volume, slab_axis(volume.shape), start, stop))
                sources.append((index, _offset(slab_axis(volume.shape), start)))
        axes = sorted({"ZYX"[slab_axis(v.shape)] for v in volumes})
        which = f"slab {fold[0]} of {fold[1]}" if fold else f"the last {val_fraction:g}"
        whose = "each tomogram's"
        if len(chosen) < len(volumes):
            whose = f"the {len(chosen)} of {len(volumes)} tomograms' ({_names(volumes, chosen)})"
        description = f"{which} of {whose} {'/'.join(axes)} extent (margin {margin} voxels)"
    regions = _capped(regions, volumes, max_voxels, margin)
    train_particles = _in_views(particles, views, sources)
    val_particles = _in_regions(particles, regions)
    return Holdout(regions, views, sources, train_particles, val_particles, description)


def _fitting(slabs, max_voxels: int) -> list[int]:
    """Indices of the volumes that keep their slab: all, or as many as ``max_voxels`` holds
    (at least one), spread evenly over the list."""
    sizes = [math.prod(region.context_shape) for region, _ in slabs]
    if sum(sizes) <= max_voxels:
        return list(range(len(slabs)))
    n = min(len(slabs), max(1, int(max_voxels // (sum(sizes) / len(sizes)))))
    return sorted({int(round(i)) for i in np.linspace(0, len(slabs) - 1, n)})


def _names(volumes, indices, limit: int = 4) -> str:
    names = [volumes[i].name for i in indices]
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")


def _slab(index, volume, patch_size, margin, val_fraction, fold):
    """The held-out slab of one volume and the (start, stop) of the training parts beside it."""
    axis = slab_axis(volume.shape)
    length = volume.shape[axis]
    if fold is not None:
        k, n_folds = fold
        start, stop = (k - 1) * length // n_folds, k * length // n_folds
    else:
        # thick enough for a validation patch together with its margin
        thickness = max(int(round(val_fraction * length)), patch_size - margin, 1)
        start, stop = length - thickness, length
    parts = [(0, start - margin), (stop + margin, length)]
    parts = [(a, b) for a, b in parts if b - a >= patch_size]
    if not parts:
        raise CryocapsError(
            f"tomogram {volume.name} {volume.shape} (z, y, x): too small to hold out voxels "
            f"{start}-{stop} of axis {'ZYX'[axis]} for validation with a {margin}-voxel margin "
            f"and keep a training patch of {patch_size}; give --val-tomograms, a smaller "
            "--val-fraction or a smaller --patch-size"
        )
    box = _along(volume.shape, axis, start, stop)
    context = _along(volume.shape, axis, max(0, start - margin), min(length, stop + margin))
    if context[axis].stop - context[axis].start < patch_size:
        raise CryocapsError(
            f"--fold {fold[0]}/{fold[1]}: the held-out slab of tomogram {volume.name} "
            f"({stop - start} voxels of axis {'ZYX'[axis]}) and its margin are thinner than a "
            f"patch ({patch_size}); choose fewer folds"
        )
    return HeldOutRegion(index, volume.name, box, context), parts


def _along(shape, axis: int, start: int, stop: int) -> Box:
    box = [slice(0, n) for n in shape]
    box[axis] = slice(start, stop)
    return tuple(box)  # type: ignore[return-value]


def _offset(axis: int, start: int) -> tuple[int, int, int]:
    offset = [0, 0, 0]
    offset[axis] = start
    return tuple(offset)  # type: ignore[return-value]


def _view(volume: TrainingVolume, axis: int, start: int, stop: int) -> TrainingVolume:
    """The voxels start..stop of ``axis`` as a volume of their own (numpy views, no copy)."""
    box = _along(volume.shape, axis, start, stop)
    return TrainingVolume(
        name=volume.name,
        data=volume.data[box],
        label_map=volume.label_map[box],
        stats=volume.stats,  # the whole tomogram's normalisation, as segment uses
        voxel_size_angstrom=volume.voxel_size_angstrom,
    )


def _capped(regions, volumes, max_voxels: int, margin: int) -> list[HeldOutRegion]:
    """Regions whose contexts hold about ``max_voxels`` in all, cropped centred in-plane."""
    total = sum(math.prod(r.context_shape) for r in regions)
    if total <= max_voxels:
        return regions
    share = max_voxels / total
    capped = []
    for region in regions:
        shape = volumes[region.volume].shape
        free = [a for a in (1, 2) if region.box[a] == slice(0, shape[a])]  # not a slab's axis
        factor = share ** (1 / len(free))
        box, context = list(region.box), list(region.context)
        for axis in free:
            keep = min(shape[axis], max(2 * margin + 1, int(shape[axis] * factor)))
            start = (shape[axis] - keep) // 2
            stop = start + keep
            # the crop's faces inside the volume are context only, as a slab's inner face is
            box[axis] = slice(
                start + margin if start > 0 else 0, stop - margin if stop < shape[axis] else stop
            )
            context[axis] = slice(start, stop)
        capped.append(HeldOutRegion(region.volume, region.name, tuple(box), tuple(context)))
    kept = sum(math.prod(r.context_shape) for r in capped)
    log.info(
        "validation regions cropped to %d of %d voxels (--max-val-voxels %d)",
        kept,
        total,
        max_voxels,
    )
    return capped


def _inside(zyx: np.ndarray, box: Box) -> np.ndarray:
    low = np.array([s.start for s in box])
    high = np.array([s.stop for s in box])
    return np.all((zyx >= low) & (zyx < high), axis=1)


def _in_views(particles: ParticleSet, views, sources) -> ParticleSet:
    """The particles whose centres lie in a training view, indexing the views, in their voxels."""
    parts = []
    for i, (view, (volume, offset)) in enumerate(zip(views, sources, strict=True)):
        mine = particles.subset(particles.volume == volume)
        local = mine.zyx - np.array(offset)
        inside = _inside(local, tuple(slice(0, n) for n in view.shape))
        n = int(inside.sum())
        parts.append(ParticleSet(np.full(n, i), mine.label[inside], local[inside]))
    return ParticleSet.concat(parts)


def _in_regions(particles: ParticleSet, regions: list[HeldOutRegion]) -> ParticleSet:
    """The particles whose centres lie in a region's box (volume indices and voxels kept)."""
    keep = np.zeros(len(particles), dtype=bool)
    for region in regions:
        keep |= (particles.volume == region.volume) & _inside(particles.zyx, region.box)
    return particles.subset(keep)


def context_view(volume: TrainingVolume, region: HeldOutRegion) -> TrainingVolume:
    """A region's context as a volume of its own (numpy views of the volume's arrays)."""
    return TrainingVolume(
        name=region.name,
        data=volume.data[region.context],
        label_map=volume.label_map[region.context],
        stats=volume.stats,
        voxel_size_angstrom=volume.voxel_size_angstrom,
    )


def in_context(particles: ParticleSet, regions: list[HeldOutRegion]) -> ParticleSet:
    """Validation particles indexing ``regions`` (their context views), in context voxels."""
    parts = []
    for i, region in enumerate(regions):
        mine = particles.subset(
            (particles.volume == region.volume) & _inside(particles.zyx, region.box)
        )
        local = mine.zyx - np.array([s.start for s in region.context])
        parts.append(ParticleSet(np.full(len(mine), i), mine.label, local))
    return ParticleSet.concat(parts)
