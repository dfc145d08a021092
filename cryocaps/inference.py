"""Sliding-window segmentation of whole tomograms with bounded memory.

:func:`sliding_window` is the core, in the manner of MONAI's
``sliding_window_inference``: a regular lattice of overlapping windows,
Gaussian (or mean) blending, batched windows under ``torch.inference_mode()``.
It differs in how it holds the result: windows are visited slab by slab
along Z (then along Y, then X) and a voxel is handed to the caller as soon
as no later window can touch it, so only the overlap margins are kept —
``K x overlap_z x Y x X`` floats for the Z margin, plus one window row.
Memory therefore does not grow with the tomogram's depth, and grows with
its area only through that thin margin.

Geometry, per axis (see :func:`plan_axis`):

- The lattice extends ``ceil(overlap / 2)`` voxels beyond both faces of the
  volume, filled by mirror reflection, so edge voxels sit as deep inside a
  window as the worst-placed interior voxel does: every voxel gets the same
  treatment.
- With ``n`` windows needed, the window side is shrunk to the smallest
  multiple of ``size_multiple`` that still covers the lattice with ``n``
  windows, and the lattice is centred; a volume smaller than the patch gets
  a single window just large enough. This keeps the work close to the
  volume's own size.
- Blending weights are normalised per axis (the lattice is a product of
  1D lattices and the Gaussian is separable), so the blended value is
  ``sum_w g_w(v) p_w(v)`` with ``sum_w g_w(v) = 1`` at every voxel: a
  constant prediction stays exactly constant, and no seams appear.

Test-time augmentation (``tta=True``) averages the identity and the three
180° rotations about Z, Y and X (flips of two axes at once). A flip of any
axis keeps a missing wedge symmetric about the Y tilt axis (it only changes
signs of kx, ky or kz), but a single flip also mirrors the particles, and
macromolecules are chiral; the rotations keep both the wedge and the hand.

:func:`segment_tomogram` applies a saved model to one MRC file and writes
``<tomo>_labels.mrc`` (uint8 argmax; MRC mode 0), optionally
``<tomo>_probs.mrc`` (float16 volume stack (C, Z, Y, X), read back with
``read_tomogram(path, allow_stack=True)``) and ``<tomo>_score.mrc``
(float16, highest foreground probability), slab by slab into memory-mapped
files renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import mmap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cryocaps.classes import ClassTable, read_classes, write_classes
from cryocaps.errors import CryocapsError
from cryocaps.io.layout import output_paths, tomogram_name
from cryocaps.io.volumes import MrcVolumeWriter, read_info, read_tomogram
from cryocaps.preprocess import DEFAULT_CLIP_PERCENTILES, apply_normalization, normalization_stats
from cryocaps.runtime import configure_threads, native_bf16
from cryocaps.runtime import device_type as torch_device_type

log = logging.getLogger(__name__)

DEFAULT_PATCH_SIZE = 96  # voxels; inference windows may be larger than training patches
DEFAULT_OVERLAP = 16  # voxels between neighbouring windows (the paper used 25)
DEFAULT_BATCH_SIZE = 1  # windows per forward pass
GAUSSIAN_SIGMA_SCALE = 0.125  # Gaussian sigma as a fraction of the window side (as MONAI)
VOXEL_SIZE_TOLERANCE = 0.05  # relative voxel-size mismatch refused by segment
BLENDING_MODES = ("gaussian", "mean")
# The identity and the 180° rotations about Z, Y, X, as flips of (B, C, Z, Y, X) dims.
TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (3, 4), (2, 4), (2, 3))


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class AxisPlan:
    """Windows along one axis: side ``patch``, starts in volume coordinates.

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


def plan_axis(size: int, patch: int, overlap: int, size_multiple: int = 1) -> AxisPlan:
    """Lay windows of side ``patch`` (a multiple of ``size_multiple``) along an axis of ``size`` voxels.

    The lattice covers ``[-margin, size + margin)`` with ``margin = ceil(overlap / 2)``;
    the window side is shrunk to the smallest multiple of ``size_multiple`` that
    covers it with the same number of windows, and the lattice is centred.
    """
    if patch % size_multiple or patch <= 0:
        raise CryocapsError(f"--patch-size {patch}: must be a positive multiple of {size_multiple} for this model")
    if not 0 <= overlap < patch:
        raise CryocapsError(f"--overlap {overlap}: must be at least 0 and smaller than the patch size {patch}")
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
    return AxisPlan(size, side, overlap, tuple(first + n * (side - overlap) for n in range(n_windows)))


