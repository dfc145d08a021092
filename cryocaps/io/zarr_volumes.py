"""OME-Zarr images: one scale level of a ``multiscales`` image as a lazily read (Z, Y, X) volume.

An OME-Zarr image (OME-NGFF 0.4, the form of the CryoET Data Portal's and copick's
tomograms) is a Zarr group whose ``multiscales`` attribute lists

- ``axes``: names (``z``, ``y``, ``x``, maybe ``c``/``t``) in array order, with units;
- ``datasets``: one array path per scale level, each with a ``scale`` (and maybe
  ``translation``) coordinate transformation in those units.

The voxel centre of index ``i`` lies at ``i * scale + translation`` (OME-NGFF), so
voxel 0 is the image origin, as cryocaps counts voxels everywhere. A level is
chosen by its voxel size; its voxels are read by the ``zarr`` library chunk by chunk
when sliced, so a sliding window over a huge image holds only the slabs it reads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cryocaps.errors import CryocapsError

log = logging.getLogger(__name__)

ZARR_SUFFIX = ".zarr"
SPATIAL_AXES = ("z", "y", "x")
# OME-NGFF unit names (UDUNITS-2) -> Å; an axis without a unit is taken to be in Å.
ANGSTROM_PER_UNIT = {
    "angstrom": 1.0,
    "picometer": 0.01,
    "nanometer": 10.0,
    "micrometer": 1e4,
    "millimeter": 1e7,
    "meter": 1e10,
}
DEFAULT_CHUNKS = (64, 64, 64)


def is_zarr_path(path: str | os.PathLike) -> bool:
    """True for a ``.zarr`` folder name (existing or not)."""
    return str(path).rstrip("/\\").lower().endswith(ZARR_SUFFIX)


@dataclass(frozen=True)
class ScaleLevel:
    """One level of a multiscales image.

    Attributes
    ----------
    path : array path inside the Zarr group (``"0"``, ``"1"``, ...)
    voxel_size_angstrom : x voxel size, Å (the one cryocaps uses; z, y in ``voxel_sizes_zyx``)
    voxel_sizes_zyx : (z, y, x) voxel sizes, Å
    origin_angstrom : (x, y, z) position of voxel 0's centre, Å
    """

    path: str
    voxel_size_angstrom: float
    voxel_sizes_zyx: tuple[float, float, float]
    origin_angstrom: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass(frozen=True)
class MultiscaleImage:
    """The metadata of an OME-Zarr image: where its levels are and how its axes map to (z, y, x)."""

    path: Path
    axis_names: tuple[str, ...]  # in array order
    levels: tuple[ScaleLevel, ...]

    @property
    def spatial_axes(self) -> tuple[int, int, int]:
        """Array axis of z, y and x."""
        return tuple(self.axis_names.index(name) for name in SPATIAL_AXES)  # type: ignore[return-value]

    def spacings_text(self) -> str:
        return ", ".join(f"{level.voxel_size_angstrom:g}" for level in self.levels) + " Å"


def _open_group(path: Path):
    import zarr

    if not path.exists():
        raise CryocapsError(f"{path}: no such OME-Zarr image")
    if not path.is_dir():
        raise CryocapsError(f"{path}: not an OME-Zarr image (expected a .zarr folder)")
    try:
        return zarr.open_group(str(path), mode="r")
    except Exception as error:  # noqa: BLE001 - zarr raises several kinds for a folder that is not a group
        raise CryocapsError(f"{path}: not a Zarr group ({error})") from error


def _multiscales(path: Path, attributes: dict) -> dict:
    entries = attributes.get("multiscales")
    if entries is None and isinstance(
        attributes.get("ome"), dict
    ):  # OME-NGFF 0.5 nests it under "ome"
        entries = attributes["ome"].get("multiscales")
    if not entries or not isinstance(entries, list) or not isinstance(entries[0], dict):
        raise CryocapsError(
            f"{path}: Zarr group without OME-Zarr 'multiscales' metadata "
            "(no voxel size or scale levels)"
        )
    return entries[0]


def _axes(path: Path, entry: dict, ndim: int) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """Axis names in array order and each axis's unit in Å (1 for non-space axes)."""
    raw = entry.get("axes") or (list(SPATIAL_AXES) if ndim == 3 else None)
    if raw is None or len(raw) != ndim:
        raise CryocapsError(
            f"{path}: 'multiscales' axes {raw} do not match the array's {ndim} dimensions"
        )
    names, factors = [], []
    for axis in raw:
        axis = axis if isinstance(axis, dict) else {"name": str(axis)}
        name = str(axis.get("name", "")).lower()
        unit = axis.get("unit")
        factor = 1.0
        if name in SPATIAL_AXES and unit is not None:
            if str(unit).lower() not in ANGSTROM_PER_UNIT:
                raise CryocapsError(
                    f"{path}: axis {name} has unit {unit!r}; expected a length unit"
                )
            factor = ANGSTROM_PER_UNIT[str(unit).lower()]
        names.append(name)
        factors.append(factor)
    missing = [name for name in SPATIAL_AXES if name not in names]
    if missing:
        raise CryocapsError(
            f"{path}: OME-Zarr image has no {'/'.join(missing)} axis (axes: {names})"
        )
    return tuple(names), tuple(factors)


