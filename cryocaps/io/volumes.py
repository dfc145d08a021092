"""Volumes: MRC files and OME-Zarr images read into a :class:`Tomogram` (z, y, x) with voxel size;
MRC written atomically (OME-Zarr writing is in :mod:`cryocaps.io.zarr_volumes`)."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import mrcfile
import numpy as np
from mrcfile.utils import data_dtype_from_header

from cryocaps.classes import IGNORE_LABEL
from cryocaps.errors import CryocapsError
from cryocaps.io.files import atomic_path
from cryocaps.io.layout import (  # noqa: F401 - the names volumes are known by
    MRC_SUFFIXES,
    OUTPUT_SUFFIXES,
    base_tomogram_name,
    tomogram_name,
)
from cryocaps.io.zarr_volumes import ZarrVolumeWriter, is_zarr_path, open_zarr_volume

log = logging.getLogger(__name__)

WRITE_DTYPES = {
    "float32": np.float32,
    "float16": np.float16,
    "int8": np.int8,
    "uint8": np.uint8,
    "int16": np.int16,
}


@dataclass
class Tomogram:
    """A 3D volume with its geometry.

    Attributes
    ----------
    data : (Z, Y, X) array (possibly a read-only memory map, or a lazily read
        :class:`~cryocaps.io.zarr_volumes.ZarrVolume`)
    voxel_size_angstrom : float, > 0
    origin_angstrom : (x, y, z) origin from the MRC header (OME-Zarr: translation), in Å
    name : tomogram name (file stem), used to match particle lists
    path : file it was read from, if any
    """

    data: np.ndarray
    voxel_size_angstrom: float
    origin_angstrom: tuple[float, float, float] = (0.0, 0.0, 0.0)
    name: str = ""
    path: Path | None = None
    _mrc: object = field(default=None, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape)  # type: ignore[return-value]

    @property
    def info(self) -> TomogramInfo:
        return TomogramInfo(self.name, self.shape, self.voxel_size_angstrom, self.origin_angstrom)

    def close(self) -> None:
        if self._mrc is not None:
            self._mrc.close()
            self._mrc = None


VOXEL_SIZE_TOLERANCE = (
    0.01  # relative; volumes whose voxel sizes differ more are refused, everywhere
)


def same_voxel_size(a: float, b: float) -> bool:
    """True when two voxel sizes (Å) agree within :data:`VOXEL_SIZE_TOLERANCE` (relative)."""
    return abs(a - b) <= VOXEL_SIZE_TOLERANCE * max(abs(a), abs(b))


def check_same_voxel_size(
    what: str, voxel_size_angstrom: float, reference: str, reference_angstrom: float, hint: str = ""
) -> None:
    """Refuse ``what`` when its voxel size is not ``reference``'s (one message for every stage)."""
    if not same_voxel_size(voxel_size_angstrom, reference_angstrom):
        difference = abs(voxel_size_angstrom - reference_angstrom) / max(reference_angstrom, 1e-12)
        raise CryocapsError(
            f"{what}: voxel size {voxel_size_angstrom:g} Å differs from {reference}'s "
            f"{reference_angstrom:g} Å by {100 * difference:.1f}% "
            f"(> {100 * VOXEL_SIZE_TOLERANCE:g}%){hint}"
        )


def label_counts(
    label_map,
    n_labels: int,
    path: str | os.PathLike | None = None,
    flag: str = "--labels",
    slab: int = 16,
) -> np.ndarray:
    """Voxels per label (n_labels,), read slab by slab; refuses values outside 0..n_labels-1.

    ``label_map`` : (Z, Y, X) integer (or integral float) array, possibly memory-mapped.
    Voxels of :data:`~cryocaps.classes.IGNORE_LABEL` (unknown) are allowed and not counted.
    """
    where = f"{flag} {path}" if path is not None else flag
    counts = np.zeros(n_labels, dtype=np.int64)
    for z in range(0, label_map.shape[0], slab):
        block = np.asarray(label_map[z : z + slab])
        if block.dtype.kind == "f" and not np.all(block == np.round(block)):
            raise CryocapsError(f"{where}: label map holds non-integer values")
        block = block.astype(np.int64)[block != IGNORE_LABEL]
        if block.size == 0:
            continue
        low, high = int(block.min()), int(block.max())
        if low < 0:
            raise CryocapsError(f"{where}: negative label value {low}")
        if high >= n_labels:
            raise CryocapsError(
                f"{where}: label value {high} is above the class table's "
                f"highest label {n_labels - 1}"
            )
        counts += np.bincount(block.ravel(), minlength=n_labels)
    return counts