def plan_windows(shape: Sequence[int], patch_size, overlap, size_multiple: int = 1) -> tuple[AxisPlan, ...]:
    """One :class:`AxisPlan` per axis (z, y, x) of a volume of ``shape``."""
    patches = _triple(patch_size, "--patch-size")
    overlaps = _triple(overlap, "--overlap")
    for patch, margin in zip(patches, overlaps, strict=True):
        if patch % size_multiple or patch <= 0:
            raise CryocapsError(f"--patch-size {patch}: must be a positive multiple of {size_multiple} for this model")
        if not 0 <= margin < patch:
            raise CryocapsError(f"--overlap {margin}: must be at least 0 and smaller than the patch size {patch}")
    return tuple(
        plan_axis(int(n), p, o, size_multiple) for n, p, o in zip(shape, patches, overlaps, strict=True)
    )


def overlap_overhead(plans: Sequence[AxisPlan]) -> float:
    """Voxels the network computes per output voxel (>= 1): windows x window volume / volume."""
    computed = math.prod(p.n_windows * p.patch for p in plans)
    return computed / math.prod(p.size for p in plans)


def _triple(value, flag: str) -> tuple[int, int, int]:
    values = (value,) * 3 if np.isscalar(value) else tuple(value)
    if len(values) != 3 or any(int(v) != v for v in values):
        raise CryocapsError(f"{flag} {value}: expected one integer or three (z, y, x)")
    return tuple(int(v) for v in values)  # type: ignore[return-value]


def _check_blending(blending: str) -> None:
    if blending not in BLENDING_MODES:
        raise CryocapsError(f"--blending {blending!r}: choose one of {', '.join(BLENDING_MODES)}")


def axis_weights(plan: AxisPlan, blending: str = "gaussian") -> np.ndarray:
    """(n_windows, patch) float32 blending weights whose sum over windows is 1 at every position."""
    _check_blending(blending)
    t = np.arange(plan.patch, dtype=np.float64)
    if blending == "gaussian" and plan.n_windows > 1:
        sigma = GAUSSIAN_SIGMA_SCALE * plan.patch
        bump = np.exp(-0.5 * ((t - (plan.patch - 1) / 2) / sigma) ** 2)
    else:
        bump = np.ones_like(t)
    total = np.zeros(plan.lattice_length)
    for start in plan.starts:
        offset = start - plan.lattice_start
        total[offset : offset + plan.patch] += bump
    weights = np.empty((plan.n_windows, plan.patch))
    for n, start in enumerate(plan.starts):
        offset = start - plan.lattice_start
        weights[n] = bump / total[offset : offset + plan.patch]
    return weights.astype(np.float32)


def reflect_indices(start: int, stop: int, size: int) -> np.ndarray:
    """Indices ``start..stop-1`` mirrored into ``0..size-1`` (edge voxel not repeated, as numpy 'reflect')."""
    index = np.arange(start, stop)
    if size == 1:
        return np.zeros_like(index)
    period = 2 * size - 2
    index = np.mod(index, period)
    return np.where(index >= size, period - index, index)


# --------------------------------------------------------------------------- memory


def _backing_mmap(array) -> mmap.mmap | None:
    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        if getattr(base, "mode", None) == "c":  # a private copy-on-write map: dropping pages loses edits
            return None
        base = getattr(base, "base", None)
    return base


def release_pages(array, flush: bool = False) -> None:
    """Drop the resident pages of a memory-mapped array from this process.

    Pages of a file mapping count in the process's resident memory until it
    is unmapped; dropping them after each slab keeps the peak independent of
    the file size. The data stay in the file (and the page cache). Writable
    maps are flushed first when ``flush``. A no-op for ordinary arrays.
    """
    mapping = _backing_mmap(array)
    if mapping is None or mapping.closed or not hasattr(mapping, "madvise"):
        return
    with contextlib.suppress(OSError, ValueError):
        if flush:
            mapping.flush()
        mapping.madvise(mmap.MADV_DONTNEED)


# --------------------------------------------------------------------------- the sliding window