def _transform(transforms: list | None, kind: str, ndim: int) -> np.ndarray | None:
    for transform in transforms or []:
        if isinstance(transform, dict) and transform.get("type") == kind and kind in transform:
            values = np.asarray(transform[kind], dtype=float)
            if values.shape == (ndim,):
                return values
    return None


def read_multiscales(path: str | os.PathLike) -> MultiscaleImage:
    """Read and check an OME-Zarr image's metadata (no voxels).

    Refuses a folder that is not a Zarr group, a group without ``multiscales``
    metadata, levels without a positive ``scale`` and images without z, y, x axes.
    """
    path = Path(path)
    group = _open_group(path)
    entry = _multiscales(path, group.attrs.asdict())
    datasets = entry.get("datasets") or []
    if not datasets:
        raise CryocapsError(f"{path}: 'multiscales' metadata lists no datasets (scale levels)")
    first = _level_array(group, path, str(datasets[0].get("path", "")))
    names, factors = _axes(path, entry, first.ndim)
    spatial = [names.index(name) for name in SPATIAL_AXES]
    global_scale = _transform(entry.get("coordinateTransformations"), "scale", first.ndim)
    levels = []
    for dataset in datasets:
        level_path = str(dataset.get("path", ""))
        transforms = dataset.get("coordinateTransformations")
        scale = _transform(transforms, "scale", first.ndim)
        if scale is None:
            raise CryocapsError(
                f"{path}: scale level {level_path!r} has no 'scale' coordinate transformation"
            )
        translation = _transform(transforms, "translation", first.ndim)
        if global_scale is not None:
            scale = scale * global_scale
        sizes = tuple(float(scale[a] * factors[a]) for a in spatial)
        if not all(np.isfinite(sizes)) or min(sizes) <= 0:
            raise CryocapsError(
                f"{path}: scale level {level_path!r} has voxel size {sizes} (z, y, x); must be > 0"
            )
        origin = (0.0, 0.0, 0.0)
        if translation is not None:
            origin = tuple(float(translation[a] * factors[a]) for a in spatial[::-1])
        levels.append(ScaleLevel(level_path, sizes[2], sizes, origin))  # type: ignore[arg-type]
    return MultiscaleImage(path, names, tuple(levels))


def _level_array(group, path: Path, level_path: str):
    try:
        array = group[level_path]
    except KeyError:
        raise CryocapsError(
            f"{path}: scale level {level_path!r} listed in 'multiscales' is missing"
        ) from None
    if not hasattr(array, "shape") or not hasattr(array, "dtype"):
        raise CryocapsError(f"{path}: scale level {level_path!r} is not an array")
    return array


def choose_level(image: MultiscaleImage, voxel_size_angstrom: float | None = None) -> ScaleLevel:
    """The level at ``voxel_size_angstrom`` (within 1 %), or the first (finest) when None.

    Refuses, listing the available spacings, when no level has that voxel size.
    """
    from cryocaps.io.volumes import same_voxel_size  # here: cryocaps.io.volumes imports this module

    if voxel_size_angstrom is None:
        return image.levels[0]
    if not (np.isfinite(voxel_size_angstrom) and voxel_size_angstrom > 0):
        raise CryocapsError(f"--voxel-size-angstrom must be > 0, got {voxel_size_angstrom}")
    for level in image.levels:
        if same_voxel_size(level.voxel_size_angstrom, voxel_size_angstrom):
            return level
    raise CryocapsError(
        f"{image.path}: no scale level at {voxel_size_angstrom:g} Å; "
        f"the image has {image.spacings_text()}"
    )