@dataclass(frozen=True)
class TomogramInfo:
    """Geometry of a tomogram without its voxels (from an MRC header, OME-Zarr metadata or a
    tomograms.star)."""

    name: str
    shape: tuple[int, int, int]  # (z, y, x)
    voxel_size_angstrom: float
    origin_angstrom: tuple[float, float, float] = (0.0, 0.0, 0.0)


def _open(path: Path, mmap: bool, header_only: bool = False):
    opener = mrcfile.mmap if mmap else mrcfile.open
    if header_only:
        opener = mrcfile.open
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            return (
                opener(path, mode="r", header_only=header_only)
                if header_only
                else opener(path, mode="r")
            )
    except (ValueError, RuntimeWarning) as strict_error:
        try:
            with warnings.catch_warnings(record=True):
                warnings.simplefilter("always")
                if header_only:
                    mrc = mrcfile.open(path, mode="r", permissive=True, header_only=True)
                else:
                    mrc = opener(path, mode="r", permissive=True)
        except Exception as error:  # noqa: BLE001 - anything mrcfile throws is a bad file
            raise CryocapsError(f"{path}: not a readable MRC file ({error})") from error
        if mrc.data is None and not header_only:
            mrc.close()
            raise CryocapsError(
                f"{path}: not a readable MRC file ({strict_error})"
            ) from strict_error
        log.warning("%s: non-standard MRC header (%s); read permissively", path, strict_error)
        return mrc
    except OSError as error:
        raise CryocapsError(f"{path}: cannot read ({error.strerror or error})") from error


def _voxel_size(mrc, path: Path, override: float | None) -> float:
    if override is not None:
        if not override > 0:
            raise CryocapsError(f"--voxel-size-angstrom must be > 0, got {override}")
        return float(override)
    size = mrc.voxel_size
    values = [float(size.x), float(size.y), float(size.z)]
    if not all(np.isfinite(values)) or min(values) <= 0:
        raise CryocapsError(
            f"{path}: voxel size in the MRC header is {values[0]:g} Å; "
            "give it with --voxel-size-angstrom"
        )
    if max(values) - min(values) > 1e-3 * max(values):
        log.warning("%s: anisotropic voxel size %s Å; using x = %g", path, values, values[0])
    return values[0]


def _origin(mrc) -> tuple[float, float, float]:
    origin = mrc.header.origin
    return (float(origin.x), float(origin.y), float(origin.z))


def _check_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise CryocapsError(f"{path}: no such file")
    if path.is_dir():
        raise CryocapsError(f"{path}: is a folder, expected an MRC file")
    return path