class _WindowReader:
    """Input of one window at a time; reads a (patch_z, patch_y, lattice_x) block per window row."""

    def __init__(self, volume, plans: Sequence[AxisPlan], transform: Callable | None):
        self.volume = volume
        self.plans = plans
        self.transform = transform
        self.x_index = reflect_indices(plans[2].lattice_start, plans[2].lattice_start + plans[2].lattice_length, plans[2].size)
        self._key: tuple[int, int] | None = None
        self._block: np.ndarray | None = None

    def window(self, k: int, j: int, i: int) -> np.ndarray:
        if self._key != (k, j):
            pz, py = self.plans[0], self.plans[1]
            z_index = reflect_indices(pz.starts[k], pz.starts[k] + pz.patch, pz.size)
            y_index = reflect_indices(py.starts[j], py.starts[j] + py.patch, py.size)
            block = self._read(z_index, y_index)
            release_pages(self.volume)  # the block is a copy; re-reading from the page cache is cheap
            self._block = np.asarray(self.transform(block) if self.transform else block, dtype=np.float32)
            self._key = (k, j)
        px = self.plans[2]
        offset = px.starts[i] - px.lattice_start
        return self._block[:, :, offset : offset + px.patch]

    def _read(self, z_index: np.ndarray, y_index: np.ndarray) -> np.ndarray:
        # Read the bounding slab with plain slicing (cheap on a memory map), then mirror.
        z0, z1 = int(z_index.min()), int(z_index.max()) + 1
        y0, y1 = int(y_index.min()), int(y_index.max()) + 1
        slab = np.asarray(self.volume[z0:z1, y0:y1, :])
        return slab[np.ix_(z_index - z0, y_index - y0, self.x_index)]

    def close(self) -> None:
        release_pages(self.volume)


class _BlendStream:
    """Sum weighted windows in lattice order and emit blocks that no later window touches.

    Windows arrive in (z, y, x) row-major order. Along each axis the part of
    a window that overlaps the next one is kept in a carry buffer; the rest
    is final along that axis and passes to the next-outer axis. The Z carry
    (K, overlap_z, Y, X) is the only buffer that spans the volume's area; it
    is stored as ``z_carry_dtype``.
    """

    def __init__(
        self,
        plans: Sequence[AxisPlan],
        emit: Callable[[tuple[slice, ...], np.ndarray], None],
        z_carry_dtype=np.float32,
    ):
        self.plans = plans
        self.emit = emit
        self.z_carry_dtype = np.dtype(z_carry_dtype)
        self.carry: list[np.ndarray | None] = [None, None, None]

    def _allocate(self, n_outputs: int) -> None:
        pz, py, px = self.plans
        self.carry = [
            np.zeros((n_outputs, pz.overlap, py.lattice_length, px.lattice_length), self.z_carry_dtype),
            np.zeros((n_outputs, pz.patch, py.overlap, px.lattice_length), np.float32),
            np.zeros((n_outputs, pz.patch, py.patch, px.overlap), np.float32),
        ]

    def add(self, index: tuple[int, int, int], block: np.ndarray) -> None:
        """Add one weighted window prediction (K, patch_z, patch_y, patch_x) at lattice position ``index``."""
        if self.carry[0] is None:
            self._allocate(block.shape[0])
        k, j, i = index
        offsets = [0, 0, 0]  # lattice offsets of the chunk along z, y, x
        chunk = block
        for axis, position in ((2, i), (1, j), (0, k)):
            plan = self.plans[axis]
            chunk = self._step(chunk, axis, position, offsets)
            offsets[axis] = position * plan.stride
        self._emit(chunk, offsets)

    def _step(self, chunk: np.ndarray, axis: int, position: int, offsets: list[int]) -> np.ndarray:
        plan = self.plans[axis]
        carry = self.carry[axis]
        dim = axis + 1  # chunk dims are (K, z, y, x)
        region = [slice(None)] * 4
        for inner in range(axis + 1, 3):  # the chunk covers part of the carry along inner axes
            region[inner + 1] = slice(offsets[inner], offsets[inner] + chunk.shape[inner + 1])
        head = [slice(None)] * 4
        head[dim] = slice(0, plan.overlap)
        if position > 0 and plan.overlap:
            chunk[tuple(head)] += carry[tuple(region)]
        if position == plan.n_windows - 1:
            return chunk
        tail = [slice(None)] * 4
        tail[dim] = slice(plan.stride, None)
        carry[tuple(region)] = chunk[tuple(tail)]
        keep = [slice(None)] * 4
        keep[dim] = slice(0, plan.stride)
        return chunk[tuple(keep)]

    def _emit(self, chunk: np.ndarray, offsets: list[int]) -> None:
        region = []
        crop = [slice(None)]
        for axis, plan in enumerate(self.plans):
            start = offsets[axis] + plan.lattice_start
            stop = start + chunk.shape[axis + 1]
            lo, hi = max(start, 0), min(stop, plan.size)
            if hi <= lo:
                return
            region.append(slice(lo, hi))
            crop.append(slice(lo - start, hi - start))
        self.emit(tuple(region), chunk[tuple(crop)])