def level_voxel_size(path: str | os.PathLike, wanted_angstrom: float | None) -> float | None:
    """``wanted_angstrom`` if the OME-Zarr image has a level at it, else None (= its finest level).

    For commands that can resample (preprocess): read the level that needs no binning when
    there is one.
    """
    from cryocaps.io.volumes import same_voxel_size  # here: cryocaps.io.volumes imports this module

    if wanted_angstrom is None or not is_zarr_path(path):
        return None
    levels = read_multiscales(path).levels
    return (
        wanted_angstrom
        if any(same_voxel_size(lv.voxel_size_angstrom, wanted_angstrom) for lv in levels)
        else None
    )


class ZarrVolume:
    """A (Z, Y, X) view of one Zarr array, read lazily on slicing.

    Supports what cryocaps' readers use on a memory-mapped MRC: ``shape``,
    ``dtype``, ``ndim``, ``size``, basic indexing (integers and slices, also with
    steps) and ``np.asarray``. Other axes (``c``, ``t``) must have length 1 and are
    dropped; axes stored in another order than z, y, x are transposed on read.
    """

    def __init__(self, array, spatial_axes: tuple[int, int, int], path: Path | None = None):
        others = [a for a in range(array.ndim) if a not in spatial_axes]
        if any(array.shape[a] != 1 for a in others):
            raise CryocapsError(
                f"{path}: OME-Zarr image has non-spatial axes longer than 1 "
                f"(shape {tuple(array.shape)}); "
                "expected one 3D volume"
            )
        self.array = array
        self.spatial_axes = tuple(spatial_axes)
        self.shape = tuple(int(array.shape[a]) for a in spatial_axes)
        self.dtype = np.dtype(array.dtype)
        self.ndim = 3
        self.size = int(np.prod(self.shape))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        key = _three_keys(key)
        source = [0] * self.array.ndim
        for position, axis in enumerate(self.spatial_axes):
            source[axis] = key[position]
        block = np.asarray(self.array[tuple(source)])
        # Axes that survive the read, in array order; put them in z, y, x order.
        kept = [
            axis
            for axis in self.spatial_axes
            if not isinstance(key[self.spatial_axes.index(axis)], int)
        ]
        in_array_order = sorted(kept)
        return np.transpose(block, [in_array_order.index(axis) for axis in kept]) if kept else block

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        block = self[...]
        return block if dtype is None else block.astype(dtype, copy=False)


def _three_keys(key) -> list:
    """A basic index as three per-axis keys (ints or slices)."""
    if not isinstance(key, tuple):
        key = (key,)
    if any(k is Ellipsis for k in key):
        at = next(i for i, k in enumerate(key) if k is Ellipsis)
        key = key[:at] + (slice(None),) * (3 - len(key) + 1) + key[at + 1 :]
    key = tuple(key) + (slice(None),) * (3 - len(key))
    if len(key) != 3:
        raise IndexError(f"too many indices for a 3D volume: {key}")
    out = []
    for k in key:
        if isinstance(k, (int, np.integer)):
            out.append(int(k))
        elif isinstance(k, slice):
            out.append(k)
        else:
            raise TypeError(f"ZarrVolume supports integers and slices only, got {type(k).__name__}")
    return out


def open_zarr_volume(
    path: str | os.PathLike, voxel_size_angstrom: float | None = None, allow_stack: bool = False
) -> tuple[ZarrVolume, ScaleLevel]:
    """The level of an OME-Zarr image at ``voxel_size_angstrom`` (None: the finest), unread.

    ``allow_stack`` accepts a (C, Z, Y, X) image (axes ``c, z, y, x``, e.g. class
    probabilities); its data is then the Zarr array itself (sliced the same way).
    """
    image = read_multiscales(path)
    level = choose_level(image, voxel_size_angstrom)
    group = _open_group(Path(path))
    array = _level_array(group, Path(path), level.path)
    if allow_stack and image.axis_names == ("c", *SPATIAL_AXES) and array.shape[0] > 1:
        return array, level
    volume = ZarrVolume(array, image.spatial_axes, Path(path))
    if min(volume.shape) < 2:
        raise CryocapsError(
            f"{path}: expected a 3D volume, got shape {volume.shape} at level {level.path!r}"
        )
    if max(level.voxel_sizes_zyx) - min(level.voxel_sizes_zyx) > 1e-3 * max(level.voxel_sizes_zyx):
        log.warning(
            "%s: anisotropic voxel size %s Å (z, y, x); using x = %g",
            path,
            level.voxel_sizes_zyx,
            level.voxel_size_angstrom,
        )
    return volume, level