def read_tomogram(
    path: str | os.PathLike,
    *,
    mmap: bool = False,
    voxel_size_angstrom: float | None = None,
    check_finite: bool = True,
    allow_stack: bool = False,
) -> Tomogram:
    """Read a 3D MRC file or OME-Zarr image (a ``.zarr`` folder).

    Parameters
    ----------
    path : MRC file or ``.zarr`` OME-Zarr image
    mmap : memory-map the voxels instead of reading them (for large tomograms);
        an OME-Zarr image is then read lazily, chunk by chunk, when sliced
    voxel_size_angstrom : MRC: use this voxel size instead of the header's;
        OME-Zarr: read the scale level at this voxel size (refused if there is none;
        None: the finest level)
    check_finite : refuse volumes that contain NaN/inf (checked on a sample when mmap)
    allow_stack : accept a 4D volume stack (C, Z, Y, X), e.g. a probability map

    Returns
    -------
    Tomogram with data (Z, Y, X) in the file's dtype.
    """
    if is_zarr_path(path):
        return _read_zarr_tomogram(Path(path), mmap, voxel_size_angstrom, check_finite, allow_stack)
    path = _check_path(path)
    mrc = _open(path, mmap)
    try:
        data = mrc.data
        if data is None:
            raise CryocapsError(f"{path}: MRC file has no data")
        ok_ndim = data.ndim == 3 or (allow_stack and data.ndim == 4)
        if not ok_ndim or min(data.shape[-3:]) < 2:
            raise CryocapsError(f"{path}: expected a 3D volume, got shape {tuple(data.shape)}")
        if data.dtype.kind == "c":
            raise CryocapsError(f"{path}: complex MRC data is not supported")
        voxel = _voxel_size(mrc, path, voxel_size_angstrom)
        origin = _origin(mrc)
        if check_finite and data.dtype.kind == "f":
            sample = data[:: max(1, data.shape[0] // 16)] if mmap else data
            if not np.isfinite(sample).all():
                raise CryocapsError(f"{path}: volume contains NaN or infinite values")
        if not mmap:
            data = np.array(data)
            mrc.close()
            mrc = None
    except BaseException:
        if mrc is not None:
            mrc.close()
        raise
    return Tomogram(data, voxel, origin, tomogram_name(path), path, _mrc=mrc)


def read_info(
    path: str | os.PathLike, voxel_size_angstrom: float | None = None, *, with_data: bool = False
) -> TomogramInfo:
    """Shape (z, y, x), voxel size and origin of an MRC file, reading only its header.

    ``with_data`` (the caller will read the voxels): refuse a file shorter than its header
    says; readers that need only the geometry (make-masks, particle files) leave it False.

    For an OME-Zarr image, those of the scale level at ``voxel_size_angstrom``
    (None: the finest), from its metadata.
    """
    if is_zarr_path(path):
        volume, level = open_zarr_volume(path, voxel_size_angstrom)
        return TomogramInfo(
            tomogram_name(path), volume.shape, level.voxel_size_angstrom, level.origin_angstrom
        )
    path = _check_path(path)
    mrc = _open(path, mmap=False, header_only=True)
    try:
        header = mrc.header
        nz = int(header.nz)
        if int(header.ispg) >= 401 and 0 < int(header.mz) < nz:
            nz = int(header.mz)  # a volume stack: geometry of one volume
        shape = (nz, int(header.ny), int(header.nx))
        if min(shape) < 2:
            raise CryocapsError(f"{path}: expected a 3D volume, got shape {shape}")
        _check_mode_and_size(mrc, path, with_data)
        voxel = _voxel_size(mrc, path, voxel_size_angstrom)
        return TomogramInfo(tomogram_name(path), shape, voxel, _origin(mrc))
    finally:
        mrc.close()


def _check_mode_and_size(mrc, path: Path, check_size: bool = True) -> None:
    """Refuse complex or unknown modes and (``check_size``) a file cut short, from the header."""
    header = mrc.header
    mode = int(header.mode)
    if mode in (3, 4):
        raise CryocapsError(f"{path}: MRC mode {mode} (complex) data is not supported")
    try:
        dtype = data_dtype_from_header(header)
    except ValueError:
        raise CryocapsError(f"{path}: unknown MRC mode {mode}") from None
    if mode == 101 or not check_size:  # 4-bit values, two a byte: mrcfile checks those itself
        return
    voxels = int(header.nx) * int(header.ny) * int(header.nz)
    needed = header.nbytes + int(header.nsymbt) + voxels * dtype.itemsize
    size = path.stat().st_size
    if size < needed:
        raise CryocapsError(f"{path}: truncated MRC file ({size} bytes; header says {needed})")


def _read_zarr_tomogram(
    path: Path, lazy: bool, voxel_size_angstrom: float | None, check_finite: bool, allow_stack: bool
) -> Tomogram:
    """An OME-Zarr level as a Tomogram: lazily read data when ``lazy``, else read whole."""
    volume, level = open_zarr_volume(path, voxel_size_angstrom, allow_stack=allow_stack)
    if volume.dtype.kind == "c":
        raise CryocapsError(f"{path}: complex data is not supported")
    data = volume if lazy else np.asarray(volume)
    if check_finite and data.dtype.kind == "f":
        sample = data[:: max(1, data.shape[0] // 16)] if lazy else data
        if not np.isfinite(sample).all():
            raise CryocapsError(f"{path}: volume contains NaN or infinite values")
    return Tomogram(
        data, level.voxel_size_angstrom, level.origin_angstrom, tomogram_name(path), path
    )


def write_volume(
    path: str | os.PathLike,
    data: np.ndarray,
    voxel_size_angstrom: float,
    *,
    origin_angstrom: tuple[float, float, float] = (0.0, 0.0, 0.0),
    dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Write a (Z, Y, X) volume (or (C, Z, Y, X) stack) to MRC atomically.

    ``dtype`` is one of float32, float16, int8, uint8, int16. The voxel size
    and origin go into the header. Existing files are refused unless
    ``overwrite``.
    """
    if dtype not in WRITE_DTYPES:
        raise CryocapsError(f"unsupported MRC dtype {dtype!r}; use one of {sorted(WRITE_DTYPES)}")
    if not voxel_size_angstrom > 0:
        raise CryocapsError(f"{path}: voxel size must be > 0, got {voxel_size_angstrom}")
    array = np.ascontiguousarray(data, dtype=WRITE_DTYPES[dtype])
    if dtype == "uint8" and (array.size == 0 or array.max() < 128):
        # mrcfile widens uint8 to uint16 (mode 6); label values fit signed bytes (mode 0).
        array = array.view(np.int8)
    if array.ndim == 4:
        array = array.reshape(-1, *array.shape[2:])  # MRC volume stack: C*Z sections
    with atomic_path(path, overwrite=overwrite) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(array)
            if data.ndim == 4:  # volume stack: nz = C*Z sections, mz = Z per volume
                mrc.header.ispg = 401
                mrc.header.mz = data.shape[1]
            mrc.voxel_size = voxel_size_angstrom  # after mz: the cell size is voxel size x mz
            mrc.header.origin = origin_angstrom
    return Path(path)


class MrcVolumeWriter:
    """Write a large volume section by section into a new MRC file, renamed into place on close.

    Use as a context manager; ``writer.data`` is a writable memory map of shape
    (Z, Y, X) (or (C, Z, Y, X)) whose pages are flushed to disk as they fill, so
    writing slab by slab does not keep the whole volume in memory.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        shape: tuple[int, ...],
        voxel_size_angstrom: float,
        *,
        origin_angstrom: tuple[float, float, float] = (0.0, 0.0, 0.0),
        dtype: str = "uint8",
        overwrite: bool = False,
    ):
        if dtype not in WRITE_DTYPES:
            raise CryocapsError(f"unsupported MRC dtype {dtype!r}")
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        self.voxel_size_angstrom = voxel_size_angstrom
        self.origin_angstrom = origin_angstrom
        self.dtype = dtype
        self.overwrite = overwrite
        self._context = None
        self._mrc = None

    def __enter__(self) -> MrcVolumeWriter:
        self._context = atomic_path(self.path, overwrite=self.overwrite)
        tmp = self._context.__enter__()
        mrc_shape = (
            self.shape if len(self.shape) == 3 else (self.shape[0] * self.shape[1], *self.shape[2:])
        )
        mrc = mrcfile.new_mmap(tmp, shape=mrc_shape, mrc_mode=_mode(self.dtype), overwrite=True)
        if len(self.shape) == 4:  # volume stack: nz = C*Z sections, mz = Z per volume
            mrc.header.ispg = 401
            mrc.header.mz = self.shape[1]
        mrc.voxel_size = self.voxel_size_angstrom  # after mz: the cell size is voxel size x mz
        mrc.header.origin = self.origin_angstrom
        self._mrc = mrc
        return self

    @property
    def data(self) -> np.ndarray:
        data = self._mrc.data
        return data.reshape(self.shape) if len(self.shape) == 4 else data

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                _update_header_stats_in_slabs(self._mrc)
            self._mrc.close()
        except BaseException as error:
            # closing writes the header (a full disk fails here): the file is not complete, so
            # it must not be renamed into place
            if exc_type is None:
                exc_type, exc, tb = type(error), error, error.__traceback__
            self._context.__exit__(exc_type, exc, tb)
            raise
        self._context.__exit__(exc_type, exc, tb)


def volume_writer(
    path: str | os.PathLike,
    shape: tuple[int, ...],
    voxel_size_angstrom: float,
    *,
    origin_angstrom: tuple[float, float, float] = (0.0, 0.0, 0.0),
    dtype: str = "uint8",
    overwrite: bool = False,
):
    """A slab-by-slab writer for ``path``: :class:`MrcVolumeWriter`, or for a ``.zarr`` path an
    OME-Zarr :class:`~cryocaps.io.zarr_volumes.ZarrVolumeWriter` (same interface: ``with ... as w:
    w.data[slab] = ...``, renamed into place on success)."""
    if dtype not in WRITE_DTYPES:
        raise CryocapsError(
            f"unsupported volume dtype {dtype!r}; use one of {sorted(WRITE_DTYPES)}"
        )
    writer = ZarrVolumeWriter if is_zarr_path(path) else MrcVolumeWriter
    return writer(
        path,
        shape,
        voxel_size_angstrom,
        origin_angstrom=origin_angstrom,
        dtype=dtype,
        overwrite=overwrite,
    )


def _update_header_stats_in_slabs(mrc, voxels_per_slab: int = 2**20) -> None:
    """dmin, dmax, dmean, rms like ``mrc.update_header_stats()``, a few sections at a time.

    mrcfile's own version makes float temporaries of the whole volume (4-8
    bytes per voxel), which would undo slab-by-slab writing of a large map.
    """
    data = mrc.data
    if data.size == 0:
        mrc.reset_header_stats()
        return
    step = max(1, voxels_per_slab // max(1, int(np.prod(data.shape[1:]))))
    low, high, total, squares = np.inf, -np.inf, 0.0, 0.0
    for start in range(0, data.shape[0], step):
        slab = np.asarray(data[start : start + step], dtype=np.float64)
        low, high = min(low, float(slab.min())), max(high, float(slab.max()))
        total += float(slab.sum())
        squares += float(np.square(slab).sum())
    mean = total / data.size
    mrc.header.dmin = np.float32(low)
    mrc.header.dmax = np.float32(high)
    mrc.header.dmean = np.float32(mean)
    mrc.header.rms = np.float32(np.sqrt(max(squares / data.size - mean**2, 0.0)))


def _mode(dtype: str) -> int:
    # uint8 label maps are stored as MRC mode 0 (8-bit); labels must be < 128.
    return {"int8": 0, "int16": 1, "float32": 2, "float16": 12, "uint8": 0}[dtype]


def read_probabilities(path: str | os.PathLike, voxel_size_angstrom: float) -> np.ndarray:
    """The (C, Z, Y, X) class-probability stack ``segment --probabilities`` wrote, memory-mapped.

    Its geometry is the label map's (``voxel_size_angstrom``): a stack's header may say
    otherwise in z.
    """
    probabilities = read_tomogram(
        path,
        allow_stack=True,
        mmap=True,
        check_finite=False,
        voxel_size_angstrom=voxel_size_angstrom,
    ).data
    if probabilities.ndim != 4:
        raise CryocapsError(f"{path}: expected a (C, Z, Y, X) probability stack")
    return probabilities
