"""Fourier rescaling to another voxel size (any ratio) and soft band-pass filters, slab by slab."""

from __future__ import annotations

import numpy as np

# Rescaling is Fourier cropping (downsampling) or zero padding (upsampling),
# done one axis at a time on slabs so that only the input, the output and a
# slab-sized spectrum are in memory at once. Each axis keeps the frequencies
# |k| < min(n_in, n_out) / 2, so an even-sized Nyquist plane (ambiguous for
# real data) is dropped. Sample j of the output sits where sample 0 of the
# input sat plus j output voxels: the first voxel, and so the MRC origin, stay.

_SLAB_BYTES = 64 * 2**20
_EDGE_FRACTION_OF_NYQUIST = 0.1


def rescaled_shape(shape, voxel_size_angstrom: float, target_voxel_size_angstrom: float) -> tuple:
    """Output shape of a rescale: ``n * voxel / target`` rounded half up, per axis (at least 2)."""
    ratio = voxel_size_angstrom / target_voxel_size_angstrom
    return tuple(_round_half_up(n * ratio) for n in shape)


def _round_half_up(value: float) -> int:
    # Header voxel sizes are float32: 21 * 5.4 / 10.8 may be 10.4999999 or 10.5000001.
    return max(2, int(np.floor(round(value, 6) + 0.5)))