def sliding_window(
    volume: np.ndarray,
    predictor: Callable,
    patch_size,
    overlap,
    *,
    size_multiple: int = 1,
    blending: str = "gaussian",
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "cpu",
    bf16: bool = False,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    write: Callable[[tuple[slice, slice, slice], np.ndarray], None] | None = None,
    progress: Callable[[int], None] | None = None,
    z_carry_dtype: str = "float32",
) -> np.ndarray | None:
    """Apply ``predictor`` to a whole volume by overlapping windows and blend the results.

    Parameters
    ----------
    volume : (Z, Y, X) array, e.g. a read-only memory map; read one window row
        at a time, and its pages are dropped from memory after each Z slab.
    predictor : callable mapping a (B, 1, d, h, w) float tensor on ``device``
        to (B, K, d, h, w) values to blend (probabilities), e.g. a
        :class:`ProbabilityPredictor`.
    patch_size : window side in voxels, one int or (z, y, x); multiples of
        ``size_multiple``. Shrunk per axis to fit the volume (see :func:`plan_axis`).
    overlap : voxels shared by neighbouring windows, one int or (z, y, x), 0 <= overlap < patch.
    blending : "gaussian" (sigma = patch / 8, weight on window centres) or "mean".
    batch_size : windows per forward pass.
    device : torch device of the predictor; autocast (float16) is used on CUDA.
    bf16 : autocast to bfloat16 on CPU (fast on CPUs with AMX / AVX512-BF16).
    transform : applied to every input block read from ``volume`` (e.g. normalisation).
    write : ``write(region, values)`` receives the blended result block by block:
        ``region`` a (z, y, x) tuple of slices of the volume, ``values`` a
        (K, dz, dy, dx) float32 array, valid only during the call. The blocks tile
        the volume exactly once, in increasing z. When None, the whole
        (K, Z, Y, X) float32 result is assembled and returned.
    progress : called with the number of windows finished after every batch.
    z_carry_dtype : "float32" (exact) or "float16": the buffer that holds the
        Z overlap across the whole area, (K, overlap_z, Y, X), at half the
        memory; values in [0, 1] then carry a rounding error below 2.5e-4
        (the precision of the float16 probability maps).

    Returns
    -------
    (K, Z, Y, X) float32 array when ``write`` is None, else None.
    """
    import torch

    if volume.ndim != 3:
        raise CryocapsError(f"sliding window needs a (Z, Y, X) volume, got shape {tuple(volume.shape)}")
    if batch_size < 1:
        raise CryocapsError(f"--batch-size {batch_size}: must be at least 1")
    plans = plan_windows(volume.shape, patch_size, overlap, size_multiple)
    weights = [axis_weights(plan, blending) for plan in plans]
    result: dict[str, np.ndarray] = {}

    def assemble(region, values):
        if "out" not in result:
            result["out"] = np.zeros((values.shape[0], *volume.shape), np.float32)
        result["out"][(slice(None), *region)] = values

    if z_carry_dtype not in ("float32", "float16"):
        raise CryocapsError(f"z_carry_dtype must be float32 or float16, got {z_carry_dtype!r}")
    stream = _BlendStream(plans, write or assemble, z_carry_dtype)
    reader = _WindowReader(volume, plans, transform)
    windows = list(itertools.product(*(range(plan.n_windows) for plan in plans)))
    device_type = torch.device(device).type
    autocast = (
        torch.autocast("cuda", dtype=torch.float16)
        if device_type == "cuda"
        else torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    )
    try:
        with torch.inference_mode(), autocast:
            for first in range(0, len(windows), batch_size):
                batch = windows[first : first + batch_size]
                inputs = np.stack([reader.window(*index) for index in batch])[:, None]
                outputs = predictor(torch.from_numpy(inputs).to(device))
                if isinstance(outputs, tuple | list):
                    outputs = outputs[0]
                outputs = outputs.float().cpu().numpy()
                for index, values in zip(batch, outputs, strict=True):
                    k, j, i = index
                    weight = weights[0][k][:, None, None] * weights[1][j][:, None] * weights[2][i]
                    stream.add(index, values * weight)  # a new array: outputs may alias each other
                if progress is not None:
                    progress(len(batch))
    finally:
        reader.close()
    return result.get("out") if write is None else None


