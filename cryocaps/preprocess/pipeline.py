"""Whole preprocessing runs: checking options, one volume in memory, MRC files to MRC files."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cryocaps.errors import CryocapsError
from cryocaps.preprocess.fourier import bandpass_filter, effective_voxel_sizes, fourier_rescale
from cryocaps.preprocess.normalization import normalize

if TYPE_CHECKING:
    from cryocaps.io.volumes import TomogramInfo

log = logging.getLogger(__name__)


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
                f"{source}: voxel size {voxel_size_angstrom:g} Å is larger than "
                f"--voxel-size-angstrom {target_voxel_size_angstrom:g}, which would upsample; "
                "pass --allow-upsample if you mean it"
            )
    if (
        lowpass_angstrom is not None
        and highpass_angstrom is not None
        and highpass_angstrom <= lowpass_angstrom
    ):
        raise CryocapsError(
            f"--highpass-angstrom {highpass_angstrom:g} must be larger than --lowpass-angstrom "
            f"{lowpass_angstrom:g} (both are resolutions in Å)"
        )
    nyquist_angstrom = 2.0 * out_voxel
    if highpass_angstrom is not None and highpass_angstrom <= nyquist_angstrom:
        raise CryocapsError(
            f"--highpass-angstrom {highpass_angstrom:g} is at or beyond the Nyquist resolution "
            f"({nyquist_angstrom:g} Å at {out_voxel:g} Å voxels) and would remove everything; "
            "use a larger value"
        )
    if lowpass_angstrom is not None and lowpass_angstrom <= nyquist_angstrom:
        log.warning(
            "%s: --lowpass-angstrom %g is finer than the Nyquist resolution (%g Å): "
            "little or no effect",
            source,
            lowpass_angstrom,
            nyquist_angstrom,
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
        voxel_size_angstrom,
        target_voxel_size_angstrom,
        lowpass_angstrom,
        highpass_angstrom,
        allow_upsample,
    )
    if (
        target_voxel_size_angstrom is not None
        and abs(out_voxel - voxel_size_angstrom) > 1e-6 * out_voxel
    ):
        volume = fourier_rescale(take_input(), voxel_size_angstrom, out_voxel, release_input)
    else:
        volume = np.array(take_input(), dtype=np.float32)
        if release_input is not None:
            release_input()
    volume = bandpass_filter(
        volume,
        out_voxel,
        lowpass_angstrom=lowpass_angstrom,
        highpass_angstrom=highpass_angstrom,
        in_place=True,
    )
    if invert:
        np.negative(volume, out=volume)
    if normalize_output:
        volume = normalize(volume)
    return volume, out_voxel


@dataclass(frozen=True)
class PreprocessOptions:
    """What to do to every volume (resolutions and voxel sizes in Å; None = skip that step)."""

    target_voxel_size_angstrom: float | None = None
    lowpass_angstrom: float | None = None
    highpass_angstrom: float | None = None
    invert: bool = False
    normalize_output: bool = True
    allow_upsample: bool = False


@dataclass(frozen=True)
class FilePlan:
    """One input file, its header, its output path and the output voxel size (Å).

    ``read_voxel_size_angstrom`` is what the reader is given: ``--input-voxel-size-angstrom``
    (MRC header override), or an OME-Zarr image's level at the target voxel size.
    """

    path: Path
    info: TomogramInfo
    out_path: Path
    out_voxel_size_angstrom: float
    read_voxel_size_angstrom: float | None = None


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
    options = PreprocessOptions(
        target_voxel_size_angstrom=target_voxel_size_angstrom,
        lowpass_angstrom=lowpass_angstrom,
        highpass_angstrom=highpass_angstrom,
        invert=invert,
        normalize_output=normalize_output,
        allow_upsample=allow_upsample,
    )
    plans = plan_files(paths, Path(out_dir), options, input_voxel_size_angstrom, overwrite)
    summaries = []
    for plan in plans:
        summaries.append(preprocess_file(plan, options, overwrite))
        if progress is not None:
            progress(1, info=plan.info.name)
    return summaries


def plan_files(
    paths,
    out_dir: Path,
    options: PreprocessOptions,
    input_voxel_size_angstrom: float | None,
    overwrite: bool,
) -> list[FilePlan]:
    """Read every header and check every option and output; create ``out_dir``.

    Raises :class:`CryocapsError` (before anything is written) for a header
    without voxel size, a bad option, an output that would replace its input,
    two inputs with the same file name, or an existing output without ``overwrite``.
    """
    from cryocaps.io.files import check_folder, check_writable
    from cryocaps.io.layout import tomogram_name
    from cryocaps.io.zarr_volumes import is_zarr_path, level_voxel_size

    check_folder(out_dir, "-o")
    plans = []
    seen = {}
    for path in map(Path, paths):
        # an OME-Zarr image: its level at the target voxel size when it has one (no binning needed)
        read_voxel = input_voxel_size_angstrom or level_voxel_size(
            path, options.target_voxel_size_angstrom
        )
        info = _read_header(path, read_voxel)
        out_voxel = check_preprocess_options(
            info.voxel_size_angstrom,
            options.target_voxel_size_angstrom,
            options.lowpass_angstrom,
            options.highpass_angstrom,
            options.allow_upsample,
            str(path),
        )
        out_path = out_dir / (f"{tomogram_name(path)}.mrc" if is_zarr_path(path) else path.name)
        if out_path.resolve() == path.resolve():
            raise CryocapsError(f"{path}: output would replace the input; choose another -o folder")
        if out_path.name in seen:
            raise CryocapsError(
                f"{path} and {seen[out_path.name]} have the same file name; outputs would collide"
            )
        seen[out_path.name] = path
        if out_path.exists() and not overwrite:
            raise CryocapsError(f"{out_path} exists; pass --overwrite to replace it")
        plans.append(FilePlan(path, info, out_path, out_voxel, read_voxel))
    out_dir.mkdir(parents=True, exist_ok=True)
    for plan in plans:
        check_writable(plan.out_path, overwrite)
    return plans


def _read_header(path: Path, input_voxel_size_angstrom: float | None) -> TomogramInfo:
    from cryocaps.io.volumes import read_info

    try:
        return read_info(path, input_voxel_size_angstrom, with_data=True)
    except CryocapsError as error:
        if "voxel size in the MRC header" not in str(error):
            raise
        raise CryocapsError(
            f"{path}: the MRC header gives no voxel size; give it with --input-voxel-size-angstrom"
        ) from None


def preprocess_file(plan: FilePlan, options: PreprocessOptions, overwrite: bool) -> dict:
    """Preprocess one planned file (memory-mapped, released once read) and write its output.

    Returns its summary (name, paths, shapes, voxel sizes in Å, seconds).
    """
    from cryocaps.io.volumes import read_tomogram, write_volume

    started = time.perf_counter()
    path, info = plan.path, plan.info
    tomogram = read_tomogram(path, mmap=True, voxel_size_angstrom=plan.read_voxel_size_angstrom)

    def release(tomogram=tomogram):
        tomogram.data = None  # drop the last reference so closing unmaps the file
        tomogram.close()

    try:
        if options.target_voxel_size_angstrom is not None:
            _warn_inexact_voxel_size(path, info, plan.out_voxel_size_angstrom)
        volume, out_voxel = _preprocess(
            lambda tomogram=tomogram: tomogram.data,
            release,
            info.voxel_size_angstrom,
            target_voxel_size_angstrom=options.target_voxel_size_angstrom,
            lowpass_angstrom=options.lowpass_angstrom,
            highpass_angstrom=options.highpass_angstrom,
            invert=options.invert,
            normalize_output=options.normalize_output,
            allow_upsample=options.allow_upsample,
        )
    finally:
        release()
    write_volume(
        plan.out_path, volume, out_voxel, origin_angstrom=info.origin_angstrom, overwrite=overwrite
    )
    return {
        "tomogram": info.name,
        "input": str(path),
        "output": str(plan.out_path),
        "input_shape_zyx": list(info.shape),
        "output_shape_zyx": list(volume.shape),
        "input_voxel_size_angstrom": info.voxel_size_angstrom,
        "output_voxel_size_angstrom": out_voxel,
        "seconds": round(time.perf_counter() - started, 3),
    }


def _warn_inexact_voxel_size(path: Path, info: TomogramInfo, out_voxel: float) -> None:
    """Warn when Fourier rescaling cannot give exactly the asked voxel size along some axis."""
    effective = effective_voxel_sizes(info.shape, info.voxel_size_angstrom, out_voxel)
    worst = max(abs(v - out_voxel) for v in effective)
    if worst > 1e-3 * out_voxel:
        log.warning(
            "%s: the output voxel is %s Å along z, y, x (asked %g Å): this size ratio "
            "cannot be met exactly",
            path,
            ", ".join(f"{v:.4f}" for v in effective),
            out_voxel,
        )
