"""Where a sliding window's result goes: the :class:`BlendSink` interface and two sinks.

:func:`~cryocaps.inference.blend.sliding_window` hands its blended result to a
sink block by block, in the spirit of MONAI's ``Merger``
(``aggregate``/``finalize``), so the caller decides what is kept: the whole
result in memory (:class:`ArraySink`), or label, probability and score maps
written into MRC files as the blocks arrive (:class:`MrcMapsSink`), with memory
that does not grow with the tomogram. A custom sink only needs the two methods.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from cryocaps.io.pages import release_pages
from cryocaps.io.volumes import volume_writer

Region = tuple[slice, slice, slice]  # (z, y, x) slices of the volume


@runtime_checkable
class BlendSink(Protocol):
    """Where :func:`~cryocaps.inference.blend.sliding_window` puts its result.

    ``aggregate(region, block)`` receives final blended values: ``region`` is a
    (z, y, x) tuple of slices of the volume, ``block`` a (K, dz, dy, dx) float32
    array, valid only during the call (copy what you keep). The regions tile the
    volume exactly once, their Z starts never decrease, and every voxel's
    blending weights sum to 1. ``finalize()`` is called once, after the last
    block; what it returns, ``sliding_window`` returns. It is not called
    when the sliding window fails.
    """

    def aggregate(self, region: Region, block: np.ndarray) -> None: ...

    def finalize(self) -> Any: ...


class ArraySink:
    """Assembles the whole result in memory: ``finalize()`` returns (K, Z, Y, X) float32."""

    def __init__(self, shape: Sequence[int]):
        self.shape = tuple(int(n) for n in shape)
        self.values: np.ndarray | None = None

    def aggregate(self, region: Region, block: np.ndarray) -> None:
        if self.values is None:  # K is known only from the first block
            self.values = np.zeros((block.shape[0], *self.shape), np.float32)
        self.values[(slice(None), *region)] = block

    def finalize(self) -> np.ndarray | None:
        return self.values


class MrcMapsSink:
    """A :class:`BlendSink` writing blended probabilities to MRC files (OME-Zarr for ``.zarr``
    paths).

    Each block of (K, dz, dy, dx) probabilities becomes its argmax in the uint8
    label map, and, when their paths are given, float16 probabilities in the
    (K, Z, Y, X) stack and the highest foreground probability in the score map.
    The files are memory maps whose pages are flushed and dropped slab by slab,
    so memory does not grow with the tomogram.

    Use as a context manager: entering creates every file under a temporary
    name; leaving without error renames them into place, the label map last (a
    label map means the tomogram is done); leaving on error removes them.

    Parameters
    ----------
    paths : ``labels`` and optionally ``probabilities`` and ``score`` (see
        :func:`cryocaps.io.layout.output_paths`).
    shape : (Z, Y, X) of the tomogram, voxels.
    n_outputs : K, the model's outputs (classes including background).
    voxel_size_angstrom, origin_angstrom : written into every header.
    """

    def __init__(
        self,
        paths: Mapping[str, Path],
        shape: Sequence[int],
        n_outputs: int,
        *,
        voxel_size_angstrom: float,
        origin_angstrom: tuple[float, float, float] = (0.0, 0.0, 0.0),
        overwrite: bool = False,
    ):
        self.paths = dict(paths)
        self.shape = tuple(int(n) for n in shape)
        self.n_outputs = n_outputs
        self.geometry = {
            "voxel_size_angstrom": voxel_size_angstrom,
            "origin_angstrom": origin_angstrom,
        }
        self.overwrite = overwrite
        self.labels = self.probabilities = self.score = None
        self._stack: contextlib.ExitStack | None = None
        self._z = -1

    def _writer(self, stack: contextlib.ExitStack, key: str, shape, dtype: str) -> np.ndarray:
        writer = volume_writer(  # an MRC file, or an OME-Zarr image for a .zarr path
            self.paths[key], shape, dtype=dtype, overwrite=self.overwrite, **self.geometry
        )
        return stack.enter_context(writer).data

    def __enter__(self) -> MrcMapsSink:
        with contextlib.ExitStack() as stack:
            # Entered first, renamed last: a labels file means the tomogram is done.
            self.labels = self._writer(stack, "labels", self.shape, "uint8")
            if "probabilities" in self.paths:
                stack_shape = (self.n_outputs, *self.shape)
                self.probabilities = self._writer(stack, "probabilities", stack_shape, "float16")
            if "score" in self.paths:
                self.score = self._writer(stack, "score", self.shape, "float16")
            self._stack = stack.pop_all()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stack.__exit__(exc_type, exc, tb)

    def aggregate(self, region: Region, block: np.ndarray) -> None:
        if region[0].start != self._z:  # a new Z slab: earlier slabs are final, drop their pages
            self._release()
            self._z = region[0].start
        self.labels[region] = block.argmax(axis=0)
        if self.score is not None:
            self.score[region] = block[1:].max(axis=0)
        if self.probabilities is not None:
            self.probabilities[(slice(None), *region)] = block

    def finalize(self) -> None:
        self._release()

    def _release(self) -> None:
        for array in (self.labels, self.probabilities, self.score):
            if array is not None:
                release_pages(array, flush=True)
