"""Particle lists: the canonical table and RELION 3/4/5, STOPGAP, Dynamo, CSV files and copick
projects.

Canonical table (pandas DataFrame), one row per particle:

    tomo        tomogram name (matches the MRC file stem / rlnTomoName)
    class_name  class name (or class number as text when no class table is given)
    x, y, z     position in voxels of the named tomogram, 0-based, voxel centre = integer
    score       confidence (NaN when unknown)
    rot, tilt, psi  optional, degrees, RELION ZYZ convention

Each format is one module in :mod:`cryocaps.io.formats` with a reader and a
writer, registered in :data:`READERS` / :data:`WRITERS` (:data:`PROJECT_WRITERS` for
formats written into an existing project rather than a new file: copick). The input
format is detected from the file (extension, STAR blocks and columns; a copick
``config.json``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cryocaps.classes import ClassTable
from cryocaps.errors import CryocapsError
from cryocaps.io.copick_project import CopickSelection, is_copick_config
from cryocaps.io.files import atomic_path, check_writable
from cryocaps.io.formats import copick, dynamo, relion, stopgap, table_csv
from cryocaps.io.formats.context import ANGLE_COLUMNS, CANONICAL_COLUMNS, XYZ, Geometry
from cryocaps.io.formats.star import loop_blocks, read_star
from cryocaps.io.layout import expand_volume_paths
from cryocaps.io.volumes import TomogramInfo, read_info

log = logging.getLogger(__name__)

__all__ = [
    "ANGLE_COLUMNS",
    "CANONICAL_COLUMNS",
    "FORMATS",
    "PROJECT_FORMATS",
    "check_format",
    "detect_format",
    "empty_table",
    "format_from_extension",
    "read_particles",
    "tomogram_infos",
    "write_particles",
    "convert_particles",
]

READERS = {
    "relion5": relion.read_relion5,
    "relion4": relion.read_relion4,
    "relion3": relion.read_relion3,
    "stopgap": stopgap.read_stopgap,
    "dynamo": dynamo.read_dynamo,
    "csv": table_csv.read_csv,
    "copick": copick.read_copick,
}
WRITERS = {
    "relion5": relion.write_relion5,
    "relion4": relion.write_relion4,
    "relion3": relion.write_relion3,
    "stopgap": stopgap.write_stopgap,
    "dynamo": dynamo.write_dynamo,
    "csv": table_csv.write_csv,
}
PROJECT_WRITERS = {"copick": copick.write_copick}  # (table, project, geometry, overwrite) -> files
FORMATS = tuple(WRITERS)  # formats written as a new file
PROJECT_FORMATS = tuple(PROJECT_WRITERS)
EXTENSIONS = {".star": "relion5", ".tbl": "dynamo", ".csv": "csv"}


def empty_table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            c: pd.Series(dtype=float if c in ("x", "y", "z", "score") else object)
            for c in CANONICAL_COLUMNS
        }
    )


# --- format detection -------------------------------------------------------------
def detect_format(path: str | os.PathLike) -> str:
    """The format of a particle file, from its extension and content."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix == ".json":
        if is_copick_config(path):
            return "copick"
        raise CryocapsError(
            f"{path}: a JSON file that is not a copick config.json (no pickable_objects)"
        )
    if suffix == ".tbl":
        return "dynamo"
    head = _head(path)
    if suffix == ".star" or "data_" in head or "loop_" in head:
        blocks = read_star(path)
        if "stopgap_motivelist" in blocks:
            return "stopgap"
        return relion.detect_version(blocks, path)
    first = next((line for line in head.splitlines() if line.strip()), "")
    if not first:
        raise CryocapsError(f"{path}: empty file (no particles and no format to detect)")
    if "," in first and "tomo" in first:
        return "csv"
    try:
        [dynamo.parse_number(token) for token in first.split()]
        return "dynamo"
    except ValueError:
        pass
    raise CryocapsError(
        f"{path}: unknown particle file format "
        "(expected .star, .tbl or .csv with tomo,x,y,z columns)"
    )


def _head(path: Path, n_bytes: int = 4096) -> str:
    try:
        with open(path, errors="replace") as handle:
            return handle.read(n_bytes)
    except OSError as error:
        raise CryocapsError(f"{path}: cannot read ({error.strerror or error})") from error


