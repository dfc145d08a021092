"""The sliding window: batched windows, blended, handed to a sink block by block.

:func:`sliding_window` works in the manner of MONAI's ``sliding_window_inference``:
a regular lattice of overlapping windows (:mod:`cryocaps.inference.windows`),
Gaussian (or mean) blending, batched windows under ``torch.inference_mode()``
and the runtime's autocast. It differs in how it holds the result: windows are
visited slab by slab along Z (then along Y, then X) and a block of voxels is
handed to a :class:`BlendSink` as soon as no later window can touch it, so only
the overlap margins are kept — ``K x overlap_z x Y x X`` values for the Z
margin, plus one window row. Memory therefore does not grow with the
tomogram's depth, and grows with its area only through that thin margin.

Blending weights are normalised per axis (the lattice is a product of 1D
lattices and the Gaussian is separable), so the blended value is
``sum_w g_w(v) p_w(v)`` with ``sum_w g_w(v) = 1`` at every voxel: a constant
prediction stays exactly constant, and no seams appear.

Test-time augmentation (:class:`ProbabilityPredictor` with ``tta=True``)
averages the identity and the three 180° rotations about Z, Y and X (flips of
two axes at once). A flip of any axis keeps a missing wedge symmetric about the
Y tilt axis (it only changes signs of kx, ky or kz), but a single flip also
mirrors the particles, and macromolecules are chiral; the rotations keep both
the wedge and the hand.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np

from cryocaps.errors import CryocapsError
from cryocaps.inference.sinks import ArraySink, BlendSink
from cryocaps.inference.windows import AxisPlan, plan_windows, reflect_indices
from cryocaps.io.pages import release_pages
from cryocaps.runtime import autocast

DEFAULT_BATCH_SIZE = 1  # windows per forward pass
GAUSSIAN_SIGMA_SCALE = 0.125  # Gaussian sigma as a fraction of the window side (as MONAI)
BLENDING_MODES = ("gaussian", "mean")
# The identity and the 180° rotations about Z, Y, X, as flips of (B, C, Z, Y, X) dims.
TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (3, 4), (2, 4), (2, 3))


# --------------------------------------------------------------------------- weights


def check_blending(blending: str) -> None:
    """Refuse a blending mode other than :data:`BLENDING_MODES`."""
    if blending not in BLENDING_MODES:
        raise CryocapsError(f"--blending {blending!r}: choose one of {', '.join(BLENDING_MODES)}")


def axis_weights(plan: AxisPlan, blending: str = "gaussian") -> np.ndarray:
    """(n_windows, patch) float32 blending weights whose sum over windows is 1 at every position."""
    check_blending(blending)
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


# --------------------------------------------------------------------------- reading and blending


class _WindowReader:
    """Input of one window at a time; reads a (patch_z, patch_y, lattice_x) block per window row.

    ``volume`` may be any (Z, Y, X) array-like that supports basic slicing
    (numpy array, memory map, lazily read chunked array): only the bounding slab
    of a window row is read, then mirrored in memory.
    """

    def __init__(self, volume, plans: Sequence[AxisPlan], transform: Callable | None):
        self.volume = volume
        self.plans = plans
        self.transform = transform
        px = plans[2]
        lattice_end = px.lattice_start + px.lattice_length
        self.x_index = reflect_indices(px.lattice_start, lattice_end, px.size)
        self._key: tuple[int, int] | None = None
        self._block: np.ndarray | None = None

    def window(self, k: int, j: int, i: int) -> np.ndarray:
        if self._key != (k, j):
            pz, py = self.plans[0], self.plans[1]
            z_index = reflect_indices(pz.starts[k], pz.starts[k] + pz.patch, pz.size)
            y_index = reflect_indices(py.starts[j], py.starts[j] + py.patch, py.size)
            block = self._read(z_index, y_index)
            release_pages(self.volume)  # the block is a copy; re-reading the page cache is cheap
            block = self.transform(block) if self.transform else block
            self._block = np.asarray(block, dtype=np.float32)
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

    def __init__(self, plans: Sequence[AxisPlan], sink: BlendSink, z_carry_dtype=np.float32):
        self.plans = plans
        self.sink = sink
        self.z_carry_dtype = np.dtype(z_carry_dtype)
        self.carry: list[np.ndarray | None] = [None, None, None]

    def _allocate(self, n_outputs: int) -> None:
        pz, py, px = self.plans
        self.carry = [
            np.zeros(
                (n_outputs, pz.overlap, py.lattice_length, px.lattice_length), self.z_carry_dtype
            ),
            np.zeros((n_outputs, pz.patch, py.overlap, px.lattice_length), np.float32),
            np.zeros((n_outputs, pz.patch, py.patch, px.overlap), np.float32),
        ]

    def add(self, index: tuple[int, int, int], block: np.ndarray) -> None:
        """Add one weighted window (K, patch_z, patch_y, patch_x) at lattice position ``index``."""
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
        self.sink.aggregate(tuple(region), chunk[tuple(crop)])


def sliding_window(
    volume,
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
    sink: BlendSink | None = None,
    progress: Callable[[int], None] | None = None,
    z_carry_dtype: str = "float32",
):
    """Apply ``predictor`` to a whole volume by overlapping windows and blend the results.

    Parameters
    ----------
    volume : (Z, Y, X) array-like supporting basic slicing (numpy array, read-only
        memory map, lazily read chunked array); read one window row at a time,
        and a memory map's pages are dropped after each row.
    predictor : callable mapping a (B, 1, d, h, w) float tensor on ``device``
        to (B, K, d, h, w) values to blend (probabilities), e.g. a
        :class:`ProbabilityPredictor`.
    patch_size : window side in voxels, one int or (z, y, x); multiples of
        ``size_multiple``. Shrunk per axis to fit the volume (see
        :func:`~cryocaps.inference.windows.plan_axis`).
    overlap : voxels shared by neighbouring windows, one int or (z, y, x),
        0 <= overlap < patch.
    blending : "gaussian" (sigma = patch / 8, weight on window centres) or "mean".
    batch_size : windows per forward pass.
    device : torch device of the predictor; autocast as :func:`cryocaps.runtime.autocast`
        decides (float16 on CUDA; bfloat16 on CPU when ``bf16``).
    bf16 : autocast to bfloat16 on CPU (fast on CPUs with AMX / AVX512-BF16).
    transform : applied to every input block read from ``volume`` (e.g. normalisation).
    sink : a :class:`BlendSink` that receives the blended result block by block;
        default an :class:`ArraySink` (the whole (K, Z, Y, X) float32 result in memory).
    progress : called with the number of windows finished after every batch.
    z_carry_dtype : "float32" (exact) or "float16": the buffer that holds the
        Z overlap across the whole area, (K, overlap_z, Y, X), at half the
        memory; values in [0, 1] then carry a rounding error below 2.5e-4
        (the precision of the float16 probability maps).

    Returns
    -------
    What ``sink.finalize()`` returns: with the default sink, (K, Z, Y, X) float32.
    """
    import torch

    if len(volume.shape) != 3:
        shape = tuple(volume.shape)
        raise CryocapsError(f"sliding window needs a (Z, Y, X) volume, got shape {shape}")
    if batch_size < 1:
        raise CryocapsError(f"--batch-size {batch_size}: must be at least 1")
    plans = plan_windows(volume.shape, patch_size, overlap, size_multiple)
    weights = [axis_weights(plan, blending) for plan in plans]
    if z_carry_dtype not in ("float32", "float16"):
        raise CryocapsError(f"z_carry_dtype must be float32 or float16, got {z_carry_dtype!r}")
    sink = ArraySink(volume.shape) if sink is None else sink
    stream = _BlendStream(plans, sink, z_carry_dtype)
    reader = _WindowReader(volume, plans, transform)
    windows = list(itertools.product(*(range(plan.n_windows) for plan in plans)))
    try:
        with torch.inference_mode(), autocast(device, bf16):
            for first in range(0, len(windows), batch_size):
                batch = windows[first : first + batch_size]
                inputs = np.stack([reader.window(*index) for index in batch])[:, None]
                outputs = predictor(torch.from_numpy(inputs).to(device))
                if isinstance(outputs, tuple | list):
                    outputs = outputs[0]
                outputs = outputs.float().cpu().numpy()
                for (k, j, i), values in zip(batch, outputs, strict=True):
                    weight = weights[0][k][:, None, None] * weights[1][j][:, None] * weights[2][i]
                    stream.add((k, j, i), values * weight)  # a new array: outputs may alias
                if progress is not None:
                    progress(len(batch))
    finally:
        reader.close()
    return sink.finalize()


# --------------------------------------------------------------------------- the model's side


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
        """(B, 1, d, h, w) tensor -> (B, K, d, h, w) float32 probabilities."""
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