# --- writing ---------------------------------------------------------------------
def multiscales_metadata(
    voxel_size_angstrom: float, origin_angstrom=(0.0, 0.0, 0.0), name: str = ""
) -> dict:
    """OME-NGFF 0.4 ``multiscales`` attribute for one level ``"0"`` of a (Z, Y, X) volume in Å."""
    transforms: list[dict] = [{"type": "scale", "scale": [float(voxel_size_angstrom)] * 3}]
    if any(origin_angstrom):
        transforms.append(
            {"type": "translation", "translation": [float(v) for v in origin_angstrom[::-1]]}
        )
    return {
        "version": "0.4",
        "name": name,
        "axes": [{"name": axis, "type": "space", "unit": "angstrom"} for axis in SPATIAL_AXES],
        "datasets": [{"path": "0", "coordinateTransformations": transforms}],
    }


@contextlib.contextmanager
def atomic_zarr_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary ``.zarr`` folder beside ``path``; rename it to ``path`` if the block
    succeeds.

    An existing ``path`` is refused unless ``overwrite``; then it is replaced only
    after the new image is complete.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise CryocapsError(f"{path} exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "image")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def create_zarr_volume(
    folder: Path,
    shape,
    dtype,
    voxel_size_angstrom: float,
    origin_angstrom=(0.0, 0.0, 0.0),
    chunks=DEFAULT_CHUNKS,
):
    """A new single-level OME-Zarr image in ``folder``; returns its writable level-0 array."""
    import zarr

    group = zarr.open_group(str(folder), mode="w")
    chunks = tuple(min(int(c), int(s)) for c, s in zip(chunks, shape[-3:], strict=True))
    chunks = (1,) * (len(shape) - 3) + chunks  # a (C, Z, Y, X) stack: one channel per chunk
    array = group.create_dataset(
        "0", shape=tuple(int(s) for s in shape), chunks=chunks, dtype=dtype
    )
    metadata = multiscales_metadata(voxel_size_angstrom, origin_angstrom)
    if len(shape) == 4:
        metadata["axes"].insert(0, {"name": "c", "type": "channel"})
        for dataset in metadata["datasets"]:
            for transform in dataset["coordinateTransformations"]:
                transform[transform["type"]].insert(0, 1.0 if transform["type"] == "scale" else 0.0)
    group.attrs["multiscales"] = [metadata]
    return array


def write_zarr_volume(
    path: str | os.PathLike,
    data,
    voxel_size_angstrom: float,
    *,
    origin_angstrom=(0.0, 0.0, 0.0),
    dtype: str = "float32",
    chunks=DEFAULT_CHUNKS,
    overwrite: bool = False,
) -> Path:
    """Write a (Z, Y, X) volume (or (C, Z, Y, X) stack) as a one-level OME-Zarr image,
    atomically."""
    if not voxel_size_angstrom > 0:
        raise CryocapsError(f"{path}: voxel size must be > 0, got {voxel_size_angstrom}")
    with atomic_zarr_dir(path, overwrite=overwrite) as tmp:
        array = create_zarr_volume(
            tmp, data.shape, np.dtype(dtype), voxel_size_angstrom, origin_angstrom, chunks
        )
        step = array.chunks[-3]
        for start in range(0, data.shape[-3], step):  # one chunk row at a time
            index = (Ellipsis, slice(start, start + step), slice(None), slice(None))
            array[index] = np.asarray(data[index], dtype=dtype)
    return Path(path)


class ZarrVolumeWriter:
    """Write a large volume slab by slab into a new OME-Zarr image, renamed into place on close.

    The counterpart of :class:`cryocaps.io.volumes.MrcVolumeWriter`: ``writer.data``
    is a writable (Z, Y, X) (or (C, Z, Y, X)) Zarr array; assigning slabs encodes
    their chunks, so memory holds only the slab being written.
    """

    def __init__(
        self,
        path,
        shape,
        voxel_size_angstrom: float,
        *,
        origin_angstrom=(0.0, 0.0, 0.0),
        dtype: str = "uint8",
        overwrite: bool = False,
        chunks=DEFAULT_CHUNKS,
    ):
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        self.voxel_size_angstrom = voxel_size_angstrom
        self.origin_angstrom = origin_angstrom
        self.dtype = np.dtype(dtype)
        self.overwrite = overwrite
        self.chunks = chunks
        self._context = None
        self.data = None

    def __enter__(self) -> ZarrVolumeWriter:
        self._context = atomic_zarr_dir(self.path, overwrite=self.overwrite)
        tmp = self._context.__enter__()
        self.data = create_zarr_volume(
            tmp, self.shape, self.dtype, self.voxel_size_angstrom, self.origin_angstrom, self.chunks
        )
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.data = None
        self._context.__exit__(exc_type, exc, tb)
