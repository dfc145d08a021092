"""Where the windows of a sliding window go: one lattice per axis, and its checks.

Geometry, per axis (see :func:`plan_axis`):

- The lattice extends ``ceil(overlap / 2)`` voxels beyond both faces of the
  volume, filled by mirror reflection (:func:`reflect_indices`), so edge voxels
  sit as deep inside a window as the worst-placed interior voxel does: every
  voxel gets the same treatment.
- With ``n`` windows needed, the window side is shrunk to the smallest
  multiple of ``size_multiple`` that still covers the lattice with ``n``
  windows, and the lattice is centred; a volume smaller than the patch gets
  a single window just large enough. This keeps the work close to the
  volume's own size.

The patch and overlap rules (a positive multiple of the model's size
multiple; ``0 <= overlap < patch``) are checked in one place,
:func:`window_sides`, whatever path the values take.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cryocaps.errors import CryocapsError

DEFAULT_PATCH_SIZE = 96  # voxels; inference windows may be larger than training patches
DEFAULT_OVERLAP = 16  # voxels between neighbouring windows (the paper used 25)

Triple = tuple[int, int, int]


@dataclass(frozen=True)
class AxisPlan:
    """Windows along one axis: side ``patch``, starts in volume coordinates (voxels).

    The first start may be negative and the last window may end past
    ``size``: those voxels are mirror padding.
    """

    size: int
    patch: int
    overlap: int
    starts: tuple[int, ...]

    @property
    def stride(self) -> int:
        return self.patch - self.overlap

    @property
    def n_windows(self) -> int:
        return len(self.starts)

    @property
    def lattice_start(self) -> int:
        return self.starts[0]

    @property
    def lattice_length(self) -> int:
        return self.starts[-1] + self.patch - self.starts[0]


def _round_up(value: int, multiple: int) -> int:
    return -(-int(value) // multiple) * multiple


def _triple(value, flag: str) -> Triple:
    values = (value,) * 3 if np.isscalar(value) else tuple(value)
    if len(values) != 3 or any(int(v) != v for v in values):
        raise CryocapsError(f"{flag} {value}: expected one integer or three (z, y, x)")
    return tuple(int(v) for v in values)  # type: ignore[return-value]


def _check_sides(patches: Sequence[int], overlaps: Sequence[int], size_multiple: int) -> None:
    # Every patch first, then every overlap: a bad patch is named before the overlap it bounds.
    for patch in patches:
        if patch <= 0 or patch % size_multiple:
            raise CryocapsError(
                f"--patch-size {patch}: must be a positive multiple of {size_multiple} "
                "for this model"
            )
    for patch, overlap in zip(patches, overlaps, strict=True):
        if not 0 <= overlap < patch:
            raise CryocapsError(
                f"--overlap {overlap}: must be at least 0 and smaller than the patch size {patch}"
            )


def window_sides(patch_size, overlap, size_multiple: int = 1) -> tuple[Triple, Triple]:
    """Patch and overlap as (z, y, x) voxels, checked: the one place these rules live.

    Parameters
    ----------
    patch_size, overlap : one int or three (z, y, x), in voxels.
    size_multiple : the model's size multiple; every patch side must be a positive multiple.

    Raises
    ------
    CryocapsError naming ``--patch-size`` or ``--overlap`` and the value.
    """
    patches = _triple(patch_size, "--patch-size")
    overlaps = _triple(overlap, "--overlap")
    _check_sides(patches, overlaps, size_multiple)
    return patches, overlaps


def plan_axis(size: int, patch: int, overlap: int, size_multiple: int = 1) -> AxisPlan:
    """Lay windows of side ``patch`` (a multiple of ``size_multiple``) along an axis of ``size``.

    The lattice covers ``[-margin, size + margin)`` with ``margin = ceil(overlap / 2)``;
    the window side is shrunk to the smallest multiple of ``size_multiple`` that
    covers it with the same number of windows, and the lattice is centred.
    """
    _check_sides((patch,), (overlap,), size_multiple)
    margin = -(-overlap // 2)
    needed = size + 2 * margin
    if needed <= patch:
        side = _round_up(needed, size_multiple)
        return AxisPlan(size, side, overlap, (-((side - size) // 2),))
    n_windows = math.ceil((needed - patch) / (patch - overlap)) + 1
    side = _round_up(math.ceil((needed + (n_windows - 1) * overlap) / n_windows), size_multiple)
    side = min(max(side, overlap + 1), patch)
    span = (n_windows - 1) * (side - overlap) + side
    first = -margin - (span - needed) // 2
    starts = tuple(first + n * (side - overlap) for n in range(n_windows))
    return AxisPlan(size, side, overlap, starts)


def plan_windows(
    shape: Sequence[int], patch_size, overlap, size_multiple: int = 1
) -> tuple[AxisPlan, AxisPlan, AxisPlan]:
    """One :class:`AxisPlan` per axis (z, y, x) of a volume of ``shape`` voxels."""
    patches, overlaps = window_sides(patch_size, overlap, size_multiple)
    return tuple(  # type: ignore[return-value]
        plan_axis(int(n), p, o, size_multiple)
        for n, p, o in zip(shape, patches, overlaps, strict=True)
    )


def overlap_overhead(plans: Sequence[AxisPlan]) -> float:
    """Voxels the network computes per output voxel (>= 1): windows x window volume / volume."""
    computed = math.prod(p.n_windows * p.patch for p in plans)
    return computed / math.prod(p.size for p in plans)


def reflect_indices(start: int, stop: int, size: int) -> np.ndarray:
    """Indices ``start..stop-1`` mirrored into ``0..size-1`` (edge not repeated, as numpy)."""
    index = np.arange(start, stop)
    if size == 1:
        return np.zeros_like(index)
    period = 2 * size - 2
    index = np.mod(index, period)
    return np.where(index >= size, period - index, index)


def resolve_window(
    config: dict, size_multiple: int, patch_size=None, overlap=None
) -> tuple[Triple, Triple]:
    """Patch and overlap (z, y, x) for a model: given values, else the defaults (checked).

    Default patch: the larger of :data:`DEFAULT_PATCH_SIZE` and the training patch
    (``config["patch_size"]``), rounded up to ``size_multiple``; default overlap:
    :data:`DEFAULT_OVERLAP`, capped at half the patch.
    """
    if patch_size is None:
        trained = config.get("patch_size") or DEFAULT_PATCH_SIZE
        trained = max(_triple(trained, "patch_size in the model config"))
        patch_size = _round_up(max(DEFAULT_PATCH_SIZE, trained), size_multiple)
    if overlap is None:
        patches = _triple(patch_size, "--patch-size")
        overlap = tuple(min(DEFAULT_OVERLAP, patch // 2) for patch in patches)
    return window_sides(patch_size, overlap, size_multiple)


def count_windows(
    shape: Sequence[int], config: dict, size_multiple: int, patch_size=None, overlap=None
) -> int:
    """Number of windows a model's sliding window runs on a volume of ``shape`` voxels."""
    patches, overlaps = resolve_window(config, size_multiple, patch_size, overlap)
    return math.prod(p.n_windows for p in plan_windows(shape, patches, overlaps, size_multiple))