class ProbabilityPredictor:
    """Softmax probabilities of a segmentation network, optionally averaged over rotations.

    ``tta=True`` averages the identity and the 180° rotations about Z, Y and X
    (:data:`TTA_FLIPS`): they keep a missing wedge about the Y tilt axis and
    the hand of the particles. With ``channels_last``, the model and inputs use
    the channels-last 3D memory format (faster oneDNN convolutions on CPU).
    """

    def __init__(self, model, *, tta: bool = False, channels_last: bool = True):
        import torch

        self.model = model.eval()
        self.flips = TTA_FLIPS if tta else ((),)
        self.memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)

    def __call__(self, inputs):
        import torch

        total = None
        for dims in self.flips:
            x = inputs.flip(dims) if dims else inputs
            logits = self.model(x.contiguous(memory_format=self.memory_format))
            if isinstance(logits, tuple | list):
                logits = logits[0]
            probabilities = torch.softmax(logits.float(), dim=1)
            probabilities = probabilities.flip(dims) if dims else probabilities
            total = probabilities if total is None else total + probabilities
        return total / len(self.flips) if len(self.flips) > 1 else total


# --------------------------------------------------------------------------- whole tomograms


def resolve_window(config: dict, size_multiple: int, patch_size=None, overlap=None) -> tuple[tuple, tuple]:
    """Patch and overlap (z, y, x) for a model: given values, else the defaults (validated).

    Default patch: the larger of :data:`DEFAULT_PATCH_SIZE` and the training patch
    (``config["patch_size"]``), rounded up to ``size_multiple``; default overlap:
    :data:`DEFAULT_OVERLAP`, capped below the patch.
    """
    if patch_size is None:
        trained = config.get("patch_size") or DEFAULT_PATCH_SIZE
        trained = max(_triple(trained, "patch_size in the model config"))
        patch_size = _round_up(max(DEFAULT_PATCH_SIZE, trained), size_multiple)
    patches = _triple(patch_size, "--patch-size")
    for patch in patches:
        if patch <= 0 or patch % size_multiple:
            raise CryocapsError(
                f"--patch-size {patch}: must be a positive multiple of {size_multiple} for this model"
            )
    if overlap is None:
        overlap = tuple(min(DEFAULT_OVERLAP, patch // 2) for patch in patches)
    overlaps = _triple(overlap, "--overlap")
    for patch, margin in zip(patches, overlaps, strict=True):
        if not 0 <= margin < patch:
            raise CryocapsError(f"--overlap {margin}: must be at least 0 and smaller than --patch-size {patch}")
    return patches, overlaps


def check_voxel_size(path, voxel_size_angstrom: float, config: dict, ignore: bool = False) -> None:
    """Refuse a tomogram whose voxel size is more than 5% off the model's training voxel size."""
    trained = config.get("voxel_size_angstrom")
    if ignore or not trained:
        return
    trained = float(trained)
    difference = abs(voxel_size_angstrom - trained) / trained
    if difference > VOXEL_SIZE_TOLERANCE:
        raise CryocapsError(
            f"{path}: voxel size {voxel_size_angstrom:g} Å differs from the model's {trained:g} Å by "
            f"{100 * difference:.0f}% (> {100 * VOXEL_SIZE_TOLERANCE:.0f}%); resample it with "
            f"`cryocaps preprocess {path} -o DIR --voxel-size-angstrom {trained:g}` and segment "
            "DIR's copy, or pass --ignore-voxel-size"
        )


def normalization_transform(data, config: dict) -> Callable[[np.ndarray], np.ndarray] | None:
    """The model's input normalisation, with statistics of the whole tomogram ``data``."""
    settings = config.get("normalization") or {}
    method = settings.get("method", "percentile_zscore")
    if method in ("none", None):
        return None
    if method != "percentile_zscore":
        raise CryocapsError(f"model config: unknown normalization method {method!r}")
    stats = normalization_stats(
        _SectionReader(data), tuple(settings.get("clip_percentiles", DEFAULT_CLIP_PERCENTILES))
    )
    return lambda block: apply_normalization(block, stats)


class _SectionReader:
    """A memory-mapped volume seen through strided indexing, read one section at a time.

    ``normalization_stats`` takes a strided sample ``data[::s, ::s, ::s]``;
    through a memory map that touches about 1/s of the file's pages at once
    (hundreds of MB for a large tomogram). Reading section by section and
    dropping the pages after each keeps that to one section; the sample is the same.
    """

    def __init__(self, data):
        self.data = data
        self.shape = data.shape
        self.size = data.size
        self.ndim = data.ndim
        self.dtype = data.dtype

    def __getitem__(self, key):
        if not (isinstance(key, tuple) and len(key) == 3 and isinstance(key[0], slice)):
            return self.data[key]
        sections = []
        for z in range(*key[0].indices(self.shape[0])):
            sections.append(np.array(self.data[(z, *key[1:])]))
            release_pages(self.data)
        return np.stack(sections)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.data, dtype=dtype)


def write_model_classes(config: dict, out_dir, overwrite: bool = False) -> Path | None:
    """Write the model's class table to ``out_dir/classes.csv`` (kept if identical)."""
    records = config.get("classes")
    if not records:
        return None
    table = ClassTable.from_records(records, "model config")
    path = Path(out_dir) / "classes.csv"
    if path.exists() and not overwrite:
        try:
            existing = read_classes(path)
        except CryocapsError:
            existing = None
        same = existing is not None and [(c.label, c.name, c.radius_angstrom) for c in existing] == [
            (c.label, c.name, c.radius_angstrom) for c in table
        ]
        if not same:
            raise CryocapsError(f"{path} exists with other classes than the model's; pass --overwrite to replace it")
        return path
    return write_classes(table, path, overwrite=True)


class _OutputMaps:
    """Turns blended probability blocks into the output maps, writing into memory-mapped files."""

    def __init__(self, labels, probabilities=None, score=None):
        self.labels = labels
        self.probabilities = probabilities
        self.score = score
        self._z = -1

    def __call__(self, region: tuple[slice, slice, slice], values: np.ndarray) -> None:
        if region[0].start != self._z:  # a new Z slab: earlier slabs are final, drop their pages
            self.release()
            self._z = region[0].start
        self.labels[region] = values.argmax(axis=0)
        if self.score is not None:
            self.score[region] = values[1:].max(axis=0)
        if self.probabilities is not None:
            self.probabilities[(slice(None), *region)] = values

    def release(self) -> None:
        for array in (self.labels, self.probabilities, self.score):
            if array is not None:
                release_pages(array, flush=True)


def segment_tomogram(
    model,
    config: dict,
    tomogram_path,
    out_dir,
    *,
    patch_size=None,
    overlap=None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    blending: str = "gaussian",
    probabilities: bool = False,
    score: bool = False,
    tta: bool = False,
    bf16: bool = False,
    device: str = "cpu",
    overwrite: bool = False,
    ignore_voxel_size: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Segment one tomogram with a loaded model and write its maps to ``out_dir``.

    Parameters
    ----------
    model, config : from :func:`cryocaps.modelfile.load_model`.
    tomogram_path : MRC file (memory-mapped, never read whole).
    out_dir : gets ``<tomo>_labels.mrc`` (uint8, MRC mode 0, 0 = background),
        with ``probabilities`` ``<tomo>_probs.mrc`` (float16 (C, Z, Y, X) stack),
        with ``score`` ``<tomo>_score.mrc`` (float16 (Z, Y, X), highest
        foreground probability), and ``classes.csv`` from the model config.
        All keep the tomogram's voxel size and origin.
    patch_size, overlap : see :func:`resolve_window` (None = defaults).
    progress : called with the number of windows finished.

    Returns
    -------
    dict with ``tomogram``, ``outputs`` (name -> path), ``shape``, ``voxels``,
    ``patch_size``/``overlap`` (fitted, z y x), ``windows``, ``overhead``,
    ``seconds`` (normalisation, inference, total), ``voxels_per_second``,
    ``peak_rss_bytes``.
    """
    from cryocaps.runinfo import peak_rss_bytes

    started = time.perf_counter()
    _check_blending(blending)
    tomogram_path = Path(tomogram_path)
    info = read_info(tomogram_path)
    check_voxel_size(tomogram_path, info.voxel_size_angstrom, config, ignore_voxel_size)
    size_multiple = int(getattr(model, "size_multiple", 1))
    patches, overlaps = resolve_window(config, size_multiple, patch_size, overlap)
    name = tomogram_name(tomogram_path)
    paths = output_paths(out_dir, name, probabilities=probabilities, score=score)
    if not overwrite:
        existing = [str(p) for p in paths.values() if p.exists()]
        if existing:
            raise CryocapsError(f"{existing[0]} exists; pass --overwrite to replace it")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_model_classes(config, out_dir, overwrite=overwrite)

    tomogram = read_tomogram(tomogram_path, mmap=True)
    try:
        transform = normalization_transform(tomogram.data, config)
        release_pages(tomogram.data)
        normalized = time.perf_counter()
        plans = plan_windows(tomogram.shape, patches, overlaps, size_multiple)
        n_outputs = int(config.get("options", {}).get("n_classes") or getattr(model, "n_classes", 0) or 0)
        geometry = {"voxel_size_angstrom": tomogram.voxel_size_angstrom, "origin_angstrom": tomogram.origin_angstrom}
        with contextlib.ExitStack() as stack:
            # Entered first, renamed last: a labels file means the tomogram is done.
            labels = stack.enter_context(
                MrcVolumeWriter(paths["labels"], tomogram.shape, dtype="uint8", overwrite=overwrite, **geometry)
            )
            probs_writer = score_writer = None
            if probabilities:
                if n_outputs < 2:
                    raise CryocapsError("model config: n_classes is missing; cannot size the probability map")
                probs_writer = stack.enter_context(
                    MrcVolumeWriter(
                        paths["probabilities"], (n_outputs, *tomogram.shape), dtype="float16", overwrite=overwrite, **geometry
                    )
                )
            if score:
                score_writer = stack.enter_context(
                    MrcVolumeWriter(paths["score"], tomogram.shape, dtype="float16", overwrite=overwrite, **geometry)
                )
            maps = _OutputMaps(
                labels.data,
                probs_writer.data if probs_writer else None,
                score_writer.data if score_writer else None,
            )
            sliding_window(
                tomogram.data,
                ProbabilityPredictor(model, tta=tta),
                patches,
                overlaps,
                size_multiple=size_multiple,
                blending=blending,
                batch_size=batch_size,
                device=device,
                bf16=bf16,
                transform=transform,
                write=maps,
                progress=progress,
                z_carry_dtype="float16",  # halves the one buffer that grows with the area
            )
            maps.release()
    finally:
        tomogram.close()
    finished = time.perf_counter()
    voxels = math.prod(tomogram.shape)
    return {
        "tomogram": str(tomogram_path),
        "outputs": {key: str(path) for key, path in paths.items()},
        "shape": list(tomogram.shape),
        "voxels": voxels,
        "voxel_size_angstrom": tomogram.voxel_size_angstrom,
        "patch_size": [p.patch for p in plans],
        "overlap": [p.overlap for p in plans],
        "windows": math.prod(p.n_windows for p in plans),
        "overhead": round(overlap_overhead(plans), 4),
        "tta": tta,
        "bf16": bf16,
        "seconds": {
            "normalization": round(normalized - started, 4),
            "inference": round(finished - normalized, 4),
            "total": round(finished - started, 4),
        },
        "voxels_per_second": round(voxels / max(finished - started, 1e-9), 1),
        "peak_rss_bytes": peak_rss_bytes(),
    }


def count_windows(shape, config: dict, size_multiple: int, patch_size=None, overlap=None) -> int:
    """Number of windows :func:`segment_tomogram` will run on a volume of ``shape``."""
    patches, overlaps = resolve_window(config, size_multiple, patch_size, overlap)
    return math.prod(p.n_windows for p in plan_windows(shape, patches, overlaps, size_multiple))


def select_shard(paths: Sequence, index: int, count: int) -> list:
    """The ``index``-th of ``count`` disjoint shares of ``paths`` (0-based), deterministic.

    Inputs are sorted by absolute path and dealt round-robin, so every shard
    gets the same list whatever order the shell gave the files in, and the
    shards together cover every input exactly once.
    """
    if count < 1 or not 0 <= index < count:
        raise CryocapsError(f"--shard {index}/{count}: need 0 <= I < N")
    ordered = sorted(paths, key=lambda p: str(Path(p).resolve()))
    return ordered[index::count]


def unique_inputs(files: Sequence) -> list[Path]:
    """Drop repeated files; refuse two inputs that would write the same output names."""
    unique: dict[Path, Path] = {}
    names: dict[str, Path] = {}
    for path in map(Path, files):
        resolved = path.resolve()
        if resolved in unique:
            continue
        name = tomogram_name(path)
        if name in names:
            raise CryocapsError(f"{path} and {names[name]} have the same name {name!r}; their outputs would collide")
        unique[resolved] = path
        names[name] = path
    return list(unique.values())


def segment_files(
    files: Sequence,
    model_path,
    out_dir,
    *,
    shard: tuple[int, int] | None = None,
    patch_size=None,
    overlap=None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    blending: str = "gaussian",
    probabilities: bool = False,
    score: bool = False,
    tta: bool = False,
    bf16: bool | None = None,
    device: str = "cpu",
    threads: int | None = None,
    overwrite: bool = False,
    ignore_voxel_size: bool = False,
    progress: Callable[..., None] | None = None,
) -> dict:
    """Segment many tomograms with a saved model (what ``cryocaps segment`` runs).

    Every input's voxel size is checked before any work starts. A tomogram
    whose requested outputs all exist is skipped unless ``overwrite``; one
    whose labels are missing is redone (extras left by an interrupted run are
    replaced, since labels are renamed into place last); one with labels but
    without a requested extra is refused. ``shard=(I, N)`` keeps the I-th
    (0-based) of N disjoint shares (:func:`select_shard`).
    ``progress(n, info=..., total=...)`` follows ``cli.common.progress``.
    ``bf16=None`` autocasts to bfloat16 on CPUs that compute it natively
    (:func:`native_bf16`): measured 3x faster with 99.99% of labels unchanged.

    Returns
    -------
    dict with ``tomograms`` (one :func:`segment_tomogram` result each),
    ``skipped`` (paths), ``model_name``, ``patch_size`` and ``overlap`` (requested).
    """
    from cryocaps.modelfile import load_model

    _check_blending(blending)
    files = unique_inputs(files)
    if shard is not None:
        files = select_shard(files, *shard)
    if batch_size < 1:
        raise CryocapsError(f"--batch-size {batch_size}: must be at least 1")
    configure_threads(threads)
    if bf16 is None:
        bf16 = torch_device_type(device) == "cpu" and native_bf16()
    model, config = load_model(model_path, device)
    size_multiple = int(getattr(model, "size_multiple", 1))
    patches, overlaps = resolve_window(config, size_multiple, patch_size, overlap)
    infos = [read_info(path) for path in files]
    for path, info in zip(files, infos, strict=True):
        check_voxel_size(path, info.voxel_size_angstrom, config, ignore_voxel_size)

    todo, skipped = [], []
    for path, info in zip(files, infos, strict=True):
        paths = output_paths(out_dir, tomogram_name(path), probabilities=probabilities, score=score)
        present = [p for p in paths.values() if p.exists()]
        if overwrite or not present:
            todo.append((path, info, overwrite))
        elif len(present) == len(paths):
            skipped.append(str(path))
        elif paths["labels"].exists():
            missing = ", ".join(p.name for p in paths.values() if not p.exists())
            raise CryocapsError(f"{paths['labels']} exists but {missing} does not; pass --overwrite to redo {path}")
        else:
            todo.append((path, info, True))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_model_classes(config, out_dir, overwrite=overwrite)

    advance = progress or (lambda *args, **kwargs: None)
    total = sum(count_windows(info.shape, config, size_multiple, patches, overlaps) for _, info, _ in todo)
    advance(0, total=total)
    results = []
    for number, (path, _, replace) in enumerate(todo, 1):
        label = f"{number}/{len(todo)} {path.name}"
        advance(0, info=label)
        results.append(
            segment_tomogram(
                model,
                config,
                path,
                out_dir,
                patch_size=patches,
                overlap=overlaps,
                batch_size=batch_size,
                blending=blending,
                probabilities=probabilities,
                score=score,
                tta=tta,
                bf16=bf16,
                device=device,
                overwrite=replace,
                ignore_voxel_size=ignore_voxel_size,
                progress=lambda n, label=label: advance(n, info=label),
            )
        )
    return {
        "tomograms": results,
        "skipped": skipped,
        "model_name": config.get("model"),
        "bf16": bf16,
        "patch_size": list(patches),
        "overlap": list(overlaps),
    }