def format_from_extension(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix == ".json" and is_copick_config(path):
        return "copick"
    if suffix not in EXTENSIONS:
        raise CryocapsError(
            f"{path}: cannot tell the output format from the extension {suffix or '(none)'!r}; "
            f"give --format ({', '.join(FORMATS)})"
        )
    return EXTENSIONS[suffix]


# --- reading -------------------------------------------------------------------
def read_particles(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    tomograms: Sequence[TomogramInfo] | None = None,
    classes: ClassTable | None = None,
    coords_pixel_size_angstrom: float | None = None,
    copick: CopickSelection | None = None,
) -> pd.DataFrame:
    """Read one or more particle files (any supported format) into the canonical table.

    Parameters
    ----------
    paths : particle file(s); the format of each is detected from its content
    tomograms : geometry of the tomograms (see :func:`tomogram_infos`); needed for
        RELION 5 centred coordinates, for STOPGAP/Dynamo tomogram numbers, and to
        turn pixel coordinates of another pixel size into tomogram voxels
    classes : class table; class numbers in the files become its class names
    coords_pixel_size_angstrom : pixel size of the coordinates in RELION 3/4,
        STOPGAP and Dynamo files (overrides rlnTomoTiltSeriesPixelSize)
    copick : which picks of a copick project (user, session, objects) and at which
        voxel spacing

    Returns
    -------
    DataFrame with columns tomo, class_name, x, y, z, score (+ rot, tilt, psi)
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise CryocapsError("no particle files given")
    geometry = Geometry(list(tomograms or []), classes, coords_pixel_size_angstrom, copick)
    frames = []
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise CryocapsError(f"{path}: no such particle file")
        if path.is_dir():
            raise CryocapsError(f"{path}: is a folder, expected a particle file")
        format = detect_format(path)
        frame = _read_one(path, format, geometry)
        log.debug("%s: %d particles read as %s", path, len(frame), format)
        _warn_outside(frame, geometry, path)
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    if any(c in table.columns for c in ANGLE_COLUMNS):
        table[ANGLE_COLUMNS] = table.reindex(columns=ANGLE_COLUMNS).fillna(0.0)
    return table


def _read_one(path: Path, format: str, geometry: Geometry) -> pd.DataFrame:
    """One file through its format's reader; content a reader cannot take (text where a number
    belongs, a row cut short, a missing key) is the file's fault and named as such."""
    try:
        return READERS[format](path, geometry)
    except (ValueError, TypeError, KeyError, IndexError, OverflowError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CryocapsError(f"{path}: not a readable {format} particle file ({reason})") from error


def _warn_outside(table: pd.DataFrame, geometry: Geometry, path: Path) -> None:
    """Warn (and keep the rows) when particles lie outside their tomogram."""
    for name, rows in table.groupby("tomo", sort=False):
        info = geometry.tomogram(name)
        if info is None:
            continue
        size_xyz = np.array(info.shape[::-1], dtype=float)
        positions = rows[XYZ].to_numpy(dtype=float)
        outside = ((positions < -0.5) | (positions > size_xyz - 0.5)).any(axis=1)
        if outside.any():
            log.warning(
                "%s: %d of %d particles lie outside tomogram %s (size x,y,z %s); kept",
                path,
                int(outside.sum()),
                len(rows),
                name,
                "x".join(str(s) for s in info.shape[::-1]),
            )


# --- writing -------------------------------------------------------------------
def check_format(format: str) -> str:
    """``format`` if it names an output format, else a CryocapsError naming the choices."""
    if format not in WRITERS and format not in PROJECT_WRITERS:
        raise CryocapsError(
            f"--format {format!r}: unknown format; "
            f"use one of {', '.join(FORMATS + PROJECT_FORMATS)}"
        )
    return format


def write_particles(
    table: pd.DataFrame,
    path: str | os.PathLike,
    *,
    format: str | None = None,
    tomograms: Sequence[TomogramInfo] | None = None,
    classes: ClassTable | None = None,
    coords_pixel_size_angstrom: float | None = None,
    copick: CopickSelection | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the canonical table as ``format`` (None: from the extension) atomically.

    RELION 5 needs the tomograms' sizes and voxel sizes; RELION 3/4, STOPGAP and
    Dynamo write pixels of ``coords_pixel_size_angstrom`` when given (else the
    tomograms' own voxels); class names are numbered through ``classes``. copick
    writes into the existing project whose ``config.json`` is ``path``, as
    ``copick``'s user and session.
    """
    path = Path(path)
    format = check_format(format or format_from_extension(path))
    missing = [c for c in ("tomo", "class_name", *XYZ) if c not in table.columns]
    if missing:
        raise CryocapsError(f"particle table lacks column(s) {', '.join(missing)}")
    geometry = Geometry(list(tomograms or []), classes, coords_pixel_size_angstrom, copick)
    table = table.reset_index(drop=True)
    if not np.isfinite(table[XYZ].to_numpy(dtype=float)).all():
        raise CryocapsError(f"{path}: particle table has missing or non-finite x, y, z")
    if "score" not in table:
        table = table.assign(score=np.nan)
    if format in PROJECT_WRITERS:
        PROJECT_WRITERS[format](table, path, geometry, overwrite=overwrite)
        return path
    with atomic_path(path, overwrite=overwrite) as tmp:
        WRITERS[format](table, tmp, geometry, target=path)
    return path


def convert_particles(
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    format: str | None = None,
    tomograms: Sequence[TomogramInfo] | None = None,
    classes: ClassTable | None = None,
    coords_pixel_size_angstrom: float | None = None,
    copick: CopickSelection | None = None,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Read particle files and write them as one file of another format; returns the table.

    ``copick`` selects the picks read from a copick project (user, session,
    objects, voxel spacing) and, for ``format="copick"``, the user and session written.
    """
    output = Path(output)
    format = check_format(format or format_from_extension(output))
    if format not in PROJECT_WRITERS:
        check_writable(output, overwrite)
    reading = copick
    if format in PROJECT_WRITERS and copick is not None:  # --copick-user/-session name the writer
        reading = CopickSelection(
            objects=copick.objects, voxel_size_angstrom=copick.voxel_size_angstrom
        )
    table = read_particles(
        inputs,
        tomograms=tomograms,
        classes=classes,
        coords_pixel_size_angstrom=coords_pixel_size_angstrom,
        copick=reading,
    )
    write_particles(
        table,
        output,
        format=format,
        tomograms=tomograms,
        classes=classes,
        coords_pixel_size_angstrom=coords_pixel_size_angstrom,
        copick=copick,
        overwrite=overwrite,
    )
    return table


# --- tomogram geometry -------------------------------------------------------------
TOMOGRAMS_STAR_COLUMNS = [
    "rlnTomoName",
    "rlnTomoSizeX",
    "rlnTomoSizeY",
    "rlnTomoSizeZ",
    "rlnTomoTiltSeriesPixelSize",
]


def tomogram_infos(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[TomogramInfo]:
    """Geometry (name, shape zyx, voxel size) from MRC files, OME-Zarr images, folders of them,
    a copick ``config.json[:TYPE][@SPACING]`` or a RELION 5 tomograms.star.

    A tomograms.star gives sizes at bin 1 (``rlnTomoSizeX/Y/Z``, pixel size
    ``rlnTomoTiltSeriesPixelSize``); the tomogram's voxel size is that pixel size
    times ``rlnTomoTomogramBinning`` and its size in voxels the bin-1 size divided
    by the binning.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    infos: list[TomogramInfo] = []
    for path in paths:
        if Path(path).suffix.lower() == ".star" and Path(path).is_file():
            infos.extend(_tomograms_star(Path(path)))
        else:
            infos.extend(read_info(f) for f in expand_volume_paths([path], "--tomograms"))
    names = [info.name for info in infos]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise CryocapsError(f"--tomograms: tomogram name(s) given twice: {', '.join(duplicates)}")
    return infos


def write_tomograms_star(
    path: str | os.PathLike,
    infos: Sequence[TomogramInfo],
    tomogram_paths: Sequence[str] | None = None,
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.07,
    overwrite: bool = False,
) -> Path:
    """Write a RELION 5 ``tomograms.star`` (``data_global``) describing ``infos`` at binning 1.

    The reverse of reading one with :func:`tomogram_infos`: sizes in voxels,
    pixel size = the tomograms' voxel size, ``rlnTomoTomogramBinning`` 1.
    ``tomogram_paths`` fills ``rlnTomoReconstructedTomogram`` (relative to the
    project); the optics (kV, Cs in mm, amplitude contrast) fill the columns
    RELION 5 expects in every tomograms.star.
    """
    from cryocaps.io.formats.star import write_star

    path = Path(path)
    frame = pd.DataFrame(
        {
            "rlnTomoName": [info.name for info in infos],
            "rlnVoltage": float(voltage_kv),
            "rlnSphericalAberration": float(cs_mm),
            "rlnAmplitudeContrast": float(amplitude_contrast),
            "rlnMicrographOriginalPixelSize": [info.voxel_size_angstrom for info in infos],
            "rlnTomoHand": 1.0,
            "rlnTomoTiltSeriesPixelSize": [info.voxel_size_angstrom for info in infos],
            "rlnTomoSizeX": [info.shape[2] for info in infos],
            "rlnTomoSizeY": [info.shape[1] for info in infos],
            "rlnTomoSizeZ": [info.shape[0] for info in infos],
            "rlnTomoTomogramBinning": 1.0,
        }
    )
    if tomogram_paths is not None:
        frame["rlnTomoReconstructedTomogram"] = [str(p) for p in tomogram_paths]
    with atomic_path(path, overwrite=overwrite) as tmp:
        write_star({"global": frame}, tmp)
    return path


def tomogram_files(paths: Sequence[str | os.PathLike]) -> dict[str, Path]:
    """Tomogram name -> its MRC file or OME-Zarr image, for the tomograms :func:`tomogram_infos`
    reads from the same ``paths`` whose voxels can be found: every file, folder and copick
    project, and the ``rlnTomoReconstructedTomogram`` files of a RELION 5 tomograms.star that
    exist (relative to the STAR file's folder or to the working folder)."""
    from cryocaps.io.formats.context import clean_tomogram_name

    files: dict[str, Path] = {}
    for path in paths:
        if Path(path).suffix.lower() == ".star" and Path(path).is_file():
            frame = _tomograms_star_frame(Path(path))
            if "rlnTomoReconstructedTomogram" not in frame.columns:
                continue
            for name, text in zip(
                frame.rlnTomoName, frame.rlnTomoReconstructedTomogram, strict=True
            ):
                found = [p for p in (Path(path).parent / str(text), Path(str(text))) if p.exists()]
                if found:
                    files[clean_tomogram_name(name)] = found[0]
        else:
            files |= {read_info(f).name: f for f in expand_volume_paths([path], "--tomograms")}
    return files


def _tomograms_star_frame(path: Path) -> pd.DataFrame:
    """The tomogram table of a RELION 5 tomograms.star (its data_global block), checked."""
    from cryocaps.io.formats.context import require_columns

    loops = loop_blocks(read_star(path))
    frame = loops.get("global")
    if frame is None:
        frame = next((f for f in loops.values() if "rlnTomoSizeX" in f.columns), None)
    if frame is None:
        raise CryocapsError(
            f"{path}: not a RELION 5 tomograms.star: no data_global block with rlnTomoSizeX/Y/Z"
        )
    require_columns(frame, TOMOGRAMS_STAR_COLUMNS, path, "RELION 5 tomograms.star")
    return frame


def _tomograms_star(path: Path) -> list[TomogramInfo]:
    from cryocaps.io.formats.context import clean_tomogram_name

    frame = _tomograms_star_frame(path)
    infos = []
    for row in frame.itertuples(index=False):
        binning = float(getattr(row, "rlnTomoTomogramBinning", 1.0) or 1.0)
        size_xyz = [float(row.rlnTomoSizeX), float(row.rlnTomoSizeY), float(row.rlnTomoSizeZ)]
        pixel = float(row.rlnTomoTiltSeriesPixelSize)
        if not (pixel > 0 and binning > 0 and min(size_xyz) > 0):
            raise CryocapsError(
                f"{path}: tomogram {row.rlnTomoName}: sizes, pixel size and binning must be > 0"
            )
        shape = tuple(int(round(s / binning)) for s in size_xyz[::-1])
        infos.append(TomogramInfo(clean_tomogram_name(row.rlnTomoName), shape, pixel * binning))
    return infos