def _exact_length(n_in: int, ratio: float) -> tuple[int, int]:
    """Padded input length and matching output length whose ratio is exactly ``ratio``.

    Padding the input by a few voxels (at most 20 %, a linear ramp from its last plane back to
    its first) makes the output voxel exactly the requested size; when no such padding exists the
    output voxel differs from the request by at most half a voxel over the whole axis (see
    :func:`effective_voxel_sizes`).
    """
    for pad in range(0, max(1, n_in // 5) + 1):
        n_out = (n_in + pad) * ratio
        if abs(n_out - round(n_out)) < 1e-4 and round(n_out) >= _round_half_up(n_in * ratio):
            return n_in + pad, int(round(n_out))
    return n_in, _round_half_up(n_in * ratio)


def effective_voxel_sizes(
    shape, voxel_size_angstrom: float, target_voxel_size_angstrom: float
) -> tuple:
    """Voxel size (Å) that :func:`fourier_rescale` really produces along z, y, x."""
    ratio = voxel_size_angstrom / target_voxel_size_angstrom
    sizes = []
    for n in shape:
        n_padded, n_out = _exact_length(n, ratio)
        sizes.append(voxel_size_angstrom * n_padded / n_out)
    return tuple(sizes)


def _slab_step(shape, axis: int) -> tuple[int, int]:
    """Axis to cut slabs along (not the transformed one) and slab thickness for ~64 MB."""
    cut_axis = 0 if axis != 0 else 1
    plane = int(np.prod(shape)) // shape[cut_axis]
    return cut_axis, max(1, _SLAB_BYTES // (8 * max(1, plane)))


def _rescale_axis(data: np.ndarray, axis: int, ratio: float, n_final: int) -> np.ndarray:
    """Fourier-rescale ``data`` along one axis by ``ratio``; returns float32 with ``n_final``
    samples there."""
    from scipy import fft

    n_in = data.shape[axis]
    n_padded, n_out = _exact_length(n_in, ratio)
    keep = (min(n_padded, n_out) + 1) // 2  # bins 0..keep-1: |k| < min/2
    view = [1] * data.ndim
    view[axis] = -1
    # Padding ramps linearly from the last plane back to the first, so the periodic signal has
    # no step.
    ramp = (np.arange(1, n_padded - n_in + 1, dtype=np.float32) / (n_padded - n_in + 1)).reshape(
        view
    )

    out_shape = list(data.shape)
    out_shape[axis] = n_final
    out = np.empty(out_shape, np.float32)
    cut_axis, step = _slab_step(data.shape, axis)
    for start in range(0, data.shape[cut_axis], step):
        index = [slice(None)] * data.ndim
        index[cut_axis] = slice(start, start + step)
        index = tuple(index)
        slab = np.asarray(data[index], dtype=np.float32)
        if n_padded > n_in:
            first = np.take(slab, [0], axis=axis)
            last = np.take(slab, [n_in - 1], axis=axis)
            slab = np.concatenate([slab, last + (first - last) * ramp], axis=axis)
        spectrum = fft.rfft(slab, axis=axis, norm="forward")
        del slab
        crop = [slice(None)] * data.ndim
        crop[axis] = slice(0, keep)
        kept = spectrum[tuple(crop)]
        resampled = fft.irfft(kept, n=n_out, axis=axis, norm="forward")
        del spectrum, kept
        take = [slice(None)] * data.ndim
        take[axis] = slice(0, n_final)  # n_final <= n_out always
        out[index] = resampled[tuple(take)]
    return out


def fourier_rescale(
    data: np.ndarray,
    voxel_size_angstrom: float,
    target_voxel_size_angstrom: float,
    release_input=None,
) -> np.ndarray:
    """Rescale a (Z, Y, X) volume to another voxel size by Fourier cropping or padding.

    Any ratio works, not only integer binning; the output shape is
    ``shape * voxel_size / target`` rounded half up. ``data`` may be a memory map of any
    real dtype: it is read slab by slab. Peak memory is about the input as
    float32 plus 1.5x the larger of input and output (measured: 1.6x the
    float32 input for 2x binning of a 200x512x512 tomogram, 1.8x for 5.4 to
    7.3 Å, beyond the interpreter's own ~125 MB). ``release_input()``, if
    given, is called as soon as ``data`` has been read (after the first axis).

    Returns
    -------
    (Z', Y', X') float32, voxel size ``target_voxel_size_angstrom``, first voxel unmoved.
    """
    ratio = voxel_size_angstrom / target_voxel_size_angstrom
    final_shape = rescaled_shape(data.shape, voxel_size_angstrom, target_voxel_size_angstrom)
    volume = data
    del data
    for axis in (2, 1, 0):  # x first: contiguous, and the volume shrinks soonest
        volume = _rescale_axis(volume, axis, ratio, final_shape[axis])
        if release_input is not None:
            release_input()
            release_input = None
    return volume


def _cosine_edge(frequency: np.ndarray, cutoff: float, width: float) -> np.ndarray:
    """1 below ``cutoff - width/2``, 0 above ``cutoff + width/2``, raised cosine between."""
    position = np.clip((frequency - (cutoff - width / 2)) / width, 0.0, 1.0)
    return (0.5 * (1.0 + np.cos(np.pi * position))).astype(np.float32)


def bandpass_filter(
    data: np.ndarray,
    voxel_size_angstrom: float,
    *,
    lowpass_angstrom: float | None = None,
    highpass_angstrom: float | None = None,
    in_place: bool = False,
) -> np.ndarray:
    """Low- and/or high-pass filter a (Z, Y, X) volume with soft (raised-cosine) edges.

    Resolutions are in Å (``lowpass_angstrom=40`` keeps detail coarser than
    40 Å). Each edge is a raised cosine centred on the cut-off, 10 % of the
    Nyquist frequency wide (never wider than the cut-off frequency itself).
    With ``in_place`` a float32 ``data`` is overwritten. Memory: the volume
    as float32 plus its half spectrum (~2x the float32 volume).

    Returns float32 (Z, Y, X).
    """
    from scipy import fft

    volume = np.asarray(data, dtype=np.float32) if in_place else np.array(data, dtype=np.float32)
    if lowpass_angstrom is None and highpass_angstrom is None:
        return volume
    shape = volume.shape
    spectrum = fft.rfftn(volume, workers=-1)
    nyquist = 1.0 / (2.0 * voxel_size_angstrom)
    fz = fft.fftfreq(shape[0], d=voxel_size_angstrom).astype(np.float32)
    fy = fft.fftfreq(shape[1], d=voxel_size_angstrom).astype(np.float32)
    fx = fft.rfftfreq(shape[2], d=voxel_size_angstrom).astype(np.float32)
    plane = fy[:, None] ** 2 + fx[None, :] ** 2
    for z in range(shape[0]):  # one plane at a time: no full-size frequency array
        frequency = np.sqrt(plane + fz[z] ** 2)
        gain = np.ones_like(frequency)
        if lowpass_angstrom is not None:
            cutoff = 1.0 / lowpass_angstrom
            gain *= _cosine_edge(
                frequency, cutoff, min(cutoff, _EDGE_FRACTION_OF_NYQUIST * nyquist)
            )
        if highpass_angstrom is not None:
            cutoff = 1.0 / highpass_angstrom
            gain *= 1.0 - _cosine_edge(
                frequency, cutoff, min(cutoff, _EDGE_FRACTION_OF_NYQUIST * nyquist)
            )
        spectrum[z] *= gain
    # Inverse along z and y in place, then along x slab by slab into the volume's own buffer.
    spectrum = fft.ifftn(spectrum, axes=(0, 1), overwrite_x=True, workers=-1)
    step = max(1, _SLAB_BYTES // (8 * spectrum[0].size))
    for start in range(0, shape[0], step):
        volume[start : start + step] = fft.irfft(spectrum[start : start + step], n=shape[2], axis=2)
    return volume
