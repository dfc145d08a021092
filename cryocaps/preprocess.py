"""Preprocessing: normalisation (shared by train and segment), rescaling, filters.

Normalisation is the same everywhere: clip to robust percentiles, then zero
mean and unit standard deviation. Statistics come from a strided sample so
that a memory-mapped tomogram is never read whole.
"""

from __future__ import annotations

import logging

import numpy as np

from cryocaps.errors import CryocapsError

log = logging.getLogger(__name__)

DEFAULT_CLIP_PERCENTILES = (0.5, 99.5)
_SAMPLE_VOXELS = 4_000_000


def normalization_stats(data: np.ndarray, clip_percentiles=DEFAULT_CLIP_PERCENTILES) -> dict:
    """Robust statistics of a volume: clip range and mean/std after clipping.

    Returns a JSON-serialisable dict ``{"low", "high", "mean", "std"}``.
    """
    step = max(1, int(np.ceil((data.size / _SAMPLE_VOXELS) ** (1 / 3))))
    sample = np.asarray(data[::step, ::step, ::step], dtype=np.float32)
    low, high = np.percentile(sample, clip_percentiles)
    clipped = np.clip(sample, low, high)
    std = float(clipped.std())
    return {"low": float(low), "high": float(high), "mean": float(clipped.mean()), "std": std if std > 0 else 1.0}


def apply_normalization(block: np.ndarray, stats: dict) -> np.ndarray:
    """Clip and standardise a block (any part of the volume) with whole-volume ``stats``."""
    out = np.clip(np.asarray(block, dtype=np.float32), stats["low"], stats["high"])
    out -= np.float32(stats["mean"])
    out /= np.float32(stats["std"])
    return out


def normalize(data: np.ndarray, clip_percentiles=DEFAULT_CLIP_PERCENTILES) -> np.ndarray:
    """Percentile-clipped zero-mean unit-std float32 copy of ``data``."""
    return apply_normalization(data, normalization_stats(data, clip_percentiles))


# --- rescaling and filters ---------------------------------------------------
#
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

    Padding the input by a few voxels (at most 20 %, a linear ramp from its
    last plane back to its first) makes the output voxel exactly the requested size; when no such padding
    exists the output voxel differs from the request by at most half a voxel
    over the whole axis (see :func:`effective_voxel_sizes`).
    """
    for pad in range(0, max(1, n_in // 5) + 1):
        n_out = (n_in + pad) * ratio
        if abs(n_out - round(n_out)) < 1e-4 and round(n_out) >= _round_half_up(n_in * ratio):
            return n_in + pad, int(round(n_out))
    return n_in, _round_half_up(n_in * ratio)


def effective_voxel_sizes(shape, voxel_size_angstrom: float, target_voxel_size_angstrom: float) -> tuple:
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
    """Fourier-rescale ``data`` along one axis by ``ratio``; returns float32 with ``n_final`` samples there."""
    from scipy import fft

    n_in = data.shape[axis]
    n_padded, n_out = _exact_length(n_in, ratio)
    keep = (min(n_padded, n_out) + 1) // 2  # bins 0..keep-1: |k| < min/2
    view = [1] * data.ndim
    view[axis] = -1
    # Padding ramps linearly from the last plane back to the first, so the periodic signal has no step.
    ramp = (np.arange(1, n_padded - n_in + 1, dtype=np.float32) / (n_padded - n_in + 1)).reshape(view)

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
    data: np.ndarray, voxel_size_angstrom: float, target_voxel_size_angstrom: float, release_input=None
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
            gain *= _cosine_edge(frequency, cutoff, min(cutoff, _EDGE_FRACTION_OF_NYQUIST * nyquist))
        if highpass_angstrom is not None:
            cutoff = 1.0 / highpass_angstrom
            gain *= 1.0 - _cosine_edge(frequency, cutoff, min(cutoff, _EDGE_FRACTION_OF_NYQUIST * nyquist))
        spectrum[z] *= gain
    # Inverse along z and y in place, then along x slab by slab into the volume's own buffer.
    spectrum = fft.ifftn(spectrum, axes=(0, 1), overwrite_x=True, workers=-1)
    step = max(1, _SLAB_BYTES // (8 * spectrum[0].size))
    for start in range(0, shape[0], step):
        volume[start : start + step] = fft.irfft(spectrum[start : start + step], n=shape[2], axis=2)
    return volume


def check_preprocess_options(
    voxel_size_angstrom: float,
    target_voxel_size_angstrom: float | None,
    lowpass_angstrom: float | None,
    highpass_angstrom: float | None,
    allow_upsample: bool,
    source: str = "input",
) -> float:
    """Validate the options against one input; return the output voxel size (Å)."""
    for flag, value in (
        ("--voxel-size-angstrom", target_voxel_size_angstrom),
        ("--lowpass-angstrom", lowpass_angstrom),
        ("--highpass-angstrom", highpass_angstrom),
    ):
        if value is not None and not (np.isfinite(value) and value > 0):
            raise CryocapsError(f"{flag} must be a positive number of Å, got {value}")
    out_voxel = target_voxel_size_angstrom or voxel_size_angstrom
    if target_voxel_size_angstrom is not None and not allow_upsample:
        if target_voxel_size_angstrom < voxel_size_angstrom * (1 - 1e-6):
            raise CryocapsError(
                f"{source}: voxel size {voxel_size_angstrom:g} Å is larger than --voxel-size-angstrom "
                f"{target_voxel_size_angstrom:g}, which would upsample; pass --allow-upsample if you mean it"
            )
    if lowpass_angstrom is not None and highpass_angstrom is not None and highpass_angstrom <= lowpass_angstrom:
        raise CryocapsError(
            f"--highpass-angstrom {highpass_angstrom:g} must be larger than --lowpass-angstrom "
            f"{lowpass_angstrom:g} (both are resolutions in Å)"
        )
    nyquist_angstrom = 2.0 * out_voxel
    if highpass_angstrom is not None and highpass_angstrom <= nyquist_angstrom:
        raise CryocapsError(
            f"--highpass-angstrom {highpass_angstrom:g} is at or beyond the Nyquist resolution "
            f"({nyquist_angstrom:g} Å at {out_voxel:g} Å voxels) and would remove everything; use a larger value"
        )
    if lowpass_angstrom is not None and lowpass_angstrom <= nyquist_angstrom:
        log.warning(
            "%s: --lowpass-angstrom %g is finer than the Nyquist resolution (%g Å): little or no effect",
            source, lowpass_angstrom, nyquist_angstrom,
        )
    return float(out_voxel)


def preprocess_volume(
    data: np.ndarray,
    voxel_size_angstrom: float,
    *,
    target_voxel_size_angstrom: float | None = None,
    lowpass_angstrom: float | None = None,
    highpass_angstrom: float | None = None,
    invert: bool = False,
    normalize_output: bool = True,
    allow_upsample: bool = False,
) -> tuple[np.ndarray, float]:
    """Rescale, filter, invert and normalise one (Z, Y, X) volume.

    Order: Fourier rescale to ``target_voxel_size_angstrom`` (if given), band
    pass, contrast inversion, percentile-clipped zero-mean unit-std
    normalisation (:func:`normalize`).

    Returns
    -------
    volume : (Z', Y', X') float32
    voxel_size_angstrom : voxel size of ``volume`` in Å
    """
    return _preprocess(
        lambda: data,
        None,
        voxel_size_angstrom,
        target_voxel_size_angstrom=target_voxel_size_angstrom,
        lowpass_angstrom=lowpass_angstrom,
        highpass_angstrom=highpass_angstrom,
        invert=invert,
        normalize_output=normalize_output,
        allow_upsample=allow_upsample,
    )


def _preprocess(
    take_input,
    release_input,
    voxel_size_angstrom: float,
    *,
    target_voxel_size_angstrom,
    lowpass_angstrom,
    highpass_angstrom,
    invert,
    normalize_output,
    allow_upsample,
) -> tuple[np.ndarray, float]:
    # The input is fetched with take_input() and never bound to a name here, so
    # release_input() (closing a memory map) really frees it once it is read.
    out_voxel = check_preprocess_options(
        voxel_size_angstrom, target_voxel_size_angstrom, lowpass_angstrom, highpass_angstrom, allow_upsample
    )
    if target_voxel_size_angstrom is not None and abs(out_voxel - voxel_size_angstrom) > 1e-6 * out_voxel:
        volume = fourier_rescale(take_input(), voxel_size_angstrom, out_voxel, release_input)
    else:
        volume = np.array(take_input(), dtype=np.float32)
        if release_input is not None:
            release_input()
    volume = bandpass_filter(
        volume, out_voxel, lowpass_angstrom=lowpass_angstrom, highpass_angstrom=highpass_angstrom, in_place=True
    )
    if invert:
        np.negative(volume, out=volume)
    if normalize_output:
        volume = normalize(volume)
    return volume, out_voxel


def preprocess_files(
    paths,
    out_dir,
    *,
    target_voxel_size_angstrom: float | None = None,
    input_voxel_size_angstrom: float | None = None,
    lowpass_angstrom: float | None = None,
    highpass_angstrom: float | None = None,
    invert: bool = False,
    normalize_output: bool = True,
    allow_upsample: bool = False,
    overwrite: bool = False,
    progress=None,
) -> list[dict]:
    """Preprocess MRC files into ``out_dir/<same file name>`` (float32, origin kept).

    Every input and output is checked before the first volume is read: a bad
    option or an existing output stops the run with nothing written. Inputs
    are memory-mapped; see :func:`fourier_rescale` and :func:`bandpass_filter`
    for the memory each step needs. ``progress(n=1, info=...)`` is called after
    each file.

    Returns one summary dict per file (name, shapes, voxel sizes, seconds).
    """
    import time
    from pathlib import Path

    from cryocaps.io.files import check_writable
    from cryocaps.io.volumes import read_info, read_tomogram, write_volume

    out_dir = Path(out_dir)
    plans = []
    seen = {}
    for path in map(Path, paths):
        try:
            info = read_info(path, input_voxel_size_angstrom)
        except CryocapsError as error:
            if "voxel size in the MRC header" not in str(error):
                raise
            raise CryocapsError(
                f"{path}: the MRC header gives no voxel size; give it with --input-voxel-size-angstrom"
            ) from None
        out_voxel = check_preprocess_options(
            info.voxel_size_angstrom,
            target_voxel_size_angstrom,
            lowpass_angstrom,
            highpass_angstrom,
            allow_upsample,
            str(path),
        )
        out_path = out_dir / path.name
        if out_path.resolve() == path.resolve():
            raise CryocapsError(f"{path}: output would replace the input; choose another -o folder")
        if out_path.name in seen:
            raise CryocapsError(f"{path} and {seen[out_path.name]} have the same file name; outputs would collide")
        seen[out_path.name] = path
        if out_path.exists() and not overwrite:
            raise CryocapsError(f"{out_path} exists; pass --overwrite to replace it")
        plans.append((path, info, out_path, out_voxel))
    out_dir.mkdir(parents=True, exist_ok=True)
    for _, _, out_path, _ in plans:
        check_writable(out_path, overwrite)

    summaries = []
    for path, info, out_path, out_voxel in plans:
        started = time.perf_counter()
        tomogram = read_tomogram(path, mmap=True, voxel_size_angstrom=input_voxel_size_angstrom)

        def release(tomogram=tomogram):
            tomogram.data = None  # drop the last reference so closing unmaps the file
            tomogram.close()

        try:
            if target_voxel_size_angstrom is not None:
                effective = effective_voxel_sizes(info.shape, info.voxel_size_angstrom, out_voxel)
                worst = max(abs(v - out_voxel) for v in effective)
                if worst > 1e-3 * out_voxel:
                    log.warning(
                        "%s: the output voxel is %s Å along z, y, x (asked %g Å): this size ratio "
                        "cannot be met exactly", path, ", ".join(f"{v:.4f}" for v in effective), out_voxel
                    )
            volume, out_voxel = _preprocess(
                lambda tomogram=tomogram: tomogram.data,
                release,
                info.voxel_size_angstrom,
                target_voxel_size_angstrom=target_voxel_size_angstrom,
                lowpass_angstrom=lowpass_angstrom,
                highpass_angstrom=highpass_angstrom,
                invert=invert,
                normalize_output=normalize_output,
                allow_upsample=allow_upsample,
            )
        finally:
            release()
        write_volume(
            out_path, volume, out_voxel, origin_angstrom=info.origin_angstrom, overwrite=overwrite
        )
        summaries.append(
            {
                "tomogram": info.name,
                "input": str(path),
                "output": str(out_path),
                "input_shape_zyx": list(info.shape),
                "output_shape_zyx": list(volume.shape),
                "input_voxel_size_angstrom": info.voxel_size_angstrom,
                "output_voxel_size_angstrom": out_voxel,
                "seconds": round(time.perf_counter() - started, 3),
            }
        )
        del volume
        if progress is not None:
            progress(1, info=info.name)
    return summaries
